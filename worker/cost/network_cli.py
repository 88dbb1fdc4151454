"""`ps-cost` on real links: `calibrate --network`, `predict` with a link, `validate --network`.

    ps-cost calibrate --network --link-gbit 0.05 --out runs/cost/network.json   # link + compute, ~1 min
    ps-cost predict --network-calibration runs/cost/network.json --workers 4 --servers 1,2,4 --compression bf16
    ps-cost predict --link-gbit 1 --latency-ms 0.1 --params 3323392 --workers 4 --servers 4    # T_comm only
    ps-cost validate --network --network-calibration runs/cost/network.json --json runs/cost/network-validate.json

`validate --network` runs bench/network.py's grid on the shaped harness (bench/shaped.py, needs
root) with the flags in --grid, or compares rows it already wrote (--from-rows), and reports
predicted against measured samples/s. The formulas are in worker/cost/network.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from asyncps_common.flags import FlagParser, non_negative, positive
from worker.cost import network
from worker.cost.validate import write_json

DEFAULT_NETWORK = "runs/cost/network.json"
DEFAULT_GRID = "--models builtin,wide --steps 20,12 --servers 1,2,4 --compression none,bf16 --runs 1 --link-gbit 0.05"
ROOT = Path(__file__).resolve().parents[2]


def add_flags(c: FlagParser, q: FlagParser, v: FlagParser) -> None:
    c.env_switch(
        "network", default=False, help="calibrate the link and each model's compute for bench/network.py's runs"
    )
    for p in (c, q):
        p.env_flag("link-gbit", type=positive(float), default=None, help="link rate (Gbit/s); calibrate default 1")
        p.env_flag(
            "latency-ms",
            type=non_negative(float),
            default=None,
            help="one-way latency per link (ms): taken as given (calibrate: not measured)",
        )
    c.env_flag("delay-ms", type=non_negative(float), default=0.1, help="delay the shaped links add (needs netem)")
    c.env_flag("efficiency", type=positive(float), default=0.95, help="TCP goodput / rate when not measured")
    c.env_flag(
        "compute-from",
        default=None,
        help="no compute probes: each model's compute as bench/network.py's DDP runs in this file measured it",
    )
    q.env_flag("network-calibration", default=None, help="a calibration from `ps-cost calibrate --network`")
    q.env_flag("compression", default="none", help="none, bf16, fp16, onebit")
    v.env_switch("network", default=False, help="validate the network model on the shaped harness (bench/network.py)")
    v.env_flag("network-calibration", default=DEFAULT_NETWORK, help="calibration from `ps-cost calibrate --network`")
    v.env_flag("grid", default=DEFAULT_GRID, help="bench/network.py flags of the grid to run")
    v.env_flag("from-rows", default=None, help="no runs: compare the rows bench/network.py wrote to this file")


def load(p: FlagParser, path: str) -> dict:
    try:
        cal = json.loads(Path(path).read_text())
        network.NetworkModel(cal)
    except FileNotFoundError:
        p.error(f"no network calibration at {path}: run `ps-cost calibrate --network --out {path}` first")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        p.error(f"cannot use network calibration {path}: {exc}")
    return cal


def cmd_calibrate(p: FlagParser, a: argparse.Namespace, default_out: str) -> int:
    out = Path(DEFAULT_NETWORK if a.out == default_out else a.out)
    runs = None
    if a.compute_from:
        try:
            runs = json.loads(Path(a.compute_from).read_text())
            network.compute_from_runs(a.models, runs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--compute-from {a.compute_from}: {exc}")
    cal = network.calibrate_network(
        a.models, max(a.workers), a.link_gbit or 1.0, a.delay_ms, a.latency_ms, a.efficiency, a.iters, runs
    )
    write_json(cal, out)
    link = cal["link"]
    sys.stdout.write(
        f"network calibration written to {out}: {link['gbit']:g} Gbit/s links, TCP efficiency "
        f"{link['efficiency']:.3f}"
        + (f" (an all-to-all both ways: {link['exchange_efficiency']:.3f})" if "exchange_efficiency" in link else "")
        + f", one-way latency {link['latency_ms']:.3f} ms ({'measured' if link['measured'] else 'given'})\n"
    )
    return 0


def wants_network(a: argparse.Namespace) -> bool:
    return bool(a.network_calibration or a.link_gbit)


def cmd_predict(p: FlagParser, a: argparse.Namespace, params: int, batch: int) -> int:
    try:
        comp = network.compress.check(a.compression)
    except ValueError as exc:
        p.error(f"--compression: {exc}")
    cal = load(p, a.network_calibration) if a.network_calibration else None
    if cal is None:
        cal = {
            "format": network.FORMAT,
            "link": {"gbit": a.link_gbit, "latency_ms": a.latency_ms or 0.0, "efficiency": 0.95},
            "compute": [],
        }
    if a.link_gbit:
        cal["link"]["gbit"] = a.link_gbit
    if a.latency_ms is not None:
        cal["link"]["latency_ms"] = a.latency_ms
    nm = network.NetworkModel(cal)
    compute = next((r for r in cal["compute"] if r["params"] == params), None)
    push, pull = network.wire_bytes(params, comp)
    out = [
        f"{params / 1e6:.2f} M parameters, {comp}: push {push / 1e6:.2f} MB, pull {pull / 1e6:.2f} MB per worker "
        f"and clock; links {nm.link.gbit:g} Gbit/s (goodput x{nm.link.efficiency:.2f}), "
        f"{nm.link.latency_s * 1e3:.3f} ms one way"
        + (
            f"; compute {compute['compute_seconds'] * 1e3:.0f} ms/iteration ({compute['model']})"
            if compute
            else "; no compute calibrated for this size: T_comm only"
        ),
        f"{'system':<9} {'P':>3} {'S':>3} {'T_comm/clock':>13} {'clock':>9} {'samples/s':>10}",
    ]
    rows = []
    for w in sorted(set(a.workers)):
        cases = [("ddp-gloo", 0)] + [("asyncps", s) for s in sorted(set(a.servers))]
        for system, s in cases:
            if system == "ddp-gloo" and comp not in ("none", "bf16"):
                continue
            link = nm.link_for(compute, s)
            comm = nm.comm(system, params, w, s, comp, a.pipeline, link)
            parts = network.asyncps_parts(params, w, s, link, comp, a.pipeline) if system == "asyncps" else None
            apply = nm.apply_seconds(params, w, s) if system == "asyncps" else 0.0
            clock = (
                network.clock_seconds(system, compute["compute_seconds"], comm, a.pipeline, parts, apply, a.staleness)
                if compute
                else None
            )
            sps = w * batch / clock if clock else None
            rows.append(
                {
                    "system": system,
                    "workers": w,
                    "servers": s or None,
                    "compression": comp,
                    "comm_seconds": comm,
                    "clock_seconds": clock,
                    "samples_per_second": sps,
                }
            )
            out.append(
                f"{system:<9} {w:>3} {s or '-':>3} {1e3 * comm:>11.1f}ms "
                f"{'' if clock is None else f'{1e3 * clock:.0f}ms':>9} {'' if sps is None else f'{sps:.1f}':>10}"
            )
    sys.stdout.write("\n".join(out) + "\n")
    if a.json:
        write_json({"link": cal["link"], "params": params, "compression": comp, "rows": rows}, Path(a.json))
    return 0


def cmd_validate(p: FlagParser, a: argparse.Namespace) -> int:
    cal = load(p, a.network_calibration)
    js = Path(a.json)
    rows_path = Path(a.from_rows) if a.from_rows else js.with_name(js.stem + "-runs.json")
    if not a.from_rows:
        cmd = [sys.executable, str(ROOT / "bench" / "network.py"), "--json", str(rows_path), *shlex.split(a.grid)]
        if subprocess.run(cmd, cwd=ROOT).returncode:
            raise RuntimeError(f"bench/network.py failed: {' '.join(cmd)}")
    try:
        result = json.loads(rows_path.read_text())
    except (OSError, ValueError) as exc:
        p.error(f"cannot read {rows_path}: {exc}")
    cmp = network.compare(cal, result)
    cmp["rows_from"] = str(rows_path)
    write_json(cmp, js)
    sys.stdout.write(network.table(cmp) + f"rows: {js}\n")
    return 0
