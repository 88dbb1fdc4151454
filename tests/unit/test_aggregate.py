"""Gradient averaging: buckets per clock, applied only when every live worker is in."""

import pytest
import torch

from ps_server.aggregate import Aggregator
from ps_server.clock import DuplicatePush


def test_bucket_completes_when_every_live_worker_contributed():
    agg = Aggregator()
    agg.add("a", 1, 0, torch.tensor([1.0, 2.0]), read_version=5)
    assert agg.complete({"a": 0, "b": 0}) == []
    agg.add("b", 2, 0, torch.tensor([3.0, 4.0]), read_version=4)
    (bucket,) = agg.complete({"a": 0, "b": 0})
    assert bucket.clock == 0 and bucket.read_version == 4
    assert torch.equal(bucket.total, torch.tensor([4.0, 6.0]))
    assert bucket.contributors == {"a": 1, "b": 2}
    assert agg.pending == 0


def test_gradient_is_copied_not_aliased():
    agg = Aggregator()
    g = torch.ones(3)
    agg.add("a", 1, 0, g, read_version=0)
    g.fill_(100.0)  # the servicer reuses its receive buffers
    (bucket,) = agg.complete({"a": 0})
    assert torch.equal(bucket.total, torch.ones(3))


def test_an_adopted_gradient_becomes_the_bucket_and_later_ones_are_only_read():
    agg = Aggregator()
    first, second, other = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 5.0)
    assert agg.add("a", 1, 0, first, read_version=0, adopt=True) is True  # no copy: the caller gives it up
    assert agg.add("b", 2, 0, second, read_version=0, adopt=True) is False
    assert agg.add("a", 1, 1, other, read_version=0) is False  # without adopt a new bucket copies
    assert torch.equal(second, torch.full((3,), 2.0)) and torch.equal(other, torch.full((3,), 5.0))
    (bucket,) = agg.complete({"a": 0, "b": 0})
    assert bucket.total is first and torch.equal(bucket.total, torch.full((3,), 3.0))
    with pytest.raises(DuplicatePush):  # a refused gradient is not adopted either
        agg.add("a", 1, 1, torch.ones(3), read_version=0, adopt=True)


def test_duplicate_push_for_a_clock_is_refused_and_changes_nothing():
    agg = Aggregator()
    agg.add("a", 1, 7, torch.ones(2), read_version=0)
    with pytest.raises(DuplicatePush):
        agg.add("a", 1, 7, torch.ones(2), read_version=0)
    agg.add("b", 1, 7, torch.ones(2), read_version=0)
    (bucket,) = agg.complete({"a": 0, "b": 0})
    assert torch.equal(bucket.total, torch.full((2,), 2.0))


def test_buckets_complete_in_clock_order_and_eviction_releases_them():
    agg = Aggregator()
    agg.add("a", 1, 1, torch.ones(1), read_version=0)
    agg.add("a", 1, 0, torch.ones(1), read_version=0)
    assert agg.complete({"a": 0, "b": 0}) == []  # b is live and has pushed nothing
    done = agg.complete({"a": 0})  # b was evicted: it no longer holds the buckets back
    assert [b.clock for b in done] == [0, 1]


def test_a_later_clock_waits_for_an_earlier_incomplete_one():
    agg = Aggregator()
    agg.add("a", 1, 0, torch.ones(1), read_version=0)
    agg.add("a", 1, 1, torch.ones(1), read_version=0)
    agg.add("b", 1, 1, torch.ones(1), read_version=0)
    assert agg.complete({"a": 0, "b": 0}) == []
    agg.add("b", 1, 0, torch.ones(1), read_version=0)
    assert [b.clock for b in agg.complete({"a": 0, "b": 0})] == [0, 1]


def test_a_worker_whose_clock_jumped_past_a_bucket_no_longer_holds_it():
    agg = Aggregator()
    agg.add("a", 1, 3, torch.ones(4), read_version=0)
    assert agg.complete({"a": 3, "b": 3}) == []  # b is at clock 3 and has not pushed it yet
    (bucket,) = agg.complete({"a": 3, "b": 5})  # b re-registered at clock 5: it will never push 3
    assert bucket.clock == 3 and set(bucket.contributors) == {"a"}


def test_equal_sample_counts_give_the_plain_sum_bit_for_bit():
    g1, g2 = torch.randn(50), torch.randn(50)
    agg = Aggregator()
    agg.add("a", 1, 0, g1, read_version=0, samples=7)
    agg.add("b", 1, 0, g2, read_version=0, samples=7)
    (bucket,) = agg.complete({"a": 0, "b": 0})
    assert torch.equal(bucket.total, g1 + g2) and bucket.divisor == 2 and not bucket.weighted


def test_unequal_sample_counts_weight_each_gradient_by_its_samples():
    """Two workers' mean gradients over 3 and 1 samples average to the gradient of the mean
    loss over all 4 samples: the update one process would make on the union of the batches."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(4, 5), torch.randn(4, 1)

    def grad(xs, ys):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()

    agg = Aggregator()
    agg.add("a", 1, 0, grad(x[:3], y[:3]), read_version=0, samples=3)
    agg.add("b", 1, 0, grad(x[3:], y[3:]), read_version=0, samples=1)
    (bucket,) = agg.complete({"a": 0, "b": 0})
    assert bucket.weighted and bucket.divisor == 4
    torch.testing.assert_close(bucket.total / bucket.divisor, grad(x, y))


def test_a_zero_sample_count_counts_as_one():
    agg = Aggregator()
    agg.add("a", 1, 0, torch.ones(2), read_version=0, samples=0)
    agg.add("b", 1, 0, torch.full((2,), 3.0), read_version=0, samples=3)
    (bucket,) = agg.complete({"a": 0, "b": 0})
    assert bucket.divisor == 4 and torch.equal(bucket.total, torch.full((2,), 10.0))


def test_a_shard_reuses_one_gradient_buffer_per_worker_pushing_at_once():
    """Three workers push each clock at the same time (all received before any commit): after
    the first clock every push is received into a pooled buffer, never a fresh allocation,
    and every clock applies the mean."""
    import asyncio

    from asyncps_common import optimizer as optim
    from protos.asyncps.v1 import ps_pb2 as pb
    from ps_server.servicer import ServerConfig, Servicer
    from ps_server.store import ShardStore

    plan, n, workers = "e" * 64, 1000, ["a", "b", "c"]
    sv = Servicer(ServerConfig(staleness=0))
    sv.store = ShardStore(plan, torch.zeros(n), optim.default_config("sgd", 1.0, average_gradients=True))
    sessions = {w: sv.clocks.register(w)[0] for w in workers}
    seen: list[set[int]] = []
    kept: list[torch.Tensor] = []  # every buffer stays alive, so a fresh one cannot take a freed one's address

    async def clock(c: int) -> None:
        opened = []
        for i, w in enumerate(workers):
            head = pb.PushHeader(worker_id=w, session=sessions[w], plan_hash=plan, clock=c, read_version=c)
            store, buf = sv.open_push(head)
            buf.fill_(float(i + 1))
            opened.append((store, head, buf))
        seen.append({buf.data_ptr() for _, _, buf in opened})
        kept.extend(buf for _, _, buf in opened)
        for store, head, buf in opened:
            await sv.commit_push(store, head, buf)

    for c in range(4):
        asyncio.run(clock(c))
        assert sv.store.version == c + 1
        snap = sv.store.lease()
        assert torch.allclose(snap.weights, torch.full((n,), -2.0 * (c + 1)))  # lr 1, mean of 1, 2, 3
        sv.store.release(snap)
    assert all(later == seen[0] for later in seen[1:]), seen
