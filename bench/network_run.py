"""The process bodies bench/network.py starts inside the shaped network's namespaces.

    python bench/network_run.py ddp SPEC.json RANK MASTER_ADDR PORT OUT.json
    python bench/network_run.py eval SPEC.json SERVERS OUT.json

`ddp`: one rank of DistributedDataParallel on gloo (ring all-reduce of fp32 gradients, or
bf16 with a gloo copy of torch's `bf16_compress_hook` when the spec says so), rendezvous at rank 0's
address; trains `steps` iterations of the spec's model with the same data slices, batch,
AdamW settings and warm-up as the asyncps workers (bench/peers_common.py), then rank 0
writes its per-step times, the compute time of the same model without communication
(median of a few forward+backward passes before training) and the held-out loss of its
final weights. `eval`: registers with the servers as a reader (no Init), pulls the final
weights once and writes their held-out loss. Both block; used one process each.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch
import torch.distributed as dist
import torch.nn.functional as F

from peers_common import RunSpec, Task, lr_at, make_optimizer, set_lr
from worker.data import Corpus, default_corpus_path, heldout_loss
from worker.task import ByteGPT, TaskConfig


def load_spec(path: str) -> tuple[RunSpec, dict]:
    raw = json.loads(Path(path).read_text())
    extra = raw.pop("extra", {})
    raw["task"] = TaskConfig(**raw["task"])
    return RunSpec(**raw), extra


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def _bf16_hook(_state, bucket):
    """torch's bf16_compress_hook without its NCCL-only check: the bucket all-reduced in bf16 over gloo."""
    world = dist.get_world_size()
    wire = bucket.buffer().to(torch.bfloat16).div_(world)

    def widen(fut):
        out = bucket.buffer()
        out.copy_(fut.value()[0])
        return out

    return dist.all_reduce(wire, async_op=True).get_future().then(widen)


def ddp(spec: RunSpec, extra: dict, rank: int, master: str, port: int, out: Path) -> None:
    torch.set_num_threads(spec.threads_for(spec.workers))
    torch.set_flush_denormal(True)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=spec.workers, timeout=timedelta(seconds=300)
    )
    try:
        corpus = Corpus.load(spec.data or default_corpus_path(), context=spec.task.context)
        task = Task(spec, rank=rank, world=spec.workers, corpus=corpus)
        compute = []
        for _ in range(3):  # the same model alone: forward + backward, no communication
            x, y = task.batch()
            t0 = time.perf_counter()
            _loss(task.model, x, y).backward()
            compute.append(time.perf_counter() - t0)
        task.model.zero_grad(set_to_none=True)
        model = torch.nn.parallel.DistributedDataParallel(task.model)
        if extra.get("compression") == "bf16":
            model.register_comm_hook(None, _bf16_hook)
        opt = make_optimizer(spec, model.parameters())
        dist.barrier()
        ends = [time.perf_counter()]
        for step in range(extra["steps"]):
            x, y = task.batch()
            loss = _loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # gradients all-reduced (averaged) across ranks here
            set_lr(opt, lr_at(spec, step))
            opt.step()
            ends.append(time.perf_counter())
        dist.barrier()
        if rank == 0:
            held = heldout_loss(task.model, corpus.heldout, spec.task.context)
            out.write_text(
                json.dumps({"step_ends": ends, "compute_seconds": statistics.median(compute), "heldout_loss": held})
            )
    finally:
        dist.destroy_process_group()


def evaluate(spec: RunSpec, servers: list[str], out: Path) -> None:
    from worker import PSClient

    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    model = ByteGPT(spec.task)
    with PSClient(servers, model, staleness=math.inf, worker_id="heldout-eval", initialize=False) as ps:
        ps.pull()
    corpus = Corpus.load(spec.data or default_corpus_path(), context=spec.task.context)
    out.write_text(json.dumps({"heldout_loss": heldout_loss(model, corpus.heldout, spec.task.context)}))


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    spec, extra = load_spec(args[0])
    if kind == "ddp":
        ddp(spec, extra, int(args[1]), args[2], int(args[3]), Path(args[4]))
    elif kind == "eval":
        evaluate(spec, args[1].split(","), Path(args[2]))
    else:
        sys.exit(f"unknown kind {kind!r}: ddp or eval")
