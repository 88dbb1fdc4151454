"""Load: 16 concurrent clients pull and push for DURATION seconds against 2 real servers.

Each client is a thread running its own asyncio loop with the real client layer
(`worker.rpc.ShardClient`, as PSClient uses it): every iteration it pulls both shards
and pushes a gradient to both, each RPC timed on its own. Staleness is unbounded and
gradients are not averaged, so every push is an independent update. Asserted: no
error and no retry; no lost update: each shard's version (Status) equals the number
of pushes it accepted, counted client-side (a push answered ALREADY_EXISTS after a
retry counts once, as the server applied it once). Reported (printed, and written
to `load.json` in the test's tmp dir): p50/p99 latency of pull and push, rates.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from protos.asyncps.v1 import ps_pb2 as pb
from worker import CallOptions, PSClient
from worker.plan import make_plan, param_specs
from worker.rpc import ShardClient

from .support import mlp, status

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

DURATION = 60.0  # seconds of load (issue 7: "16 concurrent clients ... for 60 s")
CLIENTS = 16
OPTIONS = CallOptions(timeout=10.0, push_timeout=30.0, pull_timeout=30.0, retry_seconds=10.0)
OPTIMIZER = {"name": "sgd", "lr": 1e-4, "average_gradients": False}


class LoadClient:
    """One client: register with every shard at clock 0, then pull-push until `end`."""

    def __init__(self, index: int, addresses: list[str], plan_hash: str, sizes: list[int]):
        self.worker_id, self.addresses, self.plan_hash, self.sizes = f"load-{index}", addresses, plan_hash, sizes
        self.pull_seconds: list[float] = []
        self.push_seconds: list[float] = []
        self.accepted = [0] * len(addresses)  # pushes each shard accepted from this client
        self.retries = 0
        self.error: BaseException | None = None

    def run(self, registered: threading.Barrier, go: threading.Event, end: list[float]) -> None:
        try:
            asyncio.run(self._run(registered, go, end))
        except BaseException as exc:  # reported by the test
            self.error = exc
            registered.abort()

    async def _run(self, registered: threading.Barrier, go: threading.Event, end: list[float]) -> None:
        shards = [ShardClient(a, i, OPTIONS) for i, a in enumerate(self.addresses)]
        try:
            sessions = [(await s.register(self.worker_id, self.plan_hash)).session for s in shards]
            await asyncio.to_thread(registered.wait)
            await asyncio.to_thread(go.wait)
            weights = [torch.empty(n) for n in self.sizes]
            grads = [torch.full((n,), 1e-3) for n in self.sizes]
            versions = [0] * len(shards)
            clock = 0
            while time.monotonic() < end[0]:
                heads = await asyncio.gather(
                    *(self._pull(s, sess, clock, w) for s, sess, w in zip(shards, sessions, weights))
                )
                versions = [h.version for h in heads]
                await asyncio.gather(
                    *(self._push(s, sess, clock, v, g) for s, sess, v, g in zip(shards, sessions, versions, grads))
                )
                clock += 1
            for s, sess in zip(shards, sessions):
                await s.leave(self.worker_id, sess)
        finally:
            self.retries = sum(s.retries for s in shards)
            for s in shards:
                await s.close()

    async def _pull(self, shard: ShardClient, session: int, clock: int, out: torch.Tensor) -> pb.PullHeader:
        req = pb.PullRequest(worker_id=self.worker_id, session=session, plan_hash=self.plan_hash, clock=clock)
        t0 = time.perf_counter()
        head = await shard.pull(req, out)
        self.pull_seconds.append(time.perf_counter() - t0)
        return head

    async def _push(self, shard: ShardClient, session: int, clock: int, version: int, grad: torch.Tensor) -> None:
        head = pb.PushHeader(
            worker_id=self.worker_id, session=session, plan_hash=self.plan_hash, clock=clock, read_version=version
        )
        t0 = time.perf_counter()
        await shard.push(head, grad)  # None: ALREADY_EXISTS, a retry of a push the shard applied
        self.push_seconds.append(time.perf_counter() - t0)
        self.accepted[shard.index] += 1


def quantiles_ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "count": int(a.size),
    }


def test_16_clients_pull_and_push_without_error_or_lost_update(start_server, tmp_path):
    servers = start_server.shards(2, heartbeat_timeout=120)
    addresses = [s.address for s in servers]
    model = mlp()
    with PSClient(addresses, model, optimizer=OPTIMIZER, staleness=math.inf, worker_id="initializer", options=OPTIONS):
        pass  # initializes both shards (version 0), registers and leaves
    plan = make_plan(param_specs(model.named_parameters()), len(addresses))
    sizes = [spec.numel for spec in plan.shards]

    clients = [LoadClient(i, addresses, plan.hash, sizes) for i in range(CLIENTS)]
    registered, go, end = threading.Barrier(CLIENTS + 1), threading.Event(), [math.inf]
    threads = [threading.Thread(target=c.run, args=(registered, go, end), daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        registered.wait(timeout=120)  # everyone registered at clock 0 before anyone pushes
    except threading.BrokenBarrierError:
        raise AssertionError(f"registration failed: {[repr(c.error) for c in clients if c.error]}") from None
    start = time.monotonic()
    end[0] = start + DURATION
    go.set()
    for t in threads:
        t.join(timeout=DURATION + 120)
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads), "a client hung"
    errors = [f"{c.worker_id}: {c.error!r}" for c in clients if c.error is not None]
    assert not errors, errors

    accepted = [sum(c.accepted[i] for c in clients) for i in range(len(addresses))]
    statuses = [status(a) for a in addresses]
    report = {
        "clients": CLIENTS,
        "servers": len(addresses),
        "duration_seconds": round(elapsed, 2),
        "model_elements": plan.numel,
        "shard_elements": sizes,
        "pull": quantiles_ms([x for c in clients for x in c.pull_seconds]),
        "push": quantiles_ms([x for c in clients for x in c.push_seconds]),
        "pushes_accepted_per_shard": accepted,
        "shard_versions": [st.version for st in statuses],
        "iterations_per_second": round(sum(len(c.push_seconds) for c in clients) / len(addresses) / elapsed, 1),
        "retries": sum(c.retries for c in clients),
    }
    (tmp_path / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nload: {json.dumps(report)}\n(written to {tmp_path / 'load.json'})")

    assert report["retries"] == 0
    for st, n in zip(statuses, accepted):
        assert n > 0
        assert st.version == n, f"shard {st.shard_index}: version {st.version}, accepted {n} pushes"
        assert st.pushes_applied == n and st.pushes_rejected == 0
        assert st.live_workers == 0  # every client left
    assert min(len(c.push_seconds) for c in clients) > 0, "a client never got a push through"
