"""The clock table: live membership and the stale-synchronous-parallel (SSP) rule.

`ClockTable.can_read` is the one place the consistency rule lives. A worker's entry
holds its clock: the number of iterations whose pushes this shard has applied (so a
worker computing iteration c, having pushed c - 1, stands at c). A pull for clock c
is answered once every live worker stands at c - s or later, and the reader's own
pushes up to c - 1 - own_lag are applied (own_lag 0 is read-my-writes; 1 lets a
pipelined worker prefetch while its latest push is still in flight, allowed only
when s >= 1).

A live worker is one that registered and has not been silent longer than the
heartbeat timeout; silent ones are evicted by `evict_silent` (run periodically) and no
longer hold anyone back. A worker that registers again gets a new session and starts
at the slowest live clock, or at the clock it asks for (`start_clock`, its own clock)
if that is later.

After a restart (`load_state_dict`), the restored entries keep their clocks, so the
slowest worker still bounds the others, but their sessions are refused (`restored`):
the server lost every push applied after the checkpoint, so each worker must register
again, at its own clock. That re-registration is the fast-forward rule: the worker's
entry jumps from the checkpointed clock to the worker's clock, and the clocks in
between are pushes this shard lost (the servicer counts them as lost updates). Pushes
of the old session still in flight are refused, never applied twice. A restored
worker that does not come back within the heartbeat timeout is evicted as usual.

Not thread-safe: use it from the server's event loop only. `wait_readable` blocks
(asynchronously) until the rule allows the read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass


class UnknownWorker(Exception):
    """Not registered, evicted, or an older session (answered FAILED_PRECONDITION)."""


class DuplicatePush(Exception):
    """A push for a clock this shard has already applied (answered ALREADY_EXISTS)."""


@dataclass
class Entry:
    session: int
    clock: int
    last_seen: float
    restored: bool = False  # from a checkpoint: the session died with the old process


class ClockTable:
    def __init__(self, staleness: float, heartbeat_timeout: float, now: Callable[[], float] = time.monotonic):
        if staleness < 0:
            raise ValueError("staleness must be >= 0 (use math.inf for fully asynchronous)")
        self.staleness = staleness
        self.heartbeat_timeout = heartbeat_timeout
        self._now = now
        self._entries: dict[str, Entry] = {}
        self._next_session = int(time.time() * 1000) << 8
        self._floor = 0
        self._changed = asyncio.Condition()
        self.max_read_gap = 0
        self.pulls_waited = 0
        self.wait_seconds = 0.0
        self.evictions = 0

    # -- membership -------------------------------------------------------------------
    def new_session(self) -> int:
        """The session the next `register` would give (a replicated head names it in its log entry)."""
        return self._next_session

    def register(self, worker_id: str, start_clock: int = 0, session: int | None = None) -> tuple[int, int]:
        """(session, start clock) for a worker joining or rejoining: the slowest live clock
        (or `start_clock` if that is later). `session`: the one a replicated head gave."""
        others = [e.clock for w, e in self._entries.items() if w != worker_id]
        start = max(start_clock, min(others) if others else self._floor)
        old = self._entries.get(worker_id)
        if old is not None and old.restored and old.clock > start:
            start = old.clock  # never behind what the checkpoint says it had pushed
        session = self._next_session if session is None else session
        self._next_session = max(self._next_session, session + 1)
        self._entries[worker_id] = Entry(session, start, self._now())
        self._notify()
        return session, start

    def restored_clock(self, worker_id: str) -> int | None:
        """The clock a checkpoint restored for this worker, while it has not registered again."""
        entry = self._entries.get(worker_id)
        return entry.clock if entry is not None and entry.restored else None

    def check(self, worker_id: str, session: int) -> Entry:
        """The live entry of (worker, session), refreshed as a sign of life."""
        entry = self._entries.get(worker_id)
        if entry is None:
            raise UnknownWorker(f"unknown worker {worker_id!r}: not registered or evicted; register again")
        if entry.session != session:
            raise UnknownWorker(
                f"worker {worker_id!r} session {session} is stale (current {entry.session}); register again"
            )
        if entry.restored:
            raise UnknownWorker(
                f"worker {worker_id!r}: this shard restarted from its checkpoint (clock {entry.clock}); register again"
            )
        entry.last_seen = self._now()
        return entry

    def leave(self, worker_id: str, session: int) -> None:
        self.check(worker_id, session)
        del self._entries[worker_id]
        self._notify()

    def evict_silent(self) -> list[str]:
        """Evict workers silent for longer than the heartbeat timeout; returns their ids."""
        return self.evict(self.silent())

    def silent(self) -> list[str]:
        """The workers silent for longer than the heartbeat timeout."""
        cutoff = self._now() - self.heartbeat_timeout
        return [w for w, e in self._entries.items() if e.last_seen < cutoff]

    def touch_all(self) -> None:
        """Count every worker as just seen (a promoted replica: liveness was the old head's business)."""
        now = self._now()
        for e in self._entries.values():
            e.last_seen = now

    def evict(self, workers: list[str]) -> list[str]:
        """Evict these workers (those still here); returns them."""
        gone = [w for w in workers if w in self._entries]
        if gone:
            self._floor = max(self._floor, self.min_clock())
        for w in gone:
            del self._entries[w]
            self.evictions += 1
        if gone:
            self._notify()
        return gone

    # -- clocks -----------------------------------------------------------------------
    def min_clock(self) -> int:
        return min((e.clock for e in self._entries.values()), default=self._floor)

    @property
    def live(self) -> int:
        return len(self._entries)

    def clocks(self) -> dict[str, Entry]:
        return dict(self._entries)

    def check_push(self, worker_id: str, session: int, clock: int) -> None:
        """Raise unless (worker, session) is live and `clock` has not been applied yet."""
        entry = self.check(worker_id, session)
        if clock < entry.clock:
            raise DuplicatePush(
                f"push for clock {clock} of worker {worker_id!r} was already applied (shard is at {entry.clock})"
            )

    def advance(self, worker_id: str, session: int, clock: int) -> None:
        """Record that the push of `clock` was applied: the worker now stands at clock + 1."""
        self.check_push(worker_id, session, clock)
        self._entries[worker_id].clock = clock + 1
        self._floor = max(self._floor, self.min_clock())
        self._notify()

    def advance_contributor(self, worker_id: str, clock: int) -> bool:
        """An update that holds this worker's gradient of `clock` was applied (its own, or an average).

        Moves the worker's CURRENT session past `clock` even if the gradient came from an
        earlier session (it re-registered while its gradient was applied or waited in an
        averaging bucket; its repeat of that clock is then refused as a duplicate). False if
        the worker is gone (evicted or left meanwhile: the update stands all the same).
        """
        entry = self._entries.get(worker_id)
        if entry is None:
            return False
        if entry.clock <= clock:
            entry.clock = clock + 1
            self._floor = max(self._floor, self.min_clock())
            self._notify()
        return True

    def can_read(self, worker_id: str, clock: int, own_lag: int = 0) -> bool:
        """The SSP rule: may `worker_id` read the weights for iteration `clock` now?"""
        entry = self._entries[worker_id]
        return entry.clock >= clock - own_lag and self.min_clock() >= clock - self.staleness

    def others_within_bound(self, worker_id: str, clock: int) -> bool:
        """The bound as far as other workers go: is every other live worker at `clock` - s or later?

        (The reader's own clock is the read-my-writes part of `can_read`.)"""
        return all(e.clock >= clock - self.staleness for w, e in self._entries.items() if w != worker_id)

    async def wait_readable(self, worker_id: str, session: int, clock: int, own_lag: int = 0) -> float:
        """Wait until `can_read`; returns the seconds the staleness bound held the pull back.

        Only waiting for other workers (the bound) counts in `pulls_waited` and `wait_seconds`,
        timed until they no longer hold the read back; waiting for the reader's own push still
        in flight (read-my-writes) does not. Raises UnknownWorker if evicted meanwhile.
        """
        if own_lag > self.staleness:
            raise ValueError(f"own_lag {own_lag} exceeds the staleness bound {self.staleness}")
        self.check(worker_id, session)
        start = self._now()
        bound_blocked = not self.others_within_bound(worker_id, clock)
        released = None if bound_blocked else start  # when the bound stopped holding this pull
        async with self._changed:
            while not self.can_read(worker_id, clock, own_lag):
                await self._changed.wait()
                self.check(worker_id, session)
                if released is None and self.others_within_bound(worker_id, clock):
                    released = self._now()
        seconds = (self._now() if released is None else released) - start
        if bound_blocked:
            self.pulls_waited += 1
            self.wait_seconds += seconds
        self.max_read_gap = max(self.max_read_gap, clock - self.min_clock())
        return seconds

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        try:
            asyncio.get_running_loop().create_task(wake())
        except RuntimeError:  # no loop running (restoring a checkpoint, unit tests)
            pass

    # -- durability -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "clocks": {w: (e.session, e.clock) for w, e in self._entries.items()},
            "floor": self._floor,
            "staleness": self.staleness,
        }

    def replica_state(self) -> dict:
        """Everything a replica joining the chain needs: sessions stay live (unlike a checkpoint)."""
        return {
            "entries": {w: (e.session, e.clock, e.restored) for w, e in self._entries.items()},
            "floor": self._floor,
            "staleness": self.staleness,
            "next_session": self._next_session,
            "counters": (self.max_read_gap, self.pulls_waited, self.wait_seconds, self.evictions),
        }

    def load_replica_state(self, state: dict) -> None:
        now = self._now()
        self._entries = {w: Entry(s, c, now, restored=bool(r)) for w, (s, c, r) in state["entries"].items()}
        self._floor = int(state["floor"])
        self.staleness = float(state["staleness"])
        self._next_session = int(state["next_session"])
        self.max_read_gap, self.pulls_waited, self.wait_seconds, self.evictions = state["counters"]
        self._notify()

    def load_state_dict(self, state: dict) -> None:
        """Restore clocks; restored workers count as just seen (they get one timeout to register again)."""
        now = self._now()
        self._entries = {w: Entry(s, c, now, restored=True) for w, (s, c) in state["clocks"].items()}
        self._floor = int(state["floor"])
        self.staleness = float(state["staleness"])
