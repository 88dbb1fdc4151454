"""Replicated shards under `ps-cluster --replicas 2`: a killed replica loses nothing.

Real processes on loopback: an arbiter, two replicas per shard, two workers. At s = 0 with
gradient averaging the run is deterministic, so a run whose replica was killed with SIGKILL
must end with exactly the model of a run nobody killed (docs/replication.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from .support import poll
from .test_cluster import cluster_cmd, processes_mentioning

pytestmark = pytest.mark.slow  # real clusters: left out of the quick loop (-m "not slow")

STEPS = 80


def _run(out: Path, corpus: Path, replicas: int = 2) -> list[str]:
    cmd = cluster_cmd(
        out,
        corpus,
        STEPS,
        "--no-metrics",
        "--average-gradients",
        "--staleness",
        "0",
        "--replicas",
        str(replicas),
        "--seed",
        "3",
    )
    # one worker: which of two registers first (and runs clocks alone) is a race, so two
    # unkilled runs could differ; one worker at s = 0 with averaging is deterministic
    cmd[cmd.index("--workers") + 1] = "1"
    return cmd


def _step(out: Path, name: str) -> int:
    path = out / "logs" / f"{name}.jsonl"
    step = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "progress":
            step = max(step, rec["step"])
    return step


def _stalled(out: Path) -> str:
    """What a timed-out wait reports: the step reached and the end of every process's log."""
    tails = [f"{p.name}: ...{p.read_text(errors='replace')[-600:]}" for p in sorted((out / "logs").glob("*.log"))]
    return f"40 % of the run (worker-0 at step {_step(out, 'worker-0')} of {STEPS}); logs:\n" + "\n".join(tails)


def _pid(out: Path, token: str) -> int:
    pids = [
        p
        for p in processes_mentioning(str(out))
        if token in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert len(pids) == 1, (token, pids)
    return pids[0]


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 240) -> dict:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("ps-cluster did not finish") from None
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The model of a replicated run nobody killed."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    proc = subprocess.Popen(_run(out, _corpus_dir(root)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        summary = _finish(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert summary["lost_updates"] == 0 and summary["iterations"] == STEPS
    return _tensors(out / "model.safetensors")


def _tensors(path: Path) -> dict:
    """Each tensor's raw bytes and the metadata (the header's key order may differ between runs)."""
    with safe_open(str(path), "pt") as f:
        return {"meta": f.metadata(), **{k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}}


def _corpus_dir(root: Path) -> Path:
    import sysconfig

    d = root / "corpus"
    d.mkdir(exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "typing.py", "ast.py"]:
        (d / name).write_bytes((stdlib / name).read_bytes())
    return d


@pytest.mark.parametrize("replica", [0, 1], ids=["head", "last"])
def test_killed_replica_loses_nothing_and_the_model_is_bit_identical(tmp_path, procs, reference, replica):
    out = tmp_path / "run"
    proc = procs.popen(_run(out, _corpus_dir(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    poll(lambda: _step(out, "worker-0") >= 0.4 * STEPS, 120, lambda: _stalled(out))
    os.kill(_pid(out, f"server-0-{replica}.port"), signal.SIGKILL)
    killed = time.monotonic()
    summary = _finish(proc, out)
    assert summary["iterations"] == STEPS
    assert summary["lost_updates"] == 0
    assert summary["restarts"][f"server-0-{replica}"] == 1  # it came back and re-joined
    assert all(v == 0 for k, v in summary["restarts"].items() if k.startswith("worker")), summary["restarts"]
    assert _tensors(out / "model.safetensors") == reference
    log = (out / "logs" / f"server-0-{1 - replica}.log").read_text()
    assert ("took over as head" in log) if replica == 0 else ("follower 127.0.0.1" in log and "failed" in log)
    assert time.monotonic() - killed < 200
    assert processes_mentioning(str(out)) == []


def test_three_replicas_the_first_follower_takes_over_keeping_the_other(tmp_path, procs, reference):
    """R = 3: the head killed; the first follower of the chain leads with the third still in its chain (no
    race between followers, no re-join), and the model is the same as unkilled R = 2's."""
    out = tmp_path / "run"
    proc = procs.popen(_run(out, _corpus_dir(tmp_path), replicas=3), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    poll(lambda: _step(out, "worker-0") >= 0.4 * STEPS, 120, lambda: _stalled(out))
    os.kill(_pid(out, "server-0-0.port"), signal.SIGKILL)
    summary = _finish(proc, out)
    assert summary["lost_updates"] == 0 and summary["iterations"] == STEPS
    assert _tensors(out / "model.safetensors") == reference
    logs = {k: (out / "logs" / f"server-0-{k}.log").read_text() for k in range(3)}
    assert sum("took over as head" in logs[k] for k in (1, 2)) == 1  # the follower first in the chain
    assert not any("steps down" in text for text in logs.values())
    assert processes_mentioning(str(out)) == []
