"""What every exchange on a TCP data-plane connection uses (ps_server/dataplane.py): the
hello that opens a connection (magic, then the token, checked in constant time), reading a
request header and answering one, skipping a refused payload to keep the stream in step,
and waiting from a connection's thread for a coroutine run on the servicer's event loop,
giving up when the client goes away (`_Handoff` decides who gives back what a late result
holds). `DataPlane` is a `ConnectionIO`; the exchanges themselves are in dataplane.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import threading
import time

from asyncps_common.security import Security
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import Code, DataConn, DataError, Truncated
from ps_server.servicer import rejection

log = logging.getLogger("ps_server.dataplane")  # the data plane's one logger, wherever its code lives
HANDSHAKE_SECONDS = 10.0  # a connection must say hello within this
PAYLOAD_SECONDS = 120.0  # a push's payload must arrive (a pull's be taken) within this once started


class ConnectionIO:
    """The per-connection plumbing of `ps_server.dataplane.DataPlane`, which sets `loop` (the
    servicer's event loop) and `security`; every method runs in a connection's thread."""

    loop: asyncio.AbstractEventLoop
    security: Security

    def _hello(self, conn: DataConn) -> bool:
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        if conn.recv_exact(len(wire.DATA_MAGIC), deadline) != wire.DATA_MAGIC:
            log.warning("data connection from %s is not an asyncps client; closed", conn.peer)
            return False
        req = self._header(conn, deadline)
        if req is None:
            return False
        if req.WhichOneof("op") != "hello" or req.payload_bytes:
            self._answer(conn, Code.INVALID_ARGUMENT, "a data connection must start with a bare hello")
            return False
        token = self.security.token
        if token is not None and not hmac.compare_digest(req.hello.token.encode(), token.encode()):
            self._answer(conn, Code.UNAUTHENTICATED, "missing or wrong token")
            return False
        conn.send(pb.DataResponse(), deadline=deadline)
        return True

    def _header(self, conn: DataConn, deadline: float | None) -> pb.DataRequest | None:
        """The next request header; None on EOF or after answering a malformed one (then close)."""
        try:
            return conn.recv_header(pb.DataRequest, deadline)
        except DataError as exc:
            if exc.code() == Code.INVALID_ARGUMENT or isinstance(exc, Truncated):
                with contextlib.suppress(DataError):  # a half-closed client can still read the answer
                    self._answer(conn, Code.INVALID_ARGUMENT, f"malformed request header: {exc.details()}")
            return None

    def _answer(self, conn: DataConn, code: Code, message: str, reason: str = "") -> None:
        conn.send(
            pb.DataResponse(code=code.value[0], message=message, reason=reason),
            deadline=time.monotonic() + HANDSHAKE_SECONDS,
        )

    def _call(self, coro, conn: DataConn | None = None, orphan=None):
        """Run `coro` on the servicer's loop and wait for it. With `conn`, give up (cancelling it)
        if the client sends anything or hangs up meanwhile: nobody waits for the answer. A
        result that is ready all the same goes to `orphan` (to give back what it holds), once:
        `_Handoff` decides under a lock whether the coroutine or this thread hands it over."""
        hand = _Handoff()
        fut = asyncio.run_coroutine_threadsafe(hand.run(coro, orphan), self.loop)
        while True:
            try:
                return fut.result(timeout=0.25 if conn is not None else None)
            except concurrent.futures.TimeoutError:
                if not conn.readable():  # type: ignore[union-attr]
                    continue
                conn.broken = True  # type: ignore[union-attr]
                if hand.abandon():
                    fut.cancel()
                elif orphan is not None:  # the result is on its way: take it, give it back
                    orphan(fut.result())
                raise DataError(Code.CANCELLED, "client went away") from None

    @staticmethod
    def _status(conn: DataConn, exc: Exception) -> tuple[Code, str, str]:
        status = rejection(exc)
        if status is None:
            log.error("data-plane exchange with %s failed", conn.peer, exc_info=exc)
            status = (Code.INTERNAL, f"internal error: {type(exc).__name__}", "")
        return status

    def _refused(self, conn: DataConn, exc: Exception) -> None:
        self._answer(conn, *self._status(conn, exc))

    @staticmethod
    def _skip(conn: DataConn, nbytes: int, limit: int) -> None:
        """Read past a refused payload to keep the stream in step, if it is no larger than
        `limit`; a larger one is not read at all: the connection is closed after the answer."""
        if nbytes <= limit:
            conn.drain(nbytes, time.monotonic() + PAYLOAD_SECONDS)
        else:
            conn.broken = True


class _Handoff:
    """Who owns a coroutine's result once the thread waiting for it may give up (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._returned = self._abandoned = False

    async def run(self, coro, orphan):
        result = await coro
        with self._lock:
            if not self._abandoned:
                self._returned = True
                return result
        if orphan is not None:
            orphan(result)
        raise asyncio.CancelledError

    def abandon(self) -> bool:
        """True if the result will not be returned (the caller cancels); False if it already is."""
        with self._lock:
            if not self._returned:
                self._abandoned = True
            return self._abandoned
