"""bench/network.py's outputs: the markdown table (medians and spread of the runs) and the scale-out plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def groups(result: dict) -> list[dict]:
    """One entry per (model, system, servers, compression, staleness, prefetch): medians, min and
    max over its runs (DDP rows: staleness and prefetch None)."""
    out: dict[tuple, dict] = {}
    for r in result["rows"]:
        if "samples_per_second" not in r:
            continue
        ddp = r["system"] == "ddp-gloo"
        staleness = None if ddp else r.get("staleness", result["asyncps"].get("staleness"))
        prefetch = None if ddp else r.get("prefetch", 1)
        key = (r["model"], r["system"], r["servers"] or 0, r["compression"], staleness, prefetch)
        g = out.setdefault(
            key,
            {
                "model": key[0],
                "system": key[1],
                "servers": key[2],
                "compression": key[3],
                "staleness": staleness,
                "prefetch": prefetch,
                "sps": [],
                "comm": [],
                "loss": [],
            },
        )
        g["sps"].append(r["samples_per_second"])
        g["comm"].append(r["exposed_comm_seconds"])
        g["loss"].append(r["heldout_loss"])
    for g in out.values():
        for k in ("sps", "comm", "loss"):
            g[k + "_median"] = statistics.median(g[k])
    return list(out.values())


def table(result: dict) -> str:
    lines = [
        "| model | system | S | s, prefetch | compression | samples/s (median, min-max) "
        "| exposed comm / step (s) | held-out loss | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in groups(result):
        s = "-" if g["staleness"] is None else f"{g['staleness']:g}, {g['prefetch']}"
        lines.append(
            f"| {g['model']} | {g['system']} | {g['servers'] or '-'} | {s} | {g['compression']} | "
            f"{g['sps_median']:.2f} ({min(g['sps']):.2f}-{max(g['sps']):.2f}) | {g['comm_median']:.3f} | "
            f"{g['loss_median']:.3f} | {len(g['sps'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, predicted: dict | None = None) -> None:
    """samples/s against S per model (asyncps, no compression), measured and predicted; DDP as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from worker.cost.network import scaleout_staleness

    every = groups(result)
    models = sorted({g["model"] for g in every})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), dpi=110, squeeze=False)
    for ax, model in zip(axes[0], models):
        line_s = scaleout_staleness(result, model)
        gs = [g for g in every if g["staleness"] in (None, line_s)]  # the scale-out's bound; others below
        for g in every:
            if g["model"] == model and g["system"] == "asyncps" and g["staleness"] not in (None, line_s):
                ax.plot(
                    [g["servers"]],
                    [g["sps_median"]],
                    "x",
                    markersize=8,
                    color="tab:gray",
                    label=f"asyncps s={g['staleness']:g}, {g['compression']}",
                )
        ps = sorted(
            (g for g in gs if g["model"] == model and g["system"] == "asyncps" and g["compression"] == "none"),
            key=lambda g: g["servers"],
        )
        if ps:
            xs = [g["servers"] for g in ps]
            ax.plot(
                xs,
                [g["sps_median"] for g in ps],
                "o-",
                color="tab:blue",
                label=f"asyncps s={line_s:g}, measured (median)",
            )
            for g in ps:
                ax.vlines(g["servers"], min(g["sps"]), max(g["sps"]), color="tab:blue", alpha=0.5)
            pred = (predicted or {}).get(model)
            if pred:
                ax.plot(
                    sorted(pred),
                    [pred[s] for s in sorted(pred)],
                    "s--",
                    color="tab:orange",
                    label="asyncps, cost model",
                )
            ax.set_xticks(xs)
        for g in gs:
            if g["model"] == model and g["system"] == "asyncps" and g["compression"] != "none":
                ax.plot(
                    [g["servers"]],
                    [g["sps_median"]],
                    "^",
                    markersize=8,
                    label=f"asyncps s={line_s:g}, {g['compression']}",
                    color={"bf16": "tab:green", "onebit": "tab:purple"}.get(g["compression"], "tab:gray"),
                )
        for g in gs:
            if g["model"] == model and g["system"] == "ddp-gloo":
                ax.axhline(
                    g["sps_median"],
                    color="tab:red" if g["compression"] == "none" else "tab:pink",
                    ls="-",
                    label=f"DDP-gloo ring all-reduce{'' if g['compression'] == 'none' else ', ' + g['compression']}",
                )
        ax.set_xlabel("servers S (each on its own host)")
        ax.set_ylabel(f"samples/s (P = {result['workers']} workers)")
        ax.set_title(f"{model}: {result['link_gbit']:g} Gbit/s links")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write(result: dict, folder: Path, calibration: str | None) -> None:
    predicted = None
    if calibration:
        from worker.cost.network import predicted_scaleout

        predicted = predicted_scaleout(json.loads(Path(calibration).read_text()), result)
        result["predicted"] = predicted
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "network.md").write_text(table(result))
    plot(result, folder / "network.png", predicted)
