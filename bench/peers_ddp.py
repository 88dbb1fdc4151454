"""`ddp-gloo`: torch DistributedDataParallel on the gloo backend, P processes on loopback.

Each rank trains on its own `worker_slice` with the same batch size as an asyncps
worker; DDP all-reduces (averages) the gradients during backward, and every rank then
steps its own torch.optim.AdamW with the project's warm-up schedule — one update of
P x batch samples per iteration, like asyncps with s = 0 and gradient averaging. The
straggler (the last rank) sleeps (F-1) x its forward+backward time after backward; the
others wait for it in the next all-reduce; in the jitter scenario every rank pauses as
`ps-worker --jitter` does (RunSpec.jitter_of). The ranks agree to stop with one tiny
all-reduce per iteration (a flag: has rank 0's budget run out?). Rank 0 records the
trace and snapshots. `run(spec, rank, port)` is one rank's process body; blocks.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from peers_common import Recorder, RunSpec, Task, lr_at, make_optimizer, run_in_gloo_group, set_lr, straggle


def run(spec: RunSpec, rank: int, port: int) -> None:
    run_in_gloo_group(spec, rank, port, _train)


def _train(spec: RunSpec, rank: int) -> None:
    task = Task(spec, rank=rank, world=spec.workers)
    on_gpu = task.device.type == "cuda"
    model = DDP(task.model, device_ids=[task.device.index or 0] if on_gpu else None)
    opt = make_optimizer(spec, model.parameters())
    slowdown = spec.slowdown_of(rank)
    jitter = spec.jitter_of(rank)
    rec = Recorder(spec.snapshot_every)
    stop = torch.zeros(1)
    start = torch.zeros(1, dtype=torch.float64)
    dist.barrier()  # every rank built its model and data: training starts now
    if rank == 0:
        start[0] = time.time()
    dist.broadcast(start, src=0)
    t_start = rec.start(float(start[0]))
    deadline = t_start + spec.budget
    updates = 0
    compute = 0.0
    while True:
        t1 = time.perf_counter()
        x, y = task.batch()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across ranks here
        float(loss.detach())
        t2 = time.perf_counter()
        compute += t2 - t1
        straggle(t2 - t1, slowdown)
        jitter.pause(t2 - t1)
        set_lr(opt, lr_at(spec, updates))
        opt.step()
        updates += 1
        rec.progress(updates * spec.batch_size * spec.workers, task.model if rank == 0 else None)
        stop[0] = 1.0 if rank == 0 and time.time() >= deadline else 0.0
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop[0] > 0:
            break
    if rank == 0:
        rec.save(Path(spec.out) / "raw-0.pt", updates=updates, compute_seconds_per_step=compute / max(1, updates))
