"""One server's RPCs, as the worker sees them, behind one error-handling wrapper.

`ShardClient.call` is the single place where `grpc.aio.AioRpcError` is caught: it
gives every call its deadline, retries UNAVAILABLE with exponential backoff until
`CallOptions.retry_seconds` have passed, counts retries, and raises `RpcFailed`
(carrying the status code and the server's reason) for everything else. A push is
retried safely: a repeat of an already applied push is answered ALREADY_EXISTS and
counted as done, never applied twice. With a `Security` (asyncps_common/security.py) the
channel is TLS and every call carries the auth token; UNAUTHENTICATED is not retried.

Transport: pulls and pushes go over the shard's TCP data plane (worker/dataplane.py)
when its Register answer offers one and `CallOptions.transport` allows it ("auto", the
default, falls back to gRPC for a shard whose data port cannot be reached while its gRPC
port can; "tcp" insists; "grpc" never uses it). Its failures are retried and reported
exactly like gRPC's, in the same `call`; its blocking socket work runs in this client's
own threads, and a cancelled exchange is aborted and waited for before the cancellation
goes on, so no thread writes into (or reads from) a caller's tensor after it returned.

Use from one asyncio event loop (the client's I/O thread); not thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from asyncps_common.security import NONE, Security
from protos import compress, service, wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import DataError, split_host
from worker.dataplane import CONNECT_FAILED, Abort, DataChannel

TRANSPORTS = ("auto", "tcp", "grpc")
DATA_STREAMS = 2  # bench/wire.py: two streams move ~1.3-1.6x what one does on loopback

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class CallOptions:
    """Deadlines (seconds) and the retry budget for UNAVAILABLE."""

    timeout: float = 10.0  # control calls
    push_timeout: float = 60.0
    pull_timeout: float = 300.0  # includes waiting under the staleness bound
    retry_seconds: float = 60.0  # keep retrying UNAVAILABLE this long (0: never retry)
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES
    max_message_bytes: int = 8 << 20
    transport: str = "auto"  # pulls and pushes: "auto" (data plane if offered), "tcp" or "grpc"
    # data-plane connections a pull or push of the whole model uses at once: PSClient stripes
    # each of S shards over ceil(data_streams / S) (a ShardClient alone: over data_streams),
    # in parts of at least stripe_min_bytes
    data_streams: int = DATA_STREAMS
    stripe_min_bytes: int = wire.STRIPE_MIN_BYTES


class RpcFailed(Exception):
    """A call that failed for good: `code` is the gRPC status, `reason` the server's tag."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str, reason: str = ""):
        super().__init__(f"{method} to {address} failed: {code.name}: {details}")
        self.address, self.method, self.code, self.details, self.reason = address, method, code, details, reason

    @property
    def evicted(self) -> bool:
        """True when the server no longer knows this worker's session (re-register)."""
        return self.reason == service.UNKNOWN_WORKER


