"""Load-balanced batches (LB-BSP, Chen et al., SoCC 2020): a batch per worker in proportion to its speed.

With averaging, every clock waits for every live worker, so a worker three times
slower than the others holds each clock three times longer. With `balance_batches`
the shard splits the workers' combined batch (the sum of the batch sizes they
registered with) in proportion to their measured speeds, so their clocks take about
the same time; the aggregator weights each gradient by its sample count, so the
update is still the mean gradient over every sample of the clock.

Speed is samples per second of compute (`PushHeader.busy_seconds`), smoothed over
clocks. Splitting in proportion to speed has a fixed point where every worker's
clock takes equally long even when time is not proportional to the batch (a fixed
cost per step): there, `b_i / t_i` is the same for all.

Not thread-safe: the servicer uses it on its event loop only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

KEEP_CLOCKS = 16  # splits of this many clocks behind the newest are kept (a pull may come late)


def shares(total: int, speeds: Mapping[str, float]) -> dict[str, int]:
    """Split `total` samples among workers in proportion to `speeds`, each at least 1.

    Largest remainder, ties broken by name, so the result is deterministic and sums to
    `total` exactly (when `total` >= the number of workers; otherwise every worker gets 1);
    each share is within one of `total * speed / sum(speeds)` unless some share was raised to 1.
    Speeds must be positive and finite.
    """
    if not speeds:
        return {}
    for w, v in speeds.items():
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"speed of {w!r} must be positive and finite, got {v}")
    n = len(speeds)
    if total <= n:
        return {w: 1 for w in speeds}
    whole = sum(speeds.values())
    exact = {w: total * v / whole for w, v in speeds.items()}
    out = {w: max(1, math.floor(x)) for w, x in exact.items()}
    left = total - sum(out.values())
    if left > 0:  # the largest remainders get one more
        for w in sorted(exact, key=lambda w: (-(exact[w] - math.floor(exact[w])), w))[:left]:
            out[w] += 1
    while left < 0:  # raising tiny shares to 1 overshot: the largest give one back
        w = min(out, key=lambda w: (-out[w], w))
        out[w] -= 1
        left += 1
    return out


class Balancer:
    """Each worker's registered batch size and smoothed speed; answers each one's batch."""

    def __init__(self, smoothing: float = 0.5):
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self._batch: dict[str, int] = {}  # worker -> batch size it registered with
        self._speed: dict[str, float] = {}  # worker -> samples per second of compute (smoothed)
        self._splits: dict[int, dict[str, int]] = {}  # clock -> each worker's batch at that clock

    def register(self, worker_id: str, batch_size: int) -> None:
        """A worker (re)registers with its own batch size (0: unknown, it is then left out)."""
        if batch_size > 0:
            self._batch[worker_id] = batch_size
        else:
            self._batch.pop(worker_id, None)

    def forget(self, worker_id: str) -> None:
        """A worker left for good: drop its batch size and speed (its old splits expire)."""
        self._batch.pop(worker_id, None)
        self._speed.pop(worker_id, None)

    def observe(self, worker_id: str, samples: int, busy_seconds: float) -> None:
        """Fold one clock's compute (samples in busy_seconds) into the worker's speed."""
        if samples <= 0 or not (busy_seconds > 0 and math.isfinite(busy_seconds)):
            return
        speed = samples / busy_seconds
        old = self._speed.get(worker_id)
        self._speed[worker_id] = speed if old is None else old + self.smoothing * (speed - old)

    def state_dict(self) -> dict:
        return {
            "batch": dict(self._batch),
            "speed": dict(self._speed),
            "splits": {c: dict(s) for c, s in self._splits.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._batch, self._speed = dict(state["batch"]), dict(state["speed"])
        self._splits = {int(c): dict(s) for c, s in state["splits"].items()}

    def batch_for(self, worker_id: str, clock: int, live: Iterable[str]) -> int:
        """The batch `worker_id` is to use at `clock`, among the `live` workers; 0 if it gave no batch size.

        A clock's split is made once, at its first question, from the speeds known then,
        so the batches of one clock sum to the combined batch (unless the workers change
        meanwhile: a worker that was not in the split gets a fresh one). Workers with no
        speed measured yet keep their own batch size; the others split what remains of
        the combined batch in proportion to their speeds.
        """
        split = self.new_split(worker_id, clock, live)
        if split is not None:
            self.adopt(clock, split)
        return self.batch_of(worker_id, clock)

    def new_split(self, worker_id: str, clock: int, live: Iterable[str]) -> dict[str, int] | None:
        """The split `batch_for` would make for this question now, or None if it needs none (kept none)."""
        if worker_id not in self._batch:
            return None
        split = self._splits.get(clock)
        if split is not None and worker_id in split:
            return None
        return self._split({w for w in live if w in self._batch} | {worker_id})

    def adopt(self, clock: int, split: Mapping[str, int]) -> None:
        """Keep `split` as `clock`'s (a replicated shard's followers adopt the head's, ps_server/replication.py)."""
        self._splits[clock] = dict(split)
        for old in [c for c in self._splits if c < clock - KEEP_CLOCKS]:
            del self._splits[old]

    def batch_of(self, worker_id: str, clock: int) -> int:
        """The batch kept for `worker_id` at `clock`; 0 if none (it gave no batch size)."""
        if worker_id not in self._batch:
            return 0
        return self._splits.get(clock, {}).get(worker_id, 0)

    def spread(self, clock: int) -> float:
        """The largest share of `clock`'s split over the mean share (1: equal shares, or no split kept).

        The factor on a push's lr under `lr_follows_split` (asyncps_common/delay.py). A replicated
        shard's followers adopt the head's splits, so they compute the same factor.
        """
        split = self._splits.get(clock)
        if not split or len(split) < 2:
            return 1.0
        return max(split.values()) * len(split) / sum(split.values())

    def _split(self, members: set[str]) -> dict[str, int]:
        out = {w: self._batch[w] for w in members if w not in self._speed}
        total = sum(self._batch[w] for w in members) - sum(out.values())
        out.update(shares(total, {w: self._speed[w] for w in members if w in self._speed}))
        return out
