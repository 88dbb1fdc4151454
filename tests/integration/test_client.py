"""PSClient behaviour a training loop relies on, against two real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from worker import PSClient
from worker.rpc import ShardClient

from .support import FAST_FAIL, batches, mlp, status

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")


def test_nan_gradient_is_refused_at_push_and_nothing_is_sent(start_server):
    servers = start_server.shards(2, staleness=0)
    model = mlp()
    ((x, y),) = batches(1)
    with PSClient(
        [s.address for s in servers],
        model,
        optimizer={"name": "sgd", "lr": 0.1},
        staleness=0,
        worker_id="nan",
        options=FAST_FAIL,
    ) as ps:
        ps.pull()
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = [status(s.address) for s in servers]
        next(model.parameters()).grad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            ps.push()
        assert ps.clock == 0  # the step did not happen
        after = [status(s.address) for s in servers]
        assert [(a.version, a.weights_checksum) for a in after] == [(b.version, b.weights_checksum) for b in before]
        # the loop can go on: a clean gradient for the same clock is accepted
        for p in model.parameters():
            p.grad = None
        torch.nn.functional.mse_loss(model(x), y).backward()
        ps.push().wait()
        ps.pull()
        assert ps.clock == 1 and ps.stats.versions == [1, 1]


def test_push_returns_a_ticket_and_bounds_pushes_in_flight(start_server):
    servers = start_server.shards(2, staleness=2)
    model = mlp()
    data = batches(6)
    with PSClient(
        [s.address for s in servers],
        model,
        optimizer={"name": "sgd", "lr": 0.05},
        staleness=2,
        worker_id="tickets",
        max_inflight=2,
        options=FAST_FAIL,
    ) as ps:
        tickets = []
        for x, y in data:
            ps.pull()
            torch.nn.functional.mse_loss(model(x), y).backward()
            tickets.append(ps.push())
            assert sum(not t.done() for t in tickets) <= 2
        for t in tickets:
            responses = t.wait(timeout=30)
            assert len(responses) == 2 and all(r is not None for r in responses)
        assert [t.clock for t in tickets] == list(range(6))
        assert sorted(r.version for t in tickets for r in t.wait()) == sorted([v for v in range(1, 7)] * 2)


def test_two_pushes_without_a_pull_between_get_the_newest_weights(start_server, monkeypatch):
    """Each push puts the next clock's pull in flight, and all of them land in one buffer. Pushing
    twice without pulling leaves the first of those pulls running beside the second: here it is held
    until the second has landed and then writes its older weights over them (the late chunks of a
    slow stream: over gRPC both streams write the buffer at once; the data plane serializes them).
    The second push must cancel it, so the next pull gives the newest weights."""
    server = start_server(staleness=0)
    landed, settled = threading.Event(), threading.Event()  # clock 2's pull is in; clock 1's wrote or gave up
    real_pull = ShardClient.pull

    async def pull(self, req, out):
        if req.clock != 1:
            head = await real_pull(self, req, out)
            if req.clock == 2:
                landed.set()
            return head
        try:
            head = await real_pull(self, req, out)
            older = out.clone()
            await asyncio.to_thread(landed.wait, 60)
            out.copy_(older)  # lands after the newer pull
            return head
        finally:
            settled.set()

    monkeypatch.setattr(ShardClient, "pull", pull)
    model = mlp()
    with PSClient(
        [server.address],
        model,
        optimizer={"name": "sgd", "lr": 0.1},
        staleness=0,
        worker_id="w",
        options=dataclasses.replace(FAST_FAIL, transport="grpc"),
    ) as ps:
        ps.pull()
        for x, y in batches(2):
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push().wait()
        assert landed.wait(60) and settled.wait(60)
        ps.pull()
        st = status(server.address)
        assert st.version == 2
        mine = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
        assert mine == pytest.approx(st.weights_checksum, rel=1e-9)
