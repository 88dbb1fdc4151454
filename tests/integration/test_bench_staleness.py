"""bench/staleness.py on a tiny model: delayed gradients, held-out loss and attention figures."""

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


def tiny_corpus(tmp_path: Path) -> Path:
    """A few of this Python's standard library files: a corpus that needs no download."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse.py", "dataclasses.py", "functools.py", "textwrap.py"]:
        (corpus / name).write_bytes((stdlib / name).read_bytes())
    return corpus


def test_staleness_bench_tiny(tmp_path):
    corpus = tiny_corpus(tmp_path)
    out = tmp_path / "staleness.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "staleness.py"),
            "--data",
            str(corpus),
            "--d-model",
            "32",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--context",
            "32",
            "--batch-size",
            "4",
            "--warmup",
            "2",
            "--lr",
            "1e-2",
            "--threads",
            "1",
            "--eval-windows",
            "8",
            "--delays",
            "0",
            "2",
            "--updates",
            "8",
            "--every",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(x["delay"], x["qk_norm"]) for x in runs] == [(0, False), (2, False), (0, True), (2, True)]
    for x in runs:
        assert [pt["updates"] for pt in x["points"]] == [4, 8]
        assert all(math.isfinite(pt["heldout"]) and 0 < pt["heldout"] < 6 for pt in x["points"])
        assert len(x["points"][-1]["attention"]) == 1
    assert runs[0]["final_heldout"] != runs[1]["final_heldout"]  # the delay is applied
    head = 32 // 2
    for x in runs[2:]:  # normalized queries and keys: |q.k|/sqrt(d) <= sqrt(d) x the LayerNorm gains (about 1)
        assert all(a["max_logit"] <= 1.5 * math.sqrt(head) for pt in x["points"] for a in pt["attention"])


def test_staleness_bench_bad_flags_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "staleness.py"), "--delays", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--delays" in r.stderr and "Traceback" not in r.stderr


def final_losses(tmp_path, rules: list[str], updates: int) -> dict[str, float]:
    """bench/staleness.py on the tiny model at delay 2: each rule's held-out loss after `updates`."""
    corpus = tiny_corpus(tmp_path)
    out = tmp_path / "rules.json"
    tiny = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--context", "32", "--batch-size", "4"]
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "staleness.py"),
            "--data",
            str(corpus),
            *tiny,
            *["--warmup", "2", "--lr", "1e-2", "--threads", "1", "--eval-windows", "8", "--qk-norm", "off"],
            *["--rules", *rules, "--delays", "2", "--updates", str(updates)],
            *["--every", str(updates), "--json", str(out)],
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    return {x["rule"]: x["final_heldout"] for x in json.loads(out.read_text())["runs"]}


def test_staleness_bench_braking_and_momentum_shrinking(tmp_path):
    """The two bench-only tries run, and each changes the training (differs from its base rule)."""
    final = final_losses(tmp_path, ["plain", "ab", "local4-avg", "local4-mshrink"], 8)
    assert set(final) == {"plain", "ab", "local4-avg", "local4-mshrink"}
    assert all(math.isfinite(v) and 0 < v < 6 for v in final.values())
    assert final["ab"] != final["plain"] and final["local4-mshrink"] != final["local4-avg"]


def test_staleness_bench_elastic_rule_is_the_benchs_pullback(tmp_path):
    """The servers' elastic rule (shard store, version history) trains exactly as the bench's own
    w_now - w_pulled added to each push (pullback 1), and differs from plain local steps."""
    final = final_losses(tmp_path, ["local4-avg", "local4-elastic", "local4-pull-1"], 24)
    assert final["local4-elastic"] == pytest.approx(final["local4-pull-1"], abs=2e-4)
    assert abs(final["local4-elastic"] - final["local4-avg"]) > 1e-3
