"""Server steps that, once started, run to the end even if the RPC that started them is cancelled.

grpc.aio cancels a handler's coroutine when its client goes away or its deadline passes.
An update runs in a worker thread (`asyncio.to_thread(store.apply, ...)`) that a
cancellation cannot stop, so without protection the gradient would be applied while
the bookkeeping after it (advancing the worker's clock, counting the push) is skipped:
the clock rule would then accept the same push again and apply it twice. `to_the_end`
runs such a step as its own task and shields it: the caller still sees the
cancellation, the step finishes, and its outcome (an error included) is retrieved so
asyncio never reports it as lost. Call from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


async def to_the_end(step: Coroutine[Any, Any, T]) -> T:
    """Await `step`, which completes even if this await is cancelled."""
    task = asyncio.ensure_future(step)
    task.add_done_callback(_settled)
    return await asyncio.shield(task)


def _settled(task: asyncio.Future) -> None:
    """Retrieve the step's outcome (its caller may have been cancelled meanwhile)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("a step whose caller was cancelled ended with: %s", task.exception())
