"""bench/startup.py runs real ps-cluster runs in each tree it is given, in turns, and sums them up
per mode with the first tree as the baseline; a failing run and bad flags are clear errors.
Speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real clusters: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]


def _bench(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/startup.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_startup_benchmark_times_each_tree_and_mode_in_turns(tmp_path):
    out = tmp_path / "startup.json"
    r = _bench(
        "--trees", f"{ROOT},.", "--modes", "default,local", "--rounds", "1", "--steps", "1",
        "--workers", "1", "--servers", "1", "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [(x["mode"], x["tree"]) for x in doc["runs"]] == [
        ("default", str(ROOT)),
        ("default", "."),
        ("local", str(ROOT)),
        ("local", "."),
    ]
    assert all(x["seconds"] > 0 for x in doc["runs"])
    by = {(x["mode"], x["tree"]): x for x in doc["summary"]}
    for mode in ("default", "local"):
        assert by[(mode, str(ROOT))]["ratio"] == 1.0
        run = next(x["seconds"] for x in doc["runs"] if x["mode"] == mode and x["tree"] == ".")
        assert by[(mode, ".")]["median"] == pytest.approx(run, abs=1e-3)
    assert doc["settings"] == {"steps": 1, "workers": 1, "servers": 1, "rounds": 1}


def test_startup_benchmark_bad_input_is_one_line(tmp_path):
    r = _bench("--trees", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "not an asyncps source tree" in r.stderr and "Traceback" not in r.stderr
    r = _bench("--modes", "warp", timeout=60)
    assert r.returncode == 2 and "unknown mode warp" in r.stderr and "Traceback" not in r.stderr
    r = _bench("--rounds", "0", timeout=60)
    assert r.returncode == 2 and "must be at least 1" in r.stderr
    r = _bench("--rounds", "1", "--modes", "default", "--steps", "1", "--workers", "3", timeout=120)
    assert r.returncode == 1 and "exited 2" in r.stderr and "Traceback" not in r.stderr  # ps-cluster refused the run
