"""bench/peers.py end to end in a tiny configuration: DDP (gloo) and real asyncps processes.

One run of the real script (spawned DDP ranks, real ps-server / ps-worker processes, a
straggler, snapshots evaluated after each run) on a tiny model for a few seconds each;
checks the JSON schema, that every figure is positive and finite, that both systems
trained (held-out loss fell), and that the table and plots were written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--d-model",
    "32",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--context",
    "32",
    "--batch-size",
    "8",
    "--warmup",
    "10",
    "--lr",
    "1e-2",
    "--threads",
    "1",
    "--budget",
    "3",
    "--snapshot-every",
    "0.5",
    "--eval-windows",
    "16",
    "--target",
    "5.0",
]


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "shutil.py", "typing.py"]:
        (corpus / name).write_bytes((stdlib / name).read_bytes())
    return corpus


def _peers(procs, tmp_path: Path, *args: str) -> dict:
    """Run bench/peers.py (TINY, the small corpus, results under tmp_path) and return its JSON."""
    out = tmp_path / "peers.json"
    argv = [sys.executable, str(ROOT / "bench" / "peers.py"), *TINY, "--data", str(_corpus(tmp_path)), *args]
    argv += ["--json", str(out), "--results", str(tmp_path / "results"), "--log-level", "WARNING"]
    proc = procs.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    return json.loads(out.read_text())


def test_peers_tiny_end_to_end(tmp_path, procs):
    doc = _peers(procs, tmp_path, "--systems", "ddp-gloo,asyncps-s2", "--scenarios", "straggler")
    assert doc["machine"]["cores"] >= 1 and doc["settings"]["target_loss"] == 5.0
    rows = doc["rows"]
    assert sorted((r["system"], r["scenario"]) for r in rows) == [
        ("asyncps-s2", "straggler"),
        ("ddp-gloo", "straggler"),
    ]
    for r in rows:
        assert r["workers"] == 2 and r["target_loss"] == 5.0
        assert math.isfinite(r["samples_per_second"]) and r["samples_per_second"] > 0, r
        ttt = r["time_to_target_seconds"]
        assert ttt is None or (math.isfinite(ttt) and 0 < ttt <= 4.0), r
        times = [t for t, _ in r["curve"]]
        losses = [loss for _, loss in r["curve"]]
        assert times[0] == 0 and times == sorted(times) and len(times) >= 3, r["curve"]
        assert all(math.isfinite(x) and x > 0 for x in losses), r["curve"]
        assert losses[-1] < losses[0] - 0.3, f"{r['system']} did not train: {r['curve']}"
        assert r["updates"] > 0 and r["samples"] > 0
        line = r["time_to_target_interpolated_seconds"]  # between the snapshot before and the first at the target
        assert (line is None) == (ttt is None), r
        if ttt is not None:
            assert max([t for t in times if t < ttt], default=0.0) <= line <= ttt, r
    table = (tmp_path / "results" / "peers.md").read_text()
    assert "| ddp-gloo | straggler | 2 |" in table and "| asyncps-s2 | straggler | 2 |" in table
    png = (tmp_path / "results" / "peers-straggler.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_peers_jitter_diloco_and_local_steps(tmp_path, procs):
    """The jitter scenario with the new peer (diloco-gloo) and asyncps's local-steps row."""
    doc = _peers(
        procs,
        tmp_path,
        *["--systems", "diloco-gloo,asyncps-local-s2", "--scenarios", "jitter", "--jitter", "0.2,4"],
        *["--local-steps", "2"],
    )
    assert doc["settings"]["jitter_probability"] == 0.2 and doc["settings"]["local_steps"] == 2
    rows = {r["system"]: r for r in doc["rows"]}
    assert set(rows) == {"diloco-gloo", "asyncps-local-s2"}
    for r in rows.values():
        assert r["scenario"] == "jitter" and r["workers"] == 2
        assert r["samples_per_second"] > 0 and r["samples"] > 0 and r["updates"] > 0
        losses = [loss for _, loss in r["curve"]]
        assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3, f"{r['system']} did not train: {r['curve']}"
    table = (tmp_path / "results" / "peers.md").read_text()
    assert "| diloco-gloo | jitter | 2 |" in table and "| asyncps-local-s2 | jitter | 2 |" in table
    assert (tmp_path / "results" / "peers-jitter.png").read_bytes().startswith(b"\x89PNG")
