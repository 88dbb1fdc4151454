"""One connection of the TCP data plane, as both ends use it (framing in `protos.wire`).

The data plane moves a shard's weights and gradients on a second port beside the gRPC
service (`DataRequest`/`DataResponse` in ps.proto): a small length-prefixed protobuf
header, then raw tensor bytes sent straight from tensor memory (`sendall` of a
`memoryview`) and received straight into the destination tensor (`recv_into`), so no
payload is copied or allocated on the way. Failures are `DataError`s carrying a gRPC
status code, so callers treat them exactly like failed gRPC calls.

`DataConn` methods block the calling thread (the sockets are blocking; the GIL is
released while they wait) and are not thread-safe, except `abort`, which any thread
may call to make a blocked call fail at once. Deadlines are absolute
`time.monotonic()` values; None waits forever.
"""

from __future__ import annotations

import select
import socket
import time

import grpc

from protos import wire

Code = grpc.StatusCode
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_RECV_STEP = 4 << 20  # bytes asked for per recv call


class DataError(Exception):
    """A failed data-plane exchange; `code()` and `details()` as on `grpc.aio.AioRpcError`."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = ""):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self.reason = code, details, reason

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Truncated(DataError):
    """The peer closed the connection (or half-closed it) in the middle of a message."""

    def __init__(self, details: str):
        super().__init__(Code.UNAVAILABLE, details)


def status_code(value: int) -> grpc.StatusCode:
    """The gRPC status code with this number (UNKNOWN for a number gRPC does not define)."""
    return _CODES.get(value, Code.UNKNOWN)


def split_host(address: str) -> str:
    """The host part of "host:port" or "[v6]:port", without brackets."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def tune(sock: socket.socket) -> None:
    """Options both ends set: no Nagle delay for the small headers, keepalive for idle pooled connections."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class DataConn:
    """A blocking data-plane connection (plain or TLS socket). See the module docstring."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.peer = sock, peer
        self.broken = False  # set once an exchange failed half-way: the stream is out of step

    def _timeout(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise DataError(Code.DEADLINE_EXCEEDED, f"deadline exceeded talking to {self.peer}")
        self.sock.settimeout(left)

    def _failed(self, exc: BaseException) -> DataError:
        self.broken = True
        if isinstance(exc, DataError):
            return exc
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return DataError(Code.DEADLINE_EXCEEDED, f"deadline exceeded talking to {self.peer}")
        return DataError(Code.UNAVAILABLE, f"data connection to {self.peer} lost: {exc}")

    # -- sending ------------------------------------------------------------------------
    def send(self, header, payload: memoryview | None = None, deadline: float | None = None) -> None:
        """Send a header message, then `payload` raw (its bytes are read, never copied)."""
        try:
            self._timeout(deadline)
            self.sock.sendall(wire.pack_header(header))
            if payload is not None and payload.nbytes:
                self._timeout(deadline)
                self.sock.sendall(payload)  # the timeout bounds the whole call (Python >= 3.5)
        except (OSError, DataError) as exc:
            raise self._failed(exc) from None

    # -- receiving ----------------------------------------------------------------------
    def recv_exact(self, n: int, deadline: float | None = None) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf), deadline)
        return bytes(buf)

    def recv_into(self, view: memoryview, deadline: float | None = None) -> None:
        """Fill `view` (bytes) from the socket, straight into its memory.

        EOF before `view` is full raises `Truncated` (UNAVAILABLE); a timeout DEADLINE_EXCEEDED.
        """
        view = view.cast("B") if view.format != "B" else view
        total, pos = view.nbytes, 0
        try:
            while pos < total:
                self._timeout(deadline)
                n = self.sock.recv_into(view[pos:], min(total - pos, _RECV_STEP))
                if n == 0:
                    raise Truncated(f"{self.peer} closed the data connection after {pos} of {total} bytes")
                pos += n
        except (OSError, DataError) as exc:
            raise self._failed(exc) from None

    def recv_header(self, cls, deadline: float | None = None):
        """The next length-prefixed header as `cls`; None on a clean EOF before its first byte.

        A header that does not parse, or announces more than `wire.HEADER_LIMIT` bytes,
        raises DataError(INVALID_ARGUMENT).
        """
        try:
            self._timeout(deadline)
            first = self.sock.recv(4)
        except OSError as exc:
            raise self._failed(exc) from None
        if not first:
            return None
        prefix = first + (self.recv_exact(4 - len(first), deadline) if len(first) < 4 else b"")
        try:
            body = self.recv_exact(wire.header_length(prefix), deadline)
            return wire.unpack_header(body, cls)
        except wire.FrameError as exc:
            self.broken = True
            raise DataError(Code.INVALID_ARGUMENT, str(exc)) from None

    def drain(self, n: int, deadline: float | None = None) -> None:
        """Receive and discard `n` bytes (a rejected payload), in 1 MiB steps."""
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            step = min(n, scratch.nbytes)
            self.recv_into(scratch[:step], deadline)
            n -= step

    def readable(self) -> bool:
        """True if the peer sent something or closed (non-blocking check)."""
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    # -- ending -------------------------------------------------------------------------
    def abort(self) -> None:
        """Make any call blocked on this connection fail now (callable from any thread)."""
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
