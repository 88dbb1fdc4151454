"""bench/overlap.py runs end to end on a tiny payload: every way it compares really
receives, checks and applies the pushes (the receiver refuses a push it could not check,
and the run then fails), and a bad flag is one line with exit 2. Speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]


def test_overlap_benchmark_measures_every_way(tmp_path):
    out = tmp_path / "overlap.json"
    r = subprocess.run(
        [
            sys.executable,
            "bench/overlap.py",
            "--mb",
            "4",
            "--reps",
            "2",
            "--chunk-mb",
            "1",
            "--streams",
            "3",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["streams"] == 3 and res["payload_bytes"] == 4 << 20
    assert set(res["modes"]) == {"transfer", "whole", "inline", "thread"}
    for m in res["modes"].values():
        assert len(m["samples_ms"]) == 2 and m["median_ms"] > 0
        assert len(m["cpu_busy_samples"]) == 2 and 0 < m["cpu_busy"] <= 1.5  # both processes' CPU time counted
    assert res["modes"]["whole"]["vs_whole"] == 1.0
    assert "x whole's time" in r.stdout


def test_overlap_benchmark_bad_flag_is_one_line():
    r = subprocess.run(
        [sys.executable, "bench/overlap.py", "--streams", "17"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--streams 1 to 16" in r.stderr and "Traceback" not in r.stderr
