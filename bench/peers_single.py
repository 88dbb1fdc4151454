"""`single`: the reference — one process trains the whole model with torch.optim.AdamW.

It reads worker 0 of 1's slice (the whole training split), uses every core for torch's
intra-op threads, and trains for the spec's budget. With no workers, a straggler has
nothing to slow down: peers.py runs it once and reports that run for both scenarios
(marked not applicable for the straggler one). Run in its own process by peers.py
(`run(spec)` blocks for the whole run and writes `raw.pt` into the spec's folder).
"""

from __future__ import annotations

import time
from pathlib import Path

from peers_common import Recorder, RunSpec, Task, lr_at, make_optimizer, set_lr


def run(spec: RunSpec) -> None:
    spec.prepare_process(1)
    task = Task(spec, rank=0, world=1)
    model = task.model
    opt = make_optimizer(spec, model.parameters())
    rec = Recorder(spec.snapshot_every)
    t_start = rec.start()
    deadline = t_start + spec.budget
    updates = samples = 0
    compute = 0.0
    while time.time() < deadline:
        t1 = time.perf_counter()
        x, y = task.batch()
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(opt, lr_at(spec, updates))
        opt.step()
        float(loss.detach())  # synchronizes a GPU
        compute += time.perf_counter() - t1
        updates += 1
        samples += spec.batch_size
        rec.progress(samples, model)
    rec.save(Path(spec.out) / "raw-0.pt", updates=updates, compute_seconds_per_step=compute / max(1, updates))
