"""What a worker's client hands back: the ticket of a push in flight and the blocked-time counters.

`PushTicket.wait` blocks the calling (training) thread until every shard has answered the push;
the future it waits on is completed by the client's I/O thread. `ClientStats` is written by both
threads without a lock: plain counters, read for reports.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

from protos.asyncps.v1 import ps_pb2 as pb


@dataclass
class ClientStats:
    """Cumulative seconds the training thread spent blocked, and counters."""

    pull_wait_seconds: float = 0.0  # blocked in pull() (exposed communication + bound waits)
    push_wait_seconds: float = 0.0  # blocked in push() (gather + in-flight limit)
    bound_wait_seconds: float = 0.0  # of which servers held pulls for the staleness bound
    pulls: int = 0
    pushes: int = 0
    pushes_dropped: int = 0  # pushes refused because this worker had been evicted
    reregistrations: int = 0
    max_update_staleness: int = 0
    versions: list[int] = field(default_factory=list)


class PushTicket:
    """A push in flight; `wait()` blocks until every shard has answered."""

    def __init__(self, clock: int, future: concurrent.futures.Future):
        self.clock, self._future = clock, future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> list[pb.PushResponse | None]:
        return self._future.result(timeout)
