"""Fused SGD, Adam and AdamW with torch.optim's kernels, without `torch.optim.Optimizer`.

The first `torch.optim.Optimizer` a process builds imports `torch._dynamo`: its methods
are wrapped in `torch._disable_dynamo`, which imports it on their first call. That is
1.3–1.4 s of CPU on the 2-core VM, paid by every ps-server at its first Init and by every
ps-worker with local steps, as much as importing torch itself. `FusedOptimizer` keeps
torch.optim's param_groups and per-parameter state, and runs the same fused kernels
through torch.optim's functional forms (`torch.optim.sgd.sgd`, `adam.adam`), which do not
import it. Its steps are bit-identical to `torch.optim.SGD/Adam/AdamW(..., fused=True)`
and `state_dict()` has torch.optim's layout, so checkpoints written by either load into
the other (tests/unit/test_fused.py).

`GroupOptimizer` is the shell alone (param_groups, state, state_dict, zero_grad), for
asyncps's own outer optimizers (asyncps_common/delay.py). Fused kernels exist on CPU and
CUDA only: `supported(params)` says whether a list of parameters can use them. Not
thread-safe: one caller steps an optimizer at a time.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

KINDS = ("sgd", "adam", "adamw")
# The torch versions whose Adam takes decoupled_weight_decay run AdamW through it (2.13 does);
# older ones have a separate functional adamw.
_DECOUPLED = "decoupled_weight_decay" in inspect.signature(_adam).parameters
_COMMON = {"maximize": False, "foreach": None, "differentiable": False, "fused": True}
# Each kind's param_group keys and defaults, as torch.optim's fused optimizers make them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, **_COMMON},
    "adam": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        **_COMMON,
        "capturable": False,
        **({"decoupled_weight_decay": False} if _DECOUPLED else {}),
    },
}
DEFAULTS["adamw"] = {
    **DEFAULTS["adam"],
    "weight_decay": 1e-2,
    **({"decoupled_weight_decay": True} if _DECOUPLED else {}),
}


def supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether every parameter is on a device with fused kernels (CPU, CUDA)."""
    return all(p.device.type in ("cpu", "cuda") for p in params)


class GroupOptimizer(ABC):
    """param_groups and per-parameter state as torch.optim keeps them; subclasses define `step`."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        groups = items if isinstance(items[0], dict) else [{"params": items}]
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)  # as torch.optim's
        for g in groups:  # settings the optimizer does not use are kept, as torch.optim keeps them
            self.param_groups.append({**defaults, **g, "params": list(g["params"])})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: state by parameter index, groups with their settings and indices."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: s for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take `saved` (this class's or torch.optim's `state_dict()`). Its tensors become the state,
        as torch.optim takes them: moved only where a parameter's device or dtype differs (`step`
        as float32, for the fused kernels), so restoring a shard costs no copy of its optimizer state."""
        groups = saved["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(own["params"]) for g, own in zip(groups, self.param_groups)
        ):
            raise ValueError("the saved optimizer state has other parameter groups than this optimizer")
        by_index: dict[int, torch.Tensor] = {}
        for g, own in zip(groups, self.param_groups):
            by_index.update(zip(g["params"], own["params"]))
        self.state = defaultdict(dict)
        for i, s in saved["state"].items():
            p = by_index[int(i)]
            self.state[p] = {k: _cast(k, v, p) for k, v in s.items()}
        for g, own in zip(groups, self.param_groups):
            own.update({k: v for k, v in g.items() if k != "params"})

    @abstractmethod
    def step(self) -> None:
        """One step of every parameter that has a gradient."""


def _cast(key: str, value: Any, p: torch.Tensor) -> Any:
    if not torch.is_tensor(value):
        return value
    if key == "step":
        return value.to(dtype=torch.float32, device=p.device)
    return value.to(dtype=p.dtype, device=p.device)


class FusedOptimizer(GroupOptimizer):
    """torch.optim's fused SGD (momentum, dampening, Nesterov, weight decay), Adam or AdamW.

    `kind` is one of KINDS; `params` a list of tensors or of param-group dicts, each group's
    settings named as torch.optim names them (lr, momentum, betas, eps, weight_decay, ...).
    """

    def __init__(self, kind: str, params: Iterable[Any], **settings: Any):
        if kind not in KINDS:
            raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(KINDS)}")
        super().__init__(params, {**DEFAULTS[kind], **settings})
        self.kind = kind
        for group in self.param_groups:
            if not supported(group["params"]):
                raise ValueError("fused optimizers run on CPU and CUDA tensors only")
            if group["fused"] is not True or group["foreach"] or group["maximize"] or group["differentiable"]:
                raise ValueError("FusedOptimizer runs fused, non-maximizing, non-differentiable steps only")
            if kind == "sgd" and group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
                raise ValueError("Nesterov momentum requires a momentum and zero dampening")
            if kind != "sgd" and (group["amsgrad"] or group["capturable"]):
                raise ValueError("FusedOptimizer does not run amsgrad or capturable Adam")

    @torch.no_grad()
    def step(self) -> None:
        """One step of every parameter that has a gradient (as torch.optim's step)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._sgd if self.kind == "sgd" else self._adam)(group, params)

    def _sgd(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        momentum = group["momentum"]
        bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params] if momentum != 0 else []
        _sgd(
            params,
            [p.grad for p in params],  # type: ignore[misc]
            bufs,
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=False,
            has_sparse_grad=False,
            foreach=None,
            fused=True,
        )
        for p, buf in zip(params, bufs):  # the kernel made the first step's buffers
            self.state[p] = {"momentum_buffer": buf}

    def _adam(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = []
        for p in params:
            st = self.state.get(p)
            if not st:
                st = self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            states.append(st)
        beta1, beta2 = group["betas"]
        kw: dict[str, Any] = dict(
            amsgrad=False,
            has_complex=any(torch.is_complex(p) for p in params),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=True,
        )
        step = _adam
        if _DECOUPLED:
            kw["decoupled_weight_decay"] = group["decoupled_weight_decay"]
        elif self.kind == "adamw":
            from torch.optim.adamw import adamw as step  # type: ignore[assignment]  # torch < 2.6
        step(
            params,
            [p.grad for p in params],  # type: ignore[misc]
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            **kw,
        )
