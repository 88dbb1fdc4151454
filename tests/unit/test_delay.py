"""asyncps_common/delay.py on a shard store: the outer optimizers, the version history, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from asyncps_common import delay
from asyncps_common.optimizer import default_config
from ps_server.store import ShardStore

N = 64


def grads(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=gen) for _ in range(n)]


def test_delayed_nesterov_with_period_1_is_sgd_nesterov():
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(1))
    dn = ShardStore(
        "p",
        w0,
        default_config("sgd", lr=0.3, momentum=0.9, update_rule="delayed-nesterov", local_steps=4, outer_period=1),
    )
    ref = ShardStore("p", w0, default_config("sgd", lr=0.3, momentum=0.9, nesterov=True, local_steps=4))
    for g in grads(6):
        dn.apply(g.clone(), dn.version)
        ref.apply(g.clone(), ref.version)
    assert torch.allclose(dn.state_dict()["weights"], ref.state_dict()["weights"], rtol=1e-6, atol=1e-7)


def test_delayed_nesterov_momentum_only_every_period():
    w0 = torch.zeros(N)
    store = ShardStore(
        "p",
        w0,
        default_config("sgd", lr=1.0, momentum=0.5, update_rule="delayed-nesterov", local_steps=2, outer_period=3),
    )
    g = torch.ones(N)
    store.apply(g.clone(), 0)
    store.apply(g.clone(), 1)
    assert torch.allclose(store.state_dict()["weights"], -2 * g)  # two plain steps, no momentum yet
    store.apply(g.clone(), 2)  # third: m = 0.5*0 + mean(g,g,g) = g; step -lr*g - lr*beta*m
    assert torch.allclose(store.state_dict()["weights"], -3.5 * g)


@pytest.mark.parametrize(
    "cfg",
    [
        default_config("sgd", lr=0.5, momentum=0.9, update_rule="delayed-nesterov", local_steps=4, outer_period=2),
        default_config("adamw", lr=1e-2, update_rule="dc"),
        default_config("sgd", lr=0.5, local_steps=4, update_rule="elastic"),
    ],
    ids=["delayed-nesterov", "dc", "elastic"],
)
def test_checkpoint_keeps_the_outer_and_compensation_state(cfg):
    gs = grads(8)
    a = ShardStore("p", torch.randn(N, generator=torch.Generator().manual_seed(2)), cfg, history=3)
    for i, g in enumerate(gs[:5]):
        a.apply(g.clone(), max(0, i - 1))
    b = ShardStore.from_state_dict(a.state_dict())
    for i, g in enumerate(gs[5:], start=5):  # read the version just written: needs no lost history
        a.apply(g.clone(), i)
        b.apply(g.clone(), i)
    assert torch.equal(a.state_dict()["weights"], b.state_dict()["weights"])


def test_history_keeps_the_last_versions_and_counts_misses():
    h = delay.History(2)
    for v in range(4):
        h.add(v, torch.full((3,), float(v)))
    assert float(h.get(3)[0]) == 3 and float(h.get(2)[0]) == 2 and h.missed == 0
    assert float(h.get(0)[0]) == 2 and h.missed == 1  # gone: the oldest kept


def test_dc_store_compensates_and_reports_its_size():
    seen = []
    cfg = default_config("sgd", lr=0.1, update_rule="dc", dc_lambda=2.0)
    store = ShardStore("p", torch.zeros(N), cfg, history=3)
    store.observe_compensation = seen.append
    plain = ShardStore("p", torch.zeros(N), default_config("sgd", lr=0.1), history=3)
    for i, g in enumerate(grads(4)):
        store.apply(g.clone(), max(0, i - 2))
        plain.apply(g.clone(), max(0, i - 2))
    assert seen[0] == 0.0 and all(x > 0 for x in seen[1:])
    assert not torch.equal(store.state_dict()["weights"], plain.state_dict()["weights"])


def test_elastic_moves_the_weights_toward_the_workers():
    """w <- w_now + lr (w_local - w_now): a push read at version r carries w_local = w_r - delta."""
    seen = []
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
    store = ShardStore("p", w0, default_config("sgd", lr=0.4, local_steps=4, update_rule="elastic"), history=3)
    store.observe_compensation = seen.append
    kept, want = [w0.clone()], w0.clone()
    for i, g in enumerate(grads(5)):
        read = max(0, i - 2)
        store.apply(g.clone(), read)
        want = want + 0.4 * ((kept[read] - g) - want)
        kept.append(want.clone())
    assert torch.allclose(store.state_dict()["weights"], want, rtol=1e-6, atol=1e-6)
    assert seen[0] == 0.0 and all(x > 0 for x in seen[2:])


def test_history_sizes():
    dc = default_config("adamw", lr=1e-3, update_rule="dc")
    assert delay.history_size(dc, 2.0) == 3
    assert delay.history_size(dc, math.inf) == delay.UNBOUNDED_HISTORY
    assert delay.history_size(default_config("adamw", lr=1e-3, update_rule="dc", history_versions=5), math.inf) == 5
    assert delay.history_size(default_config("adamw", lr=1e-3), 2.0) == 0
    assert delay.history_size(default_config("sgd", lr=1, local_steps=4, update_rule="elastic"), 1.0) == 2


@pytest.mark.parametrize(
    "cfg,staleness,mention",
    [
        (default_config("sgd", lr=1, local_steps=2, update_rule="dc"), None, "plain gradients"),
        (default_config("sgd", lr=1, momentum=0.9, update_rule="delayed-nesterov"), None, "needs local steps"),
        (default_config("adamw", lr=1e-3, update_rule="dc", history_versions=2), 2.0, "s + 1"),
        (default_config("sgd", lr=1, outer_period=2), None, "delayed-nesterov"),
        (default_config("adamw", lr=1e-3, local_steps=2), None, "must be sgd"),
        (default_config("sgd", lr=1, history_versions=3), None, "dc and elastic update rules only"),
        (default_config("adamw", lr=1e-3, update_rule="elastic"), None, "needs local steps"),
        (default_config("sgd", lr=1, local_steps=2, update_rule="elastic", history_versions=1), 1.0, "s + 1"),
        (default_config("sgd", lr=1, local_steps=2, lr_follows_split=True), None, "dynamic local steps"),
        (
            default_config(
                "sgd", lr=1, local_steps=2, balance_batches=True, average_gradients=True, lr_follows_split=True
            ),
            None,
            "without averaging",
        ),
        (
            default_config("adamw", lr=1e-3, balance_batches=True, average_gradients=True, lr_follows_split=True),
            None,
            "dynamic",
        ),
    ],
)
def test_validate_refuses_incompatible_choices(cfg, staleness, mention):
    with pytest.raises(ValueError, match=mention.replace("+", r"\+")):
        delay.validate(cfg, staleness)
