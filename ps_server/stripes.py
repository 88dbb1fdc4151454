"""Striped data-plane exchanges: one pull or push of a shard arriving as several parts.

A client may cut one pull or push into `Stripe.count` contiguous parts and send each
over its own connection at once (ps.proto, "Striping"), because one TCP stream leaves
CPU unused on both ends. Each part is served by its connection's thread
(ps_server/dataplane.py); an `Assembly` is what those threads share:

* the opening (the servicer's `open_pull` or `open_push`), done once, by whichever part
  arrives first; the others wait for it;
* which parts arrived, how many are moving bytes now (`active`) and how many are done;
* the end: one result every part answers with, or one failure every part answers with.

`Stripes` finds a part's assembly by its key (kind, worker, session, stripe id) and
remembers recently ended keys, so a part arriving after its exchange ended is refused
instead of opening it again.

Thread-safe: every method may be called from any thread. `Assembly.wait` blocks the
calling thread, up to a deadline, and stops early when the part's own client hangs up.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from protos.wire import MAX_STRIPES

Code = grpc.StatusCode
Status = tuple[grpc.StatusCode, str, str]  # code, message, reason: what a refused part is answered
POLL_SECONDS = 0.25  # how often a waiting part looks whether its client is still there
REMEMBER_ENDED = 4096  # ended keys kept, to refuse their late parts


class StripeError(Exception):
    """A part that cannot join its exchange; `status` is its answer."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = ""):
        super().__init__(message)
        self.status: Status = (code, message, reason)


class Assembly:
    """The parts of one striped exchange, as their threads see it (see the module docstring)."""

    def __init__(self, count: int, header: Any, timeout: float):
        self.count, self.header, self.timeout = count, header, timeout
        self.deadline = time.monotonic() + timeout  # every part in and moved by then
        self.t0 = time.perf_counter()
        self._cond = threading.Condition()
        self._arrived: set[int] = set()
        self.active = 0  # parts moving bytes now
        self.finished = 0  # parts that moved their bytes
        self.opened: Any = None
        self.result: Any = None
        self.failure: Status | None = None
        self._sealed = False  # every part is in and the commit has begun: its outcome is the answer
        self._counted = False

    # -- state changes (each wakes the waiting parts) ------------------------------------
    def arrive(self, index: int, count: int, header: Any) -> None:
        """Admit part `index`; a part that does not fit fails the whole exchange (StripeError)."""
        with self._cond:
            problem = None
            if count != self.count:
                problem = f"striped exchange: part {index} says {count} parts, the first said {self.count}"
            elif index in self._arrived:
                problem = f"striped exchange: part {index} of {count} arrived twice"
            elif header != self.header:
                problem = f"striped exchange: part {index} of {count} carries a different header from the first part"
            if problem is not None:
                self._fail((Code.INVALID_ARGUMENT, problem, ""))
                raise StripeError(Code.INVALID_ARGUMENT, problem)
            self._arrived.add(index)

    def open(self, value: Any, timeout: float | None = None) -> None:
        """The opening's result; with `timeout`, the parts have that long from now to move their bytes."""
        with self._cond:
            self.opened = value
            if timeout is not None:
                self.deadline = time.monotonic() + timeout
            self._cond.notify_all()

    def succeed(self, result: Any) -> None:
        with self._cond:
            if self.failure is None:
                self.result = result
            self._cond.notify_all()

    def fail(self, status: Status, commit: bool = False) -> None:
        """Fail the exchange (the first failure stands). Once the commit has begun only
        the commit itself (`commit=True`) can: a part's client leaving no longer matters."""
        with self._cond:
            self._fail(status, commit)

    def _fail(self, status: Status, commit: bool = False) -> None:
        if self.failure is None and self.result is None and (commit or not self._sealed):
            self.failure = status
        self._cond.notify_all()

    def begin(self) -> bool:
        """A part starts moving its bytes; False (and it must not) once the exchange failed."""
        with self._cond:
            if self.failure is not None:
                return False
            self.active += 1
            return True

    def finish(self, moved: bool = True) -> bool:
        """A part that `begin` let through is done (`moved`: its bytes went through); True
        when every part has moved its bytes and nothing failed."""
        with self._cond:
            self.active -= 1
            self.finished += moved
            self._cond.notify_all()
            self._sealed = self.failure is None and self.finished == self.count
            return self._sealed

    # -- waiting -------------------------------------------------------------------------
    def wait(
        self,
        until: Callable[[], bool],
        what: str,
        deadline: float | None = None,
        gone: Callable[[], bool] | None = None,
    ) -> bool:
        """Block until `until()` holds (checked under the lock) or the exchange failed;
        True if it holds. At `deadline` the exchange fails DEADLINE_EXCEEDED (`what`
        did not happen in time); when `gone()` says this part's client hung up, CANCELLED."""
        with self._cond:
            while not until():
                if self.failure is not None:
                    return False
                left = None if deadline is None or self._sealed else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._fail(
                        (
                            Code.DEADLINE_EXCEEDED,
                            f"striped exchange timed out: {what} did not come within "
                            f"{self.timeout:g} s (a part's client stalled or died)",
                            "",
                        )
                    )
                    return False
                if gone is not None and not self._sealed and gone():
                    self._fail((Code.CANCELLED, "striped exchange: a part's client went away", ""))
                    return False
                self._cond.wait(POLL_SECONDS if left is None else min(left, POLL_SECONDS))
            return True

    def settle(self, gone: Callable[[], bool] | None = None) -> bool:
        """Block until no part is moving bytes and none will: all moved them, or the
        exchange failed (at the deadline it fails; CANCELLED when `gone()` says the
        caller's client hung up or moved on while no part moves bytes and one never
        came: a client only reuses a connection once its exchange ended) and the parts
        under way stopped. True if every part moved its bytes. Whoever holds what the
        parts read or write (a pull's lease) gives it back after this."""
        with self._cond:
            while not (self.active == 0 and (self.failure is not None or self.finished == self.count)):
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self._fail(
                        (
                            Code.DEADLINE_EXCEEDED,
                            "striped exchange timed out: not every part was sent "
                            f"within {self.timeout:g} s (a part's client stalled or died)",
                            "",
                        )
                    )
                elif self.failure is None and self.active == 0 and gone is not None and gone():
                    self._fail((Code.CANCELLED, "striped exchange: a part's client went away", ""))
                self._cond.wait(max(0.01, min(left, POLL_SECONDS)))
            return self.failure is None

    @property
    def ended(self) -> bool:
        with self._cond:
            return self.failure is not None or (self.result is not None and self.finished == self.count)

    def count_once(self) -> bool:
        """True for the first caller only: the one that counts the exchange in the metrics."""
        with self._cond:
            first, self._counted = not self._counted, True
            return first


