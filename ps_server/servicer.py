"""The gRPC servicer of one parameter-server shard (`asyncps.v1.ParameterServer`).

Runs on the server's asyncio event loop; nothing here is thread-safe, and the heavy
work (optimizer steps, weight snapshots, checkpoint writes) is handed to worker
threads so the loop keeps answering while it runs. Every rejection uses
`context.abort` with the status code SPEC lists, and a rejected request changes
nothing: a push is staged in a private buffer, validated whole, then applied under
the apply lock, so it lands whole or not at all and never twice.

Restarts: a shard restored from its checkpoint refuses the old sessions (see
`ps_server.clock`), so every worker registers again; a worker that registers with the
highest version it saw from the previous process (`seen_version`, `seen_incarnation`)
tells the shard how many applied updates the restore lost (`lost_updates`: that version
minus the restored one, the largest any worker reports), kept across checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from asyncps_common import delay
from asyncps_common import optimizer as optim
from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server import streams
from ps_server.aggregate import Aggregator
from ps_server.atomic import to_the_end
from ps_server.balance import Balancer
from ps_server.clock import ClockTable
from ps_server.durability import Durability
from ps_server.errors import Code, ShardFailed, _Reject, rejection
from ps_server.membership import Membership
from ps_server.metrics import ServerMetrics
from ps_server.store import ShardStore, Snapshot

if TYPE_CHECKING:
    from ps_server.replication import Replication

log = logging.getLogger(__name__)
MAX_SAMPLES = 1 << 20  # PushHeader.samples above this is refused
MAX_SPARE_GRADS = 8  # gradient buffers kept for reuse, at most (see Servicer._spare)


@dataclass
class ServerConfig:
    shard_index: int = 0
    num_shards: int = 1
    staleness: float | None = None  # None: the first Init's choice (default inf)
    heartbeat_timeout: float = 10.0
    checkpoint_dir: str | None = None
    checkpoint_interval: float = 60.0
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES
    max_message_bytes: int = 8 << 20
    max_shard_bytes: int = 8 << 30


class Servicer(Durability, Membership):
    """One shard: its store (after Init), clock table, checkpoints and counters.

    `metrics` (one is made if not given) holds the shard's Prometheus registry.
    """

    def __init__(self, cfg: ServerConfig, metrics: ServerMetrics | None = None):
        if not 0 <= cfg.shard_index < cfg.num_shards:
            raise ValueError(f"shard index {cfg.shard_index} is outside 0..{cfg.num_shards - 1}")
        self.cfg = cfg
        self.clocks = ClockTable(math.inf if cfg.staleness is None else cfg.staleness, cfg.heartbeat_timeout)
        self.store: ShardStore | None = None
        self.pushes_applied = 0
        self.pushes_rejected = 0
        self.checkpoint_version = 0
        self.incarnation = time.time_ns()  # names this process; a restarted server has another
        self.restored_version: int | None = None
        self.lost_updates = 0  # updates lost to restarts (earlier restarts' count comes from the checkpoint)
        self._lost_before = 0
        self._aggregator = Aggregator()  # used when the optimizer averages gradients across workers
        self._balancer = Balancer()  # each worker's batch, when the optimizer balances batches
        self._apply_lock = asyncio.Lock()
        self._init_lock = asyncio.Lock()
        self._ckpt_lock = asyncio.Lock()
        self._grad_buffers: list[torch.Tensor] = []  # reused by pushes: no fresh 64 MB (page faults) per call
        self.data_port = 0  # the TCP data plane's port once it listens (ps_server.dataplane); 0: none
        self.failure: ShardFailed | None = None  # an update failed part-way; `failed` is then set
        self.failed = asyncio.Event()
        self.metrics = metrics if metrics is not None else ServerMetrics(cfg.shard_index)
        self.metrics.bind(self)
        self.replication: Replication | None = None  # a replicated shard's chain (ps_server/replication.py)

    async def run_background(self) -> None:
        """Evict silent workers and checkpoint periodically, until cancelled."""
        last_ckpt = asyncio.get_running_loop().time()
        tick = max(0.05, min(self.cfg.heartbeat_timeout / 4, 1.0))
        while True:
            await asyncio.sleep(tick)
            await self._evict_silent()
            now = asyncio.get_running_loop().time()
            if (
                self.checkpoint_file
                and self.store
                and not self.failure
                and now - last_ckpt >= self.cfg.checkpoint_interval
            ):
                last_ckpt = now
                if self.store.version != self.checkpoint_version:
                    try:
                        await self.checkpoint_now()
                    except OSError as exc:
                        log.error("periodic checkpoint failed: %s", exc)
                else:  # nothing unsaved: the checkpoint on disk is current
                    self.metrics.last_checkpoint.set(time.time())

    async def _apply(self, store: ShardStore, *args, **kwargs) -> tuple[int, int]:
        """`store.apply` in a thread; if it fails, the shard fails (ShardFailed: logged, kept, raised)."""
        if self.failure is not None:  # nothing more is applied to a broken state
            raise self.failure
        try:
            return await asyncio.to_thread(store.apply, *args, **kwargs)
        except Exception as exc:
            if self.failure is None:
                self.failure = ShardFailed(
                    f"shard {self.cfg.shard_index} failed an update ({exc!r}) and stops without "
                    "saving that state: restart it to resume from its last checkpoint"
                )
                log.critical("%s", self.failure, exc_info=exc)
                self.failed.set()
            raise self.failure from exc

    async def _apply_complete_buckets(self) -> None:
        """Averaging mode: apply every clock all live workers have pushed, then advance them.

        Call under the apply lock.
        """
        m = self.metrics
        for bucket in self._aggregator.complete({w: e.clock for w, e in self.clocks.clocks().items()}):
            before = self.store.version  # type: ignore[union-attr]
            await self._apply(self.store, bucket.total, bucket.read_version, bucket.divisor, consume=True)  # type: ignore[arg-type]
            self._spare(bucket.total)  # a push's buffer adopted by the bucket: reused by the next pushes
            m.updates.inc()
            for read_version in bucket.read_versions:  # each gradient's own staleness
                m.update_staleness.observe(max(0, before - read_version))
            for worker_id in bucket.contributors:  # an evicted contributor's gradient still counted
                self.clocks.advance_contributor(worker_id, bucket.clock)

    def gate(self) -> None:
        """Raise NotHead unless this replica takes workers' calls (always, when not replicated)."""
        if self.replication is not None:
            self.replication.check_head()

    async def _membership_changed(self) -> None:
        if self.store is not None and self.store.config.average_gradients and self._aggregator.pending:
            await to_the_end(self._apply_pending())

    async def _apply_pending(self) -> None:
        async with self._apply_lock:
            await self._apply_complete_buckets()

    # -- helpers ----------------------------------------------------------------------
    def _store_for(self, plan_hash: str) -> ShardStore:
        self.gate()
        if self.store is None:
            raise _Reject(Code.FAILED_PRECONDITION, "shard is not initialized: call Init first")
        if plan_hash != self.store.plan_hash:
            raise _Reject(
                Code.FAILED_PRECONDITION,
                f"plan hash {plan_hash[:12]!r} does not match this shard's {self.store.plan_hash[:12]!r}: "
                "the worker's model or server count differs",
            )
        return self.store

    async def _guard(self, context: grpc.aio.ServicerContext, coro):
        """Run a handler body, turning domain errors into gRPC statuses."""
        try:
            return await coro
        except Exception as exc:
            status = rejection(exc)
            if status is None:
                raise
            code, message, reason = status
            await context.abort(code, message, trailing_metadata=((service.REASON_KEY, reason),) if reason else ())

    # -- RPCs -------------------------------------------------------------------------
    async def Init(self, frames: AsyncIterator[bytes], context) -> pb.InitResponse:
        async def body():
            head = await streams.first_head(frames, "init")
            self.gate()
            if (head.shard_index, head.num_shards) != (self.cfg.shard_index, self.cfg.num_shards):
                raise _Reject(
                    Code.FAILED_PRECONDITION,
                    f"worker's plan sends shard {head.shard_index} of {head.num_shards} to this server, "
                    f"which is shard {self.cfg.shard_index} of {self.cfg.num_shards}",
                )
            async with self._init_lock:
                if self.store is not None:
                    self._store_for(head.plan_hash)
                    return self._init_response(self.store, accepted=False)
                if head.HasField("staleness") and not head.staleness >= 0:
                    raise _Reject(Code.INVALID_ARGUMENT, f"staleness must be >= 0, got {head.staleness}")
                bound = (
                    head.staleness
                    if self.cfg.staleness is None and head.HasField("staleness")
                    else self.clocks.staleness
                )
                optim.validate(
                    head.optimizer, head.groups, head.numel, bound
                )  # the update rule's history is checked against the bound
                if head.numel == 0:
                    raise _Reject(Code.INVALID_ARGUMENT, "a shard must own at least one element")
                if head.numel * 4 > self.cfg.max_shard_bytes:
                    raise _Reject(
                        Code.RESOURCE_EXHAUSTED,
                        f"shard of {head.numel * 4} bytes exceeds this server's limit of {self.cfg.max_shard_bytes}",
                    )
                weights = await streams.receive_flat(frames, head.numel)
                if self.replication is not None:
                    async with self._apply_lock:
                        await self.replication.forward(weights, init=head)
                        self.init_store(head, weights, bound)
                else:
                    self.init_store(head, weights, bound)
                if self.checkpoint_file:  # a restart before the first periodic checkpoint keeps the model
                    try:
                        await self.checkpoint_now()
                    except OSError as exc:
                        log.error("checkpoint after Init failed: %s", exc)
                return self._init_response(self.store, accepted=True)

        return await self._guard(context, body())

    def init_store(self, head: pb.InitHeader, weights: torch.Tensor, bound: float) -> None:
        """Make the shard's store from checked Init input (a follower: from its head's entry)."""
        self.store = ShardStore(
            head.plan_hash,
            weights,
            head.optimizer,
            groups=head.groups,
            history=delay.history_size(head.optimizer, bound),
        )
        self.store.observe_compensation = self.metrics.compensation.observe
        self.clocks.staleness = bound
        log.info(
            "shard %d initialized by %s: %d elements, %s",
            self.cfg.shard_index,
            head.worker_id,
            head.numel,
            head.optimizer.name,
        )

    def _init_response(self, store: ShardStore, accepted: bool) -> pb.InitResponse:
        return pb.InitResponse(
            accepted=accepted,
            plan_hash=store.plan_hash,
            version=store.version,
            optimizer=store.config,
            staleness=self.clocks.staleness,
            groups=store.groups,
        )

    async def Push(self, frames: AsyncIterator[bytes], context) -> pb.PushResponse:
        t0 = time.perf_counter()

        async def body():
            head = await streams.first_head(frames, "push")
            store, buf = self.open_push(head)
            try:
                grad = await streams.receive_flat(frames, store.numel, buf)
            except BaseException:
                self._spare(buf)
                raise
            # Once the gradient is whole, its commit runs to the end even if the call is cancelled
            # meanwhile (a client's deadline; gRPC also ends a stream broken by an oversized message
            # like a complete one, then cancels the handler): see commit_push.
            return await self.commit_push(store, head, grad)

        try:
            resp = await self._guard(context, body())
        except BaseException:
            self.push_finished(t0, ok=False)
            raise
        self.push_finished(t0, ok=True)
        return resp

    def open_push(self, head: pb.PushHeader) -> tuple[ShardStore, torch.Tensor]:
        """Check a push's header; returns the store and a buffer to receive its gradient into.
        Give the buffer back with `release` unless `commit_push` gets it."""
        store = self._store_for(head.plan_hash)
        self.clocks.check_push(head.worker_id, head.session, head.clock)
        if not (head.busy_seconds >= 0 and math.isfinite(head.busy_seconds)):
            raise _Reject(Code.INVALID_ARGUMENT, f"busy_seconds must be finite and >= 0, got {head.busy_seconds}")
        if head.samples > MAX_SAMPLES:  # a weight in the average: an absurd one could overflow it
            raise _Reject(Code.INVALID_ARGUMENT, f"samples must be at most {MAX_SAMPLES}, got {head.samples}")
        pool = self._grad_buffers
        buf = pool.pop() if pool and pool[-1].numel() == store.numel else torch.empty(store.numel)
        return store, buf

    def release(self, buf: torch.Tensor) -> None:
        """Give back a gradient buffer from `open_push` that was not committed."""
        self._spare(buf)

    def push_finished(self, t0: float, ok: bool) -> None:
        """Count a push that ended (accepted or not); `t0` is when it started (perf_counter)."""
        m = self.metrics
        if ok:
            m.pushes.inc()
            m.push_seconds.observe(time.perf_counter() - t0)
        else:
            self.pushes_rejected += 1
            m.pushes_rejected.inc()

    def _spare(self, buf: torch.Tensor) -> None:
        # one per push that can be in flight in a clock (live workers) plus a bucket; 2..MAX_SPARE_GRADS
        if len(self._grad_buffers) < min(MAX_SPARE_GRADS, max(2, self.clocks.live + 1)):
            self._grad_buffers.append(buf)

    async def commit_push(self, store: ShardStore, head: pb.PushHeader, grad: torch.Tensor) -> pb.PushResponse:
        """Apply a received gradient (or add it to its averaging bucket) and advance the clock, atomically.

        Takes over `grad` (a buffer from `open_push`), whatever the outcome. Once begun it runs
        to the end even if the caller is cancelled (ps_server/atomic.py).
        """
        return await to_the_end(self._commit_push(store, head, grad))

    async def _commit_push(self, store: ShardStore, head: pb.PushHeader, grad: torch.Tensor) -> pb.PushResponse:
        adopted = False  # the clock's first gradient becomes its averaging bucket: no copy
        try:
            async with self._apply_lock:
                self.clocks.check_push(head.worker_id, head.session, head.clock)
                if self.replication is not None:  # every replica applies it before this one does
                    await self.replication.forward(grad, push=head)
                resp, adopted = await self.push_locked(store, head, grad)
                return resp
        finally:
            if not adopted:
                self._spare(grad)

    async def push_locked(
        self, store: ShardStore, head: pb.PushHeader, grad: torch.Tensor
    ) -> tuple[pb.PushResponse, bool]:
        """Apply a checked push under the apply lock; (answer, whether `grad` was adopted by a bucket)."""
        m = self.metrics
        if store.config.balance_batches:  # balanced batches, or dynamic local steps (samples: steps)
            self._balancer.observe(head.worker_id, head.samples, head.busy_seconds)
        if store.config.average_gradients:
            adopted = self._aggregator.add(
                head.worker_id, head.session, head.clock, grad, head.read_version, head.samples, adopt=True
            )
            self.pushes_applied += 1
            m.push_bytes.inc(store.numel * 4)
            await self._apply_complete_buckets()
            return pb.PushResponse(version=store.version, staleness=0), adopted
        factor = self._balancer.spread(head.clock) if store.config.lr_follows_split else 1.0
        version, staleness = await self._apply(store, grad, head.read_version, lr_factor=factor)
        # Applied, so it stands even if the worker was evicted or re-registered meanwhile:
        # counted, and its current session moved past this clock (no retry applies it again).
        self.clocks.advance_contributor(head.worker_id, head.clock)
        self.pushes_applied += 1
        m.push_bytes.inc(store.numel * 4)
        m.updates.inc()
        m.update_staleness.observe(staleness)
        return pb.PushResponse(version=version, staleness=staleness), False

    async def Pull(self, request: pb.PullRequest, context) -> AsyncIterator[bytes]:
        t0 = time.perf_counter()

        async def body():
            store, waited = await self._await_readable(request)
            chunk = min(request.chunk_bytes or self.cfg.chunk_bytes, self.cfg.max_message_bytes - 1024)
            return store, waited, await asyncio.to_thread(store.frames, chunk)

        store, waited, (version, frames) = await self._guard(context, body())
        yield wire.encode_frame(pb.Frame(pull=self._pull_header(store, version, waited, request)))
        for frame in frames:  # encoded once per version, shared by every pull of it
            yield frame
        self.pull_finished(store, t0, waited)

    async def _await_readable(self, request: pb.PullRequest) -> tuple[ShardStore, float]:
        store = self._store_for(request.plan_hash)
        waited = await self.clocks.wait_readable(request.worker_id, request.session, request.clock, request.own_lag)
        if store.config.balance_batches:
            await self._split_batches(request)
        return store, waited

    async def _split_batches(self, request: pb.PullRequest) -> None:
        """Balanced batches: make the split of the pull's clock if it has none for this worker yet.

        A replicated head logs the split (under the apply lock) before it answers, so that a
        follower that takes over hands out the same batches for that clock.
        """
        live = self.clocks.clocks()
        if self.replication is None:
            self._balancer.batch_for(request.worker_id, request.clock, live)  # makes the split if it needs one
        elif self._balancer.new_split(request.worker_id, request.clock, live) is not None:
            await to_the_end(self._split_replicated(request))

    async def _split_replicated(self, request: pb.PullRequest) -> None:
        async with self._apply_lock:
            split = self._balancer.new_split(request.worker_id, request.clock, self.clocks.clocks())
            if split is None:  # made meanwhile, by another pull of the same clock
                return
            await self.replication.forward(split=pb.SplitEntry(clock=request.clock, batches=split))  # type: ignore[union-attr]
            self._balancer.adopt(request.clock, split)

    def _pull_header(self, store: ShardStore, version: int, waited: float, request: pb.PullRequest) -> pb.PullHeader:
        balance = store.config.balance_batches
        batch = self._balancer.batch_of(request.worker_id, request.clock) if balance else 0
        return pb.PullHeader(
            version=version,
            numel=store.numel,
            min_clock=self.clocks.min_clock(),
            waited_seconds=waited,
            batch_size=batch,
        )

    async def open_pull(self, request: pb.PullRequest) -> tuple[ShardStore, pb.PullHeader, Snapshot]:
        """Wait until `request` may read (the staleness bound); returns the store, the header
        and the weights of that version, leased: `store.release` them once sent (any thread)."""
        store, waited = await self._await_readable(request)
        snap = store.try_lease()
        if snap is None:  # may wait for an update in progress: not on the loop
            leasing = asyncio.ensure_future(asyncio.to_thread(store.lease))
            try:
                snap = await asyncio.shield(leasing)
            except asyncio.CancelledError:  # the lease is taken anyway: give it back when it is
                leasing.add_done_callback(lambda f: f.cancelled() or f.exception() or store.release(f.result()))  # type: ignore[func-returns-value]
                raise
        return store, self._pull_header(store, snap.version, waited, request), snap

    def pull_finished(self, store: ShardStore, t0: float, waited: float) -> None:
        """Count a pull whose weights were sent. Touches only metrics: thread-safe."""
        m = self.metrics
        m.pulls.inc()
        m.pull_bytes.inc(store.numel * 4)
        m.pull_seconds.observe(time.perf_counter() - t0)
        if waited > 0:
            m.bound_waits.inc()
            m.bound_wait_seconds.inc(waited)

    async def Checkpoint(self, request: pb.CheckpointRequest, context) -> pb.CheckpointResponse:
        async def body():
            path, version = await self.checkpoint_now()
            return pb.CheckpointResponse(path=path, version=version)

        return await self._guard(context, body())
