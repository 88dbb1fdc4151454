"""What every system of bench/peers.py shares: the run's settings, the task, the clock.

`RunSpec` is one system's run (same model, data slices, batch, optimizer and
schedule for all); `Task` builds the model, optimizer and one worker's batches the
way `ps-worker` does (`worker_slice`, `BatchStream` seeded by rank, the same seed for
the initial weights); `Recorder` keeps a run's progress trace (absolute time, samples
done) and its weight snapshots (a copy every `snapshot_every` seconds, a few
microseconds per call otherwise) for the held-out evaluation after the run, so the
evaluation never competes with the training for CPU. `straggle` is the one straggler
mechanism: sleep (F-1) x the compute time just measured; `RunSpec.jitter_of` gives each
worker its transient-straggler pauses (asyncps_common/jitter.py, as `ps-worker --jitter`). Nothing here is thread-safe
except where a caller holds its own lock (the rpc-ps server does).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from asyncps_common.jitter import Jitter
from worker.data import BatchStream, Corpus, default_corpus_path, worker_slice
from worker.task import ByteGPT, TaskConfig


@dataclass
class RunSpec:
    """One system's run; picklable, handed to spawned processes."""

    system: str
    scenario: str  # "uniform", "straggler" or "jitter"
    workers: int
    out: str  # this run's folder
    budget: float = 60.0  # seconds of training after the first step
    batch_size: int = 16
    lr: float = 6e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup: int = 100
    task: TaskConfig = field(default_factory=TaskConfig)
    data: str | None = None
    seed: int = 0
    device: str = "cpu"
    slowdown: float = 3.0  # the straggler's factor (straggler scenario only)
    snapshot_every: float = 1.0
    threads: int = 0  # torch threads per process (0: cores / processes)
    flush_denormal: bool = True  # on the CPU, denormal floats become zero (ps-worker's default)
    jitter_probability: float = 0.1  # jitter scenario: each step pauses with this probability
    jitter_factor: float = 4.0  # ... for this many times its compute time
    local_steps: int = 4  # diloco-gloo and asyncps's local-steps rows: H
    outer_lr: float | None = None  # their outer lr (None: asyncps's default, 1 with averaging, 0.6/P without)
    outer_momentum: float = 0.0  # > 0: outer SGD with Nesterov momentum
    lookahead: float = 0.0  # asyncps's asynchronous local-steps rows: ps-worker --lookahead

    def slowdown_of(self, rank: int) -> float:
        """The last worker is the straggler; everyone else runs at full speed."""
        return self.slowdown if self.scenario == "straggler" and rank == self.workers - 1 else 1.0

    def jitter_args(self) -> tuple[float, float]:
        """(P, F) of the jitter scenario; (0, 0) otherwise."""
        return (self.jitter_probability, self.jitter_factor) if self.scenario == "jitter" else (0.0, 0.0)

    def jitter_of(self, rank: int) -> Jitter:
        """Worker `rank`'s pauses, the same sequence as `ps-worker --jitter P,F --seed S --rank r`."""
        return Jitter(*self.jitter_args(), seed=self.seed, rank=rank)

    def threads_for(self, processes: int) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // processes)

    def prepare_process(self, processes: int) -> None:
        """Set this process's torch threads (one of `processes` sharing the cores) and denormal mode."""
        torch.set_num_threads(self.threads_for(processes))
        if self.flush_denormal and self.device == "cpu":
            torch.set_flush_denormal(True)

    def asdict(self) -> dict:
        d = dataclasses.asdict(self)
        d["task"] = self.task.to_metadata()
        return d


def lr_at(spec: RunSpec, update: int) -> float:
    """The project's schedule: linear warm-up over the first `warmup` updates (ps_server/store.py)."""
    return spec.lr * min(1.0, (update + 1) / spec.warmup) if spec.warmup else spec.lr


