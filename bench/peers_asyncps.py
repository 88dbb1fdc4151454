"""asyncps in the comparison: real `ps-server` and `ps-worker` processes, their own flags.

`run(spec, variant)` starts 2 shards (`python -m ps_server.cli`, free ports, readiness by
the gRPC health check) and P workers (`python -m worker.cli`, one torch thread each by
default, the last one with `--slowdown F` in the straggler scenario), exactly the
processes `ps-cluster` starts, then watches them from this process while they train:

* t = 0 is when the first worker writes its report's "start" line (registered, Init
  done, its first step begins); polled every 20 ms.
* samples: every 0.5 s one `Status` per shard (the cheap form, no checksum) gives every
  worker's clock, i.e. the iterations applied; samples = sum of clocks x batch (with
  --balance-batches too: each clock's batches sum to the workers' combined batch). With
  local steps (a clock is a push of H batches) the workers' progress lines count them.
* the local-steps rows (`asyncps-local-*`) run `--local-steps H` (RunSpec.local_steps)
  with asyncps's outer optimizer defaults (sgd, lr 1 with averaging, 0.6/P without);
  `-dyn` adds `--dynamic-local-steps` (its outer lr following the split, the default;
  `-dyn-fixed` with `--no-outer-lr-follows-split`); `asyncps-elastic-*` are the same with
  `--update-rule elastic` (outer lr 1/P); `-la` adds `--lookahead 0.5`, and bench/peers.py's
  `--lookahead` gives it to every other one without averaging; `asyncps-dc-s2` pushes gradients with
  `--update-rule dc`. In the jitter scenario every worker runs `--jitter P,F`.
* held-out snapshots: worker 0 saves the weights it has just pulled every
  `snapshot_every` seconds (`ps-worker --snapshot-dir`, one safetensors file each, no
  fsync), as DDP's rank 0 copies its own. Not the servers' checkpoints: those write the
  optimizer state too and fsync, which cost asyncps about 3 % of its samples/s on two
  cores (docs/benchmarks.md, "Peers"). The servers run without checkpoints,
  as DDP does.

When the budget is over, every process is stopped (SIGTERM, as ps-cluster does).
Blocks for the whole run; not thread-safe.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from safetensors import safe_open

from peers_common import RunSpec
from protos import service
from protos.asyncps.v1 import ps_pb2 as pb
from worker.procs import Children
from worker.rpc import wait_serving

SERVERS = 2


@dataclass(frozen=True)
class Variant:
    staleness: float
    average: bool
    staleness_aware_lr: bool = False
    balance: bool = False
    local_steps: int = 0  # > 0: --local-steps H (RunSpec.local_steps)
    dynamic: bool = False  # --dynamic-local-steps
    update_rule: str = "plain"
    lookahead: float | None = None  # --lookahead β (None: bench/peers.py's --lookahead)
    follow_split: bool = True  # with dynamic: False adds --no-outer-lr-follows-split


VARIANTS = {
    "asyncps-s0": Variant(0, True),
    "asyncps-s2": Variant(2, False),
    "asyncps-inf": Variant(math.inf, False),
    "asyncps-inf-salr": Variant(math.inf, False, True),
    "asyncps-s0-lb": Variant(0, True, balance=True),
    "asyncps-dc-s2": Variant(2, False, update_rule="dc"),
    "asyncps-local-s0": Variant(0, True, local_steps=1),
    "asyncps-local-s2": Variant(2, False, local_steps=1),
    "asyncps-local-s2-dyn": Variant(2, False, local_steps=1, dynamic=True),
    "asyncps-local-s2-dyn-fixed": Variant(2, False, local_steps=1, dynamic=True, follow_split=False),
    "asyncps-elastic-s2": Variant(2, False, local_steps=1, update_rule="elastic"),
    "asyncps-elastic-s2-dyn": Variant(2, False, local_steps=1, dynamic=True, update_rule="elastic"),
    "asyncps-local-s2-dyn-la": Variant(2, False, local_steps=1, dynamic=True, lookahead=0.5),
    "asyncps-elastic-s2-la": Variant(2, False, local_steps=1, update_rule="elastic", lookahead=0.5),
    "asyncps-elastic-s2-dyn-la": Variant(2, False, local_steps=1, dynamic=True, update_rule="elastic", lookahead=0.5),
}


class RunFailed(Exception):
    pass


def _training_argv(spec: RunSpec, v: Variant) -> list[str]:
    t = spec.task
    argv = [
        "--staleness",
        str(v.staleness),
        "--optimizer",
        "adamw",
        "--lr",
        str(spec.lr),
        "--beta1",
        str(spec.beta1),
        "--beta2",
        str(spec.beta2),
        "--weight-decay",
        str(spec.weight_decay),
        "--warmup",
        str(spec.warmup),
        "--batch-size",
        str(spec.batch_size),
        "--context",
        str(t.context),
        "--d-model",
        str(t.d_model),
        "--n-layer",
        str(t.n_layer),
        "--n-head",
        str(t.n_head),
        "--qk-norm" if t.qk_norm else "--no-qk-norm",
        "--device",
        spec.device,
        "--seed",
        str(spec.seed),
        "--average-gradients" if v.average else "--no-average-gradients",
        "--staleness-aware-lr" if v.staleness_aware_lr else "--no-staleness-aware-lr",
        "--balance-batches" if v.balance else "--no-balance-batches",
        "--flush-denormal" if spec.flush_denormal else "--no-flush-denormal",
        "--update-rule",
        v.update_rule,
        "--jitter",
        "{},{}".format(*spec.jitter_args()),
    ]
    if v.local_steps:
        argv += ["--local-steps", str(spec.local_steps)]
        argv += ["--dynamic-local-steps"] if v.dynamic else []
        argv += ["--no-outer-lr-follows-split"] if v.dynamic and not v.follow_split else []
        argv += ["--outer-lr", str(spec.outer_lr)] if spec.outer_lr is not None else []
        lookahead = spec.lookahead if v.lookahead is None else v.lookahead
        argv += ["--lookahead", str(lookahead)] if lookahead and not v.average else []
        if spec.outer_momentum > 0:
            argv += ["--outer-optimizer", "nesterov", "--outer-momentum", str(spec.outer_momentum)]
    return argv + (["--data", spec.data] if spec.data else [])


def _check(children: Children) -> None:
    for c in children.items:
        code = c.exited()
        if code is not None:
            raise RunFailed(f"{c.name} exited with code {code} during the run; its log ends:\n{c.log_tail()}")


def _wait_file(path: Path, children: Children, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        _check(children)
        if time.monotonic() > end:
            raise RunFailed(f"{path.name} did not appear within {timeout:.0f} s")
        time.sleep(0.02)
    return path.read_text().strip()


def run(spec: RunSpec, variant: str) -> None:
    v = VARIANTS[variant]
    out = Path(spec.out)
    logs, snaps = out / "logs", out / "snapshots"
    for d in (logs, snaps):
        d.mkdir(parents=True, exist_ok=True)
    children = Children(logs)
    try:
        _run(spec, v, children, logs, snaps, out)
    finally:
        children.stop_all(grace=10)


def _run(spec: RunSpec, v: Variant, children: Children, logs: Path, snaps: Path, out: Path) -> None:
    addresses = []
    for i in range(SERVERS):
        children.start(
            f"server-{i}",
            "ps_server.cli",
            [
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(logs / f"server-{i}.port"),
                "--shard-index",
                str(i),
                "--num-shards",
                str(SERVERS),
                "--staleness",
                str(v.staleness),
                "--log-level",
                "WARNING",
            ],
        )
    for i in range(SERVERS):
        address = f"127.0.0.1:{_wait_file(logs / f'server-{i}.port', children)}"
        wait_serving(address, timeout=120, is_alive=lambda c=children.items[i]: c.exited() is None)
        addresses.append(address)
    threads = spec.threads_for(spec.workers)
    reports = [logs / f"worker-{r}.jsonl" for r in range(spec.workers)]
    for r in range(spec.workers):
        children.start(
            f"worker-{r}",
            "worker.cli",
            [
                "--servers",
                ",".join(addresses),
                "--rank",
                str(r),
                "--world",
                str(spec.workers),
                "--worker-id",
                f"worker-{r}",
                "--steps",
                str(10**9),
                "--threads",
                str(threads),
                "--slowdown",
                str(spec.slowdown_of(r)),
                "--report",
                str(reports[r]),
                *(["--snapshot-dir", str(snaps), "--snapshot-every", str(spec.snapshot_every)] if r == 0 else []),
                "--log-level",
                "WARNING",
                *_training_argv(spec, v),
            ],
        )
    t_start = _wait_start(reports, children)
    deadline = t_start + spec.budget
    channels = [grpc.insecure_channel(a) for a in addresses]
    stubs = [service.Stub(c) for c in channels]
    trace: list[tuple[float, int]] = [(t_start, 0)]
    next_status = 0.0
    try:
        while True:
            now = time.time()
            if now >= next_status or now >= deadline:
                next_status = now + 0.5
                trace.append(_report_samples(reports) if v.local_steps else _samples(stubs, spec.batch_size))
            if now >= deadline:
                break
            _check(children)
            time.sleep(min(0.1, max(0.0, deadline - time.time())))
        versions = [s.Status(pb.StatusRequest(), timeout=10).version for s in stubs]
    finally:
        for c in channels:
            c.close()
    children.stop(children.items[SERVERS:], grace=10)  # workers first; then the servers
    torch.save(
        {
            "t_start": t_start,
            "trace": trace,
            "snapshots": _snapshots(snaps),
            "servers": SERVERS,
            "updates": max(versions),
        },
        out / "raw-0.pt",
    )


def _wait_start(reports: list[Path], children: Children, timeout: float = 180) -> float:
    """The time the first worker wrote its "start" line (its first step begins)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for path in reports:
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.endswith("}") and json.loads(line).get("event") == "start":
                        return time.time()
        _check(children)
        time.sleep(0.02)
    raise RunFailed(f"no worker started training within {timeout:.0f} s")


def _samples(stubs: list, batch_size: int) -> tuple[float, int]:
    """(now, samples applied): a worker's clock counts its applied iterations; take the slowest shard's view."""
    counts = []
    for stub in stubs:
        st = stub.Status(pb.StatusRequest(), timeout=10)
        counts.append(sum(c.clock for c in st.clocks if c.worker_id.startswith("worker-")))
    return time.time(), min(counts) * batch_size


def _report_samples(reports: list[Path]) -> tuple[float, int]:
    """(now, samples computed): with local steps a clock is a push of H (or, dynamic, a varying
    number of) batches, so the workers' own progress lines (every 0.5 s) count the samples."""
    total = 0
    for path in reports:
        last = 0
        if path.exists():
            for line in path.read_text().splitlines():
                if line.endswith("}"):
                    rec = json.loads(line)
                    if rec.get("event") == "progress":
                        last = int(rec.get("samples", 0))
        total += last
    return time.time(), total


def _snapshots(snaps: Path) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """(time of the pull, state dict) of every snapshot worker 0 wrote, in time order."""
    out = []
    for path in snaps.glob("weights-*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.append((float(f.metadata()["time"]), {k: f.get_tensor(k) for k in f.keys()}))
    return sorted(out, key=lambda item: item[0])
