"""One clock's pull and push across every shard at once, and the heartbeats: the `ShardExchange` part of `PSClient`.

These coroutines run on the client's I/O thread (its asyncio event loop), never on the training
thread; they count bytes and latency into the worker's metrics once per shard and call, and a
push refused because this worker was evicted marks the client for rejoining instead of failing it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import torch

from protos import compress
from protos.asyncps.v1 import ps_pb2 as pb
from worker.metrics import WorkerMetrics
from worker.plan import Plan
from worker.rpc import RpcFailed, ShardClient
from worker.tickets import ClientStats

log = logging.getLogger(__name__)


class ShardExchange:
    """Mixed into `PSClient`: the attributes below are its own (see `PSClient.__init__`)."""

    worker_id: str
    plan: Plan
    metrics: WorkerMetrics
    stats: ClientStats
    compression: str
    _pull_bufs: list[torch.Tensor]
    _free_grads: list[torch.Tensor]
    _shards: list[ShardClient]
    _sessions: list[int]
    _seen_versions: list[int]
    _pending_pulls: dict[int, concurrent.futures.Future]
    _push_order: list[asyncio.Lock]
    _failure: BaseException | None
    _evicted: bool
    _hb_interval: float | None

    def pull_buffer(self, clock: int) -> torch.Tensor:
        """The flat buffer clock `clock`'s pull lands in (one of `prefetch`, in turn)."""
        return self._pull_bufs[clock % len(self._pull_bufs)]

    async def _pull_all(self, clock: int, own_lag: int) -> list[pb.PullHeader]:
        m = self.metrics
        pull_codec = self.compression if self.compression in ("bf16", "fp16") else ""
        itemsize = compress.pull_dtype(pull_codec).itemsize
        into = self.pull_buffer(clock)

        async def one(shard: ShardClient, session: int) -> pb.PullHeader:
            spec = self.plan.shards[shard.index]
            req = pb.PullRequest(
                worker_id=self.worker_id,
                session=session,
                plan_hash=self.plan.hash,
                clock=clock,
                own_lag=own_lag,
                compression=pull_codec,
            )
            t0 = time.perf_counter()
            head = await shard.pull(req, into[spec.lo : spec.hi])
            i = shard.index
            m.data_plane[i].set(shard.transport == "tcp")
            m.pulls[i].inc()
            m.pull_bytes[i].inc(spec.numel * (itemsize if shard.transport == "tcp" else 4))
            m.pull_seconds[i].observe(time.perf_counter() - t0)
            return head

        return list(await asyncio.gather(*(one(s, sess) for s, sess in zip(self._shards, self._sessions))))

    async def _push_all(
        self,
        clock: int,
        grad: torch.Tensor,
        samples: int,
        busy_seconds: float,
        read_versions: list[int],
        payloads: list[torch.Tensor] | None = None,
    ) -> list[pb.PushResponse | None]:
        if len(read_versions) != len(self._shards):  # zip would silently push to fewer shards
            self._free_grads.append(grad)
            raise ValueError(f"{len(read_versions)} read versions for {len(self._shards)} shards")
        m = self.metrics

        async def one(shard: ShardClient, session: int, read_version: int) -> pb.PushResponse | None:
            spec = self.plan.shards[shard.index]
            head = pb.PushHeader(
                worker_id=self.worker_id,
                session=session,
                plan_hash=self.plan.hash,
                clock=clock,
                read_version=read_version,
                samples=samples,
                busy_seconds=busy_seconds,
                compression="" if payloads is None else self.compression,
            )
            payload = None if payloads is None else payloads[shard.index]
            t0 = 0.0
            try:
                # One push per shard at a time, in clock order (asyncio.Lock is FIFO and the pushes'
                # coroutines start in the order push() submitted them): a later clock overtaking an
                # earlier one on another connection would be applied first, and the earlier one then
                # refused as already applied (ALREADY_EXISTS), its gradient lost.
                async with self._push_order[shard.index]:
                    t0 = time.perf_counter()
                    resp = await shard.push(head, grad[spec.lo : spec.hi], payload)
            except RpcFailed as exc:
                if exc.evicted:
                    self.stats.pushes_dropped += 1
                    m.pushes_dropped.inc()
                    self._evicted = True
                    log.warning("push of clock %d to shard %d refused: %s", clock, shard.index, exc.details)
                    return None
                self._failure = exc
                for fut in list(self._pending_pulls.values()):  # they would wait for this push forever
                    fut.cancel()
                raise
            i = shard.index
            m.pushes[i].inc()
            m.push_bytes[i].inc(
                payload.numel() * payload.element_size()
                if payload is not None and shard.transport == "tcp"
                else spec.numel * 4
            )
            m.push_seconds[i].observe(time.perf_counter() - t0)
            if resp is not None:
                self.stats.max_update_staleness = max(self.stats.max_update_staleness, resp.staleness)
                if session == self._sessions[shard.index]:  # a version of the process we registered with
                    self._seen_versions[shard.index] = max(self._seen_versions[shard.index], resp.version)
            return resp

        try:
            return list(
                await asyncio.gather(
                    *(one(s, sess, v) for s, sess, v in zip(self._shards, self._sessions, read_versions))
                )
            )
        finally:
            self._free_grads.append(grad)

    async def _heartbeat_loop(self) -> None:
        """One heartbeat per shard per interval, never retried: a shard that is down must not
        delay the others' heartbeats (they would evict this worker meanwhile)."""
        while True:
            await asyncio.sleep(self._hb_interval)  # type: ignore[arg-type]
            results = await asyncio.gather(
                *(
                    s.heartbeat(self.worker_id, sess, timeout=max(1.0, 2 * self._hb_interval))  # type: ignore[operator]
                    for s, sess in zip(self._shards, self._sessions)
                ),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, RpcFailed) and r.evicted:
                    self._evicted = True
                elif isinstance(r, Exception):
                    log.debug("heartbeat failed: %s", r)
