"""Asynchronous local steps: H steps of the worker's own inner optimizer per push.

With `--local-steps H` a worker pulls the weights, runs H steps of its inner optimizer
(AdamW/Adam/SGD with the training flags' settings, its state kept across
pushes and lost when the worker restarts) on H batches, and pushes the pseudo-gradient
w_pulled − w_local; the servers apply their outer optimizer to it (asyncps_common/delay.py).
Communication drops H-fold. The staleness bound counts pushes, so s = 0 with averaging
is synchronous DiLoCo.

Dynamic local steps (Liu et al. 2024's Dynamic Local Updates, `--dynamic-local-steps`):
a worker slower than the others runs fewer inner steps, so its push lands on time. Each
worker registers H as its "batch" and reports each push's inner steps (`samples`) and
compute seconds (`busy_seconds`); the servers' balancer (ps_server/balance.py, the one
balanced batches use) splits the workers' combined H in proportion to their measured
steps per second and hands each its share as the pull's `batch_size`.

Look-ahead (`--lookahead β`, without averaging): while a worker runs its H steps the other
P − 1 workers' pushes land, so by the time its push applies, the servers' weights have moved on
from the pull. The worker starts its inner steps ahead of the pull by the drift it expects,
β·(P − 1)/P times the change between its last two pulls (the change over one round of all P
workers' pushes), as DANA (Hakimi et al. 2019) computes gradients at the weights predicted for
their apply. With the elastic rule the push stays w_pulled − w_local (the servers move toward the
worker's weights, which include the look-ahead); with the plain rule it is w_start − w_local
(the worker's own change). bench/staleness.py, delay 2, elastic at 1/P: held-out 1.851–1.866
with β = 0.5 against 1.878–1.888 without (three seeds; docs/asynchrony.md). The first pull
after a start or restart has no previous pull, so its steps start at the pull; so does the first
after the worker registers again (`forget_pulls`): a restarted server may have rolled its
weights back to a checkpoint, and that change is no drift to follow.
Not thread-safe: one per training loop.
"""

from __future__ import annotations

from typing import Any

import torch

from asyncps_common import fused
from protos.asyncps.v1 import ps_pb2 as pb


def inner_optimizer(cfg: pb.OptimizerConfig, params) -> torch.optim.Optimizer | fused.FusedOptimizer:
    """The worker's inner optimizer (the training flags' optimizer, run locally).

    Fused (one vectorized pass over each parameter, as the servers' optimizers) on CPU and
    CUDA: an AdamW step of the main job's model took 1.3 ms per-op and 0.35 ms fused on one
    core of the 2-core VM, of `ps-cost`'s `wide` model 10.8 and 2.0 ms; the same results to
    fp32 round-off. There it is `asyncps_common/fused.py`'s, the same kernels as torch.optim's
    without the `torch._dynamo` import torch.optim's first use costs a process (1.3 s of CPU).
    Other devices get torch.optim's default implementation.
    """
    params = list(params)
    if cfg.name == "sgd":
        settings: dict = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        settings = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if fused.supported(params):
        return fused.FusedOptimizer(cfg.name, params, **settings)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}.get(cfg.name, torch.optim.AdamW)
    return cls(params, **settings)


class LocalSteps:
    """The inner loop of one worker: `begin` after a pull, `step` H times, `finish` before the push."""

    def __init__(
        self,
        model: torch.nn.Module,
        inner: pb.OptimizerConfig,
        steps: int,
        first_step: int = 0,
        lookahead: float = 0.0,
        workers: int = 1,
        push_from_pull: bool = False,
    ):
        """`lookahead` β with `workers` P: start β(P − 1)/P of the last round's drift ahead of each pull;
        `push_from_pull`: the pseudo-gradient is taken from the pulled weights, not that start (elastic)."""
        if steps < 1:
            raise ValueError("local steps must be >= 1")
        if lookahead < 0 or workers < 1:
            raise ValueError("lookahead must be >= 0 and workers >= 1")
        self.params = [p for p in model.parameters()]
        self.inner = inner
        self.steps = steps
        self.opt = inner_optimizer(inner, self.params)
        self.inner_steps = first_step  # inner steps done: the warm-up runs over these
        self._pulled: list[torch.Tensor] = []  # what the pseudo-gradient is taken from
        self.ahead = lookahead * (workers - 1) / workers  # the fraction of the last round's drift to start ahead
        self.push_from_pull = push_from_pull
        self._previous: list[torch.Tensor] | None = None  # the weights of the previous pull (look-ahead)
        self._ahead_sq = 0.0  # ‖w_start − w_pull‖² of the push in progress
        self.lookahead_ratio = 0.0  # ‖w_start − w_pull‖ / ‖pseudo-gradient‖ of the latest push (metrics)
        self._registrations = 0  # the client's re-registrations seen at the previous pull

    def lr(self) -> float:
        """The inner lr: warmed up linearly over the first `warmup_updates` inner steps (as the servers do)."""
        lr = self.inner.lr
        if self.inner.warmup_updates:
            lr *= min(1.0, (self.inner_steps + 1) / self.inner.warmup_updates)
        return lr

    def begin(self, registrations: int = 0) -> None:
        """Remember the weights just pulled; with look-ahead, move the model ahead of them.

        `registrations`: how often the client has registered again so far (`ps.stats.reregistrations`);
        when it changed since the previous pull, that pull is forgotten (`forget_pulls`)."""
        if registrations != self._registrations:
            self._registrations = registrations
            self.forget_pulls()
        with torch.no_grad():
            if len(self._pulled) != len(self.params):
                self._pulled = [p.detach().clone() for p in self.params]
            else:
                for keep, p in zip(self._pulled, self.params):
                    keep.copy_(p)
            self._ahead_sq = 0.0
            if not self.ahead:
                return
            if self._previous is None:
                self._previous = [keep.clone() for keep in self._pulled]
                return
            norms = []  # on the device: one sync per push for the metric, not one per parameter
            for prev, keep, p in zip(self._previous, self._pulled, self.params):
                prev.neg_().add_(keep)  # the drift since the previous pull, in place (no allocation)
                p.add_(prev, alpha=self.ahead)
                norms.append(torch.linalg.vector_norm(prev))
                prev.copy_(keep)
                if not self.push_from_pull:
                    keep.copy_(p)  # the plain rule adds the worker's own change: from where it started
            self._ahead_sq = float(torch.stack(norms).square().sum()) * self.ahead**2

    def forget_pulls(self) -> None:
        """Drop the previous pull (the worker registered again): the next push starts at its pull."""
        self._previous = None

    def step(self) -> None:
        """One inner step on the gradients in the model (from the caller's backward)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.inner_steps += 1

    def finish(self) -> None:
        """Put the pseudo-gradient w_pulled − w_local in each parameter's .grad, for the push."""
        with torch.no_grad():
            norms = []
            for keep, p in zip(self._pulled, self.params):
                p.grad = grad = keep - p.detach()
                if self.ahead:
                    norms.append(torch.linalg.vector_norm(grad))
            if norms:
                push = float(torch.stack(norms).square().sum())
                self.lookahead_ratio = (self._ahead_sq / push) ** 0.5 if push > 0 else 0.0

    def run(self, model: Any, stream, batch: int, device: torch.device, steps: int, registrations: int = 0) -> float:
        """`begin(registrations)`, `steps` inner steps on batches of `stream`, `finish`; the mean training loss."""
        self.begin(registrations)
        total = 0.0
        for _ in range(steps):
            x, y = stream.next(batch)
            loss = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss.backward()
            total += float(loss.detach())
            self.step()
        self.finish()
        return total / max(1, steps)
