"""The shard's TCP data plane: Pull and Push on a second port, at raw-socket speed.

gRPC's Python stack copies every message into a fresh `bytes` and cannot receive into
a caller's buffer, which caps it at about half of raw TCP (docs/benchmarks.md, "Wire"). This
listener moves the same data with the same rules (protocol in ps.proto, "The TCP data
plane"): a pull is answered straight from the shard's weights (a lease: copy-on-write
keeps them whole while they are sent, see ps_server/store.py); a push is received
straight into a reused gradient buffer, then checked for NaN/Inf in one pass before the
servicer applies it. Every decision (session, plan, clocks, the
staleness bound, apply and clock advance as one step) is the servicer's, run on the
server's event loop; the data plane only carries bytes, so the two paths cannot drift.

A client may stripe one pull or push over several connections at once (ps.proto,
"Striping"); the parts meet in an `ps_server.stripes.Assembly`: the first part opens
the exchange, a striped pull is answered from one version and one lease, a striped push
is committed by the part that completes it, once, and every part gets the same answer.

Threads: one accept thread, one thread per connection doing blocking socket I/O (the
GIL is released while it waits), calling into the servicer with
`asyncio.run_coroutine_threadsafe`. Security is the gRPC port's: the token is checked in
the hello (constant time), TLS and mutual TLS wrap each connection. What every exchange
uses on its connection (the hello, headers and answers, waiting on the loop) is in
ps_server/dataplane_conn.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time

import torch

from asyncps_common.security import NONE, Security
from protos import compress, wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import Code, DataConn, DataError, Truncated, tune
from ps_server.dataplane_conn import HANDSHAKE_SECONDS, PAYLOAD_SECONDS, ConnectionIO
from ps_server.servicer import Servicer
from ps_server.stripes import Assembly, StripeError, Stripes

log = logging.getLogger(__name__)


class DataPlane(ConnectionIO):
    """Accepts data-plane connections for `servicer`, whose event loop is `loop`.

    `start` binds and returns the port; `stop` closes the listener and every connection.
    Both are called from the loop's thread; everything else runs in this object's threads.
    """

    def __init__(self, servicer: Servicer, loop: asyncio.AbstractEventLoop, security: Security = NONE):
        self.servicer, self.loop, self.security = servicer, loop, security
        self._tls = security.server_ssl_context() if security.cert else None
        self._listener: socket.socket | None = None
        self._conns: set[DataConn] = set()
        self._busy = 0  # exchanges in progress
        self._lock = threading.Lock()
        self._closing = False
        self._stripes = Stripes(PAYLOAD_SECONDS)

    def start(self, host: str, port: int) -> int:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        threading.Thread(target=self._accept, name="asyncps-data-accept", daemon=True).start()
        return sock.getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Stop accepting; give exchanges in progress `grace` seconds; then close every connection."""
        self._closing = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
            self._listener.close()
        end = time.monotonic() + grace
        while self._busy and time.monotonic() < end:
            await asyncio.sleep(0.02)
        self._stripes.close()  # parts still waiting for others: answered UNAVAILABLE
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()

    # -- threads ------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, addr = self._listener.accept()  # type: ignore[union-attr]
            except OSError:
                if self._closing:
                    return
                continue
            tune(sock)
            threading.Thread(
                target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True, name="asyncps-data-conn"
            ).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        conn = None
        try:
            if self._tls is not None:
                sock.settimeout(HANDSHAKE_SECONDS)
                sock = self._tls.wrap_socket(sock, server_side=True)
            conn = DataConn(sock, peer)
            with self._lock:
                self._conns.add(conn)
            if self._hello(conn):
                self._exchanges(conn)
        except (DataError, OSError, ssl.SSLError) as exc:
            log.debug("data connection from %s ended: %s", peer, exc)
        finally:
            if conn is not None:
                with self._lock:
                    self._conns.discard(conn)
                conn.close()
            else:
                sock.close()

    def _exchanges(self, conn: DataConn) -> None:
        while not self._closing:
            req = self._header(conn, None)  # an idle pooled connection waits here
            if req is None:
                return
            with self._lock:
                self._busy += 1
            try:
                op = req.WhichOneof("op")
                if req.HasField("stripe") and (op == "push" or op == "pull" and not req.payload_bytes):
                    self._striped(conn, req, op)
                elif op == "pull" and not req.payload_bytes:
                    self._pull(conn, req.pull)
                elif op == "push":
                    self._push(conn, req.push, req.payload_bytes)
                else:
                    self._answer(
                        conn,
                        Code.INVALID_ARGUMENT,
                        f"expected a pull or a push, got {op or 'nothing'}"
                        + (" with a payload" if op == "pull" else ""),
                    )
                    return
            finally:
                with self._lock:
                    self._busy -= 1
            if conn.broken:
                return

    def _pull(self, conn: DataConn, req: pb.PullRequest) -> None:
        t0 = time.perf_counter()
        try:
            dtype = compress.pull_dtype(req.compression)  # ValueError: INVALID_ARGUMENT
            store, head, snap = self._call(self.servicer.open_pull(req), conn, lambda r: r[0].release(r[2]))
        except DataError:
            raise
        except Exception as exc:
            self._refused(conn, exc)
            return
        try:
            out = snap.weights.to(dtype)  # the weights themselves for float32, else exactly w.to(dtype)
            conn.send(
                pb.DataResponse(pull=head, payload_bytes=out.numel() * out.element_size()),
                wire.tensor_bytes(out),
                time.monotonic() + PAYLOAD_SECONDS,
            )  # a client that stops reading frees the lease in time
        finally:
            store.release(snap)
        self.servicer.pull_finished(store, t0, head.waited_seconds)

    def _push(self, conn: DataConn, head: pb.PushHeader, nbytes: int) -> None:
        t0 = time.perf_counter()
        sv, ok = self.servicer, False
        try:
            try:
                compress.check(head.compression)  # ValueError: INVALID_ARGUMENT
                store, buf = self._call(_run(sv.open_push, head))
            except Exception as exc:
                self._skip(conn, nbytes, sv.store.numel * 4 if sv.store is not None else 0)
                self._refused(conn, exc)
                return
            want = compress.push_bytes(head.compression, store.numel)
            if nbytes != want:
                self.loop.call_soon_threadsafe(sv.release, buf)
                self._skip(conn, nbytes, want)
                self._answer(
                    conn,
                    Code.INVALID_ARGUMENT,
                    f"push carries {nbytes} bytes, the shard holds "
                    f"{store.numel} elements ({want} bytes as {compress.check(head.compression)})",
                )
                return
            try:
                self._receive(conn, buf, head.compression)
            except BaseException as exc:
                self.loop.call_soon_threadsafe(sv.release, buf)
                if isinstance(exc, _Invalid):
                    self._answer(conn, Code.INVALID_ARGUMENT, str(exc))
                    return
                if isinstance(exc, Truncated):  # the client may only have half-closed: tell it, then hang up
                    with contextlib.suppress(DataError):
                        self._answer(conn, Code.INVALID_ARGUMENT, f"push payload truncated: {exc.details()}")
                raise
            try:  # the commit runs to its end on the loop even if this connection dies meanwhile
                resp = self._call(sv.commit_push(store, head, buf))
            except Exception as exc:
                self._refused(conn, exc)
                return
            conn.send(pb.DataResponse(push=resp), deadline=time.monotonic() + HANDSHAKE_SECONDS)
            ok = True
        finally:
            self.loop.call_soon_threadsafe(sv.push_finished, t0, ok)

    # -- striped exchanges (ps_server/stripes.py) ---------------------------------------
    def _striped(self, conn: DataConn, req: pb.DataRequest, op: str) -> None:
        head, stripe = getattr(req, op), req.stripe
        key = (op, head.worker_id, head.session, stripe.id)
        try:
            if op == "push" and not compress.elementwise(head.compression):
                raise StripeError(Code.INVALID_ARGUMENT, f"{head.compression} pushes cannot be striped")
            compress.check(head.compression)
            asm, first = self._stripes.join(key, stripe.index, stripe.count, head)
        except (StripeError, ValueError) as exc:
            if op == "push":
                self._skip(conn, req.payload_bytes, self._part_limit(stripe.count))
            self._answer(conn, *(exc.status if isinstance(exc, StripeError) else (Code.INVALID_ARGUMENT, str(exc), "")))
            return
        try:
            if op == "push":
                self._push_part(conn, asm, first, head, stripe.index, req.payload_bytes)
            else:
                self._pull_part(conn, asm, first, head, stripe.index)
        finally:
            if asm.ended:
                self._stripes.end(key)

    def _part_limit(self, count: int) -> int:
        """The most bytes a part of a striped push may carry (0 before Init)."""
        store = self.servicer.store
        return -(-store.numel // max(1, count)) * 4 if store is not None else 0

    def _push_part(
        self, conn: DataConn, asm: Assembly, first: bool, head: pb.PushHeader, index: int, nbytes: int
    ) -> None:
        """Receive part `index` of a striped push into the shared gradient buffer; the part
        that completes it commits it; every part answers with the outcome. At DEBUG it logs
        its phases (`phases push part=...`, read by `bench/wire.py --phases`)."""
        sv = self.servicer
        t = [time.perf_counter()] + [0.0] * 4  # start, opened, received, checked, committed
        if first:
            try:
                asm.open(self._call(_run(sv.open_push, head)))
            except Exception as exc:
                asm.fail(self._status(conn, exc))
        else:
            asm.wait(lambda: asm.opened is not None, "the first part's opening", asm.deadline)
        consumed = last = False
        t[1] = time.perf_counter()
        if asm.opened is not None and asm.begin():
            store, buf = asm.opened  # on failure the buffer is dropped, not pooled: a part may still write it
            lo, hi = wire.stripes(store.numel, asm.count)[index]
            moved = False
            try:
                want = compress.push_bytes(head.compression, hi - lo)
                if nbytes != want:
                    asm.fail(
                        (
                            Code.INVALID_ARGUMENT,
                            f"push part {index} of {asm.count} carries {nbytes} bytes, "
                            f"its range holds {hi - lo} elements ({want} bytes)",
                            "",
                        )
                    )
                else:
                    _recv_decoded(conn, buf[lo:hi], head.compression, asm.deadline)
                    consumed, t[2] = True, time.perf_counter()
                    moved = wire.all_finite(buf[lo:hi])
                    t[3] = time.perf_counter()
                    if not moved:
                        asm.fail((Code.INVALID_ARGUMENT, "tensor contains NaN or Inf: not applied", ""))
            except DataError as exc:
                lost = (
                    (Code.INVALID_ARGUMENT, f"push payload truncated: {exc.details()}", "")
                    if isinstance(exc, Truncated)
                    else (exc.code(), f"push part {index} lost: {exc.details()}", "")
                )
                asm.fail(lost)
                with contextlib.suppress(DataError):  # a half-closed client can still read the answer
                    self._answer(conn, *lost)
                raise
            finally:
                last = asm.finish(moved)
            if last:
                try:
                    asm.succeed(self._call(sv.commit_push(store, head, buf)))
                except Exception as exc:
                    asm.fail(self._status(conn, exc), commit=True)
                t[4] = time.perf_counter()
        if not consumed:
            self._skip(conn, nbytes, self._part_limit(asm.count))
        asm.wait(lambda: asm.result is not None, "the rest of the push's parts", asm.deadline, gone=conn.readable)
        try:
            if asm.result is not None:
                conn.send(pb.DataResponse(push=asm.result), deadline=time.monotonic() + HANDSHAKE_SECONDS)
                if log.isEnabledFor(logging.DEBUG) and t[3]:
                    ms = [(b - a) * 1e3 for a, b in zip(t, t[1:])]
                    log.debug(
                        "phases push part=%d/%d committed=%d open_ms=%.2f receive_ms=%.2f check_ms=%.2f "
                        "commit_ms=%.2f total_ms=%.2f",
                        index,
                        asm.count,
                        bool(t[4]),
                        ms[0],
                        ms[1],
                        ms[2],
                        ms[3] if t[4] else 0.0,
                        (time.perf_counter() - t[0]) * 1e3,
                    )
            else:
                self._answer(conn, *asm.failure)  # type: ignore[misc]
        finally:
            if asm.ended and asm.count_once():
                self.loop.call_soon_threadsafe(sv.push_finished, asm.t0, asm.result is not None)

    def _pull_part(self, conn: DataConn, asm: Assembly, first: bool, req: pb.PullRequest, index: int) -> None:
        """Send part `index` of a striped pull. The first part opens it (waiting under the
        staleness bound) and holds the lease until every part has been sent, or the
        exchange failed (its own client hanging up fails it)."""
        if first:
            try:
                asm.open(
                    self._call(self.servicer.open_pull(req), conn, lambda r: r[0].release(r[2])),
                    timeout=PAYLOAD_SECONDS,
                )
            except DataError as exc:  # this part's client went away
                asm.fail((exc.code(), f"pull part {index}: {exc.details()}", ""))
                raise
            except Exception as exc:
                asm.fail(self._status(conn, exc))
        else:
            asm.wait(lambda: asm.opened is not None, "the pull's opening", None, gone=conn.readable)
        try:
            if asm.opened is not None and asm.begin():
                store, head, snap = asm.opened
                lo, hi = wire.stripes(snap.weights.numel(), asm.count)[index]
                moved = False
                try:
                    out = snap.weights[lo:hi].to(compress.pull_dtype(req.compression))
                    conn.send(
                        pb.DataResponse(pull=head, payload_bytes=out.numel() * out.element_size()),
                        wire.tensor_bytes(out),
                        asm.deadline,
                    )
                    moved = True
                except DataError as exc:
                    asm.fail((exc.code(), f"pull part {index} lost: {exc.details()}", ""))
                    raise
                finally:
                    if asm.finish(moved):
                        asm.succeed(head)
            else:
                self._answer(conn, *asm.failure)  # type: ignore[misc]
        finally:
            if first and asm.opened is not None:
                store, head, snap = asm.opened
                sent = asm.settle(gone=conn.readable)  # a client that hangs up frees the lease at once
                store.release(snap)
                if sent:
                    self.servicer.pull_finished(store, asm.t0, head.waited_seconds)
                else:
                    log.info(
                        "striped pull by %s (%d parts) ended unsent, its version %d given back: %s",
                        conn.peer,
                        asm.count,
                        head.version,
                        asm.failure and asm.failure[1],
                    )

    def _receive(self, conn: DataConn, buf: torch.Tensor, compression: str) -> None:
        """Receive a push's gradient into `buf` (exactly its size); a NaN or Inf in it raises
        `_Invalid`. One check of the whole gradient once it is in: checking chunk by chunk
        while receiving interleaves torch's threads with the socket copy and costs ~25%."""
        _recv_decoded(conn, buf, compression, time.monotonic() + PAYLOAD_SECONDS)
        if not wire.all_finite(buf):
            raise _Invalid("tensor contains NaN or Inf: not applied")


class _Invalid(ValueError):
    """A push payload that arrived whole but is refused (INVALID_ARGUMENT)."""


def _recv_decoded(conn: DataConn, out: torch.Tensor, compression: str, deadline: float) -> None:
    """Receive a push payload into float32 `out`: straight into it for float32, else into a
    staging buffer decoded into it (protos/compress.py; the caller checked the length)."""
    if compress.check(compression) == "none":
        conn.recv_into(wire.tensor_bytes(out), deadline)
        return
    stage = torch.empty(compress.push_bytes(compression, out.numel()), dtype=torch.uint8)
    conn.recv_into(wire.tensor_bytes(stage), deadline)
    compress.decode_into(compression, stage, out)


async def _run(fn, *args):
    return fn(*args)
