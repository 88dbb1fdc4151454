"""Export trained weights from the servers into the user's own `nn.Module`.

`pull_into(servers, model)` joins the servers as a short-lived reader (it registers,
pulls once at the slowest live clock, and leaves), so the module ends up holding the
servers' current weights; `save_model` (worker/task.py) or `save_file` then write a
standard safetensors file. Run it after the workers finish to get the final model:
a reader registered while workers train would count as a live worker and hold them
back to its clock. Blocks until done.
"""

from __future__ import annotations

import os

from asyncps_common.security import NONE, Security
from worker.client import PSClient
from worker.rpc import CallOptions


def pull_into(servers: list[str], model, options: CallOptions = CallOptions(), security: Security = NONE) -> int:
    """Load the servers' current weights into `model` (a module, or the parameter groups the
    workers trained with: the plan must match); returns the sum of shard versions."""
    client = PSClient(
        servers, model, worker_id=f"exporter-{os.getpid()}", options=options, initialize=False, security=security
    )
    with client:
        client.pull()
        return sum(client.stats.versions)
