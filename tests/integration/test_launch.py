"""`ps-cluster [flags] -- CMD`: real servers and P copies of a user's script, no orphans.

* examples/digits/train.py (scikit-learn's digits, an MLP through PSClient with two
  parameter groups, no address in it) trains under the launcher to far above chance;
* each copy's environment names the servers, its rank, the world, its id, and the
  token (never on a command line); a copy that fails is restarted with the same rank;
* a copy failing for good stops everything, exit 1 and its log's tail; Ctrl-C exit 130;
  both leave no process behind;
* mistakes are one line and exit 2: nothing after `--`, a worker without a rank or
  with one outside the world.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker.environment import placement, resolve_rank

from .support import poll
from .test_cluster import processes_mentioning

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "worker.cluster", "--heartbeat-timeout", "3"]

# writes its environment to RUN_DIR/env-RANK-RESTART.json; copy 1 fails in its first life
ENV_SCRIPT = """
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("ASYNCPS_") or k == "OMP_NUM_THREADS"}
rank, life = env["ASYNCPS_RANK"], env["ASYNCPS_RESTART"]
with open(os.path.join(env["ASYNCPS_RUN_DIR"], f"env-{rank}-{life}.json"), "w") as f:
    f.write(json.dumps({"env": env, "argv": sys.argv}))
from worker import PSClient
import torch
with PSClient(torch.nn.Linear(4, 2), optimizer={"name": "sgd", "lr": 0.1}) as ps:
    for _ in range(3):
        ps.pull(); ps.model(torch.ones(1, 4)).sum().backward(); ps.push()
sys.exit(1 if (rank, life) == ("1", "0") else 0)
"""


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_digits_example_trains_far_above_chance_under_the_launcher(tmp_path):
    out = tmp_path / "run"
    r = run(
        [
            *LAUNCH,
            "--servers",
            "2",
            "--workers",
            "2",
            "--out",
            str(out),
            "--",
            sys.executable,
            "examples/digits/train.py",
            "--epochs",
            "4",
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "digits.json").read_text())
    assert result["accuracy"] > 0.85, result  # chance is 0.10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == {"server-0": 0, "server-1": 0, "worker-0": 0, "worker-1": 0}
    assert set(summary["metrics"]) == {"server-0", "server-1", "worker-0", "worker-1"}
    # each shard applied every push of both copies (s = 1, no averaging), as each copy counted them
    pushes = [
        int(re.search(r"worker \d of 2: (\d+) steps", (out / "logs" / f"worker-{r}.log").read_text()).group(1))
        for r in range(2)
    ]
    assert pushes[0] == result["steps"]
    assert list(summary["versions"].values()) == [sum(pushes)] * 2
    for name in ("server-0", "server-1", "worker-0", "worker-1"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    assert "held-out accuracy" in (out / "logs" / "worker-1.log").read_text()
    assert not processes_mentioning(str(out))


def test_environment_token_and_restart_of_a_failed_copy(tmp_path):
    out = tmp_path / "run"
    r = run(
        [
            *LAUNCH,
            "--servers",
            "2",
            "--workers",
            "2",
            "--max-restarts",
            "1",
            "--token",
            "s3cret-t0ken",
            "--out",
            str(out),
            "--",
            sys.executable,
            "-c",
            ENV_SCRIPT,
            str(out),
        ],
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"]["worker-1"] == 1 and summary["restarts"]["worker-0"] == 0
    lives = {p.name for p in out.glob("env-*.json")}
    assert lives == {"env-0-0.json", "env-1-0.json", "env-1-1.json"}
    for rank in (0, 1):
        seen = json.loads((out / f"env-{rank}-0.json").read_text())
        env = seen["env"]
        assert env["ASYNCPS_SERVERS"] == ",".join(summary["addresses"])
        assert (env["ASYNCPS_RANK"], env["ASYNCPS_WORLD"], env["ASYNCPS_WORKER_ID"]) == (
            str(rank),
            "2",
            f"worker-{rank}",
        )
        assert env["ASYNCPS_TOKEN"] == "s3cret-t0ken"
        assert "s3cret-t0ken" not in " ".join(seen["argv"])
    # three pushes per life, the restarted life included
    assert list(summary["versions"].values()) == [9, 9]
    assert not processes_mentioning(str(out))


def test_a_copy_that_fails_for_good_stops_everything_with_its_log_tail(tmp_path):
    out = tmp_path / "run"
    code = "import os, sys; print('loading my data...'); sys.exit(3 if os.environ['ASYNCPS_RANK'] == '1' else 0)"
    r = run(
        [
            *LAUNCH,
            "--servers",
            "1",
            "--workers",
            "2",
            "--max-restarts",
            "0",
            "--out",
            str(out),
            "--",
            sys.executable,
            "-c",
            code,
            str(out),
        ]
    )
    assert r.returncode == 1
    assert "worker-1 failed with exit code 3" in r.stderr and "loading my data..." in r.stderr
    assert "Traceback" not in r.stderr
    assert not processes_mentioning(str(out))


@pytest.mark.parametrize("started", [2, 5], ids=["while-starting", "once-running"])
def test_ctrl_c_stops_every_process(tmp_path, procs, started):
    """Ctrl-C once `started` processes are up (2: the launcher and a server still starting;
    5: the launcher, 2 servers and 2 copies); an interrupt inside a spawn must not leave the
    just-forked child unknown to the launcher (seen: one left running after exit 130)."""
    out = tmp_path / "run"
    code = "import time; time.sleep(120)"
    launcher = procs.popen(
        [*LAUNCH, "--servers", "2", "--workers", "2", "--out", str(out), "--", sys.executable, "-c", code, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    poll(lambda: len(processes_mentioning(str(out))) >= started, 120, f"{started} processes of the run")
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and "interrupted" in err
    assert not processes_mentioning(str(out))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--"], "nothing to run after --"),
        (["--workers", "0", "--", "true"], "--workers"),
    ],
)
def test_launcher_mistakes_are_one_line_exit_2(argv, words, tmp_path):
    r = run([*LAUNCH, "--out", str(tmp_path / "run"), *argv], timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr


@pytest.mark.parametrize(
    "env, words",
    [
        ({"ASYNCPS_WORLD": "2"}, "no rank for this worker of 2"),
        ({"ASYNCPS_WORLD": "2", "JOB_COMPLETION_INDEX": "2"}, "rank 2 is outside the world of 2"),
        ({"ASYNCPS_WORLD": "2", "ASYNCPS_RANK": "5"}, "rank 5 is outside the world of 2"),
    ],
)
def test_ps_worker_without_a_rank_or_outside_the_world_is_one_line_exit_2(env, words):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCPS_") and k != "JOB_COMPLETION_INDEX"}
    r = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--servers", "127.0.0.1:1", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr


def test_rank_comes_from_the_completion_index_and_names_the_worker(monkeypatch):
    for var in ("ASYNCPS_RANK", "ASYNCPS_WORKER_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ASYNCPS_SERVERS", "a:1, b:2")
    monkeypatch.setenv("ASYNCPS_WORLD", "3")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    where = placement()
    assert (where.servers, where.rank, where.world, where.worker_id) == (["a:1", "b:2"], 2, 3, "worker-2")
    assert resolve_rank(1, 3) == (1, False)  # a flag wins over the index
    assert resolve_rank(None, 1, {}) == (0, False)  # a worker alone needs no rank
    monkeypatch.delenv("ASYNCPS_SERVERS")
    with pytest.raises(ValueError, match="no servers"):
        placement()
