"""The built-in training loop: one worker of the byte-level LM task against asyncps.

`train(cfg)` loads the corpus, takes this worker's disjoint slice of the training
split, builds the model on its device (CUDA when present and asked for), and runs
`cfg.steps` iterations through `PSClient`. Each iteration is timed in two parts:
compute (forward + backward: T_task) and the communication the worker was blocked
on (pull + push: the exposed T_comm). Progress goes to a JSON-lines report file that
`ps-cluster` follows. Blocks for the whole run; not thread-safe.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from asyncps_common.jitter import Jitter
from asyncps_common.security import NONE, Security
from protos.asyncps.v1 import ps_pb2 as pb
from worker.client import PSClient
from worker.data import BatchStream, Corpus, default_corpus_path, worker_slice
from worker.groups import no_decay_groups
from worker.local_steps import LocalSteps
from worker.metrics import WorkerMetrics
from worker.rpc import CallOptions
from worker.task import ByteGPT, TaskConfig

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    servers: list[str]
    optimizer: pb.OptimizerConfig
    task: TaskConfig = field(default_factory=TaskConfig)
    data: str | None = None
    rank: int = 0
    world: int = 1
    worker_id: str | None = None
    staleness: float = math.inf
    pipeline: bool = False
    prefetch: int = 1  # with pipeline: pulls of that many future clocks in flight (needs staleness >= prefetch)
    flush_denormal: bool = True  # on the CPU: denormal floats become zero (process-wide while train runs)
    batch_size: int = 16
    steps: int = 100
    device: str = "auto"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: leave torch's default
    slowdown: float = 1.0  # >1: sleep (slowdown-1) x compute time per step (a straggler)
    jitter: tuple[float, float] = (0.0, 0.0)  # (P, F): with probability P per step sleep F x compute
    report: str | None = None  # JSON-lines progress file
    report_every: float = 0.5  # seconds between progress lines
    snapshot_dir: str | None = None  # write the pulled weights here every `snapshot_every` seconds
    snapshot_every: float = 0.0
    first_step: int = 0  # steps done by an earlier life of this worker (ps-cluster restarted it)
    metrics: WorkerMetrics | None = None  # Prometheus metrics to record into (PSClient makes its own if None)
    options: CallOptions = field(default_factory=CallOptions)
    security: Security = NONE  # TLS and auth token (asyncps_common/security.py)
    decay_all: bool = True  # weight decay on every parameter (False: not on biases, norms, embeddings)
    compression: str = "none"  # bytes on the wire: none, bf16, fp16, onebit (protos/compress.py)
    local_steps: int = 0  # > 0: inner-optimizer steps per push (worker/local_steps.py); `optimizer` is then
    inner: pb.OptimizerConfig | None = None  # the servers' outer one and this the worker's own
    lookahead: float = 0.0  # local steps: start ahead of each pull (worker/local_steps.py)


def model_params(model: torch.nn.Module, weight_decay: float, decay_all: bool = True):
    """What the built-in task hands PSClient (and the exporter, whose plan must match): the model,
    or with weight decay and not `decay_all`, two groups leaving biases, LayerNorm weights and
    embeddings undecayed."""
    if decay_all or weight_decay <= 0:
        return model
    return no_decay_groups(model, weight_decay)


def pick_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    return torch.device(name)


class _Report:
    """Appends JSON lines to the report file (if any), flushed so others can follow it."""

    def __init__(self, path: str | None):
        self._f = open(path, "a", buffering=1) if path else None

    def write(self, **record: object) -> None:
        if self._f:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._f:
            self._f.close()


class _Snapshots:
    """The weights just pulled, saved every `every` seconds as `weights-<rank>-<clock>.safetensors`
    in `directory` (metadata: `time`, Unix seconds of the pull; written whole or not at all),
    so others can evaluate the model over time without reading the servers. Costs one 4-bytes-
    per-parameter write, no fsync, per snapshot."""

    def __init__(self, directory: str | None, every: float, rank: int):
        self.dir = Path(directory) if directory and every > 0 else None
        self.every, self.rank, self.last = every, rank, -math.inf
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def maybe(self, model: torch.nn.Module, clock: int) -> None:
        now = time.time()
        if self.dir is None or now - self.last < self.every:
            return
        self.last = now
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        path = self.dir / f"weights-{self.rank}-{clock:08d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"time": repr(now), "clock": str(clock)})
        os.replace(tmp, path)


def train(cfg: WorkerConfig) -> dict:
    """Run this worker's iterations; returns its final statistics (also the report's last line)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    corpus = Corpus.load(cfg.data or default_corpus_path(), context=cfg.task.context)
    part = worker_slice(corpus.train, cfg.rank, cfg.world)
    if part.numel() <= cfg.task.context + 1:
        raise ValueError(
            f"worker {cfg.rank} of {cfg.world} gets only {part.numel()} training bytes; use fewer workers or more data"
        )
    torch.manual_seed(cfg.seed)  # every worker builds the same initial model; the first Init wins
    model = ByteGPT(cfg.task).to(device)
    # a restarted worker (first_step > 0) draws fresh batches rather than replaying its first ones
    stream = BatchStream(
        part, cfg.batch_size, cfg.task.context, seed=cfg.seed * 1000 + cfg.rank + 1 + 7919 * cfg.first_step
    )
    report = _Report(cfg.report)
    t_task = t_comm = 0.0
    samples = 0
    losses: list[float] = []
    start = last_report = time.perf_counter()
    # A model trained on stale weights can saturate its softmax; the tiny probabilities it then
    # makes are denormal floats, which took forward+backward from 56 to 109 ms on this CPU.
    flushing = device.type == "cpu" and cfg.flush_denormal and torch.set_flush_denormal(True)
    try:
        local = (
            LocalSteps(
                model,
                cfg.inner or cfg.optimizer,
                cfg.local_steps,
                cfg.first_step,
                lookahead=cfg.lookahead,
                workers=cfg.world,
                push_from_pull=cfg.optimizer.update_rule == "elastic",
            )
            if cfg.local_steps
            else None
        )
        params = model_params(model, cfg.optimizer.weight_decay, cfg.decay_all)
        with PSClient(
            cfg.servers,
            params,
            optimizer=cfg.optimizer,
            staleness=cfg.staleness,
            worker_id=cfg.worker_id,
            pipeline=cfg.pipeline,
            prefetch=cfg.prefetch,
            options=cfg.options,
            metrics=cfg.metrics,
            security=cfg.security,
            batch_size=cfg.local_steps or cfg.batch_size,
            compression=cfg.compression,
        ) as ps:
            metrics = ps.metrics
            metrics.target_steps.set(cfg.steps)
            report.write(
                event="start",
                rank=cfg.rank,
                clock=ps.clock,
                first_step=cfg.first_step,
                device=str(device),
                params=sum(p.numel() for p in model.parameters()),
                t=0.0,
            )
            snapshots = _Snapshots(cfg.snapshot_dir, cfg.snapshot_every, cfg.rank)
            jitter = Jitter(*cfg.jitter, seed=cfg.seed, rank=cfg.rank)
            step = cfg.first_step
            while step < cfg.steps:
                t0 = time.perf_counter()
                ps.pull()
                snapshots.maybe(model, ps.clock)
                t1 = time.perf_counter()
                if local is None:
                    batch = ps.batch_size  # cfg.batch_size unless the shards balance batches by speed
                    x, y = stream.next(batch)
                    loss = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    loss.backward()
                    loss_value, done, weight = float(loss.detach()), 1, batch  # float() synchronizes the device
                else:  # H inner steps (the servers' share of H with dynamic local steps), then the pseudo-gradient
                    batch = cfg.batch_size
                    done = min(ps.batch_size, cfg.steps - step)
                    loss_value = local.run(model, stream, batch, device, done, ps.stats.reregistrations)
                    metrics.local_steps.set(done)
                    metrics.lookahead_ratio.set(local.lookahead_ratio)
                    weight = done
                t2 = time.perf_counter()
                if cfg.slowdown > 1:
                    time.sleep((cfg.slowdown - 1) * (t2 - t1))
                jitter.pause(t2 - t1, done)
                t3 = time.perf_counter()
                ps.push(samples=weight, busy_seconds=t3 - t1)
                t4 = time.perf_counter()
                step += done
                samples += batch * done
                t_task += t2 - t1
                t_comm += (t1 - t0) + (t4 - t3)
                losses.append(loss_value)
                metrics.step(t4 - t0, t2 - t1, (t1 - t0) + (t4 - t3), loss_value, batch * done, ps.clock)
                if t4 - last_report >= cfg.report_every or step >= cfg.steps:
                    last_report = t4
                    recent = losses[-20:]
                    report.write(
                        event="progress",
                        rank=cfg.rank,
                        step=step,
                        clock=ps.clock,
                        loss=sum(recent) / len(recent),
                        t=t4 - start,
                        samples=samples,
                        batch=batch,
                        t_task=t_task,
                        t_comm=t_comm,
                    )
            t5 = time.perf_counter()
            ps.wait()
            t_comm += time.perf_counter() - t5
            stats = ps.stats
        n = max(1, step - cfg.first_step)  # iterations (batches): with local steps, H per push
        result = dict(
            event="done",
            rank=cfg.rank,
            steps=step,
            t=time.perf_counter() - start,
            t_task_seconds=t_task / n,
            t_comm_seconds=t_comm / n,
            bound_wait_seconds=stats.bound_wait_seconds / n,
            final_loss=sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            first_step=cfg.first_step,
            samples=samples,
            reregistrations=stats.reregistrations,
            pushes_dropped=stats.pushes_dropped,
            max_update_staleness=stats.max_update_staleness,
        )
        report.write(**result)
        return result
    finally:
        report.close()
        if flushing:
            torch.set_flush_denormal(False)
