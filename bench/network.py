"""Real links, not loopback: DDP-gloo against asyncps on a shaped multi-host network.

    python bench/network.py --json bench/results/network.json                 # the whole grid
    python bench/network.py --json /tmp/n.json --models wide --servers 4 --runs 1 --link-gbit 0.2

Every process is its own host (bench/shaped.py: one network namespace each, a shaped
link of --link-gbit to a bridge): P workers (--workers, 4) for DDP-gloo (ring all-reduce),
P workers plus S servers for asyncps (--servers 1,2,4, each server on its own host). Both
train the same model (`builtin`: ps-worker's default; `wide`: the communication-heavy
model of `ps-cost validate`) for --steps iterations per worker with the same data slices,
batch, AdamW settings and warm-up. asyncps runs with gradient averaging (one update per
clock, as DDP) and --pipeline with s = 1 (the next pull overlaps compute and the push, so
a worker's link carries its push out and its pull in at once, as BytePS does); DDP's
all-reduce overlaps its backward pass. Compression (--compression): `none`; `bf16`
(asyncps pulls and pushes bf16; DDP all-reduces bf16 with a gloo copy of torch's bf16_compress_hook);
`onebit` (asyncps only: 1-bit pushes with error feedback, fp32 pulls).

Each row: samples/s over the steps after --warmup-steps (from each process's own step
times; asyncps sums its workers), exposed communication per step (asyncps: the workers'
time blocked in pull and push; DDP: step time minus the same model's forward+backward
alone), and the held-out loss of the final weights (equal samples across rows of a model).
Writes --json (`rows`, the machine, the network) and, with --results, a markdown table and
the scale-out plot (samples/s against S, measured and the cost model's prediction, DDP as
a line). Needs root (network namespaces). Blocks for the whole grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import network_report
import shaped
from asyncps_common.flags import FlagParser, non_negative, positive
from peers_asyncps import Variant, _training_argv
from peers_common import RunSpec
from peers_report import machine
from worker.cost.calibrate import PRESETS
from worker.procs import Children
from worker.task import TaskConfig

log = logging.getLogger("network")
MODELS = {"builtin": PRESETS["small"], "wide": PRESETS["wide"], "tiny": PRESETS["tiny"]}  # tiny: for tests
SYSTEMS = ("ddp-gloo", "asyncps")
COMPRESSIONS = ("none", "bf16", "onebit")


class RunFailed(Exception):
    pass


def csv(kind, allowed=None):
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x.strip()]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list{' of ' + ', '.join(allowed) if allowed else ''}, got {text!r}"
            )
        return items

    parse.__name__ = "list"
    return parse


def build_parser() -> FlagParser:
    p = FlagParser(prog="bench/network.py", description=__doc__.split("\n\n")[0])
    p.env_flag("json", required=True, help="write the rows here")
    p.env_flag("results", default=None, help="also write the markdown table and the scale-out plot into this folder")
    p.env_flag("models", type=csv(str, MODELS), default="builtin,wide", help="builtin, wide (tiny: a smoke test)")
    p.env_flag("systems", type=csv(str, SYSTEMS), default="ddp-gloo,asyncps", help="ddp-gloo, asyncps")
    p.env_flag("servers", type=csv(int), default="1,2,4", help="asyncps server counts S")
    p.env_flag("workers", type=positive(int), default=4, help="workers P of every system")
    p.env_flag(
        "compression",
        type=csv(str, COMPRESSIONS),
        default="none,bf16,onebit",
        help="none, bf16, onebit (DDP: none and bf16)",
    )
    p.env_flag("compressed-servers", type=csv(int), default="4", help="server counts S for the compressed asyncps rows")
    p.env_flag("link-gbit", type=positive(float), default=1.0, help="rate of every host's link (Gbit/s)")
    p.env_flag(
        "delay-ms",
        type=non_negative(float),
        default=shaped.DEFAULT_DELAY_MS,
        help="one-way delay per link (needs the netem qdisc; see bench/shaped.py)",
    )
    p.env_flag("runs", type=positive(int), default=3, help="runs of every row")
    p.env_flag("steps", type=csv(int), default="40,16", help="iterations per worker of each model, in --models order")
    p.env_flag("warmup-steps", type=non_negative(int), default=3, help="first iterations not timed")
    p.env_flag(
        "queue-ms",
        type=positive(float),
        default=shaped.DEFAULT_QUEUE_MS,
        help="each link's queue, in milliseconds at its rate (a switch port's buffer)",
    )
    p.env_flag(
        "staleness", type=non_negative(float), default=1.0, help="asyncps staleness bound (with --pipeline: >= 1)"
    )
    p.env_switch("pipeline", default=True, help="asyncps: request the next pull before computing")
    p.env_flag(
        "prefetch",
        type=positive(int),
        default=1,
        help="asyncps with --pipeline: pulls of the next N clocks in flight (needs --staleness >= N)",
    )
    p.env_flag("threads", type=positive(int), default=1, help="torch threads per training process")
    p.env_flag(
        "calibration", default=None, help="network calibration (ps-cost calibrate --network) for the plot's prediction"
    )
    p.env_switch("append", default=False, help="keep the rows already in --json and add this grid's")
    p.env_flag("log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return p


def _spec(model: str, workers: int, steps: int, threads: int, out: Path) -> RunSpec:
    m = MODELS[model]
    return RunSpec(
        system="",
        scenario="uniform",
        workers=workers,
        out=str(out),
        batch_size=m.batch_size,
        task=TaskConfig(**m.task()),
        threads=threads,
        warmup=20,
    )


def _write_spec(spec: RunSpec, path: Path, **extra) -> Path:
    d = asdict(spec)
    d["extra"] = extra
    path.write_text(json.dumps(d))
    return path


def _wait(children: Children, procs: list, timeout: float) -> None:
    end = time.monotonic() + timeout
    for c in procs:
        while c.exited() is None:
            for other in children.items:
                code = other.exited()
                if code not in (None, 0):
                    raise RunFailed(f"{other.name} exited with {code}:\n{other.log_tail()}")
            if time.monotonic() > end:
                raise RunFailed(f"{c.name} still running after {timeout:.0f} s:\n{c.log_tail()}")
            time.sleep(0.1)
        if c.exited() != 0:
            raise RunFailed(f"{c.name} exited with {c.exited()}:\n{c.log_tail()}")


def run_ddp(spec: RunSpec, steps: int, warm: int, compression: str, net_args: dict, out: Path) -> dict:
    hosts = [f"worker-{r}" for r in range(spec.workers)]
    with shaped.ShapedNet(hosts, **net_args) as net:
        children = Children(out)
        try:
            spec_file = _write_spec(spec, out / "spec.json", steps=steps, compression=compression)
            result = out / "ddp.json"
            ranks = [
                children.start(
                    h,
                    "bench.network_run",
                    ["ddp", str(spec_file), str(r), net.address(hosts[0]), "29500", str(result)],
                    env={"GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(ROOT)},
                    wrap=tuple(net.wrap(h, [])),
                )
                for r, h in enumerate(hosts)
            ]
            _wait(children, ranks, 60 + 30 * steps)
        finally:
            children.stop_all(grace=5)
    r = json.loads(result.read_text())
    ends = r["step_ends"]
    per_step = (ends[-1] - ends[warm]) / (len(ends) - 1 - warm)
    return {
        "samples_per_second": spec.workers * spec.batch_size / per_step,
        "exposed_comm_seconds": max(0.0, per_step - r["compute_seconds"]),
        "step_seconds": per_step,
        "compute_seconds": r["compute_seconds"],
        "heldout_loss": r["heldout_loss"],
    }


def _wait_serving(net: shaped.ShapedNet, hosts: list[str], addresses: list[str], env: dict) -> None:
    """The gRPC health check of every server, from inside its own namespace (the launcher cannot
    reach 10.77.0.x): a worker whose first Status meets a server still starting would fail."""
    code = "import sys; from worker.rpc import wait_serving; wait_serving(sys.argv[1], timeout=120)"
    checks = [
        net.popen(h, [sys.executable, "-c", code, a], env={**os.environ, **env}, stderr=subprocess.PIPE)
        for h, a in zip(hosts, addresses)
    ]
    for c, a in zip(checks, addresses):
        try:
            _, err = c.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"health check of {a} did not finish") from None
        if c.returncode:
            raise RunFailed(f"server at {a} is not serving: {err.decode(errors='replace')[-500:]}")


def run_asyncps(
    spec: RunSpec,
    steps: int,
    warm: int,
    servers: int,
    compression: str,
    variant: Variant,
    pipeline: bool,
    net_args: dict,
    out: Path,
    prefetch: int = 1,
) -> dict:
    shosts = [f"server-{i}" for i in range(servers)]
    whosts = [f"worker-{r}" for r in range(spec.workers)]
    env = {"PYTHONPATH": str(ROOT)}
    with shaped.ShapedNet(shosts + whosts, **net_args) as net:
        children = Children(out)
        try:
            for i, h in enumerate(shosts):
                children.start(
                    h,
                    "ps_server.cli",
                    [
                        "--host",
                        net.address(h),
                        "--port",
                        "0",
                        "--port-file",
                        str(out / f"{h}.port"),
                        "--shard-index",
                        str(i),
                        "--num-shards",
                        str(servers),
                        "--log-level",
                        "WARNING",
                    ],
                    env=env,
                    wrap=tuple(net.wrap(h, [])),
                )
            addresses = []
            for h in shosts:
                port = out / f"{h}.port"
                end = time.monotonic() + 120
                while not port.exists() or not port.read_text().strip():
                    if time.monotonic() > end:
                        raise RunFailed(f"{h} wrote no port file")
                    _wait(children, [], 1)
                    time.sleep(0.05)
                addresses.append(f"{net.address(h)}:{port.read_text().strip()}")
            _wait_serving(net, shosts, addresses, env)
            reports = [out / f"{h}.jsonl" for h in whosts]
            workers = [
                children.start(
                    h,
                    "worker.cli",
                    [
                        "--servers",
                        ",".join(addresses),
                        "--rank",
                        str(r),
                        "--world",
                        str(spec.workers),
                        "--worker-id",
                        h,
                        "--steps",
                        str(steps),
                        "--threads",
                        str(spec.threads_for(spec.workers)),
                        "--report",
                        str(reports[r]),
                        "--report-every",
                        "0",
                        "--compression",
                        compression,
                        "--pipeline" if pipeline else "--no-pipeline",
                        *(["--prefetch", str(prefetch)] if pipeline else []),
                        "--log-level",
                        "WARNING",
                        *_training_argv(spec, variant),
                    ],
                    env=env,
                    wrap=tuple(net.wrap(h, [])),
                )
                for r, h in enumerate(whosts)
            ]
            _wait(children, workers, 120 + 30 * steps)
            spec_file = _write_spec(spec, out / "spec.json")
            ev = children.start(
                "eval",
                "bench.network_run",
                ["eval", str(spec_file), ",".join(addresses), str(out / "eval.json")],
                env=env,
                wrap=tuple(net.wrap(whosts[0], [])),
            )
            _wait(children, [ev], 300)
        finally:
            children.stop_all(grace=5)
    rates, comm = [], []
    for path in reports:
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        prog = [x for x in lines if x.get("event") == "progress"]
        a, b = prog[warm - 1] if warm else {"t": 0.0, "samples": 0, "t_comm": 0.0, "step": 0}, prog[-1]
        rates.append((b["samples"] - a["samples"]) / (b["t"] - a["t"]))
        comm.append((b["t_comm"] - a["t_comm"]) / (b["step"] - a["step"]))
    held = json.loads((out / "eval.json").read_text())["heldout_loss"]
    return {"samples_per_second": sum(rates), "exposed_comm_seconds": statistics.mean(comm), "heldout_loss": held}


def grid(a) -> list[dict]:
    plan = []
    for model, steps in zip(a.models, a.steps):
        for system in a.systems:
            for comp in a.compression:
                if system == "ddp-gloo":
                    if comp in ("none", "bf16"):
                        plan.append((model, steps, system, 0, comp))
                else:
                    for s in a.servers if comp == "none" else [x for x in a.compressed_servers]:
                        plan.append((model, steps, system, s, comp))
    return plan


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped grid still removes its network
    if len(a.steps) != len(a.models):
        p.error(f"--steps needs one count per model ({len(a.models)}), got {len(a.steps)}")
    if a.pipeline and a.staleness < 1:
        p.error("--pipeline needs --staleness of at least 1")
    if a.pipeline and a.prefetch > a.staleness:
        p.error(f"--prefetch {a.prefetch} needs --staleness of at least {a.prefetch}")
    if any(s < 1 for s in a.servers + a.compressed_servers):
        p.error("server counts must be at least 1")
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    net_args = {"rate_mbit": a.link_gbit * 1000, "delay_ms": a.delay_ms, "queue_ms": a.queue_ms}
    variant = Variant(a.staleness, True)
    work = Path(tempfile.mkdtemp(prefix="asyncps-network-"))
    result = {
        "machine": machine(),
        "network": None,
        "workers": a.workers,
        "link_gbit": a.link_gbit,
        "asyncps": {"staleness": a.staleness, "pipeline": a.pipeline, "average_gradients": True},
        "steps": dict(zip(a.models, a.steps)),
        "warmup_steps": a.warmup_steps,
        "rows": [],
    }
    with shaped.ShapedNet(["a", "b"], **net_args) as net:  # the links as built, and raw TCP over one
        result["network"] = {**net.describe(), "raw_tcp_mbit": round(shaped.tcp_rate_mbit(net, "a", "b"), 1)}
    log.info("network: %s", result["network"])
    if a.append and Path(a.json).exists():
        old = json.loads(Path(a.json).read_text())
        result["rows"] = old["rows"] + result["rows"]
        result["steps"] = {**old.get("steps", {}), **result["steps"]}
    for n, (model, steps, system, servers, comp) in enumerate(grid(a)):
        for run in range(a.runs):
            out = work / f"{n:02d}-{model}-{system}-S{servers}-{comp}-{run}"
            out.mkdir(parents=True)
            spec = _spec(model, a.workers, steps, a.threads, out)
            t0, load = time.time(), os.getloadavg()[0]
            try:
                if system == "ddp-gloo":
                    m = run_ddp(spec, steps, a.warmup_steps, comp, net_args, out)
                else:
                    m = run_asyncps(
                        spec, steps, a.warmup_steps, servers, comp, variant, a.pipeline, net_args, out, a.prefetch
                    )
            except (RunFailed, shaped.NetError) as exc:
                log.error("%s %s S=%d %s run %d failed: %s", model, system, servers, comp, run, exc)
                m = {"failed": str(exc)[-2000:]}
            row = {
                "system": system,
                "model": model,
                "workers": a.workers,
                "servers": servers or None,
                "link_gbit": a.link_gbit,
                "compression": comp,
                **(
                    {}
                    if system == "ddp-gloo"
                    else {"staleness": a.staleness, "pipeline": a.pipeline, "prefetch": a.prefetch}
                ),
                "run": run,
                "steps": steps,
                "params": MODELS[model].params,
                "wall_seconds": round(time.time() - t0, 1),
                "load_average_before": round(load, 2),
                **m,
            }
            result["rows"].append(row)
            log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "failed"})
            _save(result, Path(a.json))
    if a.results:
        network_report.write(result, Path(a.results), a.calibration)
    return 0


def _save(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
