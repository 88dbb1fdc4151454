"""SPEC 'Update rule': one worker with s = 0 trains exactly like plain torch.optim.

Two real ps-server shards; a small MLP whose second weight matrix straddles the shard
cut (so one tensor is updated by two servers). After 20 steps the weights the servers
hold (pulled back into the model) equal a local torch.optim run in this process, to
fp32 round-off, for SGD with momentum, SGD with Nesterov + weight decay, and AdamW.
"""

from __future__ import annotations

import copy

import pytest
import torch

from worker import PSClient

from .support import FAST_FAIL, batches, mlp, rel_err, status

STEPS = 20
CASES = {
    "sgd-momentum": ({"name": "sgd", "lr": 0.05, "momentum": 0.9},
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "sgd-nesterov-wd": ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adamw": ({"name": "adamw", "lr": 1e-2, "weight_decay": 0.05},
              lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_worker_s0_equals_torch_optim(start_server, case):
    servers = start_server.shards(2, staleness=0)
    server_opt, local_opt = CASES[case]
    data = batches(STEPS)

    model = mlp()
    ref = copy.deepcopy(model)
    opt = local_opt(ref.parameters())
    initial = [p.detach().clone() for p in model.parameters()]

    with PSClient([s.address for s in servers], model, optimizer=server_opt, staleness=0,
                  worker_id="solo", options=FAST_FAIL) as ps:
        # The plan cuts the second weight matrix in two: both servers update parts of it.
        cut = [piece.name for piece in ps.plan.shards[0].pieces][-1]
        assert cut in [piece.name for piece in ps.plan.shards[1].pieces], "no tensor straddles the shard cut"

        for x, y in data:
            ps.pull()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push()

            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            opt.step()
        ps.pull()  # the weights after all 20 updates (read-my-writes at clock 20)
        assert ps.clock == STEPS
        assert ps.stats.versions == [STEPS, STEPS]

    for st in (status(s.address) for s in servers):
        assert st.version == STEPS and st.pushes_applied == STEPS and st.pushes_rejected == 0
        assert st.optimizer.name == server_opt["name"]

    for (name, got), want, start in zip(model.named_parameters(), ref.parameters(), initial):
        assert rel_err(want, start) > 1e-3, f"{name} barely moved: the comparison would prove nothing"
        err = rel_err(got, want)
        assert err < 1e-5, f"{case}: {name} differs from torch.optim by {err:.2e} (relative)"
