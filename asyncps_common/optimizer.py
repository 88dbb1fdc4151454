"""Server-side optimizers: torch.optim's fused kernels run on a shard's flat fp32 vector.

SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW are element-wise,
so running them on the concatenation of a shard's pieces gives exactly the weights
`torch.optim` gives on the model's own tensors. Parameter groups (`pb.ParamGroup`,
torch.optim's param_groups) cut the flat vector into contiguous ranges, each its own
param group over a view of the vector, with its own lr, weight decay, momentum and
betas. The steps are `asyncps_common/fused.py`'s (bit-identical to torch.optim's fused
optimizers, without the 1.3 s `torch._dynamo` import torch.optim costs a server at its
first Init). Not thread-safe: the shard store serializes every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from asyncps_common import delay
from asyncps_common.fused import FusedOptimizer, GroupOptimizer
from protos.asyncps.v1 import ps_pb2 as pb

OPTIMIZERS = ("sgd", "adam", "adamw")
# settings of the whole shard, not of a group: every group's must equal the shard's
SHARD_WIDE = (
    "name",
    "staleness_aware_lr",
    "average_gradients",
    "warmup_updates",
    "balance_batches",
    "update_rule",
    "dc_lambda",
    "history_versions",
    "local_steps",
    "outer_period",
    "lr_follows_split",
)


def default_config(name: str = "sgd", lr: float = 0.01, **kw: float | bool | str) -> pb.OptimizerConfig:
    """An OptimizerConfig with torch.optim's defaults for every field not given."""
    base: dict[str, Any] = dict(
        momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8
    )
    if name == "adamw":
        base["weight_decay"] = 0.01
    base.update(kw)
    return pb.OptimizerConfig(name=name, lr=lr, **base)


def validate(
    cfg: pb.OptimizerConfig, groups: Sequence[pb.ParamGroup] = (), numel: int = 0, staleness: float | None = None
) -> None:
    """Raise ValueError with a readable reason if `cfg` cannot build an optimizer.

    `groups` (over the shard's `numel` elements) are checked too, and the update rule against
    the staleness bound `staleness` when it is given."""
    if groups:
        validate_groups(cfg, groups, numel)
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not cfg.lr > 0:
        raise ValueError(f"learning rate must be positive, got {cfg.lr}")
    if cfg.weight_decay < 0 or cfg.momentum < 0 or cfg.eps < 0:
        raise ValueError("weight_decay, momentum and eps must not be negative")
    if cfg.name == "sgd" and cfg.nesterov and (cfg.momentum <= 0 or cfg.dampening != 0):
        raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
    if cfg.name != "sgd" and not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ValueError("betas must lie in [0, 1)")
    if cfg.name != "sgd" and not cfg.eps > 0:
        raise ValueError("Adam eps must be positive (unset fields of an OptimizerConfig are 0)")
    if cfg.balance_batches and not cfg.average_gradients and not cfg.local_steps:
        raise ValueError(
            "balance_batches needs average_gradients: balanced batches are weighted in the per-clock average"
        )
    delay.validate(cfg, staleness)


def validate_groups(cfg: pb.OptimizerConfig, groups: Sequence[pb.ParamGroup], numel: int) -> None:
    """Raise ValueError unless `groups` (if any) cover [0, numel) in order, each valid and shard-wide equal to `cfg`."""
    end = 0
    for i, g in enumerate(groups):
        if g.start != end or g.stop <= g.start:
            raise ValueError(
                f"parameter group {i} covers [{g.start}, {g.stop}); groups must be non-empty, "
                f"contiguous and in order from element {end}"
            )
        end = g.stop
        validate(g.optimizer)
        for name in SHARD_WIDE:
            if getattr(g.optimizer, name) != getattr(cfg, name):
                raise ValueError(
                    f"parameter group {i} sets {name}={getattr(g.optimizer, name)!r}, which is the whole "
                    f"shard's setting ({getattr(cfg, name)!r}), not a group's"
                )
    if groups and end != numel:
        raise ValueError(f"parameter groups cover {end} of the shard's {numel} elements")


def _optimizer(cfg: pb.OptimizerConfig, groups: list[dict]) -> GroupOptimizer:
    # fused: one vectorized pass over the shard, 2-6x the apply rate of the default
    # per-op implementation on CPU (bench/wire.py), same results to fp32 round-off.
    if delay.rule_of(cfg) == "delayed-nesterov":
        return delay.DelayedNesterov(groups, lr=cfg.lr, momentum=cfg.momentum, period=cfg.outer_period or 1)
    return FusedOptimizer(cfg.name, groups, lr=cfg.lr)


def _group(cfg: pb.OptimizerConfig, param: torch.Tensor) -> dict:
    if cfg.name == "sgd":
        return dict(
            params=[param],
            lr=cfg.lr,
            momentum=cfg.momentum,
            dampening=cfg.dampening,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    return dict(params=[param], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)


class FlatOptimizer:
    """The optimizer of one shard's flat vector `flat`, cut into `groups` (none: one group)."""

    def __init__(self, cfg: pb.OptimizerConfig, flat: torch.nn.Parameter, groups: Sequence[pb.ParamGroup] = ()):
        validate(cfg)
        validate_groups(cfg, groups, flat.numel())
        self.flat, self.ranges = flat, [(int(g.start), int(g.stop)) for g in groups]
        configs = [g.optimizer for g in groups] or [cfg]
        if groups:  # leaf views of the flat vector: the optimizer steps them in place
            self.parts = [torch.nn.Parameter(flat.data[a:b], requires_grad=False) for a, b in self.ranges]
        else:
            self.parts = [flat]
        self.base_lrs = [c.lr for c in configs]
        self.opt = _optimizer(cfg, [_group(c, p) for c, p in zip(configs, self.parts)])

    def rebind(self) -> None:
        """After `flat.data` moved to another buffer: point every group's view at it."""
        for part, (a, b) in zip(self.parts, self.ranges):
            part.data = self.flat.data[a:b]

    def step(self, grad: torch.Tensor, lr_scale: float) -> None:
        """One update of the whole vector by `grad`, every group's lr times `lr_scale`."""
        for group, lr in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = lr * lr_scale
        if self.ranges:
            for part, (a, b) in zip(self.parts, self.ranges):
                part.grad = grad[a:b]
        else:
            self.flat.grad = grad
        with torch.no_grad():
            self.opt.step()
        for part in self.parts:
            part.grad = None

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def build(cfg: pb.OptimizerConfig, flat: torch.nn.Parameter) -> GroupOptimizer:
    """The optimizer `cfg` describes, over the single flat parameter `flat` (step it after setting flat.grad)."""
    return FlatOptimizer(cfg, flat).opt
