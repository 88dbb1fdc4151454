"""Parameter groups as `torch.optim` takes them, for `PSClient(model_or_groups, ...)`.

    PSClient([{"params": decay, "weight_decay": 0.1},
              {"params": no_decay, "weight_decay": 0.0, "lr": 3e-3}],
             optimizer={"name": "adamw", "lr": 1e-3})

A group is a dict with "params" (tensors, or (name, tensor) pairs) and any of "lr",
"weight_decay", "momentum", "dampening", "nesterov" (SGD), "betas", "eps" (Adam,
AdamW), "param_names" (torch's optional key: the parameters' names); what a group does
not set comes from the `optimizer` settings, as torch.optim's defaults do. A module
or a plain list of tensors is one group. Unnamed parameters are called
`group<i>.<j>`; names and group membership go into the plan, so every worker must
give the same layout (the servers refuse another one).

`no_decay_groups(model, wd)` splits a model the way transformer recipes do: weight
decay for matrices, none for biases, LayerNorm weights and embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protos.asyncps.v1 import ps_pb2 as pb

_FIELDS = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "momentum": "momentum",
    "dampening": "dampening",
    "nesterov": "nesterov",
    "eps": "eps",
}


@dataclass
class Groups:
    """The parameters in plan order, each one's group, and each group's optimizer settings."""

    named: Sequence[tuple[str, torch.Tensor]]
    group_of: list[int]
    configs: list[pb.OptimizerConfig]


def parse(model_or_groups, base: pb.OptimizerConfig) -> Groups:
    """`model_or_groups` as Groups over `base`; ValueError for an empty, repeated or unknown setting."""
    if isinstance(model_or_groups, torch.nn.Module):
        every = list(model_or_groups.named_parameters())
        return Groups(every, [0] * len(every), [base])
    items = list(model_or_groups)
    if not items:
        raise ValueError("no parameters given: pass a model or a non-empty list of parameter groups")
    if not all(isinstance(g, dict) for g in items):
        if any(isinstance(g, dict) for g in items):
            raise ValueError("give either parameters or parameter groups (dicts), not both")
        items = [{"params": items}]
    named: list[tuple[str, torch.Tensor]] = []
    group_of: list[int] = []
    configs: list[pb.OptimizerConfig] = []
    seen: set[int] = set()
    for i, group in enumerate(items):
        unknown = set(group) - {"params", "betas", "param_names", *_FIELDS}
        if unknown:
            raise ValueError(
                f"parameter group {i}: unknown setting(s) {sorted(unknown)}; "
                f"allowed: params, param_names, betas, {', '.join(_FIELDS)}"
            )
        params = group.get("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        if not params:
            raise ValueError(f"parameter group {i} has no parameters")
        names = list(group.get("param_names") or [])
        if names and len(names) != len(params):
            raise ValueError(f"parameter group {i}: {len(names)} param_names for {len(params)} parameters")
        for j, p in enumerate(params):
            name, tensor = p if isinstance(p, tuple) else (names[j] if names else f"group{i}.{j}", p)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"parameter group {i} holds a {type(tensor).__name__}, not a tensor")
            if id(tensor) in seen:
                raise ValueError(f"parameter {name} appears in more than one group (torch.optim refuses that too)")
            seen.add(id(tensor))
            named.append((name, tensor))
            group_of.append(i)
        configs.append(_config(base, group, i))
    return Groups(named, group_of, configs)


def _config(base: pb.OptimizerConfig, group: dict, i: int) -> pb.OptimizerConfig:
    cfg = pb.OptimizerConfig()
    cfg.CopyFrom(base)
    for key, field in _FIELDS.items():
        if key in group:
            setattr(cfg, field, type(getattr(cfg, field))(group[key]))
    if "betas" in group:
        try:
            cfg.beta1, cfg.beta2 = (float(b) for b in group["betas"])
        except (TypeError, ValueError):
            raise ValueError(f"parameter group {i}: betas must be two numbers, got {group['betas']!r}") from None
    return cfg


def segments(plan, shard_index: int, configs: list[pb.OptimizerConfig]) -> list[pb.ParamGroup]:
    """The ParamGroups of one shard for its InitHeader (none when the model has one group)."""
    if len(configs) == 1:
        return []
    return [
        pb.ParamGroup(start=a, stop=b, optimizer=configs[g])
        for a, b, g in plan.shards[shard_index].segments(plan.params)
    ]


def no_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, undecayed] groups: no decay for biases, norm weights and embeddings (1-D or Embedding)."""
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(
            module, (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
        ):
            skip.update(id(p) for p in module.parameters(recurse=False))
    decay: list[tuple[str, torch.Tensor]] = []
    rest: list[tuple[str, torch.Tensor]] = []
    for name, p in model.named_parameters():
        (rest if p.dim() < 2 or id(p) in skip else decay).append((name, p))
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
