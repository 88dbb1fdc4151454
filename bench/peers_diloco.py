"""`diloco-gloo`: synchronous local steps (DiLoCo) on torch.distributed gloo, P processes on loopback.

Each rank trains on its own `worker_slice` with the same batch as an asyncps worker and
its own torch.optim.AdamW (the project's settings, the warm-up counted in inner steps,
as `ps-worker --local-steps` does). Every H steps (`RunSpec.local_steps`) the ranks
all-reduce the pseudo-gradient w_outer - w_local (one flat tensor, averaged) and apply
the outer optimizer to the outer weights: SGD with lr `outer_lr` (default 1: the mean of
the ranks' models, asyncps's default with averaging) and, with `outer_momentum` > 0,
Nesterov momentum (DiLoCo's 0.7/0.9). Every rank then continues from the new outer
weights with its inner AdamW state kept: what `ps-cluster --local-steps H --staleness 0
--average-gradients` computes, without servers. Straggler and jitter pauses as in DDP
(the others wait for a slow rank at the next all-reduce). The ranks agree to stop at a
round's end (rank 0's budget, carried in the same all-reduce). Rank 0 records the trace
and snapshots the outer weights after each round. `run(spec, rank, port)` blocks.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from peers_common import Recorder, RunSpec, Task, lr_at, make_optimizer, run_in_gloo_group, set_lr, straggle


def run(spec: RunSpec, rank: int, port: int) -> None:
    run_in_gloo_group(spec, rank, port, _train)


def outer_optimizer(spec: RunSpec, params) -> torch.optim.Optimizer:
    lr = 1.0 if spec.outer_lr is None else spec.outer_lr
    m = spec.outer_momentum
    return torch.optim.SGD(list(params), lr=lr, momentum=m, nesterov=m > 0)


def _train(spec: RunSpec, rank: int) -> None:
    task = Task(spec, rank=rank, world=spec.workers)
    model = task.model
    outer = copy.deepcopy(model)  # the weights every rank agrees on
    inner_opt = make_optimizer(spec, model.parameters())
    outer_opt = outer_optimizer(spec, outer.parameters())
    slowdown, jitter = spec.slowdown_of(rank), spec.jitter_of(rank)
    rec = Recorder(spec.snapshot_every)
    start = torch.zeros(1, dtype=torch.float64)
    dist.barrier()
    if rank == 0:
        start[0] = time.time()
    dist.broadcast(start, src=0)
    t_start = rec.start(float(start[0]))
    deadline = t_start + spec.budget
    steps = rounds = 0
    while True:
        for _ in range(spec.local_steps):
            t1 = time.perf_counter()
            x, y = task.batch()
            loss = model.loss(x, y)
            inner_opt.zero_grad(set_to_none=True)
            loss.backward()
            float(loss.detach())
            t2 = time.perf_counter()
            straggle(t2 - t1, slowdown)
            jitter.pause(t2 - t1)
            set_lr(inner_opt, lr_at(spec, steps))
            inner_opt.step()
            steps += 1
            rec.progress(steps * spec.batch_size * spec.workers)
        with torch.no_grad():
            w_outer = parameters_to_vector(outer.parameters())
            delta = w_outer - parameters_to_vector(model.parameters())
            flag = 1.0 if rank == 0 and time.time() >= deadline else 0.0
            buf = torch.cat([delta, torch.tensor([flag * spec.workers])])
            dist.all_reduce(buf)  # the sum; the stop flag rides along (rank 0's x P, then / P)
            buf /= spec.workers
        outer_opt.zero_grad(set_to_none=False)
        offset = 0
        for p in outer.parameters():
            n = p.numel()
            p.grad = buf[offset : offset + n].view_as(p).clone()
            offset += n
        outer_opt.step()
        with torch.no_grad():
            vector_to_parameters(parameters_to_vector(outer.parameters()), model.parameters())
        rounds += 1
        rec.progress(steps * spec.batch_size * spec.workers, outer if rank == 0 else None)
        if buf[-1] > 0:
            break
    if rank == 0:
        rec.save(Path(spec.out) / "raw-0.pt", updates=rounds, inner_steps=steps)
