"""`ps-cost calibrate`: short probes on this machine that feed the cost model.

Probes, each small and each run with what the main job runs:

* compute: P worker processes at once (P = 1, 2, 4; each with ps-cluster's cores/P torch
  threads) run forward + backward of the built-in model; a barrier starts every iteration
  together, as one averaged clock does, so both the lockstep (slowest worker) and the
  mean time of an iteration are measured, cores or a GPU shared included; after each, one
  step of the worker's own AdamW, what a `--local-steps` worker adds per iteration;
* comm: the same processes as clients of S real `ps-server` shards (S = 1, 2), pulling and
  pushing a model of the probed sizes through the real `PSClient` with nothing computed,
  s = 0 and one averaged AdamW update per clock: seconds per clock against bytes, S and P;
* apply: the shard store's optimizer step in this process (GB/s);
* startup: real `ps-cluster` runs of one iteration per worker, timed from launch to exit,
  in the default mode and with `--local-steps`.

The probe processes are spawned once and reused (`ProbePool`); everything blocks the
caller, nothing is thread-safe. `calibrate()` returns the calibration dict; `machine()`
says where it was measured.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.cost.model import threads_for
from worker.cost.servers import FlatModel, apply_rates, start_servers, stop_servers

log = logging.getLogger(__name__)
FORMAT = "asyncps-cost/1"


@dataclass(frozen=True)
class ModelSpec:
    """One built-in model size as ps-cluster's flags give it."""

    name: str
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    context: int = 128
    batch_size: int = 16

    def task(self) -> dict:
        return {"d_model": self.d_model, "n_layer": self.n_layer, "n_head": self.n_head, "context": self.context}

    def flags(self) -> list[str]:
        return [
            "--d-model",
            str(self.d_model),
            "--n-layer",
            str(self.n_layer),
            "--n-head",
            str(self.n_head),
            "--context",
            str(self.context),
            "--batch-size",
            str(self.batch_size),
        ]

    @property
    def params(self) -> int:
        from worker.task import ByteGPT, TaskConfig

        return sum(p.numel() for p in ByteGPT(TaskConfig(**self.task())).parameters())

    @property
    def tokens(self) -> int:
        return self.batch_size * self.context


# small: the main job's model; wide: 7x the bytes and 1/8 the batch, where communication dominates
PRESETS = {
    "small": ModelSpec("small"),
    "wide": ModelSpec("wide", d_model=256, n_layer=4, n_head=4, batch_size=2),
    "tiny": ModelSpec("tiny", d_model=32, n_layer=1, n_head=2, context=32, batch_size=8),
}


@dataclass
class Settings:
    models: list[ModelSpec] = field(default_factory=lambda: [PRESETS["small"], PRESETS["wide"]])
    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    servers: list[int] = field(default_factory=lambda: [1, 2])
    startup: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1), (4, 2)])
    startup_local_steps: int = 4  # the start-up probes again with --local-steps H (0: not)
    iters: int = 12  # timed iterations per compute probe (after 3 warm-up ones)
    clocks: int = 12  # timed clocks per comm probe (after 3 warm-up ones)
    rounds: int = 2  # compute probes repeated, apart in time; the faster counts
    device: str = "cpu"
    data: str | None = None  # ps-cluster --data for the start-up probes
    cluster_flags: list[str] = field(default_factory=list)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count() or 1,
        "cpu_model": cpu,
        "gpu": gpu,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# -- probe processes ----------------------------------------------------------------------


def _compute_probe(rank: int, barrier, task: dict, batch: int, threads: int, iters: int, device: str) -> dict:
    """Times of forward + backward per iteration ("iter"), and of one step of the inner optimizer
    a `--local-steps` worker runs after each ("inner", timed apart, outside the barrier's lockstep)."""
    from asyncps_common.optimizer import default_config
    from worker.local_steps import inner_optimizer
    from worker.task import ByteGPT, TaskConfig

    torch.set_num_threads(threads)
    torch.manual_seed(rank)
    dev = torch.device(device)
    cfg = TaskConfig(**task)
    model = ByteGPT(cfg).to(dev)
    x = torch.randint(0, cfg.vocab, (batch, cfg.context), device=dev)
    y = torch.randint(0, cfg.vocab, (batch, cfg.context), device=dev)
    inner = inner_optimizer(default_config("adamw"), model.parameters())  # ps-cluster's training optimizer
    times, steps = [], []
    for i in range(3 + iters):
        if barrier is not None:
            barrier.wait(timeout=300)
        t0 = time.perf_counter()
        loss = model.loss(x, y)
        loss.backward()
        float(loss.detach())  # synchronizes the device, as the worker's loop does
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        inner.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        step = time.perf_counter() - t1
        for p in model.parameters():
            p.grad = None  # the client's push() leaves the gradients None
        if i >= 3:
            times.append(dt)
            steps.append(step)
    return {"iter": times, "inner": steps}


