"""Unit tests for worker.plan: determinism, coverage, balance, hash sensitivity, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.plan import ParamSpec, Plan, make_plan, param_specs

ROOT = Path(__file__).resolve().parents[2]

SPECS = (
    ParamSpec("embed.weight", (256, 64), "float32"),
    ParamSpec("blocks.0.ln.weight", (64,), "float32"),
    ParamSpec("blocks.0.attn.qkv.weight", (192, 64), "bfloat16"),
    ParamSpec("blocks.0.attn.qkv.bias", (192,), "float16"),
    ParamSpec("scale", (), "float32"),
    ParamSpec("head.weight", (256, 64), "float32"),
)


def check_plan(plan: Plan, specs: tuple[ParamSpec, ...], num_shards: int) -> None:
    """Every element of every parameter is in exactly one piece; shards tile the flat vector."""
    assert len(plan.shards) == num_shards
    assert plan.params == tuple(specs)
    total = sum(p.numel for p in specs)
    assert plan.numel == total
    base = {}
    off = 0
    for p in specs:
        base[p.name] = off
        off += p.numel
    numel = {p.name: p.numel for p in specs}

    # Shards tile [0, total) contiguously, in order.
    assert plan.shards[0].lo == 0 and plan.shards[-1].hi == total
    for i, s in enumerate(plan.shards):
        assert s.index == i
        assert s.numel == s.hi - s.lo > 0
        if i:
            assert s.lo == plan.shards[i - 1].hi

    covered: dict[str, list[tuple[int, int]]] = {p.name: [] for p in specs}
    for s in plan.shards:
        # Pieces' shard offsets tile [0, shard.numel) in order, with no gap and no overlap.
        at = 0
        for piece in s.pieces:
            assert piece.shard_offset == at
            assert 0 <= piece.start < piece.stop <= numel[piece.name]
            # The piece is exactly where the flat vector puts it.
            assert s.lo + piece.shard_offset == base[piece.name] + piece.start
            at += piece.stop - piece.start
            covered[piece.name].append((piece.start, piece.stop))
        assert at == s.numel
    for name, ranges in covered.items():
        ranges.sort()
        at = 0
        for a, b in ranges:
            assert a == at, f"{name}: gap or overlap at {at}"
            at = b
        assert at == numel[name]


def gather_scatter_roundtrip(plan: Plan, specs: tuple[ParamSpec, ...]) -> None:
    """Cutting real tensors into shards by the plan and pasting them back is the identity."""
    tensors = {p.name: torch.randn(p.shape) for p in specs}
    shards = []
    for s in plan.shards:
        buf = torch.full((s.numel,), float("nan"))
        for piece in s.pieces:
            n = piece.stop - piece.start
            buf[piece.shard_offset : piece.shard_offset + n] = tensors[piece.name].reshape(-1)[piece.start : piece.stop]
        assert not torch.isnan(buf).any()
        shards.append(buf)
    assert torch.equal(torch.cat(shards), torch.cat([t.reshape(-1) for t in tensors.values()]))
    back = {p.name: torch.full((p.numel,), float("nan")) for p in specs}
    for s, buf in zip(plan.shards, shards):
        for piece in s.pieces:
            back[piece.name][piece.start : piece.stop] = buf[
                piece.shard_offset : piece.shard_offset + piece.stop - piece.start
            ]
    for p in specs:
        assert torch.equal(back[p.name].view(p.shape), tensors[p.name])


# -- determinism ------------------------------------------------------------------------


def test_same_specs_same_plan_and_hash() -> None:
    for s in range(1, 6):
        a, b = make_plan(SPECS, s), make_plan(list(SPECS), s)
        assert a == b
        assert a.hash == b.hash
        assert len(a.hash) == 64 and int(a.hash, 16) >= 0


def test_param_specs_from_module() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2).to(torch.float64))
    specs = param_specs(model.named_parameters())
    assert specs == tuple(ParamSpec(n, tuple(t.shape), str(t.dtype).split(".")[1]) for n, t in model.named_parameters())
    assert specs[0] == ParamSpec("0.weight", (3, 5), "float32")
    assert specs[-1] == ParamSpec("2.bias", (2,), "float64")
    # A second, separately built model of the same architecture gives the same hash.
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2).to(torch.float64))
    assert make_plan(param_specs(other.named_parameters()), 2).hash == make_plan(specs, 2).hash


_SUBPROCESS_HASH = (
    "from worker.plan import ParamSpec, make_plan\n"
    "specs = [ParamSpec(n, tuple(s), d) for n, s, d in {specs!r}]\n"
    "for k in range(1, 6):\n"
    "    print(make_plan(specs, k).hash)\n"
)


def test_hash_is_the_same_in_fresh_processes() -> None:
    """No process-dependent state: a fresh process with another str-hash seed computes the same hashes."""
    code = _SUBPROCESS_HASH.format(specs=[(p.name, list(p.shape), p.dtype) for p in SPECS])
    expected = [make_plan(SPECS, k).hash for k in range(1, 6)]
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": seed},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected


# -- coverage and balance ---------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 7, 8])
def test_fixed_model_coverage(num_shards: int) -> None:
    plan = make_plan(SPECS, num_shards)
    check_plan(plan, SPECS, num_shards)
    gather_scatter_roundtrip(plan, SPECS)


def test_exactly_as_many_elements_as_shards() -> None:
    specs = (ParamSpec("a", (2,), "float32"), ParamSpec("b", (), "float32"), ParamSpec("c", (1, 1), "float32"))
    plan = make_plan(specs, 4)
    check_plan(plan, specs, 4)
    assert [s.numel for s in plan.shards] == [1, 1, 1, 1]


def test_zero_size_parameters_get_no_pieces() -> None:
    specs = (ParamSpec("empty", (0, 3), "float32"), ParamSpec("w", (10,), "float32"), ParamSpec("e2", (0,), "float32"))
    plan = make_plan(specs, 3)
    check_plan(plan, specs, 3)
    assert all(piece.name == "w" for s in plan.shards for piece in s.pieces)


_tiny_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
_dtypes = st.sampled_from(["float32", "float16", "bfloat16", "float64"])


@st.composite
def big_models(draw) -> tuple[ParamSpec, ...]:
    """A model of >= 4 MB of fp32 weights: one huge tensor among many tiny ones."""
    rows = draw(st.integers(1024, 4096))
    cols = draw(st.integers((1 << 20) // rows + 1, 2048))  # rows * cols > 2**20 elements = 4 MB
    tiny = draw(st.lists(_tiny_shapes, min_size=1, max_size=60))
    mid = draw(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), max_size=5))
    shapes = tiny + mid
    at = draw(st.integers(0, len(shapes)))
    shapes.insert(at, (rows, cols))
    dtypes = draw(st.lists(_dtypes, min_size=len(shapes), max_size=len(shapes)))
    return tuple(ParamSpec(f"p{i}", shape, d) for i, (shape, d) in enumerate(zip(shapes, dtypes)))


@settings(max_examples=40, deadline=None)
@given(big_models())
def test_random_big_models_cover_and_balance(specs: tuple[ParamSpec, ...]) -> None:
    total = sum(p.numel for p in specs)
    assert total * 4 >= 4 << 20
    for num_shards in range(1, 9):
        plan = make_plan(specs, num_shards)
        check_plan(plan, specs, num_shards)
        sizes = [s.numel for s in plan.shards]
        mean = total / num_shards
        assert max(sizes) <= 1.15 * mean
        assert max(sizes) - min(sizes) <= 1
        # Weights travel as fp32 whatever the dtype: bytes balance as elements do.
        assert max(sizes) * 4 - min(sizes) * 4 <= 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_tiny_shapes, _dtypes), min_size=1, max_size=20), st.integers(1, 8))
def test_random_small_models(shapes, num_shards: int) -> None:
    specs = tuple(ParamSpec(f"layer{i}.w", s, d) for i, (s, d) in enumerate(shapes))
    total = sum(p.numel for p in specs)
    if total < num_shards:
        with pytest.raises(ValueError, match="too few"):
            make_plan(specs, num_shards)
        return
    plan = make_plan(specs, num_shards)
    check_plan(plan, specs, num_shards)
    assert max(s.numel for s in plan.shards) - min(s.numel for s in plan.shards) <= 1
    gather_scatter_roundtrip(plan, specs)


# -- hash sensitivity -------------------------------------------------------------------


def _replace(specs, i, **kw):
    p = specs[i]
    new = ParamSpec(kw.get("name", p.name), kw.get("shape", p.shape), kw.get("dtype", p.dtype))
    return specs[:i] + (new,) + specs[i + 1 :]


def test_hash_changes_with_every_property() -> None:
    base = make_plan(SPECS, 3).hash
    variants = {
        "name": _replace(SPECS, 1, name="blocks.0.ln.bias"),
        "shape": _replace(SPECS, 0, shape=(64, 256)),  # same numel, other shape
        "shape-rank": _replace(SPECS, 1, shape=(1, 64)),
        "dtype": _replace(SPECS, 2, dtype="float32"),
        "order": (SPECS[1], SPECS[0]) + SPECS[2:],
        "missing": SPECS[:-1],
        "extra": SPECS + (ParamSpec("extra", (1,), "float32"),),
    }
    hashes = {k: make_plan(v, 3).hash for k, v in variants.items()}
    hashes["num_shards"] = make_plan(SPECS, 4).hash
    for k, h in hashes.items():
        assert h != base, k
    assert len(set(hashes.values())) == len(hashes)


def test_hash_does_not_collide_on_name_concatenation() -> None:
    a = (ParamSpec("ab", (1,), "float32"), ParamSpec("c", (1,), "float32"))
    b = (ParamSpec("a", (1,), "float32"), ParamSpec("bc", (1,), "float32"))
    assert make_plan(a, 1).hash != make_plan(b, 1).hash


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [0, -1])
def test_rejects_fewer_than_one_shard(num_shards: int) -> None:
    with pytest.raises(ValueError, match="num_shards must be at least 1"):
        make_plan(SPECS, num_shards)


def test_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        make_plan(SPECS + (ParamSpec("scale", (3,), "float32"),), 1)


def test_rejects_fewer_elements_than_shards() -> None:
    specs = (ParamSpec("a", (2,), "float32"), ParamSpec("b", (1,), "float32"))
    with pytest.raises(ValueError, match="3 elements, too few for 4 shards"):
        make_plan(specs, 4)
    with pytest.raises(ValueError, match="too few"):
        make_plan((), 1)
    with pytest.raises(ValueError, match="too few"):
        make_plan((ParamSpec("e", (0,), "float32"),), 1)
