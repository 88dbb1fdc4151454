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

from asyncps_common.security import NONE, Security
from worker.rpc import wait_serving

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """Tests stop launchers with SIGINT, as Ctrl-C in a terminal would. A suite started in the
    background of a non-interactive shell (`bash -c '... &'`) inherits SIGINT ignored, and every
    process it starts would keep ignoring it: give it back its default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


@dataclass
class PendingServer:
    """A `ps-server` process launched but not yet known to be serving."""

    proc: subprocess.Popen
    port_file: Path
    shard_index: int
    num_shards: int
    checkpoint_dir: Path | None
    log: Path
    security: Security = NONE  # how to reach it: the health check over TLS when it serves TLS

    def ready(self, timeout: float = 60.0) -> ServerProc:
        """Poll the port file, then the gRPC health check, until SERVING (or raise)."""
        proc, log = self.proc, self.log
        end = time.monotonic() + timeout
        while not self.port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"ps-server exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > end:
                raise TimeoutError(f"ps-server wrote no port file: {log.read_text()}")
            time.sleep(0.02)
        bound = int(self.port_file.read_text())
        wait_serving(
            f"127.0.0.1:{bound}",
            timeout=max(1.0, end - time.monotonic()),
            is_alive=lambda: proc.poll() is None,
            security=self.security,
        )
        return ServerProc(proc, bound, self.shard_index, self.num_shards, self.checkpoint_dir, log)


class ServerStarter:
    """`start(shard_index=0, num_shards=1, port=0, **flags) -> ServerProc`, serving.

    `start.shards(n, **flags)` launches all `n` shards of one model at once (in
    parallel, which halves start-up time on a small machine) and returns them serving.
    Flags are `ps-server` flags with `_` for `-`, e.g. `heartbeat_timeout=1`; `security`
    (not a flag) is how the test reaches the server, e.g. the CA of its TLS certificate.
    """

    def __init__(self, group: ProcessGroup, directory: Path):
        self.group, self.directory = group, directory
        self._counter = iter(range(100000))

    def launch(
        self, shard_index: int = 0, num_shards: int = 1, port: int = 0, security: Security = NONE, **flags
    ) -> PendingServer:
        n = next(self._counter)
        port_file = self.directory / f"server-{n}.port"
        log = self.directory / f"server-{n}.log"
        args = [
            sys.executable,
            "-m",
            "ps_server.cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-file",
            str(port_file),
            "--shard-index",
            str(shard_index),
            "--num-shards",
            str(num_shards),
        ]
        for key, value in flags.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        with open(log, "wb") as out:
            proc = self.group.popen(args, stdout=out, stderr=subprocess.STDOUT)
        ckpt = flags.get("checkpoint_dir")
        return PendingServer(proc, port_file, shard_index, num_shards, Path(ckpt) if ckpt else None, log, security)

    def __call__(
        self, shard_index: int = 0, num_shards: int = 1, port: int = 0, security: Security = NONE, **flags
    ) -> ServerProc:
        return self.launch(shard_index, num_shards, port, security, **flags).ready()

    def shards(self, num_shards: int, **flags) -> list[ServerProc]:
        pending = [self.launch(i, num_shards, **flags) for i in range(num_shards)]
        return [p.ready() for p in pending]


@pytest.fixture
def start_server(procs, tmp_path):
    """start_server(shard_index=0, num_shards=1, port=0, **flags) -> ServerProc, serving.

    Also `start_server.shards(n, **flags)`: all n shards of a model, started in parallel.
    """
    return ServerStarter(procs, tmp_path)


@pytest.fixture(scope="module")
def module_procs():
    """Like `procs`, for servers shared by the tests of one module (reaped after the module)."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.reap()


@pytest.fixture(scope="module")
def start_module_server(module_procs, tmp_path_factory):
    """Like `start_server`, for servers shared by the tests of one module."""
    return ServerStarter(module_procs, tmp_path_factory.mktemp("servers"))
