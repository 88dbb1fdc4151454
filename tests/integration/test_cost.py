"""`ps-cost` end to end: a real (tiny) calibration, a prediction from it, and a tiny `validate`
grid of real ps-cluster runs."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def corpus(tmp_path) -> Path:
    """About 200 KB of real text: a few standard-library modules, copied."""
    root = tmp_path / "corpus"
    root.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "shutil.py", "typing.py", "enum.py"]:
        (root / name).write_bytes((stdlib / name).read_bytes())
    return root


def ps_cost(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cost.cli", "--log-level", "WARNING", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_calibrate_predict_validate_end_to_end(tmp_path, corpus):
    cal_path = tmp_path / "cal.json"
    done = ps_cost(
        "calibrate",
        "--out",
        str(cal_path),
        "--models",
        "tiny",
        "--workers",
        "1,2",
        "--servers",
        "1",
        "--startup",
        "1:1",
        "--startup-local-steps",
        "2",
        "--iters",
        "3",
        "--clocks",
        "3",
        "--rounds",
        "1",
        "--data",
        str(corpus),
    )
    assert done.returncode == 0, done.stderr
    cal = json.loads(cal_path.read_text())
    assert cal["machine"]["cpus"] >= 1 and cal["machine"]["hostname"] and cal["machine"]["torch"]
    assert {(r["workers"], r["model"]) for r in cal["compute"]} == {(1, "tiny"), (2, "tiny")}
    assert {(r["workers"], r["servers"]) for r in cal["comm"]} == {(1, 1), (2, 1)}
    assert all(r["lockstep_seconds"] >= r["mean_seconds"] > 0 for r in cal["compute"])
    assert all(r["clock_seconds"] > 0 for r in cal["comm"])
    assert [(r["workers"], r["servers"], r["local_steps"]) for r in cal["startup"]] == [(1, 1, 0), (1, 1, 2)]
    assert all(r["wall_seconds"] > 1 for r in cal["startup"])
    assert all(r["inner_step_seconds"] > 0 for r in cal["compute"])

    pred_path = tmp_path / "pred.json"
    done = ps_cost(
        "predict",
        "--calibration",
        str(cal_path),
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
        "--steps",
        "100",
        "--workers",
        "1,2,4",
        "--servers",
        "1,2",
        "--json",
        str(pred_path),
    )
    assert done.returncode == 0, done.stderr
    assert "recommended: P=" in done.stdout
    pred = json.loads(pred_path.read_text())
    assert [(r["workers"], r["servers"]) for r in pred["rows"]] == [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)]
    assert all(r["refined_seconds"] > r["startup_seconds"] > 0 and r["seed_formula_seconds"] > 0 for r in pred["rows"])
    assert pred["recommended"]["reason"].startswith(f"P={pred['recommended']['workers']}, S=")
    assert pred["compute_drift"] > 0  # the calibration's one-process probe, rerun now on the same host

    out_json, out_png = tmp_path / "v.json", tmp_path / "v.png"
    done = ps_cost(
        "validate",
        "--calibration",
        str(cal_path),
        "--models",
        "tiny",
        "--steps",
        "6",
        "--workers",
        "1,2",
        "--servers",
        "1",
        "--data",
        str(corpus),
        "--json",
        str(out_json),
        "--png",
        str(out_png),
        "--out",
        str(tmp_path / "runs"),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    assert [(r["model"], r["workers"], r["servers"]) for r in rows] == [("tiny", 1, 1), ("tiny", 2, 1)]
    for r in rows:
        assert r["measured_seconds"] > 1 and r["seed_formula_seconds"] > 0 and r["refined_seconds"] > 0
        assert r["refined_error"] == pytest.approx(r["refined_seconds"] / r["measured_seconds"] - 1, abs=1e-3)
        summary = json.loads((tmp_path / "runs" / f"tiny-P{r['workers']}-S1" / "summary.json").read_text())
        assert summary["iterations"] == 6 and summary["workers"] == r["workers"]
        assert r["compute_drift"] > 0  # calibrated on this host: the one-process probe was rerun before the run
    assert set(result["errors"]) == {"seed", "refined"}
    assert out_png.read_bytes()[:8] == PNG_MAGIC and out_png.stat().st_size > 10_000
    assert "refined model" in done.stdout and "tiny" in done.stdout

    # the same grid with asynchronous local steps: the flags reach ps-cluster, and the prediction counts pushes
    out_json = tmp_path / "v-local.json"
    done = ps_cost(
        *("validate", "--calibration", str(cal_path), "--models", "tiny", "--steps", "8", "--workers", "2"),
        *("--servers", "1", "--data", str(corpus), "--json", str(out_json), "--png", str(tmp_path / "v-local.png")),
        *("--out", str(tmp_path / "runs-local"), "--staleness", "1", "--no-average-gradients", "--local-steps", "2"),
    )
    assert done.returncode == 0, done.stderr
    assert "ps-cluster mode: --staleness 1 --no-average-gradients --local-steps 2" in done.stdout
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["mode"] == "--staleness 1 --no-average-gradients --local-steps 2"
    assert row["predicted"]["clocks"] == 2  # 4 iterations per worker, 2 per push
    summary = json.loads((tmp_path / "runs-local" / "tiny-P2-S1" / "summary.json").read_text())
    assert (summary["local_steps"], summary["staleness"], summary["average_gradients"]) == (2, 1.0, False)
    assert summary["iterations"] == 8


def test_validate_without_matplotlib_says_how_to_get_plots_in_one_line(tmp_path, corpus):
    """The core install has no matplotlib: validate still runs and writes its rows, and says once how to get plots."""
    cal = Path(__file__).resolve().parents[2] / "bench" / "results" / "cost-calibration.json"
    out_json, out_png = tmp_path / "v.json", tmp_path / "v.png"
    code = (
        "import sys; sys.modules['matplotlib'] = None; from worker.cost.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--log-level",
            "WARNING",
            "validate",
            "--calibration",
            str(cal),
            "--models",
            "small",
            "--steps",
            "2",
            "--workers",
            "1",
            "--servers",
            "1",
            "--data",
            str(corpus),
            "--json",
            str(out_json),
            "--png",
            str(out_png),
            "--out",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    hints = [line for line in done.stderr.splitlines() if "matplotlib" in line]
    assert hints == [hints[0]] and "pip install 'asyncps[plots]'" in hints[0], done.stderr
    assert "Traceback" not in done.stderr
    assert [r["workers"] for r in json.loads(out_json.read_text())["rows"]] == [1]
    assert not out_png.exists() and "plot: none" in done.stdout
