"""Parameter groups: parsing torch.optim-style groups, the plan's segments and hash, the store."""

from __future__ import annotations

import pytest
import torch

from asyncps_common.optimizer import default_config
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server.store import ShardStore
from worker import groups as pg
from worker.plan import make_plan, param_specs

BASE = default_config("adamw", lr=1e-2, weight_decay=0.1)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3)
    )


def test_module_is_one_group_and_hashes_as_before_groups():
    m = model()
    g = pg.parse(m, BASE)
    assert g.group_of == [0] * len(g.named) and g.configs == [BASE]
    plan = make_plan(param_specs(g.named, g.group_of), 2)
    assert plan.hash == make_plan(param_specs(m.named_parameters()), 2).hash
    assert pg.segments(plan, 1, g.configs) == []


def test_groups_take_their_own_settings_and_the_rest_from_the_optimizer():
    m = model()
    g = pg.parse(
        [
            {"params": [m[1].weight, m[3].weight], "lr": 3e-3},
            {"params": [m[1].bias], "weight_decay": 0.0, "betas": (0.8, 0.99), "param_names": ["b1"]},
        ],
        BASE,
    )
    assert [n for n, _ in g.named] == ["group0.0", "group0.1", "b1"]
    assert g.group_of == [0, 0, 1]
    assert (g.configs[0].lr, g.configs[0].weight_decay) == (pytest.approx(3e-3), pytest.approx(0.1))
    assert (g.configs[1].lr, g.configs[1].weight_decay, g.configs[1].beta1) == (
        pytest.approx(1e-2),
        0.0,
        pytest.approx(0.8),
    )
    plan = make_plan(param_specs(g.named, g.group_of), 1)
    assert plan.shards[0].segments(plan.params) == [(0, 24 + 18, 0), (42, 48, 1)]
    assert [s.stop for s in pg.segments(plan, 0, g.configs)] == [42, 48]


def test_layouts_hash_differently():
    m = model()
    w, b = [m[1].weight], [m[1].bias]
    one = make_plan(param_specs(*_named(pg.parse([{"params": w + b}], BASE))), 1)
    two = make_plan(param_specs(*_named(pg.parse([{"params": w}, {"params": b}], BASE))), 1)
    assert one.hash != two.hash


def _named(g: pg.Groups):
    return g.named, g.group_of


@pytest.mark.parametrize(
    "groups, words",
    [
        ([], "no parameters"),
        ([{"params": []}], "no parameters"),
        ([{"params": [torch.zeros(2)], "foo": 1}], "unknown setting"),
        ([{"params": [torch.zeros(2)], "betas": 0.9}], "betas must be two numbers"),
        ("twice", "more than one group"),
        ([{"params": [torch.zeros(2)], "param_names": ["a", "b"]}], "param_names"),
    ],
)
def test_bad_groups_are_value_errors(groups, words):
    if groups == "twice":
        p = torch.zeros(2)
        groups = [{"params": [p]}, {"params": [p]}]
    with pytest.raises(ValueError, match=words):
        pg.parse(groups, BASE)


def test_no_decay_groups_leave_norms_biases_and_embeddings_undecayed():
    m = model()
    decay, rest = pg.no_decay_groups(m, 0.1)
    assert {id(p) for _, p in decay["params"]} == {id(m[1].weight), id(m[3].weight)}
    assert {id(p) for _, p in rest["params"]} == {
        id(m[0].weight),
        id(m[1].bias),
        id(m[2].weight),
        id(m[2].bias),
        id(m[3].bias),
    }
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.1, 0.0)


def test_store_steps_each_group_with_its_settings_and_checkpoints_them():
    sgd = default_config("sgd", lr=0.1, momentum=0.9)
    slow = pb.OptimizerConfig()
    slow.CopyFrom(sgd)
    slow.lr, slow.weight_decay = 0.01, 0.5
    groups = [pb.ParamGroup(start=0, stop=3, optimizer=sgd), pb.ParamGroup(start=3, stop=5, optimizer=slow)]
    w0 = torch.arange(5, dtype=torch.float32)
    store = ShardStore("p" * 64, w0, sgd, groups=groups)
    a, b = torch.nn.Parameter(w0[:3].clone()), torch.nn.Parameter(w0[3:].clone())
    ref = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.01, "weight_decay": 0.5}], lr=0.1, momentum=0.9)
    for step in range(3):
        grad = torch.full((5,), float(step + 1))
        snap = store.lease()  # a reader during the update: copy-on-write moves the weights
        store.apply(grad.clone(), store.version)
        store.release(snap)
        a.grad, b.grad = grad[:3].clone(), grad[3:].clone()
        ref.step()
    got = store.state_dict()["weights"]
    assert torch.allclose(got, torch.cat([a.detach(), b.detach()]), rtol=1e-6)
    restored = ShardStore.from_state_dict(store.state_dict())
    assert [g.stop for g in restored.groups] == [3, 5]
    restored.apply(torch.ones(5), restored.version)
    store.apply(torch.ones(5), store.version)
    assert torch.equal(restored.state_dict()["weights"], store.state_dict()["weights"])
