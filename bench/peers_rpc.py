"""`rpc-ps`: a torch.distributed.rpc parameter server after PyTorch's own tutorial design.

The design of "Implementing Batch RPC Processing Using Asynchronous Executions"
(pytorch.org/tutorials/intermediate/rpc_async_execution.html): one PS process holds
the model and its optimizer behind an RRef; each trainer fetches the weights with
`rpc_sync(get_model)`, computes gradients locally on its own data slice, and calls
`rpc_sync(update_and_fetch)` with them, which returns the updated weights. Here it is
asynchronous (as asked of the comparison, and as the first PS tutorial is): every
gradient is applied on arrival, under a lock, with torch.optim.AdamW and the
project's warm-up — no waiting for the other trainers. The PS also keeps the
progress trace and snapshots. Processes: rank 0 "ps", ranks 1..P "trainer{r}", over
TensorPipe on loopback. `run(spec, rank, port)` is one process's body; blocks.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.rpc as rpc

from peers_common import Recorder, RunSpec, Task, lr_at, make_optimizer, set_lr, straggle


class ParameterServer:
    """The model and optimizer; `update_and_fetch` is serialized by one lock (thread-safe)."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        torch.manual_seed(spec.seed)
        from worker.task import ByteGPT

        self.model = ByteGPT(spec.task)  # on the CPU: gradients arrive over TCP
        self.params = list(self.model.parameters())
        self.opt = make_optimizer(dataclasses.replace(spec, device="cpu"), self.params)
        self.lock = threading.Lock()
        self.rec = Recorder(spec.snapshot_every)
        self.updates = 0
        self.samples = 0
        self.deadline: float | None = None

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @staticmethod
    def get_model(ps_rref: rpc.RRef) -> tuple[list[torch.Tensor], float]:
        """The current weights and the common deadline (set by the first trainer to ask)."""
        self = ps_rref.local_value()
        with self.lock:
            if self.deadline is None:
                self.deadline = self.rec.start() + self.spec.budget
            return self.weights(), self.deadline

    @staticmethod
    def update_and_fetch(ps_rref: rpc.RRef, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply one trainer's gradients now (asynchronous SGD), return the new weights."""
        self = ps_rref.local_value()
        with self.lock:
            for p, g in zip(self.params, grads):
                p.grad = g
            set_lr(self.opt, lr_at(self.spec, self.updates))
            self.opt.step()
            self.updates += 1
            self.samples += self.spec.batch_size
            self.rec.progress(self.samples, self.model)
            return self.weights()


def run(spec: RunSpec, rank: int, port: int) -> None:
    warnings.filterwarnings("ignore", message="You are using a Backend")  # torch's own rpc shutdown path
    spec.prepare_process(spec.workers + 1)
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=120, num_worker_threads=8)
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=spec.workers + 1, rpc_backend_options=opts)
    if rank == 0:
        ps = ParameterServer(spec)
        global _PS_RREF
        _PS_RREF = rpc.RRef(ps)
        rpc.shutdown()  # waits until every trainer is done
        ps.rec.save(Path(spec.out) / "raw-0.pt", updates=ps.updates)
    else:
        _trainer(spec, rank)
        rpc.shutdown()


_PS_RREF: rpc.RRef | None = None


def _ps_rref() -> rpc.RRef:
    """Called on the PS by a trainer: the RRef of the parameter server object."""
    while _PS_RREF is None:  # the PS builds its model right after init_rpc
        time.sleep(0.01)
    return _PS_RREF


def _trainer(spec: RunSpec, rank: int) -> None:
    worker = rank - 1
    task = Task(spec, rank=worker, world=spec.workers)
    model = task.model
    params = list(model.parameters())
    slowdown = spec.slowdown_of(worker)
    jitter = spec.jitter_of(worker)
    ps_rref = rpc.rpc_sync("ps", _ps_rref)
    weights, deadline = rpc.rpc_sync("ps", ParameterServer.get_model, args=(ps_rref,))
    while time.time() < deadline:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        t1 = time.perf_counter()
        x, y = task.batch()
        for p in params:
            p.grad = None
        loss = model.loss(x, y)
        loss.backward()
        float(loss.detach())
        t2 = time.perf_counter()
        straggle(t2 - t1, slowdown)
        jitter.pause(t2 - t1)
        grads = [p.grad.to("cpu") for p in params]
        weights = rpc.rpc_sync("ps", ParameterServer.update_and_fetch, args=(ps_rref, grads))
