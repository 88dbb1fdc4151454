"""Unit tests for ps_server.clock: the SSP rule, membership, eviction, waiting, durability."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from asyncps_common.flags import parse_staleness
from ps_server import checkpoint
from ps_server.clock import ClockTable, DuplicatePush, UnknownWorker


class FakeNow:
    """A controllable monotonic clock for `ClockTable(now=...)`."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def table_with(clocks: dict[str, int], staleness: float, timeout: float = 10.0, now: FakeNow | None = None):
    """A table whose workers stand at `clocks`, reached through register + advance only."""
    table = ClockTable(staleness, timeout, now=now or FakeNow())
    sessions = {}
    for w in clocks:
        sessions[w], start = table.register(w)
        assert start == 0
    for w, c in clocks.items():
        for k in range(c):
            table.advance(w, sessions[w], k)
    assert {w: e.clock for w, e in table.clocks().items()} == clocks
    return table, sessions


def ssp_reference(clocks: dict[str, int], reader: str, c: int, s: float, own_lag: int) -> bool:
    """Straight from the spec: every live worker is at c - s or later, and the reader's own
    pushes up to c - 1 - own_lag are applied (it stands at c - own_lag or later)."""
    return all(v >= c - s for v in clocks.values()) and clocks[reader] >= c - own_lag


# -- the SSP rule ----------------------------------------------------------------------


def test_lockstep_s0() -> None:
    table, ss = table_with({"a": 3, "b": 3}, staleness=0)
    assert table.can_read("a", 3) and table.can_read("b", 3)
    table.advance("a", ss["a"], 3)  # a pushed iteration 3, now computes 4
    assert not table.can_read("a", 4)  # b has not pushed 3 yet
    assert table.can_read("b", 3)
    table.advance("b", ss["b"], 3)
    assert table.can_read("a", 4) and table.can_read("b", 4)


def test_bounded_s2() -> None:
    table, _ = table_with({"fast": 5, "slow": 3}, staleness=2)
    assert table.can_read("fast", 5)  # 3 >= 5 - 2
    assert not table.can_read("fast", 6)  # 3 < 6 - 2
    table2, _ = table_with({"fast": 6, "slow": 3}, staleness=2)
    assert not table2.can_read("fast", 6)
    assert table2.can_read("slow", 3)


def test_fully_asynchronous_inf() -> None:
    table, _ = table_with({"fast": 1000, "slow": 0}, staleness=math.inf)
    assert table.can_read("fast", 1000)
    assert table.can_read("slow", 0)
    assert not table.can_read("fast", 1001)  # read-my-writes still holds: own push of 1000 missing
    assert table.can_read("fast", 1001, own_lag=1)


def test_own_lag() -> None:
    table, _ = table_with({"a": 4, "b": 9}, staleness=3)
    # a computes iteration 5 while its push of 4 is still in flight (it stands at 4).
    assert not table.can_read("a", 5, own_lag=0)
    assert table.can_read("a", 5, own_lag=1)
    assert not table.can_read("a", 6, own_lag=1)


@pytest.mark.parametrize("s", [0, 1, 2, 3, math.inf])
def test_rule_matches_the_spec_on_a_grid(s: float) -> None:
    for ca, cb, cc in itertools.product(range(4), repeat=3):
        clocks = {"a": ca, "b": cb, "c": cc}
        table, _ = table_with(clocks, staleness=s)
        for c in range(7):
            for lag in (0, 1):
                assert table.can_read("a", c, lag) == ssp_reference(clocks, "a", c, s, lag), (clocks, c, lag)


def test_negative_staleness_rejected() -> None:
    with pytest.raises(ValueError, match="staleness"):
        ClockTable(-1, 10.0)


# -- membership ------------------------------------------------------------------------


def test_register_starts_at_slowest_live_clock() -> None:
    table, _ = table_with({"a": 5, "b": 3}, staleness=math.inf)
    assert table.min_clock() == 3
    s1, start = table.register("c")
    assert start == 3
    assert table.register("d", start_clock=4)[1] == 4  # start_clock later than the slowest wins
    assert table.register("e", start_clock=1)[1] == 3  # never behind the slowest
    assert table.live == 5
    assert table.clocks()["c"].session == s1


