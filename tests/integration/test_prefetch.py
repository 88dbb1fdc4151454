"""SPEC 'Consistency' with a pipelined worker: `PSClient(pipeline=True, prefetch=k)` keeps the
pulls of the next k clocks in flight, against two real servers.

One worker, SGD with lr 1 and the gradient of clock c filled with c + 1, so the weights
after v applied pushes are w0 - (1 + 2 + ... + v) = w0 - v(v + 1)/2 (to float32 rounding). A pull for
clock c is asked for when the pull of clock c - k arrives, before the push of clock
c - k is computed, and each shard answers it once the worker's pushes up to c - k - 1 are
applied (own_lag k). So a pull reads version c - k (later only if a shard answered after a
later push was in: the bound allows it), and each shard's weights must be exactly the
version's it names: a pull landing in another clock's buffer, a pull read before it
completed, or pushes applied out of order would show other weights.
"""

from __future__ import annotations

import pytest
import torch

from worker import PSClient

from .support import FAST_FAIL

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

STEPS = 12


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_each_pull_reads_exactly_k_clocks_back_and_its_weights_are_that_version(start_server, prefetch):
    servers = start_server.shards(2, staleness=prefetch)
    model = _model()
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    read: list[list[int]] = []
    with PSClient(
        [s.address for s in servers],
        model,
        optimizer={"name": "sgd", "lr": 1.0},
        staleness=prefetch,
        worker_id=f"prefetch-{prefetch}",
        pipeline=True,
        prefetch=prefetch,
        options=FAST_FAIL,
    ) as ps:
        for c in range(STEPS):
            ps.pull()
            read.append(list(ps.stats.versions))
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            for shard, v in zip(ps.plan.shards, read[-1]):  # each shard answers on its own
                # versions differ by at least 1 in every weight; 1e-4 only absorbs float32 rounding
                expected = w0[shard.lo : shard.hi] - v * (v + 1) / 2
                got = flat[shard.lo : shard.hi]
                assert torch.allclose(got, expected, rtol=0, atol=1e-4), f"clock {c}: not version {v}'s weights"
            for p in model.parameters():
                p.grad = torch.full_like(p, float(c + 1))
            ps.push()
        ps.wait()
        final = ps.status()
    for c, versions in enumerate(read):  # the bound, shard by shard; pushes 0..c-1 exist by then
        assert all(max(0, c - prefetch) <= v <= c for v in versions), (c, read)
    # asked for k clocks ahead: read c - k, unless a shard answered only after a later push was in.
    # A pull asked for one clock ahead never reads below c - 1, so reads below it show the prefetch.
    reads = [(c, v) for c, versions in enumerate(read) if c >= prefetch for v in versions]
    if prefetch == 1:
        assert all(v >= c - 1 for c, v in reads), read
    else:
        assert sum(v < c - 1 for c, v in reads) >= len(reads) / 3, read
    # every push applied, once: a later clock overtaking an earlier push got the earlier one
    # refused as a duplicate, its gradient lost (the pipeline did this before pushes were ordered)
    assert [st.version for st in final] == [STEPS, STEPS]


def test_prefetch_beyond_the_staleness_bound_is_refused(start_server):
    servers = start_server.shards(1, staleness=1)
    with pytest.raises(ValueError, match="prefetch=2 needs"):
        PSClient([servers[0].address], _model(), staleness=1, pipeline=True, prefetch=2)
