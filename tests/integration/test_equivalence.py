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

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

STEPS = 20
CASES = {
    "sgd-momentum": ({"name": "sgd", "lr": 0.05, "momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "sgd-nesterov-wd": (
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    ),
    "adamw": (
        {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05},
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    ),
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

    with PSClient(
        [s.address for s in servers], model, optimizer=server_opt, staleness=0, worker_id="solo", options=FAST_FAIL
    ) as ps:
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


@pytest.mark.parametrize("rows", [(32, 32), (24, 8)], ids=["equal-batches", "unequal-batches"])
def test_two_workers_averaging_equals_one_large_batch(start_server, rows):
    """With average_gradients, each clock is ONE update: the mean gradient over both workers' samples.

    Two PSClients train concurrently (two threads, s = 0) on different data, using `rows`
    samples of their batches and saying so with each push (as with --balance-batches); the
    servers must end where a local AdamW stepping on the union of the batches ends, and
    each shard's version must count clocks, not pushes.
    """
    import threading

    servers = start_server.shards(2, staleness=0)
    addresses = [s.address for s in servers]
    cfg = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05, "average_gradients": True}
    data = [batches(STEPS, seed=11), batches(STEPS, seed=12)]
    models = [mlp(), mlp()]
    ref = copy.deepcopy(models[0])
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    errors: list[BaseException] = []
    registered = threading.Barrier(2, timeout=60)  # both live before the first push: every clock has 2 gradients

    def run(rank: int) -> None:
        try:
            with PSClient(
                addresses, models[rank], optimizer=cfg, staleness=0, worker_id=f"avg-{rank}", options=FAST_FAIL
            ) as ps:
                registered.wait()
                n = rows[rank]
                for x, y in data[rank]:
                    ps.pull()
                    torch.nn.functional.mse_loss(models[rank](x[:n]), y[:n]).backward()
                    ps.push(samples=n)
                ps.wait()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    for (x0, y0), (x1, y1) in zip(*data):
        opt.zero_grad()
        x, y = torch.cat([x0[: rows[0]], x1[: rows[1]]]), torch.cat([y0[: rows[0]], y1[: rows[1]]])
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()

    final = mlp()
    with PSClient(addresses, final, staleness=0, worker_id="reader", options=FAST_FAIL, initialize=False) as ps:
        ps.pull()
        assert ps.stats.versions == [STEPS, STEPS]  # one update per clock, not one per push
    for got, want in zip(final.parameters(), ref.parameters()):
        assert rel_err(got.detach(), want.detach()) < 1e-5
