"""`ps-cost`: calibrate the cost model on this machine, predict a run's time, validate against real runs.

    ps-cost calibrate --out runs/cost/calibration.json          # about 3 minutes on a 2-core machine
    ps-cost predict --workers 1,2,4,8 --servers 1,2 --steps 3000 [--json PATH]
    ps-cost validate --json runs/cost/validate.json --png runs/cost/validate.png

Every flag can also be set as ASYNCPS_<FLAG>. A bad flag, value or calibration file prints
one line and exits with status 2. The table goes to stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from asyncps_common.flags import FlagParser, non_negative, positive, staleness_flag
from worker.cost import drift, network_cli
from worker.cost.calibrate import FORMAT, PRESETS, ModelSpec, Settings, calibrate, from_summaries
from worker.cost.model import CostModel, Job, recommend
from worker.cost.validate import PLOTS_HINT, Mode, plot, plots_available, table, validate, write_json

DEFAULT_CALIBRATION = "runs/cost/calibration.json"


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def model_list(text: str) -> list[ModelSpec]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in PRESETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown model {bad[0] if bad else text!r}: choose from {', '.join(PRESETS)}")
    return [PRESETS[n] for n in names]


def pairs(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P:S pairs like 1:1,4:2, got {text!r}") from None
    if not out or any(len(t) != 2 or min(t) <= 0 for t in out):
        raise argparse.ArgumentTypeError(f"expected P:S pairs like 1:1,4:2, got {text!r}")
    return out  # type: ignore[return-value]


def add_mode_flags(p: FlagParser) -> None:
    """The training mode a prediction or a validation grid describes: ps-cluster's flags of the same names."""
    p.env_flag("staleness", type=staleness_flag, default=0.0, help="staleness bound s (inf: asynchronous)")
    p.env_switch("average-gradients", default=True, help="one averaged update per clock (ps-cluster's default)")
    p.env_flag(
        "local-steps",
        type=non_negative(int),
        default=0,
        help="H iterations of each worker's own optimizer per exchange (ps-cluster --local-steps); 0: none",
    )


