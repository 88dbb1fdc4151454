"""Workers joining, beating, leaving and being evicted: the `Membership` part of `Servicer`.

Register, Heartbeat and Leave, and the eviction of silent workers. On a replicated shard
(ps_server/replication.py) the head logs each change (Register with the session it chose,
Leave, the evictions it decided) to its followers before it applies it, under the apply
lock, and a follower applies the same change with the same code; followers never evict
on their own clocks. Runs on the server's event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from protos import compress
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server.atomic import to_the_end
from ps_server.errors import Code, NotHead, _Reject

if TYPE_CHECKING:
    from ps_server.aggregate import Aggregator
    from ps_server.balance import Balancer
    from ps_server.clock import ClockTable
    from ps_server.metrics import ServerMetrics
    from ps_server.replication import Replication
    from ps_server.servicer import ServerConfig
    from ps_server.store import ShardStore

log = logging.getLogger(__name__)


class Membership:
    """Mixed into `Servicer`: the membership RPCs and evictions."""

    cfg: ServerConfig
    clocks: ClockTable
    store: ShardStore | None
    metrics: ServerMetrics
    replication: Replication | None
    incarnation: int
    data_port: int
    restored_version: int | None
    lost_updates: int
    _lost_before: int
    _aggregator: Aggregator
    _balancer: Balancer
    _apply_lock: asyncio.Lock

    if TYPE_CHECKING:  # Servicer's

        async def _membership_changed(self) -> None: ...
        async def _apply_complete_buckets(self) -> None: ...
        async def _guard(self, context: Any, coro: Any) -> Any: ...
        def gate(self) -> None: ...

    async def _evict_silent(self) -> None:
        """Evict silent workers; a replicated head logs the eviction first, a follower never evicts."""
        repl = self.replication
        if repl is not None and not repl.is_head:
            return
        if repl is None:
            self.evicted(self.clocks.evict_silent())
            await self._membership_changed()
            return
        async with self._apply_lock:
            silent = self.clocks.silent()
            if not silent or not repl.is_head:
                return
            try:
                await repl.forward(evict=pb.EvictEntry(worker_ids=silent))
            except NotHead:  # deposed meanwhile: the new head decides
                return
            self.evicted(self.clocks.evict(silent))
            await self._settle()

    def evicted(self, workers: list[str]) -> None:
        for w in workers:
            self.metrics.evictions.inc()
            log.warning("evicted worker %s after %.1fs of silence", w, self.cfg.heartbeat_timeout)

    async def _settle(self) -> None:
        """After a membership change, under the apply lock: apply the averaged clocks now complete."""
        if self.store is not None and self.store.config.average_gradients and self._aggregator.pending:
            await self._apply_complete_buckets()

    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        async def body():
            if not request.worker_id:
                raise _Reject(Code.INVALID_ARGUMENT, "worker_id must not be empty")
            wire_codec = compress.check(request.compression)  # ValueError: INVALID_ARGUMENT
            self.gate()
            if self.store is not None:
                self._store_for(request.plan_hash)
            if self.replication is None:  # no log to keep in order: not behind an update in progress
                session, clock = self.register_locked(request, None)
                await self._membership_changed()
            else:
                session, clock = await to_the_end(self._register_replicated(request))
            return pb.RegisterResponse(
                session=session,
                clock=clock,
                staleness=self.clocks.staleness,
                heartbeat_timeout_seconds=self.cfg.heartbeat_timeout,
                incarnation=self.incarnation,
                data_port=self.data_port,
                compression=wire_codec,
            )

        return await self._guard(context, body())

    async def _register_replicated(self, request: pb.RegisterRequest) -> tuple[int, int]:
        async with self._apply_lock:
            given = self.clocks.new_session()
            await self.replication.forward(register=pb.RegisterEntry(request=request, session=given))  # type: ignore[union-attr]
            registered = self.register_locked(request, given)
            await self._settle()
            return registered

    def register_locked(self, request: pb.RegisterRequest, given: int | None) -> tuple[int, int]:
        """Register a worker (`given`: the session a replicated head chose); under the apply lock.

        The caller then settles the averaging buckets: a worker that registers again at a later
        clock (its other shards are ahead) no longer holds back the clocks it jumped past.
        """
        restored_clock = self.clocks.restored_clock(request.worker_id)
        session, clock = self.clocks.register(request.worker_id, request.start_clock, given)
        self._balancer.register(request.worker_id, request.batch_size)
        self._count_lost(request)
        if restored_clock is not None and clock > restored_clock:
            log.warning(
                "worker %s re-registered after the restart at clock %d: its pushes of clocks %d..%d "
                "were lost with the old process",
                request.worker_id,
                clock,
                restored_clock,
                clock - 1,
            )
        log.info("worker %s registered (session %d) at clock %d", request.worker_id, session, clock)
        return session, clock

    def _count_lost(self, request: pb.RegisterRequest) -> None:
        """A worker back from an earlier process of this shard reports the last version it saw there."""
        if self.restored_version is None or request.seen_incarnation in (0, self.incarnation):
            return
        lost = self._lost_before + max(0, request.seen_version - self.restored_version)
        if lost > self.lost_updates:
            log.warning(
                "shard %d lost %d updates in its restart: a worker saw version %d, the checkpoint held %d",
                self.cfg.shard_index,
                lost - self._lost_before,
                request.seen_version,
                self.restored_version,
            )
            self.metrics.lost_updates.inc(lost - self.lost_updates)
            self.lost_updates = lost

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        async def body():
            self.gate()
            self.clocks.check(request.worker_id, request.session)
            return pb.HeartbeatResponse(min_clock=self.clocks.min_clock(), live_workers=self.clocks.live)

        return await self._guard(context, body())

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        async def body():
            self.gate()
            if self.replication is None:
                self.leave_now(request)
                await self._membership_changed()
                return pb.LeaveResponse()
            await to_the_end(self._leave_replicated(request))
            return pb.LeaveResponse()

        return await self._guard(context, body())

    async def _leave_replicated(self, request: pb.LeaveRequest) -> None:
        async with self._apply_lock:
            self.clocks.check(request.worker_id, request.session)
            await self.replication.forward(leave=request)  # type: ignore[union-attr]
            self.leave_now(request)
            await self._settle()

    def leave_now(self, request: pb.LeaveRequest) -> None:
        self.clocks.leave(request.worker_id, request.session)
        self._balancer.forget(request.worker_id)
        log.info("worker %s left", request.worker_id)