def test_first_worker_honours_start_clock() -> None:
    table = ClockTable(1, 10.0, now=FakeNow())
    assert table.register("a", start_clock=7)[1] == 7
    assert table.min_clock() == 7
    assert ClockTable(1, 10.0, now=FakeNow()).register("a")[1] == 0


def test_sessions_are_unique_and_old_ones_are_refused() -> None:
    table = ClockTable(0, 10.0, now=FakeNow())
    old, _ = table.register("a")
    new, _ = table.register("a")
    other, _ = table.register("b")
    assert len({old, new, other}) == 3
    for call in (
        lambda: table.check("a", old),
        lambda: table.check_push("a", old, 0),
        lambda: table.advance("a", old, 0),
        lambda: table.leave("a", old),
    ):
        with pytest.raises(UnknownWorker, match="stale"):
            call()
    assert table.check("a", new).clock == 0
    assert table.clocks()["a"].clock == 0  # the refused advance changed nothing


def test_unknown_worker() -> None:
    table = ClockTable(0, 10.0, now=FakeNow())
    with pytest.raises(UnknownWorker, match="unknown worker 'ghost'"):
        table.check("ghost", 1)
    with pytest.raises(UnknownWorker):
        table.advance("ghost", 1, 0)
    with pytest.raises(UnknownWorker):
        asyncio.run(table.wait_readable("ghost", 1, 0))


def test_duplicate_push() -> None:
    table, ss = table_with({"a": 3}, staleness=0)
    for clock in (0, 2):
        with pytest.raises(DuplicatePush, match=f"clock {clock}"):
            table.check_push("a", ss["a"], clock)
        with pytest.raises(DuplicatePush):
            table.advance("a", ss["a"], clock)
    assert table.clocks()["a"].clock == 3
    table.check_push("a", ss["a"], 3)  # the next one is fine
    table.advance("a", ss["a"], 3)
    assert table.clocks()["a"].clock == 4


def test_leave_stops_holding_others_back() -> None:
    table, ss = table_with({"a": 4, "b": 1}, staleness=1)
    assert not table.can_read("a", 4)
    table.leave("b", ss["b"])
    assert table.live == 1
    assert table.can_read("a", 4)
    with pytest.raises(UnknownWorker):
        table.check("b", ss["b"])


# -- eviction --------------------------------------------------------------------------


def test_silent_workers_are_evicted_after_the_timeout() -> None:
    now = FakeNow(0.0)
    table, ss = table_with({"a": 6, "b": 2, "c": 4}, staleness=2, timeout=10.0, now=now)
    assert not table.can_read("a", 6)  # b at 2 < 6 - 2
    now.t = 5.0
    table.check("a", ss["a"])  # a heartbeat
    table.check_push("c", ss["c"], 4)  # any call is a sign of life
    now.t = 10.0
    assert table.evict_silent() == []  # exactly at the timeout: not yet
    assert table.evictions == 0
    now.t = 10.5
    assert table.evict_silent() == ["b"]
    assert table.evictions == 1
    assert table.live == 2 and set(table.clocks()) == {"a", "c"}
    assert table.min_clock() == 4
    assert table.can_read("a", 6)  # b no longer holds a back
    with pytest.raises(UnknownWorker, match="unknown worker 'b'"):
        table.check("b", ss["b"])
    # b comes back and starts at the slowest live clock, not where it was.
    session, start = table.register("b")
    assert start == 4 and session != ss["b"]
    now.t = 30.0
    assert sorted(table.evict_silent()) == ["a", "b", "c"]
    assert table.evictions == 4
    assert table.live == 0


def test_rejoin_with_none_live_starts_at_the_floor() -> None:
    now = FakeNow(0.0)
    table, ss = table_with({"a": 7, "b": 4}, staleness=1, timeout=1.0, now=now)
    now.t = 2.0
    assert sorted(table.evict_silent()) == ["a", "b"]
    assert table.min_clock() == 4  # the floor: the slowest clock seen, never lower
    assert table.register("a")[1] == 4
    assert table.register("b", start_clock=9)[1] == 9


