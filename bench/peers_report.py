"""bench/peers.py's outputs: the machine's description, the markdown table, the two plots.

`machine()` names what the figures were measured on; `table(rows)` is the markdown
results table (also quoted in docs/benchmarks.md); `plot(rows, scenario, path)` draws held-out
loss against wall time, one curve per system, with matplotlib's Agg backend (no
display needed). Pure functions of their inputs, apart from the files they write.
"""

from __future__ import annotations

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
]


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


def table(rows: list[dict]) -> str:
    """Markdown table: one line per system and scenario, with the ratios the targets are about."""
    by = {(r["system"], r["scenario"]): r for r in rows}
    lines = [
        "| system | scenario | workers | samples/s | × single | time to target (s) | DDP's time ÷ this "
        "| interpolated: time (s), DDP's ÷ this | held-out at end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in ("uniform", "straggler"):
        single = by.get(("single", "uniform"), {}).get("samples_per_second")
        ddp = by.get(("ddp-gloo", scenario), {}).get("time_to_target_seconds")
        ddp_line = by.get(("ddp-gloo", scenario), {}).get("time_to_target_interpolated_seconds")
        for system in SYSTEM_ORDER:
            r = by.get((system, scenario))
            if r is None:
                continue
            sps = r["samples_per_second"]
            ttt = r["time_to_target_seconds"]
            ratio = f"{sps / single:.2f}" if sps and single else "—"
            if system == "ddp-gloo":
                speedup = "1" if ttt else "not reached"
            elif ttt is None:
                speedup = "not reached"
            else:
                speedup = f"{ddp / ttt:.2f}" if ddp else "(DDP did not reach it)"
            line = r.get("time_to_target_interpolated_seconds")
            interpolated = "—" if line is None else f"{line:.1f}" + (f", {ddp_line / line:.2f}" if ddp_line else "")
            name = (
                system
                + (" (n/a: uniform run)" if r.get("not_applicable") else "")
                + (" (failed)" if r.get("failed") else "")
            )
            lines.append(
                f"| {name} | {scenario} | {r['workers']} | {_fmt(sps, 0)} | {ratio} | "
                f"{_fmt(ttt)} | {speedup} | {interpolated} | {_fmt(r['final_heldout_loss'], 3)} |"
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
        ax.plot(t, loss, label=label, linestyle="--" if system == "single" else "-", linewidth=1.6)
    ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.text(0, target, f" target {target:g}", va="bottom", color="grey", fontsize=8)
    finite = [l for r in rows if r["scenario"] == scenario for _, l in r["curve"][1:]]
    if finite:
        ax.set_ylim(min(min(finite), target) - 0.1, min(max(finite) + 0.2, 4.0))
    ax.set_xlabel("wall time since the first step (s)")
    ax.set_ylabel("held-out loss (nats/byte)")
    title = "uniform workers" if scenario == "uniform" else "one worker 3× slower (straggler)"
    ax.set_title(f"ByteGPT, {max(r['workers'] for r in rows)} workers: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
