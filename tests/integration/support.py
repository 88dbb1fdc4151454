"""Helpers shared by the integration tests: raw RPCs with deadlines, models, polling."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from asyncps_common.security import NONE, Security
from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server.dataplane import DataPlane
from ps_server.server import build_server
from ps_server.servicer import ServerConfig, Servicer
from worker import CallOptions

T = TypeVar("T")
RPC_TIMEOUT = 10.0  # every raw RPC in these tests carries this deadline
WORKER_SCRIPT = Path(__file__).with_name("worker_proc.py")

# Deadlines for PSClient in the test process: fail fast instead of hanging to the global timeout.
FAST_FAIL = CallOptions(timeout=10.0, push_timeout=30.0, pull_timeout=60.0, retry_seconds=5.0)


@contextmanager
def stub(address: str, security: Security = NONE, **channel_options) -> Iterator[service.Stub]:
    """A synchronous stub for every ParameterServer method (Frame streams as raw bytes).

    `security`: TLS and token of the channel (default plaintext, no token).
    """
    opts = [(f"grpc.{k}", v) for k, v in channel_options.items()]
    with security.channel(address, options=opts) as channel:
        yield service.Stub(channel, metadata=security.metadata)


def status(address: str, security: Security = NONE) -> pb.StatusResponse:
    with stub(address, security) as s:
        return s.Status(pb.StatusRequest(include_checksum=True), timeout=RPC_TIMEOUT)


def call(
    address: str, method: str, request, timeout: float = RPC_TIMEOUT, security: Security = NONE
) -> tuple[grpc.StatusCode, str, dict]:
    """One raw RPC with a deadline: (code, details, trailing metadata). Init/Push take a list of frames."""
    with stub(address, security) as s:
        return invoke(getattr(s, method), method, request, timeout)


def invoke(fn, method: str, request, timeout: float = RPC_TIMEOUT) -> tuple[grpc.StatusCode, str, dict]:
    """Call the multi-callable `fn` of `method` the way its kind needs: (code, details, trailing metadata)."""
    try:
        if method == "Pull":
            for _ in fn(request, timeout=timeout):
                pass
        elif method in ("Init", "Push"):
            fn(iter(request), timeout=timeout)
        else:
            fn(request, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", dict(err.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", {}


def grpc_pull(
    s: service.Stub, request: pb.PullRequest, numel: int, timeout: float = RPC_TIMEOUT
) -> tuple[int, torch.Tensor]:
    """A raw gRPC Pull, its frames reassembled: (version, the numel weights)."""
    out, version = torch.empty(numel), None
    for raw_frame in s.Pull(request, timeout=timeout):
        frame, payload = wire.decode_frame(raw_frame)
        if frame.HasField("pull"):
            version = frame.pull.version
            continue
        chunk = wire.payload_tensor(frame, payload)
        out[frame.tensor.offset : frame.tensor.offset + chunk.numel()] = chunk
    return version, out


def clock_of(st: pb.StatusResponse, worker_id: str) -> int | None:
    for c in st.clocks:
        if c.worker_id == worker_id:
            return c.clock
    return None


def poll(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.02) -> T:
    """Call `predicate` until it returns something truthy; raise AssertionError after `timeout`.

    `what` names the awaited condition; a callable is asked only on failure (for details).
    """
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def mlp(seed: int = 0) -> torch.nn.Module:
    """3300 parameters: cut in two by bytes, the second weight matrix straddles the shards."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)) for _ in range(n)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def start_worker(
    procs,
    servers: list[str],
    worker_id: str,
    steps: int,
    directory: Path,
    *,
    sleep: float = 0.0,
    staleness: float | str = "inf",
    hold: bool = False,
    gate: Path | None = None,
    average: bool = False,
    prefix: tuple[str, ...] = (),
    retry_seconds: float = 10.0,
) -> tuple[subprocess.Popen, dict[str, Path]]:
    """Launch worker_proc.py as its own process (own process group, reaped by `procs`).

    `prefix` goes before the command (e.g. `ip netns exec NS`); `files["stats"]` gets the
    worker's push counts (JSON) when it finishes."""
    files = {name: directory / f"{worker_id}.{name}" for name in ("ready", "done", "hold", "log", "stats")}
    args = [
        *prefix,
        sys.executable,
        str(WORKER_SCRIPT),
        "--stats",
        str(files["stats"]),
        "--retry-seconds",
        str(retry_seconds),
        "--servers",
        ",".join(servers),
        "--worker-id",
        worker_id,
        "--steps",
        str(steps),
        "--sleep",
        str(sleep),
        "--staleness",
        str(staleness),
        "--ready",
        str(files["ready"]),
        "--done",
        str(files["done"]),
    ]
    if gate is not None:
        args += ["--go", str(gate)]
    if hold:
        args += ["--hold", str(files["hold"])]
    if average:
        args.append("--average")
    with open(files["log"], "wb") as log:
        proc = procs.popen(args, stdout=log, stderr=subprocess.STDOUT)
    return proc, files


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)


def wait_exit(proc: subprocess.Popen, timeout: float, log: Path | None = None) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        raise AssertionError(f"process {proc.args[:4]} still running after {timeout}s\n{tail}") from None


class InProcessServer:
    """A Servicer on a real grpc.aio server in a background thread, for white-box tests.

    With `data_plane`, its TCP data plane listens too (port in `servicer.data_port`).
    """

    def __init__(self, cfg: ServerConfig, data_plane: bool = False):
        self.servicer = Servicer(cfg)
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        started = threading.Event()

        async def main() -> None:
            server, self.port, _ = build_server("127.0.0.1:0", self.servicer)
            data = DataPlane(self.servicer, asyncio.get_running_loop()) if data_plane else None
            if data is not None:
                self.servicer.data_port = data.start("127.0.0.1", 0)
            await server.start()
            self._stop = asyncio.Event()
            started.set()
            await self._stop.wait()
            await server.stop(0)
            if data is not None:
                await data.stop(0)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert started.wait(30), "in-process server did not start"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)