def _comm_probe(
    rank: int, barrier, addresses: list[str], nbytes: int, clocks: int, threads: int, tag: str
) -> list[float]:
    from worker import PSClient

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = FlatModel(nbytes)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    times = []
    opt = {"name": "adamw", "lr": 1e-3, "average_gradients": True}
    with PSClient(addresses, model, optimizer=opt, staleness=0, worker_id=f"probe-{tag}-{rank}") as ps:
        if barrier is not None:
            barrier.wait(timeout=300)
        for i in range(3 + clocks):
            t0 = time.perf_counter()
            ps.pull()
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            ps.push()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        ps.wait()
    return times


def _serve(rank: int, conn, barriers: dict) -> None:
    """A probe process: run what the parent sends until it sends None."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, parties, kwargs = msg
        barrier = barriers.get(parties)
        try:
            fn = _compute_probe if kind == "compute" else _comm_probe
            conn.send(("ok", fn(rank, barrier, **kwargs)))
        except Exception as exc:  # reported to the parent, which raises it
            if barrier is not None:
                barrier.abort()
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProbePool:
    """`size` spawned processes; `run(kind, p, **kw)` runs a probe in the first p of them at once."""

    def __init__(self, size: int, parties: list[int]):
        ctx = mp.get_context("spawn")
        self.barriers = {p: ctx.Barrier(p) for p in parties if p > 1}
        self.conns, self.procs = [], []
        for r in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(r, child, self.barriers), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, kind: str, parties: int, **kwargs) -> list:
        for b in self.barriers.values():
            b.reset()
        for c in self.conns[:parties]:
            c.send((kind, parties, kwargs))
        results = [c.recv() for c in self.conns[:parties]]
        errors = [r[1] for r in results if r[0] != "ok"]
        if errors:
            raise RuntimeError(f"{kind} probe failed: {errors[0]}")
        return [r[1] for r in results]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def lockstep(times: list[list[float]]) -> tuple[float, float]:
    """(median over iterations of the slowest process, median over every process and iteration).

    Medians, so that a burst of load from outside the probe moves a calibration little.
    """
    n = min(len(t) for t in times)
    slowest = [max(t[i] for t in times) for i in range(n)]
    return statistics.median(slowest), statistics.median(x for t in times for x in t[:n])


# -- the probes ---------------------------------------------------------------------------


def probe_compute(pool: ProbePool, s: Settings, cores: int) -> list[dict]:
    """Every (model, P) probe `s.rounds` times, the rounds apart in time; the faster round counts.

    A calibration describes the machine, not a burst of someone else's load during one probe.
    """
    best: dict[tuple[str, int], tuple[float, float, float]] = {}
    for _ in range(s.rounds):
        for m in s.models:
            for p in s.workers:
                runs = pool.run(
                    "compute",
                    p,
                    task=m.task(),
                    batch=m.batch_size,
                    threads=threads_for(p, cores),
                    iters=s.iters,
                    device=s.device,
                )
                lock, mean = lockstep([r["iter"] for r in runs])
                inner = statistics.median(x for r in runs for x in r["inner"])
                log.info(
                    "compute %s P=%d: lockstep %.1f ms, mean %.1f ms, inner step %.2f ms",
                    *(m.name, p, lock * 1e3, mean * 1e3, inner * 1e3),
                )
                old = best.get((m.name, p))
                best[(m.name, p)] = (lock, mean, inner) if old is None or lock < old[0] else old
    return [
        {
            "model": m.name,
            "params": m.params,
            "tokens": m.tokens,
            "workers": p,
            "threads": threads_for(p, cores),
            "lockstep_seconds": best[(m.name, p)][0],
            "mean_seconds": best[(m.name, p)][1],
            "inner_step_seconds": best[(m.name, p)][2],
        }
        for m in s.models
        for p in s.workers
    ]


def probe_comm(pool: ProbePool, s: Settings, cores: int, workdir: Path) -> list[dict]:
    rows = []
    for m in s.models:
        nbytes = 4 * m.params
        for n in s.servers:
            procs, addrs = start_servers(n, workdir, extra=["--staleness", "0"])
            try:
                for p in s.workers:
                    times = pool.run(
                        "comm",
                        p,
                        addresses=addrs,
                        nbytes=nbytes,
                        clocks=s.clocks,
                        threads=threads_for(p, cores),
                        tag=f"{m.name}-{n}-{p}",
                    )
                    clock = statistics.median(x for t in times for x in t)
                    rows.append({"model": m.name, "bytes": nbytes, "servers": n, "workers": p, "clock_seconds": clock})
                    log.info("comm %s S=%d P=%d: %.1f ms per clock", m.name, n, p, clock * 1e3)
            finally:
                stop_servers(procs)
    return rows


def run_cluster(
    out: Path,
    model: ModelSpec,
    workers: int,
    servers: int,
    steps: int,
    data: str | None,
    extra: list[str],
    timeout: float = 900,
) -> tuple[float, dict]:
    """One real ps-cluster run; (wall seconds from launch to exit, its summary.json).

    The launcher dies with this process (parent-death signal), and is stopped on any error here.
    """
    import json

    from worker.procs import Children

    argv = [
        "--workers",
        str(workers),
        "--servers",
        str(servers),
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--no-progress",
        *model.flags(),
        *extra,
    ]
    if data:
        argv += ["--data", data]
    out.parent.mkdir(parents=True, exist_ok=True)
    children = Children(out.parent)
    t0 = time.perf_counter()
    child = children.start(out.name, "worker.cluster", argv)
    try:
        code = child.proc.wait(timeout=timeout)
    finally:
        children.stop_all()
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(
            f"ps-cluster {' '.join(argv)} failed ({code}): " + " | ".join(child.log_tail(5).splitlines())
        )
    return wall, json.loads((out / "summary.json").read_text())


def probe_startup(s: Settings, workdir: Path) -> list[dict]:
    """One-step ps-cluster runs at each P:S of `s.startup`, in the default mode and (unless
    `s.startup_local_steps` is 0) with --local-steps: a local-steps worker builds its own
    optimizer, which made that mode start up 2.2-3.7 s slower while it was torch.optim's (its
    first use imports torch._dynamo); with asyncps_common/fused.py both start alike, and the
    probes keep measuring rather than assuming it."""
    rows = []
    modes = [0] + ([s.startup_local_steps] if s.startup_local_steps else [])
    for m in s.models:
        for h in modes:
            for p, n in s.startup:
                name = f"startup-{m.name}-{p}-{n}" + (f"-local{h}" if h else "")
                extra = [*s.cluster_flags, *(["--local-steps", str(h)] if h else [])]
                wall, summary = run_cluster(workdir / name, m, p, n, p, s.data, extra)
                rows.append(
                    {
                        "model": m.name,
                        "params": m.params,
                        "tokens": m.tokens,
                        "workers": p,
                        "servers": n,
                        "steps": p,
                        "local_steps": h,
                        "wall_seconds": wall,
                        "summary_wall_seconds": summary["wall_seconds"],
                    }
                )
                log.info("startup %s P=%d S=%d local steps %d: %.1f s", m.name, p, n, h, wall)
    return rows


def from_summaries(paths: list[str]) -> dict:
    """A calibration from finished ps-cluster runs' summary.json files instead of probes.

    Each run gives one point of each kind at its own P and S: compute = its T_task, one
    clock's communication = its T_comm (which, in lockstep, includes waiting for the other
    workers), start-up = its wall time less all but one of its clocks. Less exact than the
    probes (the launcher's own start is not in `wall_seconds`), but free.
    """
    import json

    rows: dict[str, list[dict]] = {"compute": [], "comm": [], "startup": []}
    for path in paths:
        s = json.loads(Path(path).read_text())
        if s.get("local_steps"):  # T_task would include the inner steps, T_comm a share of each exchange
            raise ValueError(f"{path} is a run with --local-steps: calibrate from runs without it")
        task = s.get("task", {})
        tokens = int(s["batch_size"]) * int(task.get("context", 128))
        p, n, params = int(s["workers"]), int(s["servers"]), int(s["parameters"])
        clock = s["t_task_seconds"] + s["t_comm_seconds"]
        rows["compute"].append(
            {
                "model": path,
                "params": params,
                "tokens": tokens,
                "workers": p,
                "lockstep_seconds": s["t_task_seconds"],
                "mean_seconds": s["t_task_seconds"],
            }
        )
        rows["comm"].append(
            {"model": path, "bytes": 4 * params, "servers": n, "workers": p, "clock_seconds": s["t_comm_seconds"]}
        )
        clocks = -(-int(s["iterations"]) // p)
        rows["startup"].append(
            {
                "model": path,
                "params": params,
                "tokens": tokens,
                "workers": p,
                "servers": n,
                "steps": int(s["iterations"]),
                "wall_seconds": s["wall_seconds"] - (clocks - 1) * clock,
            }
        )
    return {"format": FORMAT, "machine": machine(), "settings": {"device": "cpu", "from_summaries": paths}, **rows}


def calibrate(s: Settings) -> dict:
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    result: dict = {
        "format": FORMAT,
        "machine": machine(),
        "settings": {
            "device": s.device,
            "staleness": 0,
            "average_gradients": True,
            "optimizer": "adamw",
            "threads": "cores // workers",
            "data": s.data or "standard library",
            "cluster_flags": s.cluster_flags,
        },
        "models": [{"name": m.name, **m.task(), "batch_size": m.batch_size, "params": m.params} for m in s.models],
    }
    load = os.getloadavg()[0]
    if load > cores / 2:
        log.warning("load average %.1f on %d cores before calibrating: other jobs will slow the probes", load, cores)
    result["load_average"] = {"start": load}
    pool = ProbePool(max(s.workers), s.workers)
    try:
        with tempfile.TemporaryDirectory(prefix="asyncps-cost-") as tmp:
            result["compute"] = probe_compute(pool, s, cores)
            result["comm"] = probe_comm(pool, s, cores, Path(tmp))
            pool.close()
            big = max(4 * m.params for m in s.models)
            result["apply"] = {f"{k}_gbps": statistics.median(v) for k, v in apply_rates(big, 3).items()}
            result["startup"] = probe_startup(s, Path(tmp))
    finally:
        pool.close()
    result["calibration_seconds"] = time.perf_counter() - t0
    result["load_average"]["end"] = os.getloadavg()[0]
    return result
