"""The update rules bench/staleness.py compares, run through the servers' own code.

Every rule trains the built-in task in one process on a real `ps_server.store.ShardStore`
(the shard's optimizer, update rule and version history, exactly what a server runs) with
deterministically injected delays:

- gradient rules: update u applies the gradient computed on the weights of version
  u - d (`read_version` u - d, as a push names it), d fixed or drawn uniformly from
  0..4 ("random") with a seeded generator; the two workers' slices taken in turn.
- local-steps rules: P = d + 1 workers (d = 0: one) take turns; each pulls the shard's
  weights, runs H steps of its own AdamW (worker/local_steps.py) and pushes the
  pseudo-gradient, so every push meets d other pushes between its pull and its apply.
  "random": 3 workers, the next to push drawn uniformly. The budget counts batches: a
  run of U updates takes U / H pushes. `local4-sync` is the synchronous counterpart with
  the same P workers: all start from the same weights, their deltas averaged (DiLoCo, outer lr 1).

Two tries that live in the bench only (not server rules; kept to report their figures):
`ab`, Adaptive Braking (Venigalla et al. 2020): each gradient g is scaled by
1 - rho * cos(g, v) before the push, v the running mean (beta1) of the gradients pushed
so far, so a gradient against the velocity brakes it harder and one along it adds less;
`local4-mshrink`, momentum shrinking with asynchrony (Mitliagkas et al. 2016): P
asynchronous workers add an implicit momentum of about 1 - 1/P, so the outer Nesterov
momentum is max(0, 0.9 - (1 - 1/P)) (lr 1/P): 0.9 with one worker, 0.23 with three.

`local4-elastic` (and `local{H}-{c}elastic`, outer lr c/P) is the servers' `elastic` rule: the
shard moves toward each pushing worker's weights. Bench-only tries beside it:
`local4-1.5pull-{m}` adds m (w_now − w_pulled) to each pseudo-gradient (m = 1 is the elastic
rule: how much of the others' drift a push takes back), and the `-ws` rules give each of
the P workers warmup / P inner warm-up steps (the single worker's warm-up in samples);
`local4-easgd-{α}` adds EASGD's worker side: a pull moves the worker's weights only α of the way
to the shard's (the push is still pulled − local, so the servers' elastic rule is unchanged).
`-la{β}` is the workers' look-ahead (worker/local_steps.py, `ps-worker --lookahead β`): each
worker starts its H steps β(P − 1)/P of its last round's drift ahead of the pull. `-cos{f}`
(bench only, tried and worse) decays the outer lr along a cosine from 1 to f over the run's pushes.

`VARIANTS` names each rule's settings; the bench's table reports them side by side.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import torch

from asyncps_common.optimizer import default_config
from peers_common import RunSpec, Task
from ps_server.store import ShardStore
from worker.local_steps import LocalSteps


@dataclass
class Variant:
    local_steps: int = 0  # 0: gradients
    outer: dict = field(default_factory=dict)  # OptimizerConfig fields of the shard's optimizer
    outer_lr_per_worker: bool = False  # local steps: the outer lr is divided by the number of workers
    synchronous: bool = False  # local steps: all workers start from the same weights, deltas averaged
    braking: float = 0.0  # gradients: Adaptive Braking's rho (0: off)
    momentum_shrink: bool = False  # local steps: outer Nesterov momentum 0.9 - (1 - 1/P)
    pullback: float = 0.0  # local steps: w - lr (delta + m (w - w_read)); m = 1 is the elastic rule
    shared_warmup: bool = False  # local steps: warm-up over warmup / P inner steps per worker
    resync: float = 1.0  # local steps: a pull moves the worker's weights this far toward the shard's (EASGD's α)
    lookahead: float = 0.0  # local steps: start from the pull + this × the drift the others will add (DANA-like)
    decay: float = 1.0  # local steps: the outer lr follows a cosine from 1 to this fraction over the run's pushes


VARIANTS: dict[str, Variant] = {
    "plain": Variant(),
    "dc": Variant(outer={"update_rule": "dc"}),
    "dc-8": Variant(outer={"update_rule": "dc", "dc_lambda": 8.0}),
    "beta1-0.5": Variant(outer={"beta1": 0.5}),
    "beta1-0": Variant(outer={"beta1": 0.0}),
    "dc-beta1-0.5": Variant(outer={"update_rule": "dc", "beta1": 0.5}),
    "salr": Variant(outer={"staleness_aware_lr": True}),
    "local1-avg": Variant(1, {"lr": 1.0}, True),
    "local4-avg": Variant(4, {"lr": 1.0}, True),
    "local4-0.6avg": Variant(4, {"lr": 0.6}, True),
    "local4-0.8avg": Variant(4, {"lr": 0.8}, True),
    "local4-0.4avg": Variant(4, {"lr": 0.4}, True),
    "local4-0.5avg": Variant(4, {"lr": 0.5}, True),
    "local8-0.8avg": Variant(8, {"lr": 0.8}, True),
    "local4-lr1": Variant(4, {"lr": 1.0}),
    "local4-half": Variant(4, {"lr": 0.5}),
    "local4-nesterov": Variant(4, {"lr": 0.7, "momentum": 0.9, "nesterov": True}, True),
    "local4-dn": Variant(4, {"update_rule": "delayed-nesterov", "lr": 1.0, "momentum": 0.5}, True),
    "local2-avg": Variant(2, {"lr": 1.0}, True),
    "local8-avg": Variant(8, {"lr": 1.0}, True),
    "local16-avg": Variant(16, {"lr": 1.0}, True),
    "local4-sync": Variant(4, {"lr": 1.0}, synchronous=True),
    "local4-0.6avg-ws": Variant(4, {"lr": 0.6}, True, shared_warmup=True),
    "local4-elastic": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True),
    "local4-0.7elastic": Variant(4, {"lr": 0.7, "update_rule": "elastic"}, True),
    "local4-1.5elastic": Variant(4, {"lr": 1.5, "update_rule": "elastic"}, True),
    "local4-2elastic": Variant(4, {"lr": 2.0, "update_rule": "elastic"}, True),
    "local4-2.5elastic": Variant(4, {"lr": 2.5, "update_rule": "elastic"}, True),
    "local8-elastic": Variant(8, {"lr": 1.0, "update_rule": "elastic"}, True),
    "local4-easgd-0.5": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True, resync=0.5),
    "local4-easgd-0.3": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True, resync=0.3),
    "local4-pull-1": Variant(4, {"lr": 1.0}, True, pullback=1.0),  # the elastic rule, done by the bench
    "local4-1.5pull-0.5": Variant(4, {"lr": 1.5}, True, pullback=0.5),
    "local4-1.5pull-1.5": Variant(4, {"lr": 1.5}, True, pullback=1.5),
    "local4-0.6avg-cos0.1": Variant(4, {"lr": 0.6}, True, decay=0.1),
    "local4-elastic-cos0.5": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True, decay=0.5),
    "local4-elastic-la0.5": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True, lookahead=0.5),
    "local4-elastic-la0.25": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True, lookahead=0.25),
    "local4-elastic-la0.75": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True, lookahead=0.75),
    "local4-elastic-la1": Variant(4, {"lr": 1.0, "update_rule": "elastic"}, True, lookahead=1.0),
    "local4-0.6avg-la0.5": Variant(4, {"lr": 0.6}, True, lookahead=0.5),
    "ab": Variant(braking=1.0),
    "local4-mshrink": Variant(4, {"lr": 1.0}, True, momentum_shrink=True),
}


def inner_config(spec: RunSpec, workers: int = 1):
    """The workers' AdamW; `workers` > 1 splits the warm-up's inner steps among them."""
    return default_config(
        "adamw",
        lr=spec.lr,
        beta1=spec.beta1,
        beta2=spec.beta2,
        weight_decay=spec.weight_decay,
        warmup_updates=max(1, spec.warmup // workers) if spec.warmup else 0,
    )


def flat_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def load_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy `flat` into the model's parameters. (Not vector_to_parameters: that makes them views of
    `flat`, so two workers loaded from one tensor shared their weights and trained each other's.)"""
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def grads_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


