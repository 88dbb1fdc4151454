"""Shared fixtures: real `ps-server` processes on loopback, always reaped.

`procs` starts child processes in their own process groups and kills every one of
them (and their children) when the test ends, pass or fail. `start_server` launches
a real `ps-server` on a free port (port 0 + --port-file) and returns once the gRPC
health check says SERVING - never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.rpc import wait_serving

ROOT = Path(__file__).resolve().parent.parent


class ProcessGroup:
    """Child processes of one test; `reap()` stops them all (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
        proc = subprocess.Popen(args, start_new_session=True, cwd=kw.pop("cwd", ROOT), env=env, **kw)
        self.procs.append(proc)
        return proc

    def reap(self, grace: float = 5.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)  # the group may hold grandchildren
            if p.poll() is None:
                p.wait(timeout=5)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def procs():
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.reap()


@dataclass
class ServerProc:
    proc: subprocess.Popen
    port: int
    shard_index: int
    num_shards: int
    checkpoint_dir: Path | None
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def start_server(procs, tmp_path):
    """start_server(shard_index=0, num_shards=1, port=0, **flags) -> ServerProc, serving."""
    counter = iter(range(1000))

    def start(shard_index: int = 0, num_shards: int = 1, port: int = 0, **flags) -> ServerProc:
        n = next(counter)
        port_file = tmp_path / f"server-{n}.port"
        log = tmp_path / f"server-{n}.log"
        args = [sys.executable, "-m", "ps_server.cli", "--host", "127.0.0.1", "--port", str(port),
                "--port-file", str(port_file), "--shard-index", str(shard_index), "--num-shards", str(num_shards)]
        for key, value in flags.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        proc = procs.popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"ps-server exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > end:
                raise TimeoutError(f"ps-server wrote no port file: {log.read_text()}")
            time.sleep(0.02)
        bound = int(port_file.read_text())
        wait_serving(f"127.0.0.1:{bound}", timeout=60, is_alive=lambda: proc.poll() is None)
        ckpt = flags.get("checkpoint_dir")
        return ServerProc(proc, bound, shard_index, num_shards, Path(ckpt) if ckpt else None, log)

    return start