class ShardClient:
    """RPCs to the server holding shard `index`.

    `address` may name a replicated shard's replicas, `host:port|host:port|...` (head first):
    a call answered UNAVAILABLE (a dead replica, or one that is not the head: reason
    `not-head`) is retried on the next replica, round the list, within the same retry budget;
    the session stays valid there (the chain replicated it), and the data plane follows the
    new head's data port (Status) or falls back to gRPC.
    """

    def __init__(self, address: str, index: int, opts: CallOptions = CallOptions(), security: Security = NONE):
        self.replicas = [a.strip() for a in address.split("|") if a.strip()]
        if not self.replicas or len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"shard {index}: {address!r} is not a list of distinct host:port replicas")
        self.address, self.index, self.opts = self.replicas[0], index, opts
        self.retries = 0
        self.failovers = 0  # times a call moved on to another replica
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._old_data: list[DataChannel] = []
        self._probe_data = False  # after a failover: ask the new head for its data port
        self.security = security
        self._channel = self._channel_to(self.address)
        self.stub = service.Stub(self._channel, metadata=security.metadata)
        if opts.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {opts.transport!r}")
        if not 1 <= opts.data_streams <= wire.MAX_STRIPES:
            raise ValueError(f"data_streams must be 1 to {wire.MAX_STRIPES}, got {opts.data_streams}")
        self.data: DataChannel | None = None  # the shard's data plane, once Register offered one
        self._executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix=f"asyncps-data-{index}")
        self._pull_lock = asyncio.Lock()  # one pull at a time writes into this shard's slice

    def _channel_to(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            opts = self.opts
            ch = self._channels[address] = self.security.aio_channel(
                address,
                options=[
                    ("grpc.max_receive_message_length", opts.max_message_bytes),
                    ("grpc.max_send_message_length", opts.max_message_bytes),
                    # reconnect to a restarted server within a second, not after gRPC's default backoff (up to 120 s)
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
        return ch

    def _fail_over(self, failed: str) -> None:
        """Move on to the replica after `failed` (unless another call already moved on)."""
        if len(self.replicas) < 2 or self.address != failed:
            return
        self.address = self.replicas[(self.replicas.index(failed) + 1) % len(self.replicas)]
        self._channel = self._channel_to(self.address)
        self.stub = service.Stub(self._channel, metadata=self.security.metadata)
        if self.data is not None:  # calls in flight on it may still end; closed with the client
            self._old_data.append(self.data)
            self.data = None
        self._probe_data = self.opts.transport != "grpc"
        self.failovers += 1
        log.info("shard %d: trying replica %s", self.index, self.address)

    async def close(self) -> None:
        self._use_data_port(0)
        for d in self._old_data:
            d.close()
        for ch in self._channels.values():
            await ch.close()
        self._executor.shutdown(wait=False)

    @property
    def transport(self) -> str:
        """What pulls and pushes use now: "tcp" (the data plane) or "grpc"."""
        return "tcp" if self.data is not None else "grpc"

    def _use_data_port(self, port: int) -> None:
        """Follow the data port the server offers (0: none) unless transport is "grpc"."""
        if self.opts.transport == "grpc":
            port = 0
        if self.data is not None and self.data.port == port:
            return
        if self.data is not None:
            self.data.close()
        self.data = (
            DataChannel(
                split_host(self.address), port, self.security, self.opts.data_streams, self.opts.stripe_min_bytes
            )
            if port
            else None
        )
        if port:
            log.info("shard %d: pulls and pushes over the data plane at %s", self.index, self.data.peer)  # type: ignore[union-attr]

    async def _on_data(self, fn: Callable[..., T], *args) -> T:
        """Run a blocking `DataChannel` exchange in this client's threads; cancellable."""
        abort = Abort()
        fut = asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, abort=abort))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            abort.abort()
            while not fut.done():  # the thread must be done with the caller's tensor first
                try:
                    await asyncio.wait([fut])
                except asyncio.CancelledError:
                    pass
            raise

    async def _data_or_grpc(
        self, method: str, data_fn: Callable[[], Awaitable[T]], grpc_fn: Callable[[], Awaitable[T]]
    ) -> T:
        """One attempt of a pull or push: over the data plane if there is one, else gRPC.

        If the data port refuses connections while the gRPC port answers, the shard has
        moved its data port (a restart: follow it) or it is out of reach from here
        (transport "auto": use gRPC for this shard until it registers again). An attempt
        whose channel another call closed meanwhile, on finding the port moved, is retried
        on the new channel (UNAVAILABLE), not failed.
        """
        if self._probe_data:  # the head changed: its data port, from Status (gRPC errors: retried by call)
            st = await self.stub.Status(pb.StatusRequest(), timeout=self.opts.timeout)
            self._probe_data = False
            self._use_data_port(st.data_port)
        if self.data is None:
            return await grpc_fn()
        used = self.data
        try:
            return await data_fn()
        except DataError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self.data is not None and self.data is not used:
                raise DataError(
                    grpc.StatusCode.UNAVAILABLE, f"the data port moved to {self.data.peer} during the {method}"
                ) from None
            if exc.reason != CONNECT_FAILED:
                raise
            port = self.data.port
            st = await self.stub.Status(pb.StatusRequest(), timeout=self.opts.timeout)  # gRPC errors: retried by call
            if st.data_port != port or self.opts.transport == "tcp":
                self._use_data_port(st.data_port)
                raise  # UNAVAILABLE: retried (at the new port, if it moved)
            log.warning(
                "shard %d: data plane at %s unreachable (%s); using gRPC for %s and the rest",
                self.index,
                self.data.peer,
                exc.details(),
                method,
            )
            self._use_data_port(0)
            return await grpc_fn()

    async def call(self, method: str, attempt: Callable[[], Awaitable[T]], retry_seconds: float | None = None) -> T:
        """Run `attempt()` (one whole RPC) until it succeeds or fails for good.

        UNAVAILABLE is retried for `retry_seconds` (default: the options') counted from the
        first failure, so a pull that waited long under the bound still gets the whole budget
        when its server dies (and comes back: a restarted shard).
        """
        budget = self.opts.retry_seconds if retry_seconds is None else retry_seconds
        deadline = None
        backoff = self.opts.backoff_initial
        # a replicated shard: the next replica may be the head already, so retry soon
        most = self.opts.backoff_max if len(self.replicas) < 2 else min(self.opts.backoff_max, 0.25)
        while True:
            used = self.address
            try:
                return await attempt()
            except (grpc.aio.AioRpcError, DataError) as err:
                code = err.code()
                if deadline is None:
                    deadline = time.monotonic() + budget
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._fail_over(used)
                if code == grpc.StatusCode.UNAVAILABLE and time.monotonic() + backoff < deadline:
                    self.retries += 1
                    log.warning(
                        "%s to %s unavailable (%s); retrying in %.2fs", method, self.address, err.details(), backoff
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, most)
                    continue
                reason = (
                    err.reason
                    if isinstance(err, DataError)
                    else dict(err.trailing_metadata() or ()).get(service.REASON_KEY, "")
                )
                raise RpcFailed(self.address, method, code, err.details() or "", reason) from None

    # -- control ----------------------------------------------------------------------
    async def status(self) -> pb.StatusResponse:
        return await self.call("Status", lambda: self.stub.Status(pb.StatusRequest(), timeout=self.opts.timeout))

    async def register(
        self,
        worker_id: str,
        plan_hash: str,
        start_clock: int = 0,
        seen_version: int = 0,
        seen_incarnation: int = 0,
        batch_size: int = 0,
        compression: str = "",
    ) -> pb.RegisterResponse:
        req = pb.RegisterRequest(
            worker_id=worker_id,
            plan_hash=plan_hash,
            start_clock=start_clock,
            seen_version=seen_version,
            seen_incarnation=seen_incarnation,
            batch_size=batch_size,
            compression=compression,
        )
        resp = await self.call("Register", lambda: self.stub.Register(req, timeout=self.opts.timeout))
        self._use_data_port(resp.data_port)
        return resp

    async def heartbeat(self, worker_id: str, session: int, timeout: float | None = None) -> pb.HeartbeatResponse:
        """One attempt, not retried (the next heartbeat is the retry)."""
        req = pb.HeartbeatRequest(worker_id=worker_id, session=session)
        return await self.call(
            "Heartbeat", lambda: self.stub.Heartbeat(req, timeout=timeout or self.opts.timeout), retry_seconds=0
        )

    async def leave(self, worker_id: str, session: int) -> None:
        req = pb.LeaveRequest(worker_id=worker_id, session=session)
        await self.call("Leave", lambda: self.stub.Leave(req, timeout=self.opts.timeout))

    async def checkpoint(self) -> pb.CheckpointResponse:
        return await self.call(
            "Checkpoint", lambda: self.stub.Checkpoint(pb.CheckpointRequest(), timeout=self.opts.timeout)
        )

    # -- tensors ----------------------------------------------------------------------
    def _frames(self, head: pb.Frame, flat: torch.Tensor) -> Iterator[bytes]:
        yield wire.encode_frame(head)
        yield from wire.chunk_frames(flat, self.opts.chunk_bytes)

    async def init(self, head: pb.InitHeader, weights: torch.Tensor) -> pb.InitResponse:
        """Offer this shard's initial weights (a 1-D float32 CPU tensor); first offer wins."""
        frame = pb.Frame(init=head)
        return await self.call(
            "Init", lambda: self.stub.Init(self._frames(frame, weights), timeout=self.opts.push_timeout)
        )

    async def push(
        self, head: pb.PushHeader, grad: torch.Tensor, payload: torch.Tensor | None = None
    ) -> pb.PushResponse | None:
        """Send one gradient (1-D float32 CPU tensor); None if the server had already applied it.

        With `head.compression` set, `payload` is its encoding (protos/compress.py) and `grad`
        holds exactly the values it decodes to: the data plane sends `payload`, gRPC `grad` as
        float32 (so the shard applies the same values either way)."""
        plain = pb.PushHeader()
        plain.CopyFrom(head)
        plain.compression = ""
        frame = pb.Frame(push=plain)
        data_head, data_grad = (head, payload) if payload is not None else (plain, grad)

        def attempt() -> Awaitable[pb.PushResponse]:
            return self._data_or_grpc(
                "Push",
                lambda: self._on_data(
                    self.data.push,  # type: ignore[union-attr]
                    data_head,
                    data_grad,
                    time.monotonic() + self.opts.push_timeout,
                ),
                lambda: self.stub.Push(self._frames(frame, grad), timeout=self.opts.push_timeout),
            )

        try:
            return await self.call("Push", attempt)
        except RpcFailed as exc:
            if exc.code == grpc.StatusCode.ALREADY_EXISTS:
                return None
            raise

    async def pull(self, req: pb.PullRequest, out: torch.Tensor) -> pb.PullHeader:
        """Stream this shard's weights into `out` (1-D float32 CPU tensor, the shard's size); with
        `req.compression` bf16/fp16 they are exactly the shard's weights rounded to that dtype."""
        req.chunk_bytes = req.chunk_bytes or self.opts.chunk_bytes
        dtype = compress.pull_dtype(req.compression)

        async def over_data() -> pb.PullHeader:
            async with self._pull_lock:
                return await self._on_data(self.data.pull_into, req, out, time.monotonic() + self.opts.pull_timeout)  # type: ignore[union-attr]

        async def over_grpc() -> pb.PullHeader:
            head = None
            received = 0
            async for raw in self.stub.Pull(req, timeout=self.opts.pull_timeout):
                frame, payload = wire.decode_frame(raw)
                if head is None:
                    head = frame.pull
                    if head.numel != out.numel():
                        raise RpcFailed(
                            self.address,
                            "Pull",
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"shard holds {head.numel} elements, the plan expects {out.numel()}",
                        )
                    continue
                chunk = wire.payload_tensor(frame, payload)
                lo = frame.tensor.offset
                out[lo : lo + chunk.numel()].copy_(chunk)
                received += chunk.numel()
            if head is None or received != out.numel():
                raise RpcFailed(
                    self.address,
                    "Pull",
                    grpc.StatusCode.DATA_LOSS,
                    f"pull stream ended after {received} of {out.numel()} elements",
                )
            if dtype != torch.float32:  # gRPC sends float32: round here, as the data plane's server does
                out.copy_(out.to(dtype))
            return head

        return await self.call("Pull", lambda: self._data_or_grpc("Pull", over_data, over_grpc))


def wait_serving(
    address: str, timeout: float = 30.0, is_alive: Callable[[], bool] = lambda: True, security: Security = NONE
) -> None:
    """Block until the server at `address` answers the gRPC health check SERVING.

    The health service needs no token, but a TLS server must be reached over TLS
    (`security`'s CA, and its client certificate under mutual TLS).

    Polls (each check has its own short deadline) until `timeout`; raises TimeoutError,
    or RuntimeError as soon as `is_alive()` turns False (the process died).
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    with security.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not is_alive():
                raise RuntimeError(f"server at {address} exited before serving")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service.SERVICE_NAME), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"server at {address} not serving after {timeout:.0f}s")
            time.sleep(0.05)