# -- waiting -----------------------------------------------------------------------------


async def _blocked(task: asyncio.Task) -> bool:
    for _ in range(20):
        await asyncio.sleep(0)
    return not task.done()


def test_wait_readable_blocks_until_the_slow_worker_advances() -> None:
    async def main() -> None:
        now = FakeNow(50.0)
        table, ss = table_with({"a": 1, "b": 0}, staleness=0, now=now)
        task = asyncio.create_task(table.wait_readable("a", ss["a"], 1))
        assert await _blocked(task)
        assert table.pulls_waited == 0
        now.t = 52.5
        table.check("b", ss["b"])  # activity that changes no clock
        assert await _blocked(task)
        table.advance("b", ss["b"], 0)
        waited = await asyncio.wait_for(task, 5)
        assert waited == pytest.approx(2.5)
        assert table.pulls_waited == 1
        assert table.wait_seconds == pytest.approx(2.5)
        assert table.max_read_gap == 0

        # A read that the bound allows at once: no wait recorded, the gap is.
        table.staleness = 3
        for k in range(1, 4):
            table.advance("a", ss["a"], k)
        assert await table.wait_readable("a", ss["a"], 4) == 0.0
        assert table.pulls_waited == 1
        assert table.wait_seconds == pytest.approx(2.5)
        assert table.max_read_gap == 3  # 4 - slowest (b at 1)

    asyncio.run(main())


def test_waiting_for_the_own_push_is_not_bound_waiting() -> None:
    """Only the staleness bound counts as waiting; read-my-writes waits for the reader's own push."""

    async def main() -> None:
        now = FakeNow(0.0)
        table, ss = table_with({"a": 0, "b": 0}, staleness=1, now=now)
        # a computes clock 1 while its push of 0 is in flight; the bound (b at 0 >= 1 - 1) allows it.
        task = asyncio.create_task(table.wait_readable("a", ss["a"], 1))
        assert await _blocked(task)
        now.t = 3.0
        table.advance("a", ss["a"], 0)
        assert await asyncio.wait_for(task, 5) == 0.0
        assert table.pulls_waited == 0 and table.wait_seconds == 0.0

    asyncio.run(main())


def test_lockstep_wait_for_the_own_push_is_not_bound_waiting() -> None:
    """s = 0: the others are all there; only the reader's own push of the last clock is missing."""

    async def main() -> None:
        now = FakeNow(0.0)
        table, ss = table_with({"a": 0, "b": 1}, staleness=0, now=now)
        task = asyncio.create_task(table.wait_readable("a", ss["a"], 1))
        assert await _blocked(task)
        now.t = 2.0
        table.advance("a", ss["a"], 0)
        assert await asyncio.wait_for(task, 5) == 0.0
        assert table.pulls_waited == 0 and table.wait_seconds == 0.0

    asyncio.run(main())


def test_bound_wait_is_timed_until_the_bound_releases() -> None:
    async def main() -> None:
        now = FakeNow(0.0)
        table, ss = table_with({"a": 1, "b": 0}, staleness=1, now=now)
        task = asyncio.create_task(table.wait_readable("a", ss["a"], 2))  # needs b at 1 and its own push of 1
        assert await _blocked(task)
        now.t = 1.0
        table.advance("b", ss["b"], 0)  # the bound releases here
        assert await _blocked(task)
        now.t = 3.0
        table.advance("a", ss["a"], 1)  # then its own push lands
        assert await asyncio.wait_for(task, 5) == pytest.approx(1.0)
        assert table.pulls_waited == 1 and table.wait_seconds == pytest.approx(1.0)

    asyncio.run(main())


def test_wait_readable_raises_if_the_waiter_is_evicted() -> None:
    async def main() -> None:
        now = FakeNow(0.0)
        table, ss = table_with({"a": 1, "b": 0}, staleness=0, timeout=10.0, now=now)
        task = asyncio.create_task(table.wait_readable("a", ss["a"], 1))
        assert await _blocked(task)
        now.t = 15.0
        table.check("b", ss["b"])
        now.t = 20.0
        assert table.evict_silent() == ["a"]
        with pytest.raises(UnknownWorker):
            await asyncio.wait_for(task, 5)
        assert table.pulls_waited == 0

    asyncio.run(main())


