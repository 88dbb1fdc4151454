"""asyncps_common/fused.py: torch.optim's fused steps and state layout, without importing torch._dynamo."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch

from asyncps_common.fused import FusedOptimizer

CASES = {
    "sgd": ("sgd", torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum-wd": ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-dampening": ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3)),
    "sgd-nesterov": ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "adam-wd": ("adam", torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)),
    "adamw": ("adamw", torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6)),
}


def _pair(case: str, seed: int = 0):
    """Our optimizer and torch.optim's fused one of `case`, over equal copies of two parameter groups."""
    kind, cls, kw = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((37,), (5, 3), (4,))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": kw["lr"] / 2}]

    return ours, FusedOptimizer(kind, groups(ours), **kw), theirs, cls(groups(theirs), fused=True, **kw), gen


def _steps(params, opt, grads) -> None:
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _grads(ours, gen, n: int):
    """n steps' gradients; the last parameter has none in the second step (it is skipped, as torch skips it)."""
    return [
        [None if (i == 1 and j == 2) else torch.randn(p.shape, generator=gen) for j, p in enumerate(ours)]
        for i in range(n)
    ]


def _trained(case: str, steps: int):
    """`_pair(case)` after `steps` equal steps of both optimizers."""
    ours, opt, theirs, ref, gen = _pair(case)
    grads = _grads(ours, gen, steps)
    _steps(ours, opt, grads)
    _steps(theirs, ref, grads)
    return ours, opt, theirs, ref, gen


@pytest.mark.parametrize("case", CASES)
def test_steps_are_bit_identical_to_torch_optim_fused(case: str) -> None:
    ours, _, theirs, _, _ = _trained(case, 6)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _pair(case)[0][0])  # it moved


@pytest.mark.parametrize("case", CASES)
def test_state_dict_has_torch_optims_layout(case: str) -> None:
    _, opt, _, ref, _ = _trained(case, 3)
    mine, torch_sd = opt.state_dict(), ref.state_dict()
    assert mine["param_groups"] == torch_sd["param_groups"]
    assert mine["state"].keys() == torch_sd["state"].keys()
    for i, st in torch_sd["state"].items():
        assert mine["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(mine["state"][i][k], v) and mine["state"][i][k].dtype == v.dtype


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
def test_checkpoints_load_across_and_training_continues_identically(case: str, direction: str) -> None:
    """A checkpoint written by torch.optim (asyncps before fused.py) loads into ours, and back."""
    ours, opt, theirs, ref, gen = _trained(case, 3)
    then = _grads(ours, gen, 3)
    kind, cls, kw = CASES[case]
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in (theirs if direction == "torch-to-ours" else ours)]
    groups = [{"params": fresh[:2]}, {"params": fresh[2:], "lr": 1.0}]  # lr 1.0: the checkpoint's lrs win
    if direction == "torch-to-ours":
        restored = FusedOptimizer(kind, groups, **{**kw, "lr": 1.0})
        checkpoint = _through_a_file(ref.state_dict())
        restored.load_state_dict(checkpoint)
        for i, st in checkpoint["state"].items():  # taken over, not copied (a shard's state is large)
            p = fresh[i]
            assert all(restored.state[p][k] is v for k, v in st.items())
        _steps(theirs, ref, then)
        expected = theirs
    else:
        restored = cls(groups, fused=True, **{**kw, "lr": 1.0})
        restored.load_state_dict(_through_a_file(opt.state_dict()))
        _steps(ours, opt, then)
        expected = ours
    _steps(fresh, restored, then)
    for a, b in zip(fresh, expected):
        assert torch.equal(a, b)


def _through_a_file(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def test_bad_input_is_refused() -> None:
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        FusedOptimizer("rmsprop", p)
    with pytest.raises(ValueError, match="empty parameter list"):
        FusedOptimizer("sgd", [])
    with pytest.raises(ValueError, match="CPU and CUDA tensors only"):
        FusedOptimizer("adamw", [torch.nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        FusedOptimizer("sgd", p, nesterov=True)
    opt = FusedOptimizer("adam", p)
    with pytest.raises(ValueError, match="other parameter groups"):
        opt.load_state_dict(FusedOptimizer("adam", p + [torch.nn.Parameter(torch.zeros(2))]).state_dict())


def test_servers_and_local_steps_workers_do_not_import_torch_dynamo() -> None:
    """torch.optim's first use imports torch._dynamo (1.3 s of CPU per process); the servers' optimizers
    (every kind and the delayed-nesterov outer one) and a local-steps worker's inner loop do not use it."""
    code = textwrap.dedent(
        """
        import sys, torch
        from asyncps_common import optimizer as optim
        from ps_server.store import ShardStore
        from worker.local_steps import LocalSteps
        cfgs = [optim.default_config(n, 0.1, momentum=0.9) if n == "sgd" else optim.default_config(n, 1e-3)
                for n in optim.OPTIMIZERS]
        cfgs.append(optim.default_config("sgd", 0.5, momentum=0.9, local_steps=4,
                                         update_rule="delayed-nesterov", outer_period=2))
        for cfg in cfgs:
            store = ShardStore("plan", torch.randn(100), cfg)
            for _ in range(3):
                store.apply(torch.randn(100), read_version=store.version)
            ShardStore.from_state_dict(store.state_dict())
        model = torch.nn.Linear(8, 2)
        local = LocalSteps(model, optim.default_config("adamw", 1e-3), steps=2)
        local.begin()
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            local.step()
        print("dynamo imported:", "torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dynamo imported: False" in out.stdout
