"""worker/cost/network.py and `ps-cost` on links: the bandwidth arithmetic, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from protos import compress
from worker.cost import network
from worker.cost.network import Link, asyncps_comm, ddp_comm

ROOT = Path(__file__).resolve().parents[2]
N = 3_323_392  # the wide model
LINK = Link(gbit=1.0, latency_s=0.0, efficiency=1.0)
M_OVER_B = 4 * N / (1e9 / 8)


def test_asyncps_moves_m_each_way_per_worker_and_p_over_s_per_server():
    assert asyncps_comm(N, 4, 4, LINK) == pytest.approx(M_OVER_B)  # pipelined: push and pull overlap
    assert asyncps_comm(N, 4, 4, LINK, pipeline=False) == pytest.approx(2 * M_OVER_B)
    assert asyncps_comm(N, 4, 2, LINK) == pytest.approx(2 * M_OVER_B)  # a server's link: P/S models
    assert asyncps_comm(N, 4, 1, LINK) == pytest.approx(4 * M_OVER_B)
    assert asyncps_comm(N, 4, 8, LINK) == pytest.approx(M_OVER_B)  # then the worker's own link bounds it


def test_pipelined_exchanges_move_at_the_measured_all_to_all_rate():
    both = Link(gbit=1.0, efficiency=1.0, exchange_efficiency=0.8)  # both directions busy: 80 % each way
    assert asyncps_comm(N, 4, 4, both) == pytest.approx(M_OVER_B / 0.8)
    assert asyncps_comm(N, 4, 4, both, pipeline=False) == pytest.approx(2 * M_OVER_B)  # turns: one flow's rate
    assert ddp_comm(N, 4, both) == pytest.approx(1.5 * M_OVER_B)
    cal = {**_cal(), "link": {"gbit": 1.0, "latency_ms": 0.0, "efficiency": 1.0, "exchange_efficiency": 0.8}}
    assert network.NetworkModel(cal).link == both


def test_ring_all_reduce_and_the_bytesps_bound():
    assert ddp_comm(N, 4, LINK) == pytest.approx(1.5 * M_OVER_B)
    assert ddp_comm(N, 1, LINK) == 0.0
    # P = 4: enough servers beat the ring by 2(P-1)/P = 1.5x on the wire
    assert ddp_comm(N, 4, LINK) / asyncps_comm(N, 4, 4, LINK) == pytest.approx(1.5)
    assert ddp_comm(N, 4, LINK, "bf16") == pytest.approx(0.75 * M_OVER_B)
    lat = Link(1.0, latency_s=1e-3, efficiency=1.0)
    assert ddp_comm(N, 4, lat) == pytest.approx(1.5 * M_OVER_B + 6 * 4e-3)  # 2(P-1) round trips


def test_compression_changes_the_bytes():
    assert network.wire_bytes(N, "bf16") == (2 * N, 2 * N)
    assert network.wire_bytes(N, "onebit") == (compress.push_bytes("onebit", N), 4 * N)
    assert asyncps_comm(N, 4, 4, LINK, "bf16") == pytest.approx(M_OVER_B / 2)
    # onebit: the push shrinks ~30x, the fp32 pull is left, so pipelined it costs what the pull does
    assert asyncps_comm(N, 4, 4, LINK, "onebit") == pytest.approx(M_OVER_B)
    assert asyncps_comm(N, 4, 4, LINK, "onebit", pipeline=False) < 1.1 * M_OVER_B
    with pytest.raises(ValueError, match="unknown compression"):
        network.wire_bytes(N, "zip")


def _cal() -> dict:
    return {
        "format": network.FORMAT,
        "link": {"gbit": 1.0, "latency_ms": 0.0, "efficiency": 1.0},
        "compute": [{"model": "wide", "params": N, "batch_size": 2, "compute_seconds": 0.05}],
    }


def test_predictions_and_comparison_against_rows():
    nm = network.NetworkModel(_cal()).with_rate(0.1)
    sps, comm = nm.samples_per_second("asyncps", "wide", 4, 4, "none")
    assert comm == pytest.approx(10 * M_OVER_B) and sps == pytest.approx(8 / (comm + 0.025))
    ddp, dcomm = nm.samples_per_second("ddp-gloo", "wide", 4, 0, "none")
    assert ddp == pytest.approx(8 / (0.05 + dcomm))  # one bucket: reduced after the backward pass
    # pipelined with compute C, push U, pull D: the period solves T = D + max(0, C + U - T)
    assert network.clock_seconds("asyncps", 1.0, 2.0, True, (2.0, 2.0)) == pytest.approx(2.5)
    assert network.clock_seconds("asyncps", 3.0, 1.0, True, (1.0, 1.0)) == pytest.approx(3.0)
    assert network.clock_seconds("asyncps", 1.0, 4.0, False) == pytest.approx(5.0)
    # a bound s spreads one push -> pull -> compute chain over s + 1 clocks; one pull and one push at a time
    assert network.clock_seconds("asyncps", 1.0, 2.0, True, (2.0, 2.0), staleness=2) == pytest.approx(2.0)
    assert network.clock_seconds("asyncps", 1.0, 1.0, True, (2.0, 1.0), 0.6, staleness=2) == pytest.approx(2.0)
    assert network.clock_seconds("asyncps", 0.5, 1.0, True, (1.0, 1.0), 1.0, staleness=2) == pytest.approx(3.5 / 3)
    assert network.clock_seconds("asyncps", 0.5, 1.0, True, (1.0, 0.8), 9.0, math.inf) == pytest.approx(1.0)
    rows = [
        {"system": "asyncps", "model": "wide", "servers": 4, "compression": "none", "samples_per_second": v}
        for v in (sps * 0.9, sps, sps * 1.2)
    ]
    result = {"link_gbit": 0.1, "workers": 4, "asyncps": {"pipeline": True}, "rows": rows}
    cmp = network.compare(_cal(), result)
    assert cmp["rows"][0]["runs"] == 3 and cmp["errors"]["median_abs"] == pytest.approx(0.0, abs=1e-3)
    # rows of another bound are their own group, predicted with their own s
    s2, _ = nm.samples_per_second("asyncps", "wide", 4, 4, "none", staleness=2)
    assert s2 > sps
    rows.append({**rows[0], "staleness": 2.0, "samples_per_second": s2 * 1.1})
    groups = {r["staleness"]: r for r in network.compare(_cal(), result)["rows"]}
    assert groups[1.0]["runs"] == 3 and groups[2.0]["runs"] == 1
    assert groups[2.0]["predicted_samples_per_second"] == pytest.approx(s2, abs=1e-3)
    # the scale-out line: the bound covering the most server counts, the larger on a tie
    assert network.predicted_scaleout(_cal(), result) == {"wide": {4: round(s2, 2)}}
    rows.append({**rows[0], "servers": 2})
    s1_at_2, _ = nm.samples_per_second("asyncps", "wide", 4, 2, "none")
    assert network.predicted_scaleout(_cal(), result) == {"wide": {2: round(s1_at_2, 2), 4: round(sps, 2)}}
    with pytest.raises(ValueError, match="not a network calibration"):
        network.NetworkModel({"format": "x"})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cost.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_cli_predict_validate_and_bad_input(tmp_path):
    r = _cli(
        "predict",
        "--link-gbit",
        "1",
        "--latency-ms",
        "0",
        "--params",
        str(N),
        "--workers",
        "4",
        "--servers",
        "1,4",
        "--pipeline",
        "--staleness",
        "1",
        "--json",
        str(tmp_path / "p.json"),
    )
    assert r.returncode == 0, r.stderr
    rows = {(x["system"], x["servers"]): x for x in json.loads((tmp_path / "p.json").read_text())["rows"]}
    assert rows[("asyncps", 4)]["comm_seconds"] == pytest.approx(M_OVER_B / 0.95)
    assert rows[("asyncps", 1)]["comm_seconds"] == pytest.approx(4 * M_OVER_B / 0.95)
    r = _cli("predict", "--link-gbit", "1", "--compression", "zip")
    assert r.returncode == 2 and "unknown compression 'zip'" in r.stderr and "Traceback" not in r.stderr
    cal = tmp_path / "net.json"
    cal.write_text(json.dumps(_cal()))
    runs = tmp_path / "runs.json"
    runs.write_text(
        json.dumps(
            {
                "link_gbit": 1.0,
                "workers": 4,
                "asyncps": {"pipeline": True},
                "rows": [
                    {
                        "system": "asyncps",
                        "model": "wide",
                        "servers": 4,
                        "compression": "none",
                        "samples_per_second": 100.0,
                    }
                ],
            }
        )
    )
    r = _cli(
        "validate",
        "--network",
        "--network-calibration",
        str(cal),
        "--from-rows",
        str(runs),
        "--json",
        str(tmp_path / "v.json"),
    )
    assert r.returncode == 0, r.stderr
    assert "absolute error, median / worst" in r.stdout
    assert json.loads((tmp_path / "v.json").read_text())["rows"][0]["measured_samples_per_second"] == 100.0
    r = _cli("validate", "--network", "--network-calibration", str(tmp_path / "none.json"), "--json", "x.json")
    assert r.returncode == 2 and "no network calibration" in r.stderr
