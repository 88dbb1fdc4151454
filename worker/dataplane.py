"""A worker's side of one shard's TCP data plane (server: ps_server/dataplane.py).

`DataChannel` keeps a small pool of connections to the shard's data port (one per
exchange in progress, kept for the next one) and runs one pull or push per call:
a pull receives the weights straight into the caller's tensor, a push sends the
gradient straight from it. With `streams` > 1 a large shard's pull or push is striped:
cut into parts (`protos.wire.stripes`) that go over that many connections at once,
one thread each (ps.proto, "Striping"); the server treats them as one exchange.
Failures are `protos.datasock.DataError`s with gRPC status codes, so
`worker.rpc.ShardClient.call` retries and reports them as it does gRPC errors; a
connection that could not be opened at all says so with `reason == CONNECT_FAILED`.

Every method blocks the calling thread (run them in an executor) and is thread-safe;
an `Abort` handed to a call lets another thread make it fail at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
import socket
import threading
import time

import torch

from asyncps_common.security import NONE, Security
from protos import compress, wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import Code, DataConn, DataError, status_code, tune

log = logging.getLogger(__name__)
CONNECT_FAILED = "data-connect-failed"
CONNECT_SECONDS = 5.0
POOL_SIZE = 4  # idle connections kept per shard (at least: twice the streams)


class Abort:
    """Lets one thread abort the exchange other threads are blocked in (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: list[DataConn] = []
        self.aborted = False

    def attach(self, conn: DataConn) -> None:
        with self._lock:
            self._conns.append(conn)
            if self.aborted:
                conn.abort()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            conns = list(self._conns)
        for conn in conns:
            conn.abort()


class DataChannel:
    """Pooled data-plane connections to one shard at `host:port`."""

    def __init__(
        self,
        host: str,
        port: int,
        security: Security = NONE,
        streams: int = 1,
        min_part_bytes: int = wire.STRIPE_MIN_BYTES,
    ):
        if not 1 <= streams <= wire.MAX_STRIPES:
            raise ValueError(f"streams must be 1 to {wire.MAX_STRIPES}, got {streams}")
        self.host, self.port, self.security, self.streams = host, port, security, streams
        self.min_part_bytes = min_part_bytes
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._tls = security.client_ssl_context() if security.tls else None
        self._idle: list[DataConn] = []
        self._pool_size = max(POOL_SIZE, 2 * streams)
        self._lock = threading.Lock()
        self._closed = False
        # the parts after the first of a striped exchange (the caller's thread moves the first)
        self._parts = (
            concurrent.futures.ThreadPoolExecutor(2 * (streams - 1), thread_name_prefix="asyncps-stripe")
            if streams > 1
            else None
        )

    # -- connections --------------------------------------------------------------------
    def _connect(self, deadline: float) -> DataConn:
        try:
            sock = socket.create_connection(
                (self.host, self.port), timeout=max(0.01, min(CONNECT_SECONDS, deadline - time.monotonic()))
            )
        except OSError as exc:
            raise DataError(
                Code.UNAVAILABLE, f"cannot connect to the data plane at {self.peer}: {exc}", CONNECT_FAILED
            ) from None
        try:
            tune(sock)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:  # ssl.SSLError included: an untrusted server, a refused client certificate
            sock.close()
            raise DataError(
                Code.UNAVAILABLE, f"TLS handshake with the data plane at {self.peer} failed: {exc}"
            ) from None
        conn = DataConn(sock, self.peer)
        hello_deadline = min(deadline, time.monotonic() + CONNECT_SECONDS)
        try:
            conn.sock.settimeout(max(0.01, hello_deadline - time.monotonic()))
            conn.sock.sendall(wire.DATA_MAGIC)
            conn.send(pb.DataRequest(hello=pb.DataHello(token=self.security.token or "")), deadline=hello_deadline)
            _answer(conn, conn.recv_header(pb.DataResponse, hello_deadline))
        except (DataError, OSError) as exc:
            conn.close()
            if isinstance(exc, DataError):
                raise
            raise DataError(Code.UNAVAILABLE, f"data plane at {self.peer}: {exc}") from None
        return conn

    def _take(self, deadline: float) -> DataConn:
        with self._lock:
            if self._closed:
                raise DataError(Code.CANCELLED, "data channel closed")
            if self._idle:
                return self._idle.pop()
        return self._connect(deadline)

    def _give(self, conn: DataConn) -> None:
        with self._lock:
            if not conn.broken and not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self._parts is not None:
            self._parts.shutdown(wait=False)

    # -- exchanges ----------------------------------------------------------------------
    def pull_into(self, req: pb.PullRequest, out: torch.Tensor, deadline: float, abort: Abort) -> pb.PullHeader:
        """Pull the shard's weights into `out` (contiguous 1-D float32, the shard's size); with
        `req.compression` bf16/fp16 they arrive in that dtype and are widened into `out` exactly."""
        dtype = compress.pull_dtype(req.compression)
        stage = out if dtype == torch.float32 else torch.empty(out.numel(), dtype=dtype)

        def part(conn: DataConn, stripe: pb.Stripe | None, lo: int, hi: int) -> pb.PullHeader:
            conn.send(pb.DataRequest(pull=req, stripe=stripe), deadline=deadline)
            resp = _answer(conn, conn.recv_header(pb.DataResponse, deadline))
            if resp.pull.numel != out.numel() or resp.payload_bytes != (hi - lo) * dtype.itemsize:
                conn.broken = True
                raise DataError(
                    Code.FAILED_PRECONDITION,
                    f"shard holds {resp.pull.numel} elements "
                    f"({resp.payload_bytes} bytes sent for elements {lo}:{hi}), the plan expects {out.numel()}",
                )
            conn.recv_into(wire.tensor_bytes(stage[lo:hi]), deadline)
            if stage is not out:
                out[lo:hi].copy_(stage[lo:hi])
            return resp.pull

        heads = self._exchange(out.numel(), part, deadline, abort, True, dtype.itemsize)
        if any(h.version != heads[0].version for h in heads):  # the server answers every part from one version
            raise DataError(
                Code.INTERNAL,
                f"striped pull from {self.peer} got parts of versions {sorted({h.version for h in heads})}",
            )
        return heads[0]

    def push(self, head: pb.PushHeader, grad: torch.Tensor, deadline: float, abort: Abort) -> pb.PushResponse:
        """Push one gradient: contiguous 1-D, the shard's size in float32, or the payload of
        `head.compression` (protos/compress.py; a onebit one is never striped). Returns the answer."""

        def part(conn: DataConn, stripe: pb.Stripe | None, lo: int, hi: int) -> pb.PushResponse:
            payload = wire.tensor_bytes(grad[lo:hi])
            conn.send(pb.DataRequest(push=head, payload_bytes=payload.nbytes, stripe=stripe), payload, deadline)
            return _answer(conn, conn.recv_header(pb.DataResponse, deadline)).push

        striped = compress.elementwise(head.compression)
        return self._exchange(grad.numel(), part, deadline, abort, striped, grad.element_size())[0]

    def _exchange(
        self, numel: int, part, deadline: float, abort: Abort, striped: bool = True, itemsize: int = 4
    ) -> list:
        """Run `part(conn, stripe, lo, hi)` for each part of one exchange of a shard of
        `numel` elements: one part on one connection, or a striped exchange over
        `stripe_count` connections at once (all opened before any byte is sent, so a
        connect failure leaves the server untouched). Returns the parts' results in order;
        if any part fails, the most telling error is raised (see `_part` for when the
        others are aborted)."""
        count = wire.stripe_count(numel * itemsize // 4, self.streams, self.min_part_bytes) if striped else 1
        conns: list[DataConn] = []
        try:
            for _ in range(count):
                conns.append(self._take(deadline))
                abort.attach(conns[-1])
            if count == 1:
                return [part(conns[0], None, 0, numel)]
            sid = secrets.randbits(63) + 1
            jobs = [
                (conns[i], pb.Stripe(id=sid, index=i, count=count), lo, hi)
                for i, (lo, hi) in enumerate(wire.stripes(numel, count))
            ]
            futures = []
            try:
                for job in jobs[1:]:
                    futures.append(self._parts.submit(self._part, part, job, conns))  # type: ignore[union-attr]
            except RuntimeError:  # closed meanwhile (the shard moved its data port): as `_take` when closed
                for conn in conns:
                    conn.abort()
                concurrent.futures.wait(futures)
                raise DataError(Code.CANCELLED, "data channel closed") from None
            try:
                results = [self._part(part, jobs[0], conns)]
            finally:  # no part may still touch the caller's tensor once this returns
                concurrent.futures.wait(futures)
            results += [f.result() for f in futures]
            errors = [r for r in results if isinstance(r, DataError)]
            if errors:  # the server's own answer over the side effects of one part failing
                raise min(errors, key=lambda e: e.code() in (Code.UNAVAILABLE, Code.CANCELLED, Code.ABORTED))
            return results
        finally:
            for conn in conns:
                self._give(conn)

    @staticmethod
    def _part(part, job: tuple, conns: list[DataConn]):
        """One part of a striped exchange (any thread): its result, or its DataError. A part
        whose connection failed aborts its siblings, which the server would keep waiting
        for it; a part the server answered with an error leaves them to get that answer too."""
        try:
            return part(*job)
        except DataError as exc:
            if job[0].broken:
                for conn in conns:
                    if conn is not job[0]:
                        conn.abort()
            return exc
        except BaseException:
            for conn in conns:
                conn.abort()
            raise


def _answer(conn: DataConn, resp: pb.DataResponse | None) -> pb.DataResponse:
    """`resp` if it is OK; DataError with the server's status otherwise (or if it hung up)."""
    if resp is None:
        conn.broken = True
        raise DataError(Code.UNAVAILABLE, f"{conn.peer} closed the data connection")
    if resp.code:
        raise DataError(status_code(resp.code), resp.message, resp.reason)
    return resp
