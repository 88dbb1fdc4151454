"""bench/wire.py runs end to end on a tiny payload and writes the JSON docs/benchmarks.md's table comes from.

Speed itself is never asserted here (benchmarks measure it, as ratios within one run);
this only keeps the benchmark working: every row it promises is there, both transports
were really used (the benchmark refuses to report a transport the client did not use),
and a bad flag is one line with exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]


def test_wire_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "wire.json"
    r = subprocess.run(
        [
            sys.executable,
            "bench/wire.py",
            "--mb",
            "16",
            "--reps",
            "2",
            "--servers",
            "1",
            "2",
            "--skip",
            "tensorpipe",
            "grpc",
            "--phases",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tcp_gbps"] > 0 and res["transport"] == "tcp"
    assert res["tcp_streams"]["streams"] == 2 and len(res["tcp_streams"]["samples"]) == 2
    assert res["tcp_streams"]["median"] > 0
    # the push floor: raw TCP over the product's default streams, checked and applied
    assert res["push_floor"]["streams"] == 2 and len(res["push_floor"]["samples"]) == 2
    assert res["ratios"]["push_vs_floor"] == res["push_gbps"] / res["push_floor"]["median"]
    assert "push floor: TCP x2" in r.stdout
    rows = {(row["transport"], row["servers"], row["data_streams"]): row for row in res["rows"]}
    assert set(rows) == {("tcp", 1, 2), ("tcp", 2, 2), ("tcp", 1, 1), ("tcp", 2, 1), ("grpc", 1, 1), ("grpc", 2, 1)}
    # 16 MB on one shard, 8 MB on each of two: cut in two parts of at least 4 MiB when striped
    assert rows[("tcp", 1, 2)]["parts_per_shard"] == [2] and rows[("tcp", 2, 2)]["parts_per_shard"] == [2, 2]
    assert rows[("tcp", 1, 1)]["parts_per_shard"] == [1]
    for row in rows.values():
        for kind in ("pull_gbps", "push_gbps"):
            assert row[kind]["median"] > 0 and len(row[kind]["samples"]) == 2
    assert res["pull_gbps"] == rows[("tcp", 1, 2)]["pull_gbps"]["median"]
    assert set(res["apply"]) == {"sgd", "sgd_momentum", "adam", "adamw"}
    assert "x TCP" in r.stdout and "tcp x2" in r.stdout
    phases = res["push_phases_ms"]  # timed by the server itself, per part of a striped push
    assert phases["parts"] == 2
    for who in ("committing_part", "other_parts"):
        assert phases[who]["receive_ms"] > 0 and phases[who]["total_ms"] >= phases[who]["receive_ms"]
    assert phases["committing_part"]["commit_ms"] > 0 and phases["other_parts"]["commit_ms"] == 0


def test_wire_benchmark_sets_asyncps_against_tensorpipe_echo_and_each_direction(tmp_path):
    out = tmp_path / "wire.json"
    r = subprocess.run(
        [
            sys.executable,
            "bench/wire.py",
            "--mb",
            "4",
            "--reps",
            "2",
            "--servers",
            "1",
            "--transports",
            "tcp",
            "--data-streams",
            "1",
            "--skip",
            "grpc",
            "apply",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    # SPEC's figure: the tensor's bytes over the round trip of the echo
    assert res["tensorpipe_gbps"] == res["tensorpipe"]["median"] > 0 and len(res["tensorpipe"]["samples"]) == 2
    assert res["tensorpipe_both_ways_gbps"] == 2 * res["tensorpipe_gbps"]
    one_way = res["tensorpipe_one_way"]
    assert set(one_way) == {"send", "fetch", "push"}
    assert all(s["median"] > 0 and len(s["samples"]) == 2 for s in one_way.values())
    ratios = res["ratios"]
    assert ratios["pull_vs_tensorpipe"] == res["pull_gbps"] / res["tensorpipe_gbps"]
    assert ratios["push_vs_tensorpipe"] == res["push_gbps"] / res["tensorpipe_gbps"]
    assert ratios["pull_vs_tensorpipe_fetch"] == res["pull_gbps"] / one_way["fetch"]["median"]
    assert ratios["push_vs_tensorpipe_push"] == res["push_gbps"] / one_way["push"]["median"]
    assert ratios["floor_vs_tensorpipe_push"] == res["push_floor"]["median"] / one_way["push"]["median"]
    assert "x TensorPipe echo" in r.stdout and "x its fetch" in r.stdout and "x its push" in r.stdout


def test_wire_benchmark_bad_flag_is_one_line():
    r = subprocess.run(
        [sys.executable, "bench/wire.py", "--transports", "carrier-pigeon"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "bench/wire.py", "--data-streams", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--data-streams must be 1 to 16" in r.stderr and "Traceback" not in r.stderr