def test_wait_readable_unblocks_when_the_slow_worker_is_evicted() -> None:
    async def main() -> None:
        now = FakeNow(0.0)
        table, ss = table_with({"a": 1, "b": 0}, staleness=0, timeout=10.0, now=now)
        task = asyncio.create_task(table.wait_readable("a", ss["a"], 1))
        assert await _blocked(task)
        now.t = 8.0
        table.check("a", ss["a"])
        now.t = 12.0
        assert table.evict_silent() == ["b"]
        assert await asyncio.wait_for(task, 5) == pytest.approx(12.0)
        assert table.pulls_waited == 1

    asyncio.run(main())


def test_wait_readable_rejects_own_lag_beyond_the_bound() -> None:
    table, ss = table_with({"a": 0}, staleness=0)
    with pytest.raises(ValueError, match="own_lag"):
        asyncio.run(table.wait_readable("a", ss["a"], 1, own_lag=1))


# -- durability -------------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path) -> None:
    now = FakeNow(0.0)
    table, ss = table_with({"a": 5, "b": 3, "c": 4}, staleness=math.inf, timeout=1.0, now=now)
    now.t = 0.5
    table.check("a", ss["a"])
    table.check("b", ss["b"])
    now.t = 1.2
    assert table.evict_silent() == ["c"]
    path = tmp_path / "clocks.pt"
    checkpoint.save(path, {"clocks": table.state_dict()})
    state = checkpoint.load(path)["clocks"]

    now2 = FakeNow(1000.0)
    restored = ClockTable(0, 1.0, now=now2)
    restored.load_state_dict(state)
    assert restored.staleness == math.inf
    assert {w: (e.session, e.clock) for w, e in restored.clocks().items()} == {"a": (ss["a"], 5), "b": (ss["b"], 3)}
    assert restored.min_clock() == table.min_clock() == 3
    # Restored workers count as just seen and are evicted only after a timeout, but their
    # sessions died with the old process: they must register again.
    with pytest.raises(UnknownWorker, match="restarted"):
        restored.check("a", ss["a"])
    now2.t = 1000.9
    assert restored.evict_silent() == []
    now2.t = 1001.5
    assert sorted(restored.evict_silent()) == ["a", "b"]
    assert restored.register("z")[1] == 3  # the floor survived


@pytest.mark.parametrize("text, value", [("0", 0.0), ("3", 3.0), ("inf", math.inf), ("12", 12.0), ("2.0", 2.0)])
def test_parse_staleness_accepts(text: str, value: float) -> None:
    assert parse_staleness(text) == value


@pytest.mark.parametrize("text", ["-1", "1.5", "nan", "x", "", "-inf", "0.1"])
def test_parse_staleness_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_staleness(text)


def test_restored_worker_registers_again_at_its_own_clock() -> None:
    """The fast-forward rule: after a restore, a worker re-registers at the clock it reached
    (the pushes in between died with the old process), never behind the checkpointed clock."""
    table, ss = table_with({"a": 5, "b": 3}, staleness=0, timeout=10.0)
    restored = ClockTable(0, 10.0)
    restored.load_state_dict(table.state_dict())
    assert restored.restored_clock("a") == 5
    session, clock = restored.register("a", start_clock=9)
    assert clock == 9 and restored.restored_clock("a") is None
    assert restored.check("a", session).clock == 9
    # b is still the restored entry at 3: it holds a back (s = 0) until it registers again
    assert not restored.can_read("a", 9) and restored.min_clock() == 3
    with pytest.raises(UnknownWorker):
        restored.check_push("b", ss["b"], 3)  # a push of the old session is refused, not applied
    assert restored.register("b", start_clock=0)[1] == 9  # a fresh process starts at the slowest live clock
    assert restored.can_read("a", 9)