def make_optimizer(spec: RunSpec, params) -> torch.optim.Optimizer:
    """torch.optim.AdamW with the project's defaults (eps 1e-8, no weight decay unless asked)."""
    fused = True if spec.device == "cpu" or spec.device.startswith("cuda") else None
    return torch.optim.AdamW(
        list(params), lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=1e-8, weight_decay=spec.weight_decay, fused=fused
    )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class Task:
    """Model and batches of worker `rank` of `world`, built as ps-worker builds them."""

    def __init__(self, spec: RunSpec, rank: int, world: int, corpus: Corpus | None = None):
        self.spec = spec
        self.device = torch.device(spec.device)
        corpus = corpus or Corpus.load(spec.data or default_corpus_path(), context=spec.task.context)
        part = worker_slice(corpus.train, rank, world)
        torch.manual_seed(spec.seed)  # the same initial weights in every system and process
        self.model = ByteGPT(spec.task).to(self.device)
        self.stream = BatchStream(part, spec.batch_size, spec.task.context, seed=spec.seed * 1000 + rank + 1)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.next()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def straggle(compute_seconds: float, slowdown: float) -> None:
    """The straggler: sleep (slowdown - 1) x the compute time just measured (as ps-worker --slowdown)."""
    if slowdown > 1:
        time.sleep((slowdown - 1) * compute_seconds)


class Recorder:
    """Progress trace and timed weight snapshots of one process, saved to `path` at the end."""

    def __init__(self, snapshot_every: float):
        self.every = snapshot_every
        self.trace: list[tuple[float, int]] = []
        self.snapshots: list[tuple[float, dict[str, torch.Tensor]]] = []
        self.t_start: float | None = None
        self._next_snap = 0.0

    def start(self, t: float | None = None) -> float:
        self.t_start = time.time() if t is None else t
        self._next_snap = self.t_start + self.every
        self.trace.append((self.t_start, 0))
        return self.t_start

    def progress(self, samples: int, model: torch.nn.Module | None = None) -> float:
        """Note `samples` done by now; snapshot `model`'s weights when one is due. Returns now."""
        now = time.time()
        self.trace.append((now, samples))
        if model is not None and now >= self._next_snap:
            self._next_snap = now + self.every
            self.snapshots.append((now, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}))
        return now

    def save(self, path: Path, **extra: object) -> None:
        torch.save({"t_start": self.t_start, "trace": self.trace, "snapshots": self.snapshots, **extra}, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples_per_second(trace: list[tuple[float, int]], t_start: float) -> float | None:
    """Samples done over the training phase: from the first step's start to the last trace point."""
    if not trace:
        return None
    t_end, samples = max(trace)
    return samples / (t_end - t_start) if t_end > t_start and samples > 0 else None


def merge_traces(traces: list[list[tuple[float, int]]]) -> list[tuple[float, int]]:
    """Sum per-process traces into one (each process's count held at its latest value), up to
    the earliest last point, so no process's count is extrapolated."""
    traces = [sorted(t) for t in traces if t]
    if not traces:
        return []
    end = min(t[-1][0] for t in traces)
    times = sorted({p[0] for t in traces for p in t if p[0] <= end})
    out, idx, cur = [], [0] * len(traces), [0] * len(traces)
    for now in times:
        for i, t in enumerate(traces):
            while idx[i] < len(t) and t[idx[i]][0] <= now:
                cur[i] = t[idx[i]][1]
                idx[i] += 1
        out.append((now, sum(cur)))
    return out


def run_in_gloo_group(spec: RunSpec, rank: int, port: int, train: Callable[[RunSpec, int], None]) -> None:
    """Join a gloo process group of spec.workers ranks on 127.0.0.1:port, run `train`, leave together."""
    import torch.distributed as dist

    spec.prepare_process(spec.workers)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=spec.workers,
        timeout=timedelta(seconds=120),
    )
    try:
        train(spec, rank)
        dist.barrier()  # rank 0 saves its trace first; leaving together, gloo's teardown is clean
    finally:
        dist.destroy_process_group()
