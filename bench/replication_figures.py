"""The replicated-shard figures of `python bench/faults.py --replication` (see its docstring)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from faults import ROOT, pid_of, step, wait

RESULTS = ROOT / "bench" / "results" / "faults-replication.json"
SHARD_MB = 64


def _stat(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def _run(cmd: list[str], out: Path, kill: str | None) -> tuple[float | None, dict]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stall = None
    if kill:
        wait(lambda: step(out, "worker-0") >= 60)
        os.kill(pid_of(out, kill), signal.SIGKILL)
        killed = time.monotonic()
        before = step(out, "worker-0")
        wait(lambda: step(out, "worker-0") >= before + 3)
        stall = time.monotonic() - killed
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-3000:])
    return stall, json.loads((out / "summary.json").read_text())


class _Pusher:
    """Pushes one 64 MB gradient after another to the head (a worker that never stops), timing each."""

    def __init__(self, stub, session: int):
        import threading

        self.stub, self.session, self.clock = stub, session, 1
        self.times: list[tuple[float, float]] = []  # (start, seconds) of each push
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from protos import wire
        from protos.asyncps.v1 import ps_pb2 as pb

        grad = torch.randn(SHARD_MB << 18) * 1e-6
        while not self.stop.is_set():
            push = pb.PushHeader(worker_id="bench", session=self.session, plan_hash="bench", clock=self.clock)
            t0 = time.monotonic()
            self.stub.Push(iter([wire.encode_frame(pb.Frame(push=push)), *wire.chunk_frames(grad)]), timeout=120)
            self.times.append((t0, time.monotonic() - t0))
            self.clock += 1

    def between(self, t0: float, t1: float) -> list[float]:
        """Seconds of every push that was in flight at some time in [t0, t1]."""
        return [d for start, d in self.times if start <= t1 and start + d >= t0]


def _transfer(root: Path, repeats: int) -> tuple[list[float], list[float], list[float]]:
    """Seconds the head spends snapshotting and sending a 64 MB shard to a joining replica while a
    worker pushes to it without pause; with the longest push during each join and the median push
    before it (a worker waits out the transfer only if the first is many times the second)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from integration.chains import free_ports, start_arbiter, status  # noqa: E402

    from asyncps_common.optimizer import default_config
    from protos import wire
    from protos.asyncps.v1 import ps_pb2 as pb
    from worker.rpc import wait_serving

    class Group:  # the tests' ProcessGroup, minimal: every process started is stopped
        procs: list[subprocess.Popen] = []

        def popen(self, args, **kw):
            p = subprocess.Popen(args, cwd=ROOT, **kw)
            self.procs.append(p)
            return p

    group = Group()
    shutil.rmtree(root, ignore_errors=True)  # an earlier run's arbiter state and logs would mislead this one
    root.mkdir(parents=True)
    seconds: list[float] = []
    longest: list[float] = []
    usual: list[float] = []
    pusher = None
    try:
        arbiter = start_arbiter(group, root)
        a, b = (f"127.0.0.1:{p}" for p in free_ports(2))
        chain = f"{a}|{b}"

        def start(k: int, port: str) -> subprocess.Popen:
            args = [sys.executable, "-m", "ps_server.cli", "--port", port, "--replicas", chain]
            args += ["--replica-index", str(k), "--arbiter", arbiter, "--max-shard-bytes", str(1 << 30)]
            with open(root / f"replica-{k}.log", "ab") as log:
                return group.popen(args, stdout=log, stderr=log)

        start(0, a.rsplit(":", 1)[1])
        wait_serving(a, timeout=60)
        wait(lambda: status(a).role == "head", 60)
        numel = SHARD_MB << 18
        import grpc

        from protos import service

        with grpc.insecure_channel(a, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            head = pb.InitHeader(plan_hash="bench", shard_index=0, num_shards=1, numel=numel, worker_id="bench")
            head.optimizer.CopyFrom(default_config(name="sgd", momentum=0.9))
            frames = [wire.encode_frame(pb.Frame(init=head)), *wire.chunk_frames(torch.randn(numel), 4 << 20)]
            service.Stub(ch).Init(iter(frames), timeout=120)
            s = service.Stub(ch)
            reg = s.Register(pb.RegisterRequest(worker_id="bench", plan_hash="bench"), timeout=30)
            push = pb.PushHeader(worker_id="bench", session=reg.session, plan_hash="bench", clock=0)
            s.Push(iter([wire.encode_frame(pb.Frame(push=push)), *wire.chunk_frames(torch.randn(numel))]), timeout=120)
        ch = grpc.insecure_channel(a, options=[("grpc.max_send_message_length", 8 << 20)])
        pusher = _Pusher(service.Stub(ch), reg.session)
        for _ in range(repeats):
            wait(lambda: len(pusher.times) >= 5, 120)
            before = time.monotonic()
            usual.append(statistics.median(d for _, d in pusher.times[-5:]))
            joiner = start(1, b.rsplit(":", 1)[1])
            wait(lambda: len(status(a).members) == 2, 120)
            longest.append(max(pusher.between(before, time.monotonic())))

            def joined() -> list[str]:  # the head logs each transfer once it is done
                return [ln for ln in (root / "replica-0.log").read_text().splitlines() if "state transfer of" in ln]

            wait(lambda: len(joined()) > len(seconds), 60)
            seconds.append(float(joined()[-1].split(" after a ")[1].split("s ")[0]))
            joiner.kill()
            joiner.wait()
            wait(lambda: len(status(a).members) == 1, 60)
    finally:
        if pusher is not None:
            pusher.stop.set()
            pusher.thread.join(timeout=130)
        for p in group.procs:
            p.kill()
            p.wait()
    return seconds, longest, usual


def _main_job(out: Path, steps: int, replicas: int) -> list[str]:
    """README's main job (`ps-cluster --servers 2 --workers 2`, the built-in model), `steps` long."""
    return [
        *[sys.executable, "-m", "worker.cluster", "--servers", "2", "--workers", "2", "--steps", str(steps)],
        *["--out", str(out), "--no-progress", "--no-metrics", "--replicas", str(replicas)],
    ]


def replication(a, corpus: Path, cmd) -> int:
    """`cmd(out, *extra)`: the small-model `ps-cluster` command the stall is timed on."""
    root = a.out / "replication"
    stalls: dict[int, list[float]] = {1: [], 2: []}
    rates: dict[int, list[float]] = {1: [], 2: []}  # the main job
    small: dict[int, list[float]] = {1: [], 2: []}  # the tests' small model: per-push costs dominate
    for i in range(a.repeats):
        for r in (1, 2):  # alternating, so load drifts hit both alike
            extra = ("--replicas", str(r))
            _, s = _run(_main_job(root / f"r{r}-main-{i}", a.steps, r), root / f"r{r}-main-{i}", None)
            rates[r].append(s["samples_per_second"])
            _, s = _run(cmd(root / f"r{r}-plain-{i}", *extra), root / f"r{r}-plain-{i}", None)
            small[r].append(s["samples_per_second"])
            kill = "server-0.port" if r == 1 else "server-0-0.port"
            stall, s = _run(cmd(root / f"r{r}-kill-{i}", *extra), root / f"r{r}-kill-{i}", kill)
            assert stall is not None
            stalls[r].append(stall)
            print(
                f"R={r} run {i}: main job {rates[r][-1]:.0f} samples/s, small model {small[r][-1]:.0f}; "
                f"stall after the kill {stall:.2f}s, lost updates {s['lost_updates']}",
                flush=True,
            )
    transfer, longest, usual = _transfer(root / "transfer", a.repeats)
    result = {
        "stall_seconds": {"R=1 (restart from checkpoint)": _stat(stalls[1]), "R=2 (head killed)": _stat(stalls[2])},
        "samples_per_second": {"R=1": _stat(rates[1]), "R=2": _stat(rates[2])},
        "cost_of_replication": 1 - statistics.median(rates[2]) / statistics.median(rates[1]),
        "samples_per_second_small_model": {"R=1": _stat(small[1]), "R=2": _stat(small[2])},
        "cost_of_replication_small_model": 1 - statistics.median(small[2]) / statistics.median(small[1]),
        "state_transfer_seconds_64MB_shard": _stat(transfer),
        # a worker pushing without pause during each join: its longest push then, and its usual one
        "push_seconds_during_join": _stat(longest),
        "push_seconds_before_join": _stat(usual),
        "steps": a.steps,
        "load_average": os.getloadavg(),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def transfer_only(a) -> int:
    """Re-measure the state transfer (and the pushes during it) into the existing result file."""
    transfer, longest, usual = _transfer(a.out / "replication" / "transfer", a.repeats)
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result["state_transfer_seconds_64MB_shard"] = _stat(transfer)
    result["push_seconds_during_join"] = _stat(longest)
    result["push_seconds_before_join"] = _stat(usual)
    result["load_average_transfer"] = os.getloadavg()
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("state_transfer_seconds_64MB_shard", "push_seconds_during_join", "push_seconds_before_join")
            },
            indent=1,
        )
    )
    return 0
