"""Failures during a `ps-cluster` run: a server or a worker killed with SIGKILL.

`ps-cluster` restarts the failed process (its restart policy, like compose's
`restart: on-failure`); the run must finish with every step done, the workers must not
crash, and what was lost must be what docs/guarantees.md promises:

- server killed: it restarts on the same port from its last checkpoint; the updates it
  lost are at most those applied since that checkpoint, and summary.json counts them;
- worker killed: the survivors stall at most about the heartbeat timeout; the restarted
  worker rejoins at the slowest live clock and does only the steps it had left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from protos.asyncps.v1 import ps_pb2 as pb

from .support import poll, start_worker, stub, wait_exit
from .test_cluster import SMALL, cluster_cmd, corpus, processes_mentioning  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

HEARTBEAT = 2.0  # seconds; the tests' --heartbeat-timeout


def _cmd(out: Path, corpus: Path, steps: int, *extra: str) -> list[str]:
    cmd = cluster_cmd(out, corpus, steps, "--no-metrics", *extra)
    i = cmd.index("--heartbeat-timeout")  # SMALL says 3; these tests want a shorter one
    cmd[i + 1] = str(HEARTBEAT)
    return cmd


def _records(out: Path, name: str) -> list[dict]:
    path = out / "logs" / f"{name}.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass  # a torn last line
    return recs


def _step(out: Path, name: str) -> int:
    return max((r["step"] for r in _records(out, name) if r["event"] == "progress"), default=0)


def _pid(out: Path, token: str) -> int:
    """The one live process of this run whose command line holds `token`."""
    pids = [
        p
        for p in processes_mentioning(str(out))
        if token in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    ]
    assert len(pids) == 1, (token, pids)
    return pids[0]


def _server_address(out: Path, i: int) -> str:
    return f"127.0.0.1:{int((out / 'logs' / f'server-{i}.port').read_text())}"


def _status(address: str) -> pb.StatusResponse:
    with stub(address) as s:
        return s.Status(pb.StatusRequest(), timeout=5)


def _finish(proc: subprocess.Popen, out: Path, timeout: float) -> dict:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("ps-cluster did not finish") from None
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_killed_server_restarts_from_its_checkpoint_and_training_finishes(tmp_path, corpus, procs):
    out, steps = tmp_path / "run", 600
    # no periodic checkpoint during the test: the only ones are after Init and the one asked for below
    proc = procs.popen(
        _cmd(out, corpus, steps, "--checkpoint-interval", "600"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    poll(lambda: _step(out, "worker-0") >= 20, 120, "training to start")
    address = _server_address(out, 0)
    with stub(address) as s:
        ckpt = s.Checkpoint(pb.CheckpointRequest(), timeout=10).version
    poll(lambda: _status(address).version >= ckpt + 15, 60, "updates after the checkpoint")

    # Freeze the workers so the version read is the version killed, then kill the server.
    workers = [_pid(out, f"--worker-id worker-{r} ") for r in range(2)]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        last = [-1]

        def settled() -> bool:  # two equal reads in a row: no push was still being applied
            v = _status(address).version
            same, last[0] = v == last[0], v
            return same

        poll(settled, 10, "the version to settle", interval=0.1)
        killed_at = last[0]
        steps_at_kill = sum(_step(out, f"worker-{r}") for r in range(2))
        os.kill(_pid(out, "server-0.port"), signal.SIGKILL)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert killed_at > ckpt and steps_at_kill < steps

    summary = _finish(proc, out, 240)
    log = (out / "logs" / "server-0.log").read_text()
    assert f"restored shard 0 at version {ckpt} " in log  # the same checkpoint folder, the last checkpoint
    assert summary["restarts"] == {"server-0": 1, "server-1": 0, "worker-0": 0, "worker-1": 0}  # no worker crashed
    assert summary["iterations"] == steps
    lost = summary["lost_updates_by_server"]
    # at most the updates since the last checkpoint; every one a worker saw is counted
    assert killed_at - ckpt - 1 <= lost["server-0"] <= killed_at - ckpt, (lost, killed_at, ckpt)
    assert lost["server-1"] == 0 and summary["lost_updates"] == lost["server-0"]
    assert processes_mentioning(str(out)) == []


def test_killed_worker_stalls_others_at_most_a_timeout_and_rejoins(tmp_path, corpus, procs):
    out, steps = tmp_path / "run", 500
    proc = procs.popen(_cmd(out, corpus, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    poll(lambda: _step(out, "worker-1") >= 30, 120, "worker-1 to train")
    done_before = _step(out, "worker-1")
    clock_before = max(r["clock"] for r in _records(out, "worker-1") if r["event"] == "progress")
    os.kill(_pid(out, "--worker-id worker-1 "), signal.SIGKILL)
    killed = time.monotonic()
    survivor = _step(out, "worker-0")
    # Synchronous averaging: worker-0 finishes at most the step in hand, then waits for worker-1's
    # gradient until worker-1 is evicted (or its restart rejoins), never longer.
    poll(lambda: _step(out, "worker-0") >= survivor + 3, 60, "worker-0 to go on")
    stalled = time.monotonic() - killed
    assert stalled < HEARTBEAT + 3.0, f"worker-0 stalled {stalled:.1f}s (heartbeat timeout {HEARTBEAT}s)"

    summary = _finish(proc, out, 240)
    assert summary["restarts"]["worker-1"] == 1 and summary["restarts"]["server-0"] == 0
    assert summary["iterations"] == steps  # the restarted worker did only what was left
    starts = [r for r in _records(out, "worker-1") if r["event"] == "start"]
    assert len(starts) == 2
    again = starts[1]
    assert done_before <= again["first_step"] < steps // 2
    assert again["clock"] >= clock_before  # joined at the slowest live clock, never behind
    done = [r for r in _records(out, "worker-1") if r["event"] == "done"]
    assert len(done) == 1 and done[0]["steps"] == steps // 2
    assert processes_mentioning(str(out)) == []


def test_a_process_out_of_restarts_fails_the_cluster_naming_it(tmp_path, corpus, procs):
    """With its restarts used up, a failure stops the cluster (exit 1) and says so (--max-restarts 0: test_cluster)."""
    out = tmp_path / "run"
    proc = procs.popen(
        _cmd(out, corpus, 100000, "--max-restarts", "1", "--servers", "1", "--workers", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def starts() -> int:
        return sum(r["event"] == "start" for r in _records(out, "worker-0"))

    poll(lambda: starts() == 1, 120, "worker-0 to start")
    os.kill(_pid(out, "--worker-id worker-0 "), signal.SIGKILL)
    poll(lambda: starts() == 2, 120, "worker-0 to be restarted")
    os.kill(_pid(out, "--worker-id worker-0 "), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert b"worker-0 failed with exit code -9 after 1 restarts (--max-restarts 1)" in stderr
    poll(lambda: processes_mentioning(str(out)) == [], 30, "every cluster process to exit")


def test_server_restarted_by_hand_in_ssp_mode_counts_its_losses_and_applies_nothing_twice(
    start_server, procs, tmp_path
):
    """`ps-server` alone (as under compose's restart policy), asynchronous SSP (s = 2), no averaging:
    the restarted server on the same port and checkpoint folder resumes; each applied push was
    acknowledged to exactly one push; the lost updates are those since the checkpoint."""
    flags = dict(checkpoint_dir=tmp_path / "ckpt", checkpoint_interval=600, heartbeat_timeout=HEARTBEAT, staleness=2)
    server = start_server(**flags)
    workers = [
        start_worker(procs, [server.address], f"w{i}", 150, tmp_path, sleep=0.01, staleness=2, retry_seconds=120)
        for i in range(2)
    ]
    poll(lambda: _status(server.address).version >= 20, 60, "training to start")
    with stub(server.address) as s:
        ckpt = s.Checkpoint(pb.CheckpointRequest(), timeout=10).version
    poll(lambda: _status(server.address).version >= ckpt + 15, 60, "updates after the checkpoint")
    for proc, _ in workers:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        last = [-1]

        def settled() -> bool:
            v = _status(server.address).version
            same, last[0] = v == last[0], v
            return same

        poll(settled, 10, "the version to settle", interval=0.1)
        killed_at = last[0]
        server.proc.kill()
        server.proc.wait(timeout=10)
    finally:
        for proc, _ in workers:
            os.kill(proc.pid, signal.SIGCONT)
    again = start_server(port=server.port, **flags)
    for proc, files in workers:
        assert wait_exit(proc, 120, files["log"]) == 0  # no worker crashed
    st = _status(again.address)
    assert st.restored_version == ckpt
    assert killed_at - ckpt - 2 <= st.lost_updates <= killed_at - ckpt  # each of 2 workers may miss its last ack
    stats = [json.loads(files["stats"].read_text()) for _, files in workers]
    accepted = sum(s["accepted"] for s in stats)
    # acknowledged pushes = those applied before the kill and acknowledged (killed_at, less at most one
    # unacknowledged per worker) + those applied by the restarted server: none applied twice or unseen
    assert killed_at - 2 <= accepted - (st.version - ckpt) <= killed_at, (accepted, st.version, ckpt, killed_at)
    assert st.version == ckpt + st.pushes_applied
    assert sum(s["reregistrations"] for s in stats) >= 2  # both came back with new sessions