class Runner:
    """One rule at one delay: `step()` spends one push; `weights()` is the shard's model now."""

    def __init__(self, name: str, delay: int | str, spec: RunSpec, corpus, seed: int = 0, budget: int = 1000):
        self.v = VARIANTS[name]
        self.delay, self.spec = delay, spec
        self.rng = random.Random(seed)
        rand = delay == "random"
        if self.v.local_steps:
            self.workers = 3 if rand else int(delay) + 1
            self.tasks = [Task(spec, rank=r, world=self.workers, corpus=corpus) for r in range(self.workers)]
        else:
            self.workers = 2
            self.tasks = [Task(spec, rank=r, world=2, corpus=corpus) for r in range(2)]
        self.model = self.tasks[0].model
        flat0 = flat_of(self.model)
        fields = dict(self.v.outer)
        if self.v.local_steps:
            lr = fields.pop("lr", 1.0) / (self.workers if self.v.outer_lr_per_worker else 1)
            if self.v.momentum_shrink:
                momentum = 0.9 - (1 - 1 / self.workers)
                if momentum > 0:
                    fields.update(momentum=momentum, nesterov=True)
            cfg = default_config("sgd", lr=lr, local_steps=self.v.local_steps, **fields)
        else:
            base = {
                "lr": spec.lr,
                "beta1": spec.beta1,
                "beta2": spec.beta2,
                "eps": 1e-8,
                "weight_decay": spec.weight_decay,
                "warmup_updates": spec.warmup,
            }
            cfg = default_config("adamw", **{**base, **fields})
        history = 5 if rand else int(delay) + 1
        self.store = ShardStore("bench", flat0, cfg, history=history)
        if self.v.decay < 1:  # cosine from 1 to `decay` over the run's pushes (synchronous: rounds)
            pushes = budget / (self.v.local_steps * (self.workers if self.v.synchronous else 1))
            base, lo = self.store.lr_scale, self.v.decay

            def decayed(staleness: int) -> float:
                frac = min(1.0, self.store.version / pushes)
                return base(staleness) * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))

            self.store.lr_scale = decayed
        self.history = [flat0.clone()]  # gradient rules: the weights of the last versions
        self.batches = 0
        self.velocity = torch.zeros_like(flat0)  # Adaptive Braking: the running mean of pushed gradients
        if self.v.local_steps:
            inner = inner_config(spec, self.workers if self.v.shared_warmup else 1)
            elastic = self.v.outer.get("update_rule") == "elastic"
            self.locals = [
                LocalSteps(t.model, inner, self.v.local_steps, 0, self.v.lookahead, self.workers, elastic)
                for t in self.tasks
            ]
            self.read = [0] * self.workers
            self.centre = [flat0.clone() for _ in range(self.workers)]  # the shard's weights each worker last pulled
            for t in self.tasks:
                load_flat(t.model, flat0)
            self.turn = 0

    def weights(self) -> torch.Tensor:
        snap = self.store.lease()
        try:
            return snap.weights.clone()
        finally:
            self.store.release(snap)

    def step(self) -> None:
        if self.v.local_steps:
            self._local_push()
        else:
            self._gradient_update()

    def _gradient_update(self) -> None:
        u = self.store.version
        d = self.rng.randint(0, 4) if self.delay == "random" else int(self.delay)
        read = max(0, u - d)
        load_flat(self.model, self.history[read - u - 1] if read - u - 1 >= -len(self.history) else self.history[0])
        x, y = self.tasks[u % 2].batch()
        self.model.zero_grad(set_to_none=True)
        self.model.loss(x, y).backward()
        self.store.apply(self._brake(grads_of(self.model)), read)
        self.history = (self.history + [self.weights()])[-6:]
        self.batches += 1

    def _brake(self, g: torch.Tensor) -> torch.Tensor:
        """Adaptive Braking: g x (1 - rho cos(g, v)); v follows the pushed gradients (beta1)."""
        if not self.v.braking:
            return g
        v = self.velocity
        cos = float(g @ v) / (float(g.norm() * v.norm()) + 1e-12)
        g = g * (1 - self.v.braking * cos)
        v.mul_(self.spec.beta1).add_(g, alpha=1 - self.spec.beta1)
        return g

    def _synchronous_round(self) -> None:
        """Synchronous local steps (DiLoCo with outer lr 1 when averaged): every worker from the same weights."""
        w = self.weights()
        total = torch.zeros_like(w)
        for task, local in zip(self.tasks, self.locals):
            load_flat(task.model, w)
            local.begin()
            for _ in range(local.steps):
                x, y = task.batch()
                task.model.zero_grad(set_to_none=True)
                task.model.loss(x, y).backward()
                local.step()
            local.finish()
            total += grads_of(task.model)
            task.model.zero_grad(set_to_none=True)
            self.batches += local.steps
        self.store.apply(total / len(self.tasks), self.store.version)

    def _local_push(self) -> None:
        if self.v.synchronous:
            return self._synchronous_round()
        if self.delay == "random":
            k = self.rng.randrange(self.workers)
        else:
            k = self.turn
            self.turn = (self.turn + 1) % self.workers
        task, local = self.tasks[k], self.locals[k]
        local.begin()
        for _ in range(local.steps):
            x, y = task.batch()
            task.model.zero_grad(set_to_none=True)
            task.model.loss(x, y).backward()
            local.step()
        local.finish()
        push = grads_of(task.model)
        if self.v.resync < 1:  # the worker started from a blend: push what the servers' rule expects, pulled − local
            push += self.centre[k] - torch.cat([w.reshape(-1) for w in local._pulled])
        if self.v.pullback:  # m (w_now - w_pulled): m = 1 is what the elastic rule adds on the server
            push += (self.weights() - torch.cat([w.reshape(-1) for w in local._pulled])) * self.v.pullback
        self.store.apply(push, self.read[k])
        task.model.zero_grad(set_to_none=True)
        centre = self.weights()  # the worker's next pull
        if self.v.resync < 1:  # EASGD's worker side: only α of the way to the shard's weights
            self.centre[k] = centre
            centre = flat_of(task.model).lerp_(centre, self.v.resync)
        load_flat(task.model, centre)
        self.read[k] = self.store.version
        self.batches += local.steps


def eval_model(runner: Runner) -> torch.nn.Module:
    model = copy.deepcopy(runner.model)
    load_flat(model, runner.weights())
    return model
