"""`ps-cluster` end to end: real servers and workers, a corpus the test writes, no orphans."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from safetensors.torch import load_file

from worker.task import ByteGPT, TaskConfig

from .support import poll

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

SMALL = [
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
    "--lr",
    "1e-2",
    "--warmup",
    "10",
    "--heartbeat-timeout",
    "3",
    "--no-progress",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """About 300 KB of real text: a handful of standard-library modules, copied."""
    root = tmp_path / "corpus"
    root.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in [
        "argparse.py",
        "dataclasses.py",
        "functools.py",
        "textwrap.py",
        "json/decoder.py",
        "shutil.py",
        "string.py",
        "typing.py",
        "enum.py",
        "ast.py",
        "random.py",
        "heapq.py",
    ]:
        (root / name.replace("/", "_")).write_bytes((stdlib / name).read_bytes())
    return root


def processes_mentioning(token: str) -> list[int]:
    """PIDs of live processes whose command line contains `token`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if token in cmd and "zombie" not in state:
            pids.append(int(entry.name))
    return pids


def wait_until(predicate, timeout: float, what: str) -> None:
    poll(predicate, timeout, what, interval=0.1)


def cluster_cmd(out: Path, corpus: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "worker.cluster",
        "--servers",
        "2",
        "--workers",
        "2",
        "--steps",
        str(steps),
        "--data",
        str(corpus),
        "--out",
        str(out),
        *SMALL,
        *extra,
    ]


def test_cluster_trains_exports_and_cleans_up(tmp_path, corpus, procs):
    out = tmp_path / "run"
    proc = procs.popen(cluster_cmd(out, corpus, 240), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in [
        "wall_seconds",
        "iterations",
        "workers",
        "servers",
        "staleness",
        "t_task_seconds",
        "t_comm_seconds",
        "final_train_loss",
        "heldout_loss",
        "max_clock_gap",
        "loss_curve",
        "model_path",
    ]:
        assert key in summary, key
    assert summary["iterations"] == 240 and summary["workers"] == 2 and summary["servers"] == 2
    assert summary["staleness"] == 0 and summary["max_clock_gap"] == 0  # the default: synchronous averaging
    assert summary["t_task_seconds"] > 0 and summary["t_comm_seconds"] > 0
    curve = summary["loss_curve"]
    assert curve and all(len(row) == 3 for row in curve)
    # An untrained byte model scores about ln 256 = 5.5 nats; the monitor's first curve point may come late
    # on a loaded machine, so the fall is judged against the untrained loss.
    assert summary["final_train_loss"] < math.log(256) - 1.5, "training loss did not fall"
    assert summary["heldout_loss"] < math.log(256) - 0.5, "held-out loss no better than uniform"
    assert str(out) in stdout.decode()  # the final report names where things are

    # the model file loads into the task's own nn.Module and samples
    cfg = TaskConfig(context=32, d_model=32, n_layer=1, n_head=2)
    model = ByteGPT(cfg)
    model.load_state_dict(load_file(summary["model_path"]))
    sample = subprocess.run(
        [sys.executable, "-m", "worker.sample", "--model", summary["model_path"], "--prompt", "def ", "--bytes", "40"],
        capture_output=True,
        timeout=60,
    )
    assert sample.returncode == 0 and sample.stdout.startswith(b"def ") and len(sample.stdout) >= 40
    assert processes_mentioning(str(out)) == []


def test_failed_worker_stops_the_whole_cluster(tmp_path, corpus, procs):
    out = tmp_path / "run"
    proc = procs.popen(
        cluster_cmd(out, corpus, 100000, "--max-restarts", "0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    report = out / "logs" / "worker-1.jsonl"
    wait_until(lambda: report.exists() and '"progress"' in report.read_text(), 120, "worker-1 to train")
    victims = [
        p
        for p in processes_mentioning(str(out))
        if "--worker-id worker-1" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    ]
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert b"worker-1 failed" in stderr
    wait_until(lambda: processes_mentioning(str(out)) == [], 30, "every cluster process to exit")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_interrupted_or_killed_launcher_leaves_no_orphans(tmp_path, corpus, procs, sig, code):
    out = tmp_path / "run"
    proc = procs.popen(cluster_cmd(out, corpus, 100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    report = out / "logs" / "worker-0.jsonl"
    wait_until(lambda: report.exists() and '"progress"' in report.read_text(), 120, "worker-0 to train")
    assert len(processes_mentioning(str(out))) >= 5  # launcher, 2 servers, 2 workers
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == code
    wait_until(lambda: processes_mentioning(str(out)) == [], 30, "every cluster process to exit")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments"),
        (["--data", "/no/such/corpus"], "/no/such/corpus"),
        (["--workers", "0"], "--workers"),
        (["--staleness", "-1"], "--staleness"),
        (["--optimizer", "lbfgs"], "unknown optimizer"),
    ],
)
def test_bad_flags_get_one_line_and_exit_2(argv, message):
    r = subprocess.run([sys.executable, "-m", "worker.cluster", *argv], capture_output=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0]
