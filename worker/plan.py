"""The plan: the deterministic map from a model's parameters to shards.

`make_plan(params, num_shards)` is one pure function. It lays the parameters end to
end in their given order as one flat vector of elements and cuts that vector into
`num_shards` contiguous ranges of (almost) equal bytes, the way ps-lite's
`GetServerKeyRanges` cuts the key space. A large tensor that straddles a cut is split
into chunks, so shards balance by bytes whatever the tensor sizes: the largest shard
holds at most one element more than the smallest. Every process computes the same
plan from the same parameter list without asking anyone; servers compare its hash.

Weights travel and are stored as float32 whatever the parameters' own dtype, so the
byte balance is the element balance.

Parameter groups (torch.optim's param_groups) are part of the plan: each parameter
names its group, and `Shard.segments` are the contiguous runs of one group in a
shard, which its server updates with that group's settings. A plan with more than
one group hashes its layout too, so workers whose groups differ are refused; a plan
of one group hashes exactly as before groups existed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

PLAN_FORMAT = "asyncps.plan.v1"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the plan sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    group: int = 0  # index of its parameter group

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of parameter `name` (flattened) live at `shard_offset` in the shard."""

    name: str
    start: int
    stop: int
    shard_offset: int


@dataclass(frozen=True)
class Shard:
    """Shard `index` owns elements [lo, hi) of the model's flat vector."""

    index: int
    lo: int
    hi: int
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def segments(self, params: Sequence[ParamSpec]) -> list[tuple[int, int, int]]:
        """(start, stop, group): the runs of one parameter group in this shard, in shard offsets."""
        group_of = {p.name: p.group for p in params}
        runs: list[tuple[int, int, int]] = []
        for piece in self.pieces:
            g, a, b = group_of[piece.name], piece.shard_offset, piece.shard_offset + piece.stop - piece.start
            if runs and runs[-1][2] == g:
                runs[-1] = (runs[-1][0], b, g)
            else:
                runs.append((a, b, g))
        return runs


@dataclass(frozen=True)
class Plan:
    params: tuple[ParamSpec, ...]
    shards: tuple[Shard, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @cached_property
    def hash(self) -> str:
        """sha256 of the canonical description; equal plans have equal hashes everywhere."""
        doc = {
            "format": PLAN_FORMAT,
            "params": [[p.name, list(p.shape), p.dtype] for p in self.params],
            "num_shards": len(self.shards),
        }
        if any(p.group for p in self.params):
            doc["groups"] = [p.group for p in self.params]
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def param_specs(
    named: Iterable[tuple[str, torch.Tensor]], groups: Sequence[int] | None = None
) -> tuple[ParamSpec, ...]:
    """ParamSpecs of `module.named_parameters()` (or any (name, tensor) pairs), in order; `groups`: each one's group."""
    named = list(named)
    groups = list(groups) if groups is not None else [0] * len(named)
    return tuple(
        ParamSpec(name, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."), g)
        for (name, t), g in zip(named, groups, strict=True)
    )


def make_plan(params: Sequence[ParamSpec], num_shards: int) -> Plan:
    """Cut the parameters into `num_shards` contiguous, byte-balanced shards.

    Raises ValueError for no shards, duplicate names, or fewer elements than shards.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    total = sum(p.numel for p in params)
    if total < num_shards:
        raise ValueError(f"the model has {total} elements, too few for {num_shards} shards")
    bounds = [total * i // num_shards for i in range(num_shards + 1)]
    shards = []
    for index in range(num_shards):
        lo, hi = bounds[index], bounds[index + 1]
        pieces, base = [], 0
        for p in params:
            a, b = max(lo, base), min(hi, base + p.numel)
            if a < b:
                pieces.append(Piece(p.name, a - base, b - base, a - lo))
            base += p.numel
        shards.append(Shard(index, lo, hi, tuple(pieces)))
    return Plan(tuple(params), tuple(shards))
