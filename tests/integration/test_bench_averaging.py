"""bench/averaging.py runs end to end on a small model: real servers, real workers,
averaging at s = 0 (a bucket that never completed would hang the workers and fail the
run); every worker reports every step; a bad flag is one line with exit 2. Speed is not
asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]


def test_averaging_benchmark_times_every_step_of_every_worker(tmp_path):
    out = tmp_path / "avg.json"
    r = subprocess.run(
        [sys.executable, "bench/averaging.py", "--mb", "4", "--steps", "5", "--servers", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["step_ms"]) == {"w0", "w1"} and res["servers"] == 2
    for w, steps in res["step_ms"].items():
        assert len(steps) == 5 and min(steps) > 0
        assert res["median_step_ms"][w] > 0
    assert "median step (ms)" in r.stdout


def test_averaging_benchmark_bad_flag_is_one_line():
    r = subprocess.run(
        [sys.executable, "bench/averaging.py", "--steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--steps more than 3" in r.stderr and "Traceback" not in r.stderr