class Stripes:
    """The open striped exchanges of one data plane, by key."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._open: dict[tuple, Assembly] = {}
        self._ended: collections.OrderedDict[tuple, Status | None] = collections.OrderedDict()  # key: its failure
        self._closed = False

    def join(self, key: tuple, index: int, count: int, header: Any) -> tuple[Assembly, bool]:
        """The assembly part `index` of `count` belongs to, and whether it is the first part
        (which opens the exchange). StripeError: the part is refused (and, if its exchange
        is open, that exchange fails)."""
        if not 2 <= count <= MAX_STRIPES:
            raise StripeError(Code.INVALID_ARGUMENT, f"a striped exchange has 2 to {MAX_STRIPES} parts, got {count}")
        if index >= count:
            raise StripeError(Code.INVALID_ARGUMENT, f"part {index} of a striped exchange of {count} parts")
        if not key[-1]:
            raise StripeError(Code.INVALID_ARGUMENT, "a striped exchange needs a nonzero stripe id")
        with self._lock:
            if self._closed:
                raise StripeError(Code.UNAVAILABLE, "the server is stopping")
            if key in self._ended:  # a late part gets the exchange's own failure (say, an unknown session)
                failure = self._ended[key]
                if failure is not None:
                    raise StripeError(*failure)
                raise StripeError(Code.ABORTED, f"striped exchange {key[-1]} already ended; part {index} came too late")
            asm = self._open.get(key)
            first = asm is None
            if asm is None:
                asm = self._open[key] = Assembly(count, header, self.timeout)
        asm.arrive(index, count, header)
        return asm, first

    def end(self, key: tuple) -> None:
        """Forget an ended exchange; its late parts are refused from now on, with its failure
        if it failed, else ABORTED (idempotent)."""
        with self._lock:
            asm = self._open.pop(key, None)
            if asm is not None:
                self._ended[key] = asm.failure
                while len(self._ended) > REMEMBER_ENDED:
                    self._ended.popitem(last=False)

    def close(self) -> None:
        """Fail every open exchange (UNAVAILABLE) and refuse new ones: the server is stopping."""
        with self._lock:
            self._closed = True
            open_ = list(self._open.values())
        for asm in open_:
            asm.fail((Code.UNAVAILABLE, "the server is stopping", ""))

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)
