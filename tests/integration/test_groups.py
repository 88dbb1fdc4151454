"""Parameter groups as torch.optim takes them, on real ps-server shards.

One worker at s = 0 trains a grouped MLP (matrices decayed, biases not, each group its
own lr, momentum or betas) through two servers; the weights the servers end with equal
a local torch.optim run with the same groups to 1e-5. The plan puts every matrix first
and every bias after, so shard 1 holds two groups and a matrix straddles the cut. A
second worker with another group layout is refused at Init/Register (FAILED_PRECONDITION)
and changes nothing; ungrouped settings that only a shard may hold are INVALID_ARGUMENT.
"""

from __future__ import annotations

import copy

import grpc
import pytest
import torch

from asyncps_common.optimizer import default_config
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from worker import PSClient, RpcFailed
from worker.export import pull_into
from worker.task import ByteGPT, TaskConfig
from worker.trainer import model_params

from .support import FAST_FAIL, batches, mlp, rel_err, status, stub

STEPS = 15


def split(model: torch.nn.Module) -> tuple[list, list]:
    matrices = [p for p in model.parameters() if p.dim() > 1]
    return matrices, [p for p in model.parameters() if p.dim() == 1]


CASES = {
    "sgd": (
        {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        lambda w, b: [{"params": w, "weight_decay": 0.05}, {"params": b, "lr": 0.02, "momentum": 0.5}],
        lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
    ),
    "adamw": (
        {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1},
        lambda w, b: [{"params": w}, {"params": b, "weight_decay": 0.0, "lr": 3e-3, "betas": (0.8, 0.99)}],
        lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_model_equals_torch_optim(start_server, case):
    servers = start_server.shards(2, staleness=0)
    server_opt, make_groups, local_opt = CASES[case]
    model = mlp()
    ref = copy.deepcopy(model)
    opt = local_opt(make_groups(*split(ref)))
    initial = [p.detach().clone() for p in model.parameters()]
    with PSClient(
        [s.address for s in servers],
        make_groups(*split(model)),
        optimizer=server_opt,
        staleness=0,
        worker_id="grouped",
        options=FAST_FAIL,
    ) as ps:
        shard1 = ps.plan.shards[1].segments(ps.plan.params)
        assert [g for _, _, g in shard1] == [0, 1], "shard 1 should hold the end of the matrices and the biases"
        for x, y in batches(STEPS):
            ps.pull()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push()
            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            opt.step()
        ps.pull()
        assert ps.stats.versions == [STEPS, STEPS]
    st = status(servers[1].address)
    assert st.version == STEPS
    for (name, got), want, start in zip(model.named_parameters(), ref.parameters(), initial):
        assert rel_err(want, start) > 1e-3, f"{name} barely moved: the comparison would prove nothing"
        err = rel_err(got, want)
        assert err < 1e-5, f"{case}: {name} differs from torch.optim by {err:.2e}"
    # the ungrouped run differs: the groups' own settings were really applied
    plain = mlp()
    plain_opt = local_opt(plain.parameters())
    for x, y in batches(STEPS):
        plain_opt.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        plain_opt.step()
    assert max(rel_err(a, b) for a, b in zip(plain.parameters(), ref.parameters())) > 1e-3


def test_other_group_layout_is_refused_and_changes_nothing(start_server):
    servers = start_server.shards(2, staleness=0)
    addresses = [s.address for s in servers]
    cfg = {"name": "adamw", "lr": 1e-2}
    model = mlp()
    with PSClient(
        addresses,
        [{"params": split(model)[0]}, {"params": split(model)[1], "weight_decay": 0.0}],
        optimizer=cfg,
        staleness=0,
        worker_id="first",
        options=FAST_FAIL,
    ) as ps:
        x, y = batches(1)[0]
        ps.pull()
        torch.nn.functional.mse_loss(model(x), y).backward()
        ps.push().wait()
        before = [status(a) for a in addresses]
        for layout, other in (("ungrouped", mlp()), ("groups swapped", None)):
            if other is None:
                m = mlp()
                other = [{"params": split(m)[1], "weight_decay": 0.0}, {"params": split(m)[0]}]
            with pytest.raises(RpcFailed) as err:
                PSClient(
                    addresses, other, optimizer=cfg, staleness=0, worker_id=f"other-{layout}", options=FAST_FAIL
                ).start()
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, layout
            assert "plan hash" in err.value.details
        after = [status(a) for a in addresses]
        for b, a in zip(before, after):
            assert (a.version, a.live_workers, a.plan_hash, a.pushes_applied) == (
                b.version,
                b.live_workers,
                b.plan_hash,
                b.pushes_applied,
            )
            assert [c.worker_id for c in a.clocks] == ["first"]


def test_group_that_changes_a_shard_wide_setting_is_invalid_argument(start_server):
    server = start_server()
    base = default_config("adamw", lr=1e-2)
    bad = pb.OptimizerConfig()
    bad.CopyFrom(base)
    bad.average_gradients = True
    for groups, words in (
        (
            [pb.ParamGroup(start=0, stop=4, optimizer=base), pb.ParamGroup(start=4, stop=8, optimizer=bad)],
            "average_gradients",
        ),
        ([pb.ParamGroup(start=0, stop=5, optimizer=base)], "cover 5 of"),
    ):
        head = pb.InitHeader(
            plan_hash="a" * 64, shard_index=0, num_shards=1, numel=8, optimizer=base, worker_id="w", groups=groups
        )
        with stub(server.address) as s:
            with pytest.raises(grpc.RpcError) as err:
                s.Init(iter([wire.encode_frame(pb.Frame(init=head)), *wire.chunk_frames(torch.zeros(8))]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
    assert not status(server.address).initialized


def test_built_in_task_with_undecayed_groups_trains_and_exports(start_server):
    """--no-decay-all: the workers (trainer.model_params) and the exporter (report.py) build one plan."""
    server = start_server(staleness=0)
    task = TaskConfig(context=16, d_model=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = ByteGPT(task)
    groups = model_params(model, 0.1, decay_all=False)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    undecayed = {n for n, _ in groups[1]["params"]}
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "blocks.0.ln1.bias"} <= undecayed
    assert not any(n.endswith("fc.weight") for n in undecayed)
    with PSClient(
        [server.address],
        groups,
        optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.1},
        staleness=0,
        worker_id="w",
        options=FAST_FAIL,
    ) as ps:
        x = torch.randint(0, 256, (2, 16))
        ps.pull()
        model.loss(x, x).backward()
        ps.push().wait()
        ps.pull()  # the weights after that update
    exported = ByteGPT(task)
    assert pull_into([server.address], model_params(exported, 0.1, decay_all=False), options=FAST_FAIL) == 1
    for a, b in zip(exported.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="holds no model with this plan"):  # ungrouped: another plan
        pull_into([server.address], ByteGPT(task), options=FAST_FAIL)