def build_parser() -> FlagParser:
    p = FlagParser(
        prog="ps-cost", description="Predict how long a ps-cluster run takes, and how many workers and servers to use."
    )
    p.env_flag("log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=FlagParser)

    c = sub.add_parser("calibrate", help="measure this machine (about 3 minutes on 2 cores)")
    c.env_flag("out", default=DEFAULT_CALIBRATION, help="calibration file to write")
    c.env_flag("models", type=model_list, default="small,wide", help=f"model sizes to probe: {', '.join(PRESETS)}")
    c.env_flag("workers", type=int_list, default="1,2,4", help="worker counts P to probe")
    c.env_flag("servers", type=int_list, default="1,2", help="server counts S to probe")
    c.env_flag("startup", type=pairs, default="1:1,4:2", help="P:S of the one-step ps-cluster start-up probes")
    c.env_flag(
        "startup-local-steps",
        type=non_negative(int),
        default=4,
        help="run the start-up probes again with this --local-steps (0: not)",
    )
    c.env_flag("iters", type=positive(int), default=12, help="timed iterations per compute probe")
    c.env_flag("clocks", type=positive(int), default=12, help="timed clocks per communication probe")
    c.env_flag("rounds", type=positive(int), default=2, help="rounds of compute probes (the faster round counts)")
    c.env_flag("device", default="cpu", help="device of the compute probes (cpu, cuda)")
    c.env_flag("data", default=None, help="ps-cluster --data for the start-up probes (default: the standard library)")
    c.env_flag(
        "from-summary",
        type=lambda t: [x for x in t.split(",") if x],
        default=None,
        help="no probes: build the calibration from these ps-cluster summary.json files (comma-separated)",
    )

    q = sub.add_parser("predict", help="predicted run time for each (P, S) and a recommendation")
    q.env_flag("calibration", default=DEFAULT_CALIBRATION, help="calibration file from ps-cost calibrate")
    q.env_flag("workers", type=int_list, default="1,2,4,8", help="worker counts P")
    q.env_flag("servers", type=int_list, default="1,2", help="server counts S")
    q.env_flag("steps", type=positive(int), default=3000, help="total iterations M")
    q.env_flag("json", default=None, help="also write the rows here")
    q.env_flag("params", type=positive(int), default=None, help="model size in parameters (instead of --d-model ...)")
    q.env_flag("d-model", type=positive(int), default=128, help="model width")
    q.env_flag("n-layer", type=positive(int), default=2, help="transformer blocks")
    q.env_flag("n-head", type=positive(int), default=4, help="attention heads")
    q.env_flag("context", type=positive(int), default=128, help="bytes of context")
    q.env_flag("batch-size", type=positive(int), default=16, help="sequences per iteration per worker")
    add_mode_flags(q)
    q.env_switch("pipeline", default=False, help="the next pull overlaps compute")
    q.env_flag("tolerance", type=float, default=0.05, help="prefer fewer processes within this fraction of the fastest")
    q.env_switch(
        "drift-check",
        default=True,
        help="rerun the calibration's one-process compute probe (1-3 s) and warn if this machine now computes "
        f"more than {drift.WARN_RATIO:.0%} faster or slower",
    )

    v = sub.add_parser("validate", help="real ps-cluster runs against the predictions, with a plot")
    v.env_flag("json", required=True, help="write the rows here")
    v.env_flag("png", default=None, help="write the predicted-vs-measured plot here (default: next to --json)")
    v.env_flag("calibration", default=DEFAULT_CALIBRATION, help="calibration file from ps-cost calibrate")
    v.env_flag("models", type=model_list, default="small,wide", help=f"model sizes: {', '.join(PRESETS)}")
    v.env_flag("steps", type=int_list, default="300,160", help="iterations M of each model's runs, in --models order")
    v.env_flag("workers", type=int_list, default="1,2,4", help="worker counts P")
    v.env_flag("servers", type=int_list, default="1,2", help="server counts S")
    v.env_flag("out", default=None, help="folder for the runs' outputs (default: a folder next to --json)")
    v.env_flag("data", default=None, help="ps-cluster --data (default: the standard library)")
    add_mode_flags(v)
    network_cli.add_flags(c, q, v)
    return p


def load_calibration(p: FlagParser, path: str) -> dict:
    try:
        cal = json.loads(Path(path).read_text())
    except FileNotFoundError:
        p.error(f"no calibration at {path}: run `ps-cost calibrate --out {path}` first")
    except (OSError, ValueError) as exc:
        p.error(f"cannot read calibration {path}: {exc}")
    if not isinstance(cal, dict) or cal.get("format") != FORMAT:
        p.error(f"{path} is not a ps-cost calibration (format {FORMAT})")
    try:
        CostModel(cal)
    except (KeyError, TypeError, ValueError) as exc:
        p.error(f"calibration {path} is incomplete: {exc}")
    return cal


def cmd_calibrate(p: FlagParser, a: argparse.Namespace) -> int:
    if a.network:
        return network_cli.cmd_calibrate(p, a, DEFAULT_CALIBRATION)
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda asked for, but no CUDA GPU is available")
    if a.data is not None and not os.path.exists(a.data):
        p.error(f"--data {a.data}: no such file or folder")
    if a.from_summary:
        try:
            cal = from_summaries(a.from_summary)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--from-summary: {exc}")
        write_json(cal, Path(a.out))
        sys.stdout.write(f"calibration from {len(a.from_summary)} summaries written to {a.out}\n")
        return 0
    s = Settings(
        models=a.models,
        workers=sorted(set(a.workers)),
        servers=sorted(set(a.servers)),
        startup=a.startup,
        startup_local_steps=a.startup_local_steps,
        iters=a.iters,
        clocks=a.clocks,
        rounds=a.rounds,
        device=a.device,
        data=a.data,
    )
    cal = calibrate(s)
    write_json(cal, Path(a.out))
    sys.stdout.write(
        f"calibration written to {a.out} ({cal['calibration_seconds']:.0f} s on {cal['machine']['hostname']}, "
        f"{cal['machine']['cpus']} cores)\n"
    )
    return 0


def job_from(a: argparse.Namespace, cal: dict) -> Job:
    if a.params:
        params, tokens = a.params, a.batch_size * a.context
    else:
        from worker.task import ByteGPT, TaskConfig

        cfg = TaskConfig(d_model=a.d_model, n_layer=a.n_layer, n_head=a.n_head, context=a.context)
        params, tokens = sum(t.numel() for t in ByteGPT(cfg).parameters()), a.batch_size * a.context
    return Job(
        params=params,
        tokens=tokens,
        steps=a.steps,
        staleness=a.staleness,
        average_gradients=a.average_gradients,
        pipeline=a.pipeline,
        local_steps=a.local_steps,
    )


def cmd_predict(p: FlagParser, a: argparse.Namespace) -> int:
    if a.pipeline and a.staleness < 1:
        p.error("--pipeline needs --staleness of at least 1")
    if network_cli.wants_network(a):
        if a.local_steps:
            p.error("--local-steps is not modelled by the network model: leave out --link-gbit/--network-calibration")
        job = job_from(a, {})
        return network_cli.cmd_predict(p, a, job.params, a.batch_size)
    cal = load_calibration(p, a.calibration)
    try:
        job = job_from(a, cal)
    except ValueError as exc:
        p.error(str(exc))
    cost = CostModel(cal)
    now = drift.measure(cal, job.params) if a.drift_check else None
    if now is not None and now.large():
        logging.getLogger("ps-cost").warning(
            "%s: the predictions assume the calibrated speed; recalibrate (ps-cost calibrate) for ones that hold",
            now.describe(),
        )
    preds = cost.table(job, sorted(set(a.workers)), sorted(set(a.servers)))
    pick, reason = recommend(preds, cost.cores, a.tolerance)
    m = cal["machine"]
    gap = "inf" if math.isinf(job.staleness) else f"{job.staleness:g}"
    out = [
        f"{job.steps} iterations of a {job.params / 1e6:.2f} M-parameter model, batch × context {job.tokens}, s={gap}"
        f"{', averaged' if job.average_gradients else ''}{', pipelined' if job.pipeline else ''}"
        f"{f', {job.local_steps} local steps per exchange' if job.local_steps else ''}; "
        f"calibrated on {m['hostname']} ({m['cpus']} cores"
        f"{', ' + m['gpu'] if m.get('gpu') else ''}, {m['date']})",
        f"{'P':>3} {'S':>3} {'seed formula':>13} {'refined':>9} "
        f"{'start-up':>9} {'clock':>9} {'compute':>9} {'comm':>9}",
    ]
    for r in preds:
        out.append(
            f"{r.workers:>3} {r.servers:>3} {r.seed_formula_seconds:>12.1f}s {r.refined_seconds:>8.1f}s "
            f"{r.startup_seconds:>8.1f}s {1e3 * r.clock_seconds:>7.1f}ms {1e3 * r.compute_seconds:>7.1f}ms "
            f"{1e3 * r.comm_seconds:>7.1f}ms"
        )
    out.append(f"recommended: {reason}")
    sys.stdout.write("\n".join(out) + "\n")
    if a.json:
        write_json(
            {
                "calibration": a.calibration,
                "machine": m,
                "job": job.__dict__,
                "rows": [r.row() for r in preds],
                "compute_drift": None if now is None else round(now.ratio, 3),
                "recommended": {"workers": pick.workers, "servers": pick.servers, "reason": reason},
            },
            Path(a.json),
        )
    return 0


def cmd_validate(p: FlagParser, a: argparse.Namespace) -> int:
    if a.network:
        return network_cli.cmd_validate(p, a)
    if len(a.steps) == 1:
        a.steps = a.steps * len(a.models)
    if len(a.steps) != len(a.models):
        p.error(f"--steps gives {len(a.steps)} values for {len(a.models)} models")
    if any(s < max(a.workers) for s in a.steps):
        p.error(f"--steps must be at least the largest worker count ({max(a.workers)})")
    if a.data is not None and not os.path.exists(a.data):
        p.error(f"--data {a.data}: no such file or folder")
    cal = load_calibration(p, a.calibration)
    js = Path(a.json)
    png = Path(a.png) if a.png else js.with_suffix(".png")
    draw = plots_available()
    if not draw:  # said before the runs, so a user who wants the plot need not wait for them
        sys.stderr.write(PLOTS_HINT + "\n")
    out = Path(a.out) if a.out else js.parent / f"{js.stem}-runs-{time.strftime('%Y%m%d-%H%M%S')}"
    mode = Mode(a.staleness, a.average_gradients, a.local_steps)
    result = validate(cal, a.models, a.steps, sorted(set(a.workers)), sorted(set(a.servers)), out, a.data, mode=mode)
    write_json(result, js)
    if draw:
        plot(result, png)
    sys.stdout.write(table(result) + f"rows: {js}   plot: {png if draw else 'none (no matplotlib)'}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s ps-cost %(levelname)s %(message)s")
    sub = p._subparsers._group_actions[0].choices[a.command]  # type: ignore[union-attr, index]
    try:
        return {"calibrate": cmd_calibrate, "predict": cmd_predict, "validate": cmd_validate}[a.command](sub, a)
    except KeyboardInterrupt:
        sys.stderr.write("\nps-cost: interrupted\n")
        return 130
    except RuntimeError as exc:  # a probe or a ps-cluster run failed
        sys.stderr.write(f"ps-cost: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
