"""A shard's checkpoints and its Status and Checkpoint RPCs: the `Durability` part of `Servicer`.

Checkpoints are written atomically (`ps_server.checkpoint`) from a worker thread, under the
servicer's apply lock for one consistent moment of weights and clocks, and serialized by
their own lock; the event loop keeps answering meanwhile. Not thread-safe otherwise: every
method runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from protos.asyncps.v1 import ps_pb2 as pb
from ps_server import checkpoint
from ps_server.errors import Code, ShardFailed, _Reject
from ps_server.store import ShardStore

if TYPE_CHECKING:
    from ps_server.clock import ClockTable
    from ps_server.metrics import ServerMetrics
    from ps_server.servicer import ServerConfig

log = logging.getLogger(__name__)


class Durability:
    """Mixed into `Servicer`: checkpoint, restore, and the Status RPC."""

    cfg: ServerConfig
    clocks: ClockTable
    store: ShardStore | None
    metrics: ServerMetrics
    failure: ShardFailed | None
    checkpoint_version: int
    restored_version: int | None
    lost_updates: int
    _lost_before: int
    pushes_applied: int
    pushes_rejected: int
    incarnation: int
    data_port: int
    _apply_lock: asyncio.Lock
    _ckpt_lock: asyncio.Lock

    @property
    def checkpoint_file(self) -> Path | None:
        if not self.cfg.checkpoint_dir:
            return None
        return checkpoint.checkpoint_path(self.cfg.checkpoint_dir, self.cfg.shard_index, self.cfg.num_shards)

    def restore(self) -> bool:
        """Load the checkpoint in --checkpoint-dir if there is one; True if restored."""
        path = self.checkpoint_file
        state = checkpoint.load(path) if path else None
        if state is None:
            return False
        if (state["shard_index"], state["num_shards"]) != (self.cfg.shard_index, self.cfg.num_shards):
            raise ValueError(
                f"{path} holds shard {state['shard_index']} of {state['num_shards']}, "
                f"this server is shard {self.cfg.shard_index} of {self.cfg.num_shards}"
            )
        self.store = ShardStore.from_state_dict(state["store"])
        self.store.observe_compensation = self.metrics.compensation.observe
        self.clocks.load_state_dict(state["clocks"])
        self.checkpoint_version = self.restored_version = self.store.version
        self.lost_updates = self._lost_before = int(state.get("lost_updates", 0))
        self.metrics.last_checkpoint.set(time.time())
        log.info("restored shard %d at version %d from %s", self.cfg.shard_index, self.store.version, path)
        return True

    async def checkpoint_now(self) -> tuple[str, int]:
        """Write the shard's checkpoint atomically; returns (path, version). Serialized."""
        if self.failure is not None:  # never overwrite the last good checkpoint with a broken state
            raise self.failure
        path = self.checkpoint_file
        if path is None:
            raise _Reject(Code.FAILED_PRECONDITION, "this server has no --checkpoint-dir")
        if self.store is None:
            raise _Reject(Code.FAILED_PRECONDITION, "shard is not initialized yet: nothing to checkpoint")
        async with self._ckpt_lock:
            t0 = time.perf_counter()
            async with self._apply_lock:  # weights and clocks of one moment
                store_state = await asyncio.to_thread(self.store.state_dict)
                clocks = self.clocks.state_dict()
            state = {
                "shard_index": self.cfg.shard_index,
                "num_shards": self.cfg.num_shards,
                "store": store_state,
                "clocks": clocks,
                "lost_updates": self.lost_updates,
            }
            try:
                await asyncio.to_thread(checkpoint.save, path, state)
            except OSError:
                self.metrics.checkpoint_failures.inc()
                raise
            self.checkpoint_version = store_state["version"]
            m = self.metrics
            m.checkpoints.inc()
            m.checkpoint_seconds.observe(time.perf_counter() - t0)
            m.last_checkpoint.set(time.time())
        log.info("checkpoint of shard %d at version %d -> %s", self.cfg.shard_index, self.checkpoint_version, path)
        return str(path), self.checkpoint_version

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        c, s = self.clocks, self.store
        mono = time.monotonic()
        return pb.StatusResponse(
            shard_index=self.cfg.shard_index,
            num_shards=self.cfg.num_shards,
            initialized=s is not None,
            plan_hash=s.plan_hash if s else "",
            version=s.version if s else 0,
            numel=s.numel if s else 0,
            clocks=[
                pb.WorkerClock(worker_id=w, clock=e.clock, seconds_since_seen=mono - e.last_seen)
                for w, e in sorted(c.clocks().items())
            ],
            min_clock=c.min_clock(),
            live_workers=c.live,
            staleness=c.staleness,
            max_read_gap=c.max_read_gap,
            pulls_waited=c.pulls_waited,
            wait_seconds=c.wait_seconds,
            pushes_applied=self.pushes_applied,
            pushes_rejected=self.pushes_rejected,
            evictions=c.evictions,
            weights_checksum=(await asyncio.to_thread(s.checksum)) if s and request.include_checksum else 0.0,
            optimizer=s.config if s else None,
            checkpoint_version=self.checkpoint_version,
            lost_updates=self.lost_updates,
            incarnation=self.incarnation,
            restored_version=self.restored_version,
            data_port=self.data_port,
            **self._chain_status(),
        )

    def _chain_status(self) -> dict:
        repl = getattr(self, "replication", None)
        if repl is None:
            return {}
        return {"role": repl.role, "epoch": repl.epoch, "members": repl.members}
