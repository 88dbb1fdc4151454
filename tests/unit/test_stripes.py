"""Unit tests for striped data-plane exchanges: the cut (protos.wire) and the server's shared state.

* `wire.stripes` cuts `numel` into `count` contiguous ranges, in order, covering 0..numel,
  sizes differing by at most one (the first ones larger); a count below 1 is a ValueError.
  `wire.stripe_count` is at least 1, at most `streams` and `MAX_STRIPES`, never cuts parts
  under `min_bytes`, and uses as many streams as those limits allow.
* `ps_server.stripes.Stripes.join` refuses a count outside 2..16, an index >= count and a
  zero id (INVALID_ARGUMENT) without opening anything; a part arriving twice, a count or a
  header differing from the first part's fail the whole assembly, so parts already waiting
  in another thread see that failure; a part of an ended exchange is ABORTED; `close`
  fails open assemblies UNAVAILABLE and refuses new ones.
* `Assembly`: `wait` fails DEADLINE_EXCEEDED at its deadline and CANCELLED when `gone()`
  says the client left, but neither once the exchange is sealed (every part moved); after
  the sealing `finish`, only the commit's own failure (`commit=True`) stands; `settle`
  waits for the parts still moving bytes; `count_once` is True exactly once.

Waiting is exercised with real threads; nothing sleeps to wait for readiness.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import DataConn, DataError
from ps_server import stripes as stripes_mod
from ps_server.stripes import Assembly, StripeError, Stripes
from worker.dataplane import Abort, DataChannel

Code = grpc.StatusCode
FAR = 60.0  # a timeout no test reaches unless the code under test hangs
HEAD = pb.PushHeader(worker_id="w", session=7, plan_hash="p" * 64, clock=3, read_version=3)


def key(sid: int = 5) -> tuple:
    return ("push", "w", 7, sid)


class Waiter:
    """`fn()` run in a thread; `value` is what it returned."""

    def __init__(self, fn):
        self.value, self.done = None, threading.Event()

        def run():
            self.value = fn()
            self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = FAR):
        assert self.done.wait(timeout), "the waiting thread never returned"
        self.thread.join(timeout)
        return self.value


# -- the cut -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(numel=st.integers(0, 1 << 22), count=st.integers(1, 64))
def test_stripes_are_contiguous_in_order_cover_everything_and_balanced(numel, count):
    parts = wire.stripes(numel, count)
    assert len(parts) == count
    assert parts[0][0] == 0 and parts[-1][1] == numel
    for (_, hi), (nlo, _) in zip(parts, parts[1:]):
        assert nlo == hi  # no gap, no overlap, in order
    sizes = [hi - lo for lo, hi in parts]
    assert all(s >= 0 for s in sizes) and sum(sizes) == numel
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger parts first
    assert wire.stripes(numel, count) == parts  # both ends compute the same ranges


@pytest.mark.parametrize("numel, count", [(10, 0), (10, -1), (0, 0), (-1, 2)])
def test_stripes_refuses_impossible_cuts(numel, count):
    with pytest.raises(ValueError):
        wire.stripes(numel, count)


def test_stripes_examples():
    assert wire.stripes(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert wire.stripes(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert wire.stripes(7, 1) == [(0, 7)]


@settings(max_examples=300, deadline=None)
@given(numel=st.integers(0, 1 << 30), streams=st.integers(0, 40), min_bytes=st.integers(0, 64 << 20))
def test_stripe_count_respects_every_limit_and_uses_what_they_allow(numel, streams, min_bytes):
    n = wire.stripe_count(numel, streams, min_bytes)
    assert 1 <= n <= wire.MAX_STRIPES
    assert n == 1 or n <= streams
    if n > 1:  # no part smaller than min_bytes (on average: the cut balances them)
        assert n * max(1, min_bytes) <= numel * 4
    if n < min(streams, wire.MAX_STRIPES):  # one more part would be too small
        assert (n + 1) * max(1, min_bytes) > numel * 4


def test_stripe_count_examples():
    mib = 1 << 20
    assert wire.stripe_count(mib, 2) == 1  # 4 MiB: one default part
    assert wire.stripe_count(2 * mib, 2) == 2
    assert wire.stripe_count(2 * mib - 1, 2) == 1
    assert wire.stripe_count(1 << 30, 64) == wire.MAX_STRIPES == 16
    assert wire.stripe_count(1 << 30, 1) == 1
    assert wire.stripe_count(0, 8) == 1
    assert wire.stripe_count(10_000, 3, 4096) == 3
    assert wire.STRIPE_MIN_BYTES == 4 * mib


@pytest.mark.parametrize("streams", [0, -1, wire.MAX_STRIPES + 1])
def test_data_channel_refuses_a_stream_count_outside_1_to_16(streams):
    with pytest.raises(ValueError):
        DataChannel("127.0.0.1", 1, streams=streams)


# -- Stripes.join ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index, count, sid",
    [(0, 1, 5), (0, 17, 5), (0, 0, 5), (1, 1, 5), (2, 2, 5), (16, 16, 5), (0, 2, 0)],
    ids=["count-1", "count-17", "count-0", "index-1-of-1", "index-2-of-2", "index-16-of-16", "id-0"],
)
def test_join_refuses_bad_parts_without_opening_anything(index, count, sid):
    stripes = Stripes(FAR)
    with pytest.raises(StripeError) as err:
        stripes.join(key(sid), index, count, HEAD)
    assert err.value.status[0] == Code.INVALID_ARGUMENT
    assert len(stripes) == 0
    if sid:  # the same exchange, well formed, is still welcome: the refusal left no trace
        asm, first = stripes.join(key(sid), 0, 2, HEAD)
        assert first and asm.count == 2


def test_join_gathers_the_parts_of_one_exchange():
    stripes = Stripes(FAR)
    asm, first = stripes.join(key(), 0, 16, HEAD)
    assert first
    for i in range(1, 16):
        again, first = stripes.join(key(), i, 16, pb.PushHeader.FromString(HEAD.SerializeToString()))
        assert again is asm and not first
    other, first = stripes.join(key(6), 15, 16, HEAD)  # another id: another exchange
    assert first and other is not asm
    assert len(stripes) == 2 and asm.failure is None


def _mismatches() -> dict:
    return {
        "duplicate index": (0, 2, HEAD),
        "count mismatch": (1, 3, HEAD),
        "header mismatch": (1, 2, pb.PushHeader(worker_id="w", session=7, plan_hash="p" * 64, clock=4, read_version=3)),
    }


@pytest.mark.parametrize("case", list(_mismatches()))
def test_a_misfit_part_fails_the_exchange_for_the_parts_waiting(case):
    stripes = Stripes(FAR)
    asm, _ = stripes.join(key(), 0, 2, HEAD)
    waiting = Waiter(lambda: asm.wait(lambda: asm.result is not None, "every part", asm.deadline))
    assert not waiting.done.wait(0.05)  # nothing ended it yet
    index, count, header = _mismatches()[case]
    with pytest.raises(StripeError) as err:
        stripes.join(key(), index, count, header)
    assert err.value.status[0] == Code.INVALID_ARGUMENT
    assert waiting.result() is False
    assert asm.failure is not None and asm.failure[0] == Code.INVALID_ARGUMENT
    assert asm.ended and not asm.begin()  # no part may move bytes any more
    asm.arrive(1, 2, HEAD)  # the right part 1, arriving now, cannot revive it
    assert not asm.begin()
    assert asm.failure[0] == Code.INVALID_ARGUMENT and asm.result is None


def test_a_part_of_an_ended_exchange_is_aborted():
    stripes = Stripes(FAR)
    stripes.join(key(), 0, 2, HEAD)
    stripes.end(key())
    stripes.end(key())  # idempotent
    assert len(stripes) == 0
    for index in (0, 1):
        with pytest.raises(StripeError) as err:
            stripes.join(key(), index, 2, HEAD)
        assert err.value.status[0] == Code.ABORTED
    assert stripes.join(key(6), 0, 2, HEAD)[1]  # other ids are unaffected


def test_a_late_part_of_a_failed_exchange_gets_its_failure():
    # an unknown session found by the first part must reach the client from every part,
    # so that it re-registers: not ABORTED from the parts that came after the failure
    stripes = Stripes(FAR)
    asm, _ = stripes.join(key(), 0, 2, HEAD)
    asm.fail((Code.FAILED_PRECONDITION, "unknown worker", "unknown-worker"))
    stripes.end(key())
    with pytest.raises(StripeError) as err:
        stripes.join(key(), 1, 2, HEAD)
    assert err.value.status == (Code.FAILED_PRECONDITION, "unknown worker", "unknown-worker")


def test_ended_keys_are_remembered_up_to_a_bound():
    stripes = Stripes(FAR)
    stripes.join(key(1), 0, 2, HEAD)
    stripes.end(key(1))
    for sid in range(2, stripes_mod.REMEMBER_ENDED + 2):
        stripes.join(key(sid), 0, 2, HEAD)
        stripes.end(key(sid))
    assert stripes.join(key(1), 0, 2, HEAD)[1]  # the oldest was forgotten
    with pytest.raises(StripeError) as err:
        stripes.join(key(stripes_mod.REMEMBER_ENDED + 1), 0, 2, HEAD)
    assert err.value.status[0] == Code.ABORTED


def test_close_fails_open_exchanges_and_refuses_new_ones():
    stripes = Stripes(FAR)
    asm, _ = stripes.join(key(), 0, 2, HEAD)
    waiting = Waiter(lambda: asm.wait(lambda: asm.opened is not None, "the opening", asm.deadline))
    stripes.close()
    assert waiting.result() is False
    assert asm.failure[0] == Code.UNAVAILABLE
    for k in (key(), key(9)):
        with pytest.raises(StripeError) as err:
            stripes.join(k, 1, 2, HEAD)
        assert err.value.status[0] == Code.UNAVAILABLE


# -- Assembly --------------------------------------------------------------------------------


def test_wait_returns_true_once_what_it_waits_for_happens():
    asm = Assembly(2, HEAD, FAR)
    waiting = Waiter(lambda: asm.wait(lambda: asm.opened is not None, "the opening", asm.deadline, gone=lambda: False))
    asm.open(("store", "buf"))
    assert waiting.result() is True and asm.failure is None


def test_wait_fails_deadline_exceeded_at_its_deadline():
    asm = Assembly(2, HEAD, 0.05)
    t0 = time.monotonic()
    assert asm.wait(lambda: False, "every part", asm.deadline) is False
    assert time.monotonic() - t0 < 10
    assert asm.failure[0] == Code.DEADLINE_EXCEEDED and "within 0.05 s" in asm.failure[1]
    assert asm.ended


def test_wait_fails_cancelled_when_its_client_is_gone():
    asm = Assembly(2, HEAD, FAR)
    gone = threading.Event()
    waiting = Waiter(lambda: asm.wait(lambda: False, "every part", asm.deadline, gone=gone.is_set))
    assert not waiting.done.wait(0.05)
    gone.set()
    assert waiting.result() is False
    assert asm.failure[0] == Code.CANCELLED


def test_settle_fails_deadline_exceeded_when_parts_never_come():
    asm = Assembly(3, HEAD, 0.05)
    assert asm.begin()
    asm.finish(True)
    assert asm.settle() is False
    assert asm.failure[0] == Code.DEADLINE_EXCEEDED


def test_settle_fails_cancelled_when_its_client_hangs_up_and_no_part_moves():
    asm = Assembly(3, HEAD, FAR)
    assert asm.begin() and asm.begin()
    asm.finish(True)  # the first part sent its bytes; the third part never comes
    gone = threading.Event()
    settling = Waiter(lambda: asm.settle(gone=gone.is_set))
    assert not settling.done.wait(0.05)  # client still there: a pull's lease stays held
    gone.set()
    # while a part still moves bytes its client may have them all and have moved on: not a failure
    assert not settling.done.wait(0.4)
    assert asm.failure is None
    asm.finish(True)  # now nothing moves, and the third part never came
    assert settling.result() is False
    assert asm.failure[0] == Code.CANCELLED


def test_settle_does_not_ask_a_finished_exchange_whether_its_client_is_gone():
    asm = Assembly(2, HEAD, FAR)
    assert asm.begin() and asm.begin()
    asm.finish(True)
    assert asm.finish(True)
    assert asm.settle(gone=lambda: True) is True
    assert asm.failure is None


def test_open_with_a_timeout_moves_the_deadline():
    asm = Assembly(2, HEAD, FAR)
    asm.open("opened", timeout=0.05)
    assert asm.deadline < time.monotonic() + 1
    assert asm.wait(lambda: False, "every part", asm.deadline) is False
    assert asm.failure[0] == Code.DEADLINE_EXCEEDED


def test_a_sealed_exchange_ignores_deadlines_and_leaving_clients_but_not_its_commit():
    asm = Assembly(2, HEAD, FAR)
    assert asm.begin() and asm.begin()
    assert asm.finish(True) is False
    assert asm.finish(True) is True  # every part moved: sealed, the commit begins
    # a part waiting for the commit: its deadline passed, its client left; it still waits
    waiting = Waiter(
        lambda: asm.wait(lambda: asm.result is not None, "the commit", time.monotonic() - 1, gone=lambda: True)
    )
    assert not waiting.done.wait(0.3)  # longer than one POLL_SECONDS: gone() was asked and ignored
    asm.fail((Code.CANCELLED, "a part's client went away", ""))
    assert asm.failure is None
    asm.fail((Code.INTERNAL, "the commit failed", ""), commit=True)
    assert asm.failure == (Code.INTERNAL, "the commit failed", "")
    assert waiting.result() is False
    asm.succeed("too late")
    assert asm.result is None and asm.ended


def test_the_first_outcome_stands():
    asm = Assembly(2, HEAD, FAR)
    assert asm.begin() and asm.begin()
    asm.finish(True)
    assert asm.finish(True)
    asm.succeed("applied")
    asm.fail((Code.INTERNAL, "after the fact", ""), commit=True)
    assert asm.result == "applied" and asm.failure is None and asm.ended
    failed = Assembly(2, HEAD, FAR)
    failed.fail((Code.INVALID_ARGUMENT, "first", ""))
    failed.fail((Code.CANCELLED, "second", ""))
    assert failed.failure[0] == Code.INVALID_ARGUMENT


def test_a_part_that_did_not_move_its_bytes_does_not_seal():
    asm = Assembly(2, HEAD, FAR)
    assert asm.begin() and asm.begin()
    assert asm.finish(True) is False
    assert asm.finish(False) is False  # e.g. a NaN: its bytes came but do not count
    asm.fail((Code.CANCELLED, "gone", ""))
    assert asm.failure[0] == Code.CANCELLED  # not sealed: a failure still stands


def test_settle_waits_for_the_parts_moving_bytes():
    asm = Assembly(2, HEAD, FAR)
    assert asm.begin() and asm.begin()
    settling = Waiter(asm.settle)
    assert not settling.done.wait(0.05)
    asm.finish(True)
    assert not settling.done.wait(0.05)  # one part still moving
    asm.finish(True)
    assert settling.result() is True


def test_settle_after_a_failure_still_waits_for_the_active_part():
    asm = Assembly(3, HEAD, FAR)
    assert asm.begin()
    asm.fail((Code.CANCELLED, "gone", ""))
    assert not asm.begin()  # nobody starts once it failed
    settling = Waiter(asm.settle)
    assert not settling.done.wait(0.05)  # a part is still writing: its buffer is still in use
    asm.finish(False)
    assert settling.result() is False


def test_count_once_is_true_for_exactly_one_caller():
    asm = Assembly(2, HEAD, FAR)
    results: list[bool] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def count():
        go.wait(FAR)
        first = asm.count_once()
        with lock:
            results.append(first)

    threads = [threading.Thread(target=count) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(FAR)
    assert sorted(results) == [False] * 7 + [True]
    assert asm.count_once() is False


def test_a_channel_closed_between_taking_connections_and_sending_fails_cleanly():
    channel = DataChannel("127.0.0.1", 1, streams=2, min_part_bytes=4)
    pairs = [socket.socketpair() for _ in range(2)]
    conns = iter(DataConn(a, "test") for a, _ in pairs)
    channel._take = lambda deadline: next(conns)  # two live connections, as if pooled
    channel.close()  # its part threads are gone before the exchange hands them a part
    try:
        with pytest.raises(DataError) as err:
            channel.push(pb.PushHeader(worker_id="w"), torch.zeros(8), time.monotonic() + 5, Abort())
        assert err.value.code() == Code.CANCELLED
        assert all(b.recv(1) == b"" for _, b in pairs)  # nothing was sent: both connections were shut
    finally:
        for a, b in pairs:
            a.close()
            b.close()
