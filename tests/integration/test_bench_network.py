"""bench/network.py end to end on the shaped harness, on a tiny grid: rows as promised, nothing left behind.

Speed is never asserted here (the benchmark measures it); this keeps the benchmark working:
real ps-server/ps-worker processes, each in its own namespace, train over bf16 links; the
row carries every key the issue names; every namespace the run made is gone afterwards;
a bad flag is one line with exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .shapednet import shaped

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "system",
    "model",
    "workers",
    "servers",
    "link_gbit",
    "compression",
    "samples_per_second",
    "exposed_comm_seconds",
    "heldout_loss",
}


def test_tiny_grid_writes_rows_and_leaves_no_namespace(tmp_path):
    out = tmp_path / "network.json"
    r = subprocess.run(
        [
            sys.executable,
            "bench/network.py",
            "--json",
            str(out),
            "--models",
            "tiny",
            "--steps",
            "4",
            "--workers",
            "2",
            "--systems",
            "asyncps",
            "--compression",
            "bf16",
            "--compressed-servers",
            "1",
            "--runs",
            "1",
            "--warmup-steps",
            "1",
            "--link-gbit",
            "0.5",
            "--staleness",
            "2",
            "--results",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["network"]["rate_mbit"] == 500 and res["network"]["raw_tcp_mbit"] > 0
    [row] = res["rows"]
    assert KEYS <= set(row), row
    assert (row["system"], row["model"], row["servers"], row["compression"]) == ("asyncps", "tiny", 1, "bf16")
    assert row["samples_per_second"] > 0 and row["heldout_loss"] > 0 and row["exposed_comm_seconds"] >= 0
    assert (row["staleness"], row["pipeline"]) == (2.0, True)  # each row says the bound it ran at
    assert "| tiny | asyncps | 1 | 2, 1 | bf16 |" in (tmp_path / "network.md").read_text()
    assert (tmp_path / "network.png").exists()
    assert not [
        ns
        for ns in shaped.namespaces()
        if ns.startswith(f"{shaped.PREFIX}") and not shaped._alive(int(ns[len(shaped.PREFIX) :].split("x")[0]))
    ]


@pytest.mark.parametrize(
    "flags,mention",
    [(["--models", "huge"], "--models"), (["--staleness", "1", "--prefetch", "2"], "--prefetch 2")],
)
def test_bad_flag_is_one_line_and_exit_2(tmp_path, flags, mention):
    r = subprocess.run(
        [sys.executable, "bench/network.py", "--json", str(tmp_path / "x.json"), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and mention in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.json").exists()
