"""Load-balanced batches: the combined batch split by speed, and the fixed point it settles at."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps_server.balance import Balancer, shares


def test_shares_follow_speed_and_sum_to_the_total():
    assert shares(32, {"fast": 3.0, "slow": 1.0}) == {"fast": 24, "slow": 8}
    assert shares(32, {"a": 1.0, "b": 1.0}) == {"a": 16, "b": 16}
    assert shares(10, {"a": 1.0, "b": 1.0, "c": 1.0}) == {"a": 4, "b": 3, "c": 3}  # remainder by name


def test_every_worker_keeps_at_least_one_sample():
    assert shares(32, {"fast": 1e9, "slow": 1.0}) == {"fast": 31, "slow": 1}
    assert shares(2, {"a": 5.0, "b": 1.0, "c": 1.0}) == {"a": 1, "b": 1, "c": 1}


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_a_speed_that_is_not_positive_and_finite_is_refused(bad):
    with pytest.raises(ValueError, match="speed"):
        shares(8, {"a": 1.0, "b": bad})


@given(
    total=st.integers(1, 10_000),
    speeds=st.dictionaries(st.text(min_size=1, max_size=4), st.floats(1e-3, 1e3), min_size=1, max_size=8),
)
def test_shares_are_exact_at_least_one_and_within_one_of_proportional(total, speeds):
    out = shares(total, speeds)
    assert out.keys() == speeds.keys()
    assert all(b >= 1 for b in out.values())
    if total >= len(speeds):
        assert sum(out.values()) == total
        whole = sum(speeds.values())
        exact = {w: total * v / whole for w, v in speeds.items()}
        if min(exact.values()) >= 1:
            assert all(abs(out[w] - exact[w]) < 1.0 + 1e-9 for w in out)
        faster = sorted(speeds, key=speeds.get)
        assert all(out[a] <= out[b] + 1 for a, b in zip(faster, faster[1:]))  # monotone up to rounding
    assert shares(total, dict(reversed(speeds.items()))) == out  # order of the mapping does not matter


def test_unmeasured_workers_keep_their_own_batch_and_the_rest_is_split():
    b = Balancer()
    b.register("a", 16)
    b.register("b", 16)
    b.register("c", 8)
    assert b.batch_for("a", 0, ["a", "b", "c"]) == 16  # nothing measured yet
    b.observe("a", 16, 1.0)
    b.observe("b", 16, 3.0)
    # c (unmeasured) keeps 8; a and b split the other 32 by speed 16 : 5.33
    assert b.batch_for("c", 1, ["a", "b", "c"]) == 8
    assert b.batch_for("a", 1, ["a", "b", "c"]) == 24
    assert b.batch_for("b", 1, ["a", "b", "c"]) == 8


def test_only_live_workers_share_the_combined_batch():
    b = Balancer()
    for w in "ab":
        b.register(w, 16)
        b.observe(w, 16, 1.0)
    assert b.batch_for("a", 0, ["a", "b"]) == 16
    assert b.batch_for("a", 1, ["a"]) == 16  # b evicted: a runs its own batch, not b's as well


def test_a_worker_without_a_batch_size_is_not_balanced():
    b = Balancer()
    b.register("a", 0)
    b.register("b", 16)
    assert b.batch_for("a", 0, ["a", "b"]) == 0
    assert b.batch_for("b", 0, ["a", "b"]) == 16


def test_speed_is_smoothed_and_bad_observations_are_ignored():
    b = Balancer(smoothing=0.5)
    for w in "ab":
        b.register(w, 10)
    b.observe("a", 10, 1.0)  # 10/s
    b.observe("a", 10, 0.5)  # 20/s -> 15/s
    b.observe("a", 10, 0.0)  # ignored
    b.observe("a", 0, 1.0)  # ignored
    b.observe("a", 10, math.nan)  # ignored
    b.observe("b", 5, 1.0)  # 5/s
    assert b.batch_for("a", 0, ["a", "b"]) == 15 and b.batch_for("b", 0, ["a", "b"]) == 5


@pytest.mark.parametrize(
    "fixed, per_sample",
    [((0.0, 0.0), (1.0, 3.0)), ((0.02, 0.02), (0.01, 0.03)), ((0.05, 0.0, 0.01), (0.01, 0.01, 0.04))],
)
def test_repeated_balancing_evens_out_step_times(fixed, per_sample):
    """Workers whose step takes fixed + per_sample * batch: after a few clocks their steps take
    about equally long, which is what lets a synchronous clock run at the fast workers' pace."""
    names = [f"w{i}" for i in range(len(fixed))]
    b = Balancer()
    for w in names:
        b.register(w, 16)
    batch = {w: 16 for w in names}
    for clock in range(30):
        for w, f, c in zip(names, fixed, per_sample):
            b.observe(w, batch[w], f + c * batch[w])
        batch = {w: b.batch_for(w, clock, names) for w in names}
        assert sum(batch.values()) == 16 * len(names)
    times = [f + c * batch[w] for w, f, c in zip(names, fixed, per_sample)]
    assert max(times) / min(times) < 1.15, (batch, times)
    evenly = [f + c * 16 for f, c in zip(fixed, per_sample)]
    assert max(times) < 0.8 * max(evenly)  # the slowest clock is much shorter than with equal batches


def test_a_clocks_split_is_made_once_so_its_batches_sum_to_the_combined_batch():
    b = Balancer(smoothing=1.0)
    for w in "ab":
        b.register(w, 16)
        b.observe(w, 16, 1.0)
    assert b.batch_for("a", 5, "ab") == 16
    b.observe("a", 16, 0.25)  # a pushes clock 5 before b has pulled for it
    assert b.batch_for("b", 5, "ab") == 16  # clock 5 keeps its split
    assert b.batch_for("b", 6, "ab") == 6 and b.batch_for("a", 6, "ab") == 26  # the next one moves


def test_a_worker_missing_from_a_clocks_split_gets_a_fresh_one():
    b = Balancer()
    b.register("a", 16)
    assert b.batch_for("a", 3, ["a"]) == 16
    b.register("b", 8)  # joined after the split of clock 3 was made
    assert b.batch_for("b", 3, ["a", "b"]) == 8


def test_a_worker_that_left_is_forgotten():
    b = Balancer()
    for w in "ab":
        b.register(w, 16)
        b.observe(w, 16, 1.0)
    b.forget("b")
    assert b.batch_for("b", 0, "ab") == 0  # no batch size any more: not balanced
    assert b.batch_for("a", 0, "ab") == 16  # and it no longer counts in a's split


def test_the_spread_of_a_clocks_split_is_its_largest_share_over_the_mean():
    b = Balancer(smoothing=1.0)
    assert b.spread(0) == 1.0  # no split kept
    for w in "ab":
        b.register(w, 4)
    assert b.batch_for("a", 0, "ab") == 4 and b.spread(0) == 1.0  # no speed yet: equal shares
    b.observe("a", 4, 0.1)
    b.observe("b", 4, 0.3)  # 3x slower
    assert b.batch_for("a", 1, "ab") == 6 and b.batch_for("b", 1, "ab") == 2
    assert b.spread(1) == pytest.approx(6 / 4)
    assert b.spread(0) == 1.0  # each clock keeps its own split
    b.forget("b")
    assert b.batch_for("a", 2, "a") == 4 and b.spread(2) == 1.0  # one worker: nothing to spread
