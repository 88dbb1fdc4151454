"""A worker's side of one shard's TCP data plane (server: ps_server/dataplane.py).

`DataChannel` keeps a small pool of connections to the shard's data port (one per
exchange in progress, kept for the next one) and runs one pull or push per call:
a pull receives the weights straight into the caller's tensor, a push sends the
gradient straight from it. Failures are `protos.datasock.DataError`s with gRPC status
codes, so `worker.rpc.ShardClient.call` retries and reports them as it does gRPC errors;
a connection that could not be opened at all says so with `reason == CONNECT_FAILED`.

Every method blocks the calling thread (run them in an executor) and is thread-safe;
an `Abort` handed to a call lets another thread make it fail at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import torch

from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import Code, DataConn, DataError, status_code, tune
from ps_server.security import NONE, Security

log = logging.getLogger(__name__)
CONNECT_FAILED = "data-connect-failed"
CONNECT_SECONDS = 5.0
POOL_SIZE = 4  # idle connections kept per shard


class Abort:
    """Lets one thread abort the exchange another is blocked in (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: DataConn | None = None
        self.aborted = False

    def attach(self, conn: DataConn) -> None:
        with self._lock:
            self._conn = conn
            if self.aborted:
                conn.abort()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._conn is not None:
                self._conn.abort()


class DataChannel:
    """Pooled data-plane connections to one shard at `host:port`."""

    def __init__(self, host: str, port: int, security: Security = NONE):
        self.host, self.port, self.security = host, port, security
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._tls = security.client_ssl_context() if security.tls else None
        self._idle: list[DataConn] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- connections --------------------------------------------------------------------
    def _connect(self, deadline: float) -> DataConn:
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=max(0.01, min(CONNECT_SECONDS, deadline - time.monotonic())))
        except OSError as exc:
            raise DataError(Code.UNAVAILABLE, f"cannot connect to the data plane at {self.peer}: {exc}",
                            CONNECT_FAILED) from None
        try:
            tune(sock)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:  # ssl.SSLError included: an untrusted server, a refused client certificate
            sock.close()
            raise DataError(Code.UNAVAILABLE, f"TLS handshake with the data plane at {self.peer} failed: {exc}") from None
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
            if not conn.broken and not self._closed and len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- exchanges ----------------------------------------------------------------------
    def pull_into(self, req: pb.PullRequest, out: torch.Tensor, deadline: float, abort: Abort) -> pb.PullHeader:
        """Pull the shard's weights into `out` (contiguous 1-D float32, the shard's size)."""
        conn = self._take(deadline)
        abort.attach(conn)
        try:
            conn.send(pb.DataRequest(pull=req), deadline=deadline)
            resp = _answer(conn, conn.recv_header(pb.DataResponse, deadline))
            if resp.pull.numel != out.numel() or resp.payload_bytes != out.numel() * 4:
                conn.broken = True
                raise DataError(Code.FAILED_PRECONDITION, f"shard holds {resp.pull.numel} elements "
                                f"({resp.payload_bytes} bytes sent), the plan expects {out.numel()}")
            conn.recv_into(wire.tensor_bytes(out), deadline)
            return resp.pull
        finally:
            self._give(conn)

    def push(self, head: pb.PushHeader, grad: torch.Tensor, deadline: float, abort: Abort) -> pb.PushResponse:
        """Push one gradient (contiguous 1-D float32, the shard's size); returns the server's answer."""
        conn = self._take(deadline)
        abort.attach(conn)
        try:
            payload = wire.tensor_bytes(grad)
            conn.send(pb.DataRequest(push=head, payload_bytes=payload.nbytes), payload, deadline)
            return _answer(conn, conn.recv_header(pb.DataResponse, deadline)).push
        finally:
            self._give(conn)


def _answer(conn: DataConn, resp: pb.DataResponse | None) -> pb.DataResponse:
    """`resp` if it is OK; DataError with the server's status otherwise (or if it hung up)."""
    if resp is None:
        conn.broken = True
        raise DataError(Code.UNAVAILABLE, f"{conn.peer} closed the data connection")
    if resp.code:
        raise DataError(status_code(resp.code), resp.message, resp.reason)
    return resp
