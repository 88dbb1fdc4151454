"""Side by side with the peers: asyncps against torch.distributed, with and without a straggler.

    python bench/peers.py --json bench/results/peers.json     # the whole comparison (~20 min)
    python bench/peers.py --systems single,ddp-gloo,asyncps-s2 --scenarios straggler --budget 20

Trains the built-in byte-level GPT (worker/task.py) with the same model, data (each
worker its own `worker_slice`), batch per worker, AdamW settings and warm-up and the
same number of workers in every system, each for `--budget` seconds of wall time:

* single           one process, all cores as torch threads (the reference);
* ddp-gloo         DistributedDataParallel, gloo, P processes (bench/peers_ddp.py);
* rpc-ps           a torch.distributed.rpc parameter server after PyTorch's tutorial,
                   asynchronous, lock around the apply (bench/peers_rpc.py);
* diloco-gloo      synchronous local steps (DiLoCo): H steps of AdamW per rank, then the
                   pseudo-gradients all-reduced and an outer SGD step (bench/peers_diloco.py);
* asyncps-s0       real ps-server / ps-worker processes: s = 0 with gradient averaging
                   (the project's default), asyncps-s2 (s = 2), asyncps-inf (s = inf),
                   asyncps-inf-salr (s = inf, --staleness-aware-lr); no averaging for
                   the last three; asyncps-s0-lb: s = 0 with averaging and
                   --balance-batches, each worker's batch by its speed (bench/peers_asyncps.py);
                   asyncps-dc-s2 (s = 2, --update-rule dc); asyncps-local-s0 (--local-steps
                   H, s = 0, averaging: synchronous DiLoCo), asyncps-local-s2 (H, s = 2, no
                   averaging, each push at 0.6/P), asyncps-local-s2-dyn (+ --dynamic-local-steps);
                   asyncps-elastic-s2 and -s2-dyn (the same with --update-rule elastic);
                   -la adds the workers' look-ahead (--lookahead 0.5): asyncps-local-s2-dyn-la,
                   asyncps-elastic-s2-la, asyncps-elastic-s2-dyn-la.

Scenarios: `uniform`, and `straggler` — the last worker sleeps (F-1) x its measured
compute time after each forward+backward (F = --slowdown, 3), the same mechanism as
`ps-worker --slowdown` in every system; `jitter` — transient stragglers: at each step
every worker, with probability P from its own seeded generator, sleeps F x its compute
time (--jitter P,F, default 0.1,4; asyncps_common/jitter.py, as `ps-worker --jitter`).
`single` has no worker to slow down: it runs once and its row is repeated for the other
scenarios, marked not applicable. `--repeats N` runs every row (or those of
`--repeat-only`) N times and reports the median time to the target and every run's.

Measured: samples/s over the training phase (first step to end, start-up excluded) and
the wall time until the held-out loss first reaches --target. The held-out loss is
measured after each run on weight snapshots taken every --snapshot-every seconds
during it (bench/peers_eval.py), so evaluation never takes CPU from a running system.
Writes --json, a markdown table and one PNG plot per scenario into --results.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:  # `python bench/peers.py` from anywhere
        sys.path.insert(0, p)

import torch  # noqa: E402

import peers_asyncps  # noqa: E402
import peers_ddp  # noqa: E402
import peers_diloco  # noqa: E402
import peers_rpc  # noqa: E402
import peers_single  # noqa: E402
from asyncps_common.flags import FlagParser, non_negative, positive  # noqa: E402
from asyncps_common.jitter import parse_jitter  # noqa: E402
from peers_common import RunSpec, free_port  # noqa: E402
from peers_eval import Evaluator, evaluate  # noqa: E402
from peers_report import SCENARIOS, SYSTEM_ORDER, _median, machine, plot, table  # noqa: E402
from worker.data import Corpus, default_corpus_path  # noqa: E402
from worker.task import TaskConfig  # noqa: E402

log = logging.getLogger("peers")


class RunFailed(Exception):
    pass


def build_parser() -> FlagParser:
    p = FlagParser(prog="bench/peers.py", description=__doc__.split("\n\n")[0])
    p.env_flag("json", help="write every row (with its loss curve) to this file")
    p.env_flag("results", default=str(ROOT / "bench" / "results"), help="folder for the table and the plots")
    p.env_flag(
        "systems",
        default=",".join(SYSTEM_ORDER),
        help="comma-separated systems to run (system@scenario: that system in that scenario only)",
    )
    p.env_flag("scenarios", default=",".join(SCENARIOS), help="comma-separated: uniform, straggler, jitter")
    p.env_flag("workers", type=positive(int), default=2, help="workers (processes) of every distributed system")
    p.env_flag("budget", type=positive(float), default=60.0, help="seconds of training per run, after start-up")
    p.env_flag("target", type=positive(float), default=2.2, help="held-out loss (nats/byte) for time-to-target")
    p.env_flag("slowdown", type=positive(float), default=3.0, help="the straggler's slowdown factor")
    p.env_flag("jitter", type=parse_jitter, default=(0.1, 4.0), help="the jitter scenario's P,F")
    p.env_flag("local-steps", type=positive(int), default=4, help="H of diloco-gloo and asyncps-local-*")
    p.env_flag(
        "outer-lr",
        type=positive(float),
        help="outer lr of diloco-gloo and asyncps-local-* (default: asyncps's, 1 with averaging, 0.6/P without)",
    )
    p.env_flag(
        "outer-momentum",
        type=non_negative(float),
        default=0.0,
        help="> 0: their outer optimizer is SGD with this Nesterov momentum",
    )
    p.env_flag(
        "lookahead",
        type=non_negative(float),
        default=0.0,
        help="asyncps-local-* and asyncps-elastic-* without averaging: ps-worker --lookahead",
    )
    p.env_flag("repeats", type=positive(int), default=1, help="runs of each row; the median is reported")
    p.env_flag(
        "repeat-only",
        default="",
        help="comma-separated systems (or system@scenario) that get --repeats runs (default: all)",
    )
    p.env_flag("snapshot-every", type=positive(float), default=1.0, help="seconds between weight snapshots")
    p.env_flag("eval-windows", type=positive(int), default=64, help="held-out windows per evaluation")
    p.env_flag("batch-size", type=positive(int), default=16, help="sequences per iteration per worker")
    p.env_flag("lr", type=positive(float), default=6e-3, help="AdamW learning rate")
    p.env_flag("warmup", type=non_negative(int), default=100, help="updates of linear lr warm-up")
    p.env_flag("context", type=positive(int), default=128, help="bytes of context")
    p.env_flag("d-model", type=positive(int), default=128, help="model width")
    p.env_flag("n-layer", type=positive(int), default=2, help="transformer blocks")
    p.env_flag("n-head", type=positive(int), default=4, help="attention heads")
    p.env_flag("threads", type=non_negative(int), default=0, help="torch threads per process (0: cores / processes)")
    p.env_switch(
        "qk-norm", default=False, help="the built-in model with LayerNorm on queries and keys, in every system"
    )
    p.env_switch(
        "flush-denormal",
        default=True,
        help="every process flushes denormal floats to zero on the CPU "
        "(ps-worker's default; --no-flush-denormal for torch's default)",
    )
    p.env_flag("device", default="cpu", help="where workers compute: cpu or cuda[:N] (asyncps: ps-worker --device)")
    p.env_flag("data", help="text file or folder (default: this Python's standard library)")
    p.env_flag("seed", type=non_negative(int), default=0, help="seed of the initial weights and data order")
    p.env_flag("work", help="folder for the runs' raw files (default: a temporary one, removed)")
    p.env_flag("log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return p


def _spawn(spec: RunSpec, targets: list[tuple]) -> None:
    """Run each (function, args) in its own spawned process; fail fast if any fails."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=f, args=a, name=f"{spec.system}-{i}") for i, (f, a) in enumerate(targets)]
    for proc in procs:
        proc.start()
    end = time.monotonic() + spec.budget + 300
    try:
        while any(proc.is_alive() for proc in procs):
            failed = [proc for proc in procs if proc.exitcode not in (None, 0)]
            if failed:
                raise RunFailed(f"{spec.system}: process {failed[0].name} exited with code {failed[0].exitcode}")
            if time.monotonic() > end:
                raise RunFailed(f"{spec.system}: did not finish within its budget + 300 s")
            time.sleep(0.1)
        failed = [proc for proc in procs if proc.exitcode != 0]
        if failed:
            raise RunFailed(f"{spec.system}: process {failed[0].name} exited with code {failed[0].exitcode}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def run_system(spec: RunSpec) -> None:
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    if spec.system == "single":
        _spawn(spec, [(peers_single.run, (spec,))])
    elif spec.system == "ddp-gloo":
        port = free_port()
        _spawn(spec, [(peers_ddp.run, (spec, r, port)) for r in range(spec.workers)])
    elif spec.system == "diloco-gloo":
        port = free_port()
        _spawn(spec, [(peers_diloco.run, (spec, r, port)) for r in range(spec.workers)])
    elif spec.system == "rpc-ps":
        port = free_port()
        _spawn(spec, [(peers_rpc.run, (spec, r, port)) for r in range(spec.workers + 1)])
    else:
        try:
            peers_asyncps.run(spec, spec.system)
        except peers_asyncps.RunFailed as exc:
            raise RunFailed(f"{spec.system}: {exc}") from exc


def _run_once(spec: RunSpec, ev: Evaluator, target: float) -> dict:
    log.info("%s, %s: training for %.0f s", spec.system, spec.scenario, spec.budget)
    try:
        run_system(spec)
    except RunFailed as exc:  # keep the other systems' rows; the exit status says it
        log.error("%s", exc)
        return {
            "workers": spec.workers,
            "failed": str(exc),
            "samples_per_second": None,
            "time_to_target_seconds": None,
            "time_to_target_interpolated_seconds": None,
            "target_loss": target,
            "final_heldout_loss": None,
            "curve": [],
        }
    row = {"workers": spec.workers, **evaluate(spec, ev, target, spec.budget)}
    log.info(
        "%s, %s: %s samples/s, target %.2f after %s s (interpolated), held-out %.3f at the end",
        spec.system,
        spec.scenario,
        row["samples_per_second"],
        target,
        row["time_to_target_interpolated_seconds"],
        row["final_heldout_loss"],
    )
    return row


def _row(
    base: RunSpec, system: str, scenario: str, work: Path, ev: Evaluator, target: float, n: int, failures: list[str]
) -> dict:
    """`n` runs of one system in one scenario; the row is the median run's (by the interpolated
    time to the target; a run that never reaches it counts as the slowest), with every run's figures."""
    runs = []
    for i in range(n):
        spec = replace(
            base,
            system=system,
            scenario=scenario,
            out=str(work / f"{system}-{scenario}-{i}"),
            workers=1 if system == "single" else base.workers,
        )
        runs.append(_run_once(spec, ev, target))
        if runs[-1].get("failed"):
            failures.append(runs[-1]["failed"])
    key = "time_to_target_interpolated_seconds"
    done = [r for r in runs if not r.get("failed")] or runs
    median = _median([r[key] for r in done])
    row = next((r for r in done if r[key] == median), done[len(done) // 2])
    row = {"system": system, "scenario": scenario, **row}
    if n > 1:
        row["runs_time_to_target"] = [r[key] for r in runs]
        row["runs_final_heldout_loss"] = [r["final_heldout_loss"] for r in runs]
        row["runs_samples_per_second"] = [r["samples_per_second"] for r in runs]
    return row


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    only: dict[str, set[str]] = {}  # system@scenario: that system in those scenarios only
    for item in [s.strip() for s in args.systems.split(",") if s.strip()]:
        name, _, where = item.partition("@")
        only.setdefault(name, set()).add(where or "*")
    systems = list(only)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEM_ORDER:
            p.error(f"--systems: unknown system {s!r}; choose from {', '.join(SYSTEM_ORDER)}")
    for s in [s.strip().split("@")[0] for s in args.repeat_only.split(",") if s.strip()]:
        if s not in SYSTEM_ORDER:
            p.error(f"--repeat-only: unknown system {s!r}; choose from {', '.join(SYSTEM_ORDER)}")
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"--scenarios: unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA GPU is available")
    try:
        task = TaskConfig(
            context=args.context, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, qk_norm=args.qk_norm
        )
        corpus = Corpus.load(args.data or default_corpus_path(), context=args.context)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    logging.basicConfig(level=args.log_level, format="%(asctime)s peers %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every process a run started is stopped
    # Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning 2-thread
    # team is up to 20x slower (measured: 2.8 s against 0.15 s per step under load 10), and
    # only `single` runs a team (every other process has one torch thread). The environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="asyncps-peers-"))
    base = RunSpec(
        system="",
        scenario="",
        workers=args.workers,
        out="",
        budget=args.budget,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        task=task,
        data=args.data,
        seed=args.seed,
        device=args.device,
        slowdown=args.slowdown,
        snapshot_every=args.snapshot_every,
        threads=args.threads,
        flush_denormal=args.flush_denormal,
        jitter_probability=args.jitter[0],
        jitter_factor=args.jitter[1],
        local_steps=args.local_steps,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        lookahead=args.lookahead,
    )
    ev = Evaluator(base, corpus, args.eval_windows)
    repeat_only = {s.strip() for s in args.repeat_only.split(",") if s.strip()}
    rows: list[dict] = []
    failures: list[str] = []
    started = time.monotonic()
    try:
        for scenario in scenarios:
            for system in systems:
                if system == "single" and scenario != "uniform":
                    continue  # filled in from the uniform run below
                if "*" not in only[system] and scenario not in only[system]:
                    continue
                wanted = not repeat_only or system in repeat_only or f"{system}@{scenario}" in repeat_only
                n = args.repeats if wanted else 1
                row = _row(base, system, scenario, work, ev, args.target, n, failures)
                rows.append(row)
        others = [s for s in scenarios if s != "uniform"]
        if "single" in systems and others:
            ref = next((r for r in rows if r["system"] == "single"), None)
            if ref is None:  # no uniform scenario: the reference still runs once, without pauses
                n = args.repeats if not repeat_only or "single" in repeat_only else 1
                ref = _row(base, "single", "uniform", work, ev, args.target, n, failures)
            for scenario in others:
                rows.append(
                    {
                        **ref,
                        "scenario": scenario,
                        "not_applicable": True,
                        "note": "one process has no straggler; the figures repeat the uniform run",
                    }
                )
    except RunFailed as exc:
        sys.stderr.write(f"bench/peers.py: {exc}\n")
        return 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: (SCENARIOS.index(r["scenario"]), SYSTEM_ORDER.index(r["system"])))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (results / "peers.md").write_text(text)
    for scenario in scenarios:
        plot(rows, scenario, results / f"peers-{scenario}.png", args.target)
    settings = {k: v for k, v in base.asdict().items() if k not in ("system", "scenario", "out")}
    settings["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    doc = {
        "machine": machine(),
        "settings": {
            **settings,
            "target_loss": args.target,
            "eval_windows": args.eval_windows,
            "systems": systems,
            "scenarios": scenarios,
        },
        "wall_seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    sys.stdout.write(text)
    for failure in failures:
        sys.stderr.write(f"bench/peers.py: {failure}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
