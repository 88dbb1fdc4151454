"""Gradient averaging across workers: one update per clock from every live worker's gradient.

With `average_gradients` on, a shard does not apply pushes one by one. It sums the
gradients pushed for each clock into a bucket and applies the bucket's mean as ONE
update once every live worker has contributed (synchronous data-parallel SGD on the
servers). Until then the contributors' clocks do not advance, so the SSP rule holds
their next pulls until the averaged update is in the weights. A worker evicted while
a bucket waits no longer holds it back; its gradient, if already in, still counts.

Each gradient comes with the number of samples it is the mean over. While every
contribution has the same count the bucket is the plain sum and its divisor the number
of contributors (exactly as without counts); once counts differ (load-balanced batches,
ps_server/balance.py) it holds the sample-weighted sum and divides by the total samples,
so the update is the mean gradient over every sample of the clock.

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
    samples: list[int] = field(default_factory=list)  # each contribution's sample count (weight)
    weighted: bool = False  # total is sum(samples_i * grad_i), not sum(grad_i)

    @property
    def divisor(self) -> int:
        """What `total` is divided by to give the mean gradient."""
        return sum(self.samples) if self.weighted else len(self.contributors)


class Aggregator:
    def __init__(self) -> None:
        self._buckets: dict[int, Bucket] = {}

    def add(
        self,
        worker_id: str,
        session: int,
        clock: int,
        grad: torch.Tensor,
        read_version: int,
        samples: int = 0,
        adopt: bool = False,
    ) -> bool:
        """Fold one gradient, the mean over `samples` examples (0 counts as 1), into its clock's bucket.

        `grad` is copied, so the caller may reuse it, unless `adopt`: then the first
        gradient of a clock becomes its bucket's sum itself (no shard-sized copy) and
        True is returned; the caller must not touch it again (it comes back as
        `Bucket.total` from `complete`). False: `grad` was only read.
        """
        samples = max(1, samples)
        bucket = self._buckets.get(clock)
        if bucket is None:
            total = grad if adopt else grad.clone()
            self._buckets[clock] = Bucket(clock, total, read_version, {worker_id: session}, [read_version], [samples])
            return adopt
        if worker_id in bucket.contributors:
            raise DuplicatePush(f"worker {worker_id!r} already pushed clock {clock}; it is waiting for the others")
        if not bucket.weighted and samples != bucket.samples[0]:
            bucket.total.mul_(bucket.samples[0])  # every earlier contribution had this count
            bucket.weighted = True
        if bucket.weighted:
            bucket.total.add_(grad, alpha=samples)
        else:
            bucket.total.add_(grad)
        bucket.samples.append(samples)
        bucket.read_version = min(bucket.read_version, read_version)
        bucket.contributors[worker_id] = session
        bucket.read_versions.append(read_version)
        return False

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

    def state_dict(self) -> list[dict]:
        """The waiting buckets (copies), for a replica joining the chain."""
        return [
            {
                "clock": b.clock,
                "total": b.total.clone(),
                "read_version": b.read_version,
                "contributors": dict(b.contributors),
                "read_versions": list(b.read_versions),
                "samples": list(b.samples),
                "weighted": b.weighted,
            }
            for b in self._buckets.values()
        ]

    def load_state_dict(self, state: list[dict]) -> None:
        self._buckets = {int(b["clock"]): Bucket(**b) for b in state}

    @property
    def pending(self) -> int:
        return len(self._buckets)
