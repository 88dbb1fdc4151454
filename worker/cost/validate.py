"""`ps-cost validate`: real `ps-cluster` runs over a grid against both models' predictions.

For every model size, worker count P and server count S of the grid, runs `ps-cluster`
(one run at a time, each timed from launch to exit as `time ps-cluster` would) and
predicts the same run from a calibration with the seed formula and the refined model.
A run that fails is tried once more (its row says `retried`); a second failure stops the grid.
Before each run the calibration's one-process compute probe is rerun (worker/cost/drift.py),
so each row says how much faster or slower the machine computed than when it was calibrated.
Writes the rows as JSON and a predicted-vs-measured plot (matplotlib, Agg backend).
Blocks for the whole grid; not thread-safe.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from worker.cost import drift
from worker.cost.calibrate import ModelSpec, run_cluster
from worker.cost.model import CostModel, Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mode:
    """The training mode of the validated runs: the same flags go to ps-cluster and into the predicted Job."""

    staleness: float = 0.0
    average_gradients: bool = True
    local_steps: int = 0

    def flags(self) -> list[str]:
        """ps-cluster flags for this mode (none for ps-cluster's default)."""
        out = (
            []
            if self.staleness == 0
            else ["--staleness", "inf" if math.isinf(self.staleness) else f"{self.staleness:g}"]
        )
        out += [] if self.average_gradients else ["--no-average-gradients"]
        return out + (["--local-steps", str(self.local_steps)] if self.local_steps else [])

    def name(self) -> str:
        return " ".join(self.flags()) or "default"


def job_for(m: ModelSpec, steps: int, mode: Mode = Mode()) -> Job:
    return Job(
        params=m.params,
        tokens=m.tokens,
        steps=steps,
        staleness=mode.staleness,
        average_gradients=mode.average_gradients,
        local_steps=mode.local_steps,
    )


def validate(
    cal: dict,
    models: list[ModelSpec],
    steps: list[int],
    workers: list[int],
    servers: list[int],
    out: Path,
    data: str | None = None,
    extra: list[str] | None = None,
    mode: Mode = Mode(),
) -> dict:
    cost = CostModel(cal)
    rows = []
    extra = [*mode.flags(), *(extra or [])]
    for m, m_steps in zip(models, steps):
        job = job_for(m, m_steps, mode)
        for p in workers:
            for s in servers:
                load = os.getloadavg()[0]
                now = drift.measure(cal, m.params)
                try:
                    wall, summary = run_cluster(out / f"{m.name}-P{p}-S{s}", m, p, s, m_steps, data, extra)
                    retried = False
                except RuntimeError as exc:  # one failed run should not cost the whole grid; twice is an error
                    log.warning("run failed, trying it once more: %s", exc)
                    wall, summary = run_cluster(out / f"{m.name}-P{p}-S{s}-retry", m, p, s, m_steps, data, extra)
                    retried = True
                pred = cost.predict(job, p, s)
                row = {
                    "model": m.name,
                    "mode": mode.name(),
                    "params": m.params,
                    "workers": p,
                    "servers": s,
                    "steps": m_steps,
                    "measured_seconds": round(wall, 3),
                    "load_average_before": round(load, 2),
                    "compute_drift": None if now is None else round(now.ratio, 3),
                    "retried": retried,
                    "seed_formula_seconds": round(pred.seed_formula_seconds, 3),
                    "refined_seconds": round(pred.refined_seconds, 3),
                    "seed_error": round(pred.seed_formula_seconds / wall - 1, 4),
                    "refined_error": round(pred.refined_seconds / wall - 1, 4),
                    "predicted": pred.row(),
                    "summary": {
                        k: summary.get(k)
                        for k in (
                            "wall_seconds",
                            "train_seconds",
                            "t_task_seconds",
                            "t_comm_seconds",
                            "bound_wait_seconds",
                            "heldout_loss",
                        )
                    },
                }
                rows.append(row)
                log.info(
                    "%s P=%d S=%d: measured %.1f s, seed %.1f s, refined %.1f s",
                    m.name,
                    p,
                    s,
                    wall,
                    pred.seed_formula_seconds,
                    pred.refined_seconds,
                )
    return {"calibration_machine": cal["machine"], "mode": mode.name(), "rows": rows, "errors": error_summary(rows)}


def error_summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("seed", "refined"):
        errs = [abs(r[f"{key}_error"]) for r in rows]
        out[key] = {"median_abs": round(statistics.median(errs), 4), "max_abs": round(max(errs), 4)} if errs else {}
    return out


def table(result: dict) -> str:
    lines = [
        f"ps-cluster mode: {result.get('mode', 'default')}",
        f"{'model':<8} {'P':>2} {'S':>2} {'steps':>6} {'measured':>9} "
        f"{'seed':>8} {'err':>6} {'refined':>8} {'err':>6} {'load':>5} {'drift':>6}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['model']:<8} {r['workers']:>2} {r['servers']:>2} {r['steps']:>6} {r['measured_seconds']:>8.1f}s "
            f"{r['seed_formula_seconds']:>7.1f}s {100 * r['seed_error']:>+5.0f}% "
            f"{r['refined_seconds']:>7.1f}s {100 * r['refined_error']:>+5.0f}% "
            f"{r.get('load_average_before', math.nan):>5.1f} {_drift(r.get('compute_drift')):>6}"
        )
    e = result["errors"]
    lines.append(
        f"absolute error, median / worst: seed formula {100 * e['seed']['median_abs']:.0f}% / "
        f"{100 * e['seed']['max_abs']:.0f}%,  refined model {100 * e['refined']['median_abs']:.0f}% / "
        f"{100 * e['refined']['max_abs']:.0f}%"
    )
    return "\n".join(lines) + "\n"


def _drift(ratio: float | None) -> str:
    """A row's compute drift as a signed percentage (`-`: not measured)."""
    return "-" if ratio is None else f"{100 * (ratio - 1):+.0f}%"


PLOTS_HINT = (
    "ps-cost: matplotlib is not installed, so validate draws no plot (the rows and the table are written); "
    "install the plots extra: pip install 'asyncps[plots]' (in a checkout: pip install -e '.[plots]')"
)


def plots_available() -> bool:
    """True when matplotlib (the `plots` extra; not part of the core install) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    markers = ["o", "s", "^", "D", "v"]
    names = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    for i, name in enumerate(names):
        rs = [r for r in rows if r["model"] == name]
        x = [r["measured_seconds"] for r in rs]
        ax.scatter(
            x,
            [r["seed_formula_seconds"] for r in rs],
            marker=markers[i % 5],
            facecolors="none",
            edgecolors="tab:gray",
            label=f"seed formula, {name}",
        )
        ax.scatter(
            x,
            [r["refined_seconds"] for r in rs],
            marker=markers[i % 5],
            color="tab:blue",
            label=f"refined model, {name}",
        )
    vals = [v for r in rows for v in (r["measured_seconds"], r["seed_formula_seconds"], r["refined_seconds"]) if v > 0]
    lo, hi = min(vals) * 0.8, max(vals) * 1.25
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="tab:blue", alpha=0.08, label="±10%")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured wall time of ps-cluster (s)")
    ax.set_ylabel("predicted (s)")
    e = result["errors"]
    m = result.get("calibration_machine", {})
    ax.set_title(
        f"ps-cost validate: {len(rows)} runs, {m.get('cpus', '?')} cores; ps-cluster {result.get('mode', 'default')}"
        f"\nmedian/worst |error|: refined {100 * e['refined']['median_abs']:.0f}%/{100 * e['refined']['max_abs']:.0f}%,"
        f" seed {100 * e['seed']['median_abs']:.0f}%/{100 * e['seed']['max_abs']:.0f}%",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
