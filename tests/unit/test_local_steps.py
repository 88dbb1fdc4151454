"""The workers' look-ahead (worker/local_steps.py): where each push's inner steps start."""

from __future__ import annotations

import torch

from asyncps_common.optimizer import default_config
from worker.local_steps import LocalSteps


def pulled(model: torch.nn.Module, value: float) -> None:
    """As if a pull had just written `value` into every weight."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def weights(model: torch.nn.Module) -> list[float]:
    return [float(x) for p in model.parameters() for x in p.detach().reshape(-1)]


def test_start_ahead_of_each_pull_and_forget_the_pulls_before_a_new_registration() -> None:
    model = torch.nn.Linear(2, 1)
    local = LocalSteps(model, default_config("sgd", lr=0.1), 1, lookahead=1.0, workers=2, push_from_pull=True)
    pulled(model, 1.0)
    local.begin()  # the first pull: nothing to follow yet
    assert weights(model) == [1.0, 1.0, 1.0]
    pulled(model, 3.0)
    local.begin()  # ahead by β (P - 1)/P = 0.5 of the change since the previous pull, 2
    assert weights(model) == [4.0, 4.0, 4.0]
    local.finish()  # elastic: the push is taken from the pull, 3 - 4
    assert [float(p.grad.reshape(-1)[0]) for p in model.parameters()] == [-1.0, -1.0]
    assert abs(local.lookahead_ratio - 1.0) < 1e-6  # |start - pull| / |push|
    local.forget_pulls()  # registered again: a server may have rolled back to its checkpoint
    pulled(model, 0.0)
    local.begin()
    assert weights(model) == [0.0, 0.0, 0.0]
    pulled(model, 2.0)
    local.begin()
    assert weights(model) == [3.0, 3.0, 3.0]
    # the trainer passes the client's re-registration count with each pull: a change forgets too
    pulled(model, 4.0)
    local.begin(registrations=0)  # unchanged: ahead by 0.5 of 4 - 2
    assert weights(model) == [5.0, 5.0, 5.0]
    pulled(model, 0.0)
    local.begin(registrations=1)
    assert weights(model) == [0.0, 0.0, 0.0]
    pulled(model, 2.0)
    local.begin(registrations=1)
    assert weights(model) == [3.0, 3.0, 3.0]


def test_the_plain_rule_pushes_the_workers_own_change_from_where_it_started() -> None:
    model = torch.nn.Linear(2, 1)
    local = LocalSteps(model, default_config("sgd", lr=0.1), 1, lookahead=1.0, workers=2)
    pulled(model, 1.0)
    local.begin()
    pulled(model, 3.0)
    local.begin()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.25)  # the inner steps' change
    local.finish()
    assert [float(x) for p in model.parameters() for x in p.grad.reshape(-1)] == [0.25, 0.25, 0.25]
