"""bench/peers.py's outputs: the machine's description, the markdown table, the two plots.

`machine()` names what the figures were measured on; `table(rows)` is the markdown
results table (also quoted in docs/benchmarks.md); `plot(rows, scenario, path)` draws held-out
loss against wall time, one curve per system, with matplotlib's Agg backend (no
display needed). Pure functions of their inputs, apart from the files they write.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch

SYSTEM_ORDER = [
    "single",
    "ddp-gloo",
    "rpc-ps",
    "asyncps-s0",
    "asyncps-s2",
    "asyncps-inf",
    "asyncps-inf-salr",
    "asyncps-s0-lb",
    "diloco-gloo",
    "asyncps-dc-s2",
    "asyncps-local-s0",
    "asyncps-local-s2",
    "asyncps-local-s2-dyn",
    "asyncps-local-s2-dyn-fixed",
    "asyncps-local-s2-dyn-la",
    "asyncps-elastic-s2",
    "asyncps-elastic-s2-la",
    "asyncps-elastic-s2-dyn",
    "asyncps-elastic-s2-dyn-la",
]
SCENARIOS = ("uniform", "straggler", "jitter")
TITLES = {
    "uniform": "uniform workers",
    "straggler": "one worker 3× slower (straggler)",
    "jitter": "transient stragglers (each step: p 0.1 of a 4× pause)",
}


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_end": [round(x, 2) for x in load] if load else None,
    }


def _fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    """The median of the runs, None if any run did not reach the target (it counts as last)."""
    if not values:
        return None
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    mid = ordered[len(ordered) // 2]
    return mid


def _ratio(base: float | None, this: float | None) -> str:
    if this is None:
        return "not reached"
    return f"{base / this:.2f}" if base else "—"


def table(rows: list[dict]) -> str:
    """Markdown table: one line per system and scenario, with the ratios the targets are about.

    Time to target is the interpolated crossing (peers_eval.crossing); with repeated runs
    (`--repeats`) the median, and every run's figure in the last column."""
    by = {(r["system"], r["scenario"]): r for r in rows}
    lines = [
        "| system | scenario | workers | samples/s | × single | time to target (s) | DDP's time ÷ this "
        "| asyncps-s0's ÷ this | held-out at end | runs: time to target (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in SCENARIOS:
        single = next((r["samples_per_second"] for r in rows if r["system"] == "single"), None)
        ddp = by.get(("ddp-gloo", scenario), {}).get("time_to_target_interpolated_seconds")
        s0 = by.get(("asyncps-s0", scenario), {}).get("time_to_target_interpolated_seconds")
        for system in SYSTEM_ORDER:
            r = by.get((system, scenario))
            if r is None:
                continue
            sps = r["samples_per_second"]
            ttt = r.get("time_to_target_interpolated_seconds")
            ratio = f"{sps / single:.2f}" if sps and single else "—"
            name = (
                system
                + (" (n/a: uniform run)" if r.get("not_applicable") else "")
                + (" (failed)" if r.get("failed") else "")
            )
            runs = r.get("runs_time_to_target")
            runs_text = " / ".join("—" if t is None else f"{t:.1f}" for t in runs) if runs else "1 run"
            lines.append(
                f"| {name} | {scenario} | {r['workers']} | {_fmt(sps, 0)} | {ratio} | {_fmt(ttt)} | "
                f"{_ratio(ddp, ttt)} | {_ratio(s0, ttt)} | {_fmt(r['final_heldout_loss'], 3)} | {runs_text} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], scenario: str, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for system in SYSTEM_ORDER:
        r = next((r for r in rows if r["system"] == system and r["scenario"] == scenario), None)
        if r is None or not r["curve"]:
            continue
        t, loss = zip(*r["curve"])
        label = system + (" (no straggler: reference)" if r.get("not_applicable") else "")
        style = "--" if system == "single" else (":" if system in ("rpc-ps", "diloco-gloo") else "-")
        ax.plot(t, loss, label=label, linestyle=style, linewidth=1.6)
    ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.text(0, target, f" target {target:g}", va="bottom", color="grey", fontsize=8)
    finite = [loss for r in rows if r["scenario"] == scenario for _, loss in r["curve"][1:]]
    if finite:
        ax.set_ylim(min(min(finite), target) - 0.1, min(max(finite) + 0.2, 4.0))
    ax.set_xlabel("wall time since the first step (s)")
    ax.set_ylabel("held-out loss (nats/byte)")
    title = TITLES[scenario]
    ax.set_title(f"ByteGPT, {max(r['workers'] for r in rows)} workers: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
