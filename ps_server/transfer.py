"""A replica's whole state as bytes: what a head sends a joining replica (ps_server/replication.py).

`snapshot` copies the servicer's state (store with optimizer state and history, clocks and
sessions, averaging buckets, balancer, counters) and must run under the apply lock;
`load_snapshot` installs one. The bytes are torch.save's; they are loaded with
weights_only=True, so a transfer carries tensors and plain values, never code.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch

from protos import wire
from ps_server.store import ShardStore

if TYPE_CHECKING:
    from ps_server.servicer import Servicer


class Refused(Exception):
    """An entry this replica does not apply (FAILED_PRECONDITION, with `reason`)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def snapshot(s: Servicer) -> dict:
    """The shard's whole state, for a joiner (copies; call in a thread, under the apply lock)."""
    return {
        "shard": (s.cfg.shard_index, s.cfg.num_shards),
        "store": s.store.state_dict() if s.store is not None else None,
        "clocks": s.clocks.replica_state(),
        "aggregator": s._aggregator.state_dict(),
        "balancer": s._balancer.state_dict(),
        "lost": (s.lost_updates, s._lost_before),
        "restored_version": -1 if s.restored_version is None else s.restored_version,
        "incarnation": s.incarnation,
        "counters": (s.pushes_applied, s.pushes_rejected),
    }


def load_snapshot(s: Servicer, state: dict) -> None:
    if tuple(state["shard"]) != (s.cfg.shard_index, s.cfg.num_shards):
        raise Refused(f"the state is of shard {tuple(state['shard'])}, this replica holds shard {s.cfg.shard_index}")
    s.store = ShardStore.from_state_dict(state["store"]) if state["store"] is not None else None
    if s.store is not None:
        s.store.observe_compensation = s.metrics.compensation.observe
    s.clocks.load_replica_state(state["clocks"])
    s._aggregator.load_state_dict(state["aggregator"])
    s._balancer.load_state_dict(state["balancer"])
    s.lost_updates, s._lost_before = state["lost"]
    s.restored_version = None if state["restored_version"] < 0 else int(state["restored_version"])
    s.incarnation = int(state["incarnation"])
    s.pushes_applied, s.pushes_rejected = state["counters"]
    s._grad_buffers.clear()


def warm_up() -> None:
    """Make and step one tiny optimizer: torch's first one takes seconds (lazy imports), which a
    follower must not spend inside an entry's deadline."""
    from asyncps_common.optimizer import default_config

    store = ShardStore("warm-up", torch.zeros(8), default_config(name="adamw"))
    store.apply(torch.ones(8), 0)


def _serialize(state: dict) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


async def _receive_bytes(frames: AsyncIterator[bytes], size: int) -> bytearray:
    """Read uint8 chunk frames that must cover [0, size) exactly once, in order."""
    out, pos = bytearray(size), 0
    async for raw in frames:
        frame, payload = wire.decode_frame(raw)
        if frame.WhichOneof("head") is not None or payload is None or frame.tensor.offset != pos:
            raise Refused(f"state transfer out of order at byte {pos}")
        n = len(payload)
        if pos + n > size:
            raise Refused(f"state transfer runs past its {size} bytes")
        out[pos : pos + n] = payload
        pos += n
    if pos != size:
        raise Refused(f"state transfer broke off after {pos} of {size} bytes: this replica does not serve")
    return out
