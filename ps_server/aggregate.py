"""Gradient averaging across workers: one update per clock from every live worker's gradient.

With `average_gradients` on, a shard does not apply pushes one by one. It sums the
gradients pushed for each clock into a bucket and applies the bucket's mean as ONE
update once every live worker has contributed (synchronous data-parallel SGD on the
servers). Until then the contributors' clocks do not advance, so the SSP rule holds
their next pulls until the averaged update is in the weights. A worker evicted while
a bucket waits no longer holds it back; its gradient, if already in, still counts.

Not thread-safe: the servicer uses it under its apply lock only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ps_server.clock import DuplicatePush


@dataclass
class Bucket:
    clock: int
    total: torch.Tensor
    read_version: int
    contributors: dict[str, int] = field(default_factory=dict)  # worker -> session
    read_versions: list[int] = field(default_factory=list)  # each contribution's own read version


class Aggregator:
    def __init__(self) -> None:
        self._buckets: dict[int, Bucket] = {}

    def add(self, worker_id: str, session: int, clock: int, grad: torch.Tensor, read_version: int) -> None:
        """Fold one gradient into its clock's bucket (copied: `grad` may be reused by the caller)."""
        bucket = self._buckets.get(clock)
        if bucket is None:
            self._buckets[clock] = Bucket(clock, grad.clone(), read_version, {worker_id: session}, [read_version])
            return
        if worker_id in bucket.contributors:
            raise DuplicatePush(f"worker {worker_id!r} already pushed clock {clock}; it is waiting for the others")
        bucket.total.add_(grad)
        bucket.read_version = min(bucket.read_version, read_version)
        bucket.contributors[worker_id] = session
        bucket.read_versions.append(read_version)

    def complete(self, live: dict[str, int]) -> list[Bucket]:
        """Remove and return, in clock order, the buckets every live worker has contributed to.

        `live` maps each live worker to its clock: a bucket waits only for the workers still
        at or below its clock; one whose clock jumped past it (it registered again at a
        later clock, e.g. after a server restart) will never push that clock.
        """
        done = []
        for clock in sorted(self._buckets):
            bucket = self._buckets[clock]
            needed = {w for w, c in live.items() if c <= clock}
            if not needed <= bucket.contributors.keys():
                break
            done.append(self._buckets.pop(clock))
        return done

    @property
    def pending(self) -> int:
        return len(self._buckets)
