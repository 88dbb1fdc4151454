"""Update rules for stale pushes and local steps: exact against in-process references.

Real ps-server shards (two, so one tensor straddles the cut); a PSClient worker injects
delays deterministically: it pulls every step, but computes on the weights it pulled
`DELAY` steps earlier and names that pull's versions in its push. With s = 0 every
pull waits for the worker's own previous push, so the shards' versions, and with them
each push's staleness, are exactly those of the in-process reference written here
(independently of asyncps_common/delay.py): delay compensation (DC-ASGD-a) on AdamW, and
local steps (inner AdamW on the worker) under outer SGD, Nesterov, Delayed Nesterov and
elastic averaging, and with the worker's look-ahead under SGD and elastic averaging.
Two workers with s = 0 and averaging run synchronous local steps: DiLoCo.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import threading

import pytest
import torch

from asyncps_common.optimizer import default_config
from worker import PSClient
from worker.local_steps import LocalSteps

from .chains import start_chain, try_status
from .support import FAST_FAIL, batches, mlp, rel_err, status
from .test_cluster import SMALL, corpus  # noqa: F401  (corpus is a fixture)

STEPS, DELAY, H = 12, 2, 3
INNER = default_config("adamw", lr=1e-2, weight_decay=0.01)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def flat_norm(tensors) -> float:
    return float(torch.cat([t.reshape(-1) for t in tensors]).norm())


def set_params(model, values):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def dc_reference(model, data, lam: float) -> list[torch.Tensor]:
    """AdamW on gradients DELAY updates stale, each corrected by DC-ASGD-a (Zheng et al. 2017)."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    probe = copy.deepcopy(model)
    history = [[p.detach().clone() for p in params]]
    mean_sq = None
    for t, (x, y) in enumerate(data):
        read = max(0, t - DELAY)
        set_params(probe, history[read])
        probe.zero_grad()
        loss_of(probe, x, y).backward()
        grads = [q.grad.clone() for q in probe.parameters()]
        if mean_sq is None:
            mean_sq = [g * g for g in grads]
        else:
            mean_sq = [0.95 * m + 0.05 * g * g for m, g in zip(mean_sq, grads)]
        if t - read > 0:
            grads = [
                g + lam * g * g * (w.detach() - wr) / (m.sqrt() + 1e-7)
                for g, w, wr, m in zip(grads, params, history[read], mean_sq)
            ]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history[-1]


def test_delay_compensation_equals_reference(start_server):
    servers = start_server.shards(2, staleness=0)
    data = batches(STEPS)
    model = mlp()
    want = dc_reference(model, data, lam=2.0)
    uncorrected = dc_reference(model, data, lam=0.0)
    assert max(rel_err(w, u) for w, u in zip(want, uncorrected)) > 1e-4  # the compensation shows in the result
    start = [p.detach().clone() for p in model.parameters()]
    cfg = default_config(
        "adamw", lr=1e-2, weight_decay=0.01, update_rule="dc", dc_lambda=2.0, history_versions=DELAY + 1
    )
    pulled = []
    with PSClient(
        [s.address for s in servers], model, optimizer=cfg, staleness=0, worker_id="solo", options=FAST_FAIL
    ) as ps:
        for x, y in data:
            ps.pull()
            pulled.append(([p.detach().clone() for p in model.parameters()], list(ps.stats.versions)))
            weights, versions = pulled[max(0, len(pulled) - 1 - DELAY)]
            set_params(model, weights)
            loss_of(model, x, y).backward()
            ps.push(read_versions=versions)
        ps.pull()
    assert [st.version for st in map(status, (s.address for s in servers))] == [STEPS, STEPS]
    for got, w, s0 in zip(model.parameters(), want, start):
        assert rel_err(w, s0) > 1e-3
        assert rel_err(got, w) < 1e-5


def outer_reference(kind: str, lr: float, beta: float, period: int):
    """The outer step on a flat list of tensors, written out: returns step(params, pseudo_grads)."""
    state: dict = {"t": 0, "m": None, "pending": None}

    def step(params, grads):
        state["t"] += 1
        if state["m"] is None:
            state["m"] = [torch.zeros_like(g) for g in grads]
            state["pending"] = [torch.zeros_like(g) for g in grads]
        for p, g, m, pend in zip(params, grads, state["m"], state["pending"]):
            with torch.no_grad():
                if kind in ("sgd", "elastic"):
                    p -= lr * g
                elif kind == "nesterov":
                    m.mul_(beta).add_(g)
                    p -= lr * (g + beta * m)
                else:  # delayed nesterov: a plain step per push, the momentum once every `period`
                    pend += g
                    p -= lr * g
                    if state["t"] % period == 0:
                        m.mul_(beta).add_(pend / period)
                        p -= lr * beta * m
                        pend.zero_()

    return step


OUTER = {
    "sgd": {"lr": 0.5},
    "nesterov": {"lr": 0.7, "momentum": 0.9, "nesterov": True},
    "delayed-nesterov": {"lr": 0.5, "momentum": 0.9, "update_rule": "delayed-nesterov", "outer_period": 2},
    "elastic": {"lr": 0.5, "update_rule": "elastic", "history_versions": DELAY + 1},
}
LOOKAHEAD, LOOKAHEAD_P = 0.5, 3  # the worker starts 0.5 x 2/3 of the drift between its last two pulls ahead


CASES = [(kind, 0.0) for kind in OUTER] + [("sgd", LOOKAHEAD), ("elastic", LOOKAHEAD)]


@pytest.mark.parametrize(("kind", "lookahead"), CASES, ids=[k + ("-lookahead" if a else "") for k, a in CASES])
def test_local_steps_with_delay_equals_reference(start_server, kind, lookahead):
    servers = start_server.shards(2, staleness=0)
    pushes = 8
    ahead = lookahead * (LOOKAHEAD_P - 1) / LOOKAHEAD_P
    data = batches(pushes * H)
    model = mlp()
    fields = OUTER[kind]
    # reference: one worker, its own AdamW kept across pushes, starting each push from the
    # weights of the pull DELAY pushes earlier (with look-ahead: moved ahead of it by `ahead` times
    # its change since the previous pull); the servers' outer step on the pseudo-gradient
    ref, inner_model = copy.deepcopy(model), copy.deepcopy(model)
    inner = torch.optim.AdamW(inner_model.parameters(), lr=1e-2, weight_decay=0.01)
    outer = outer_reference(kind, fields["lr"], fields.get("momentum", 0.0), fields.get("outer_period", 1))
    history = [[p.detach().clone() for p in ref.parameters()]]
    for k in range(pushes):
        start_w = history[max(0, k - DELAY)]
        begin = start_w
        if ahead and k > 0:  # the worker's first pull has no previous one
            previous = history[max(0, k - 1 - DELAY)]
            begin = [w + ahead * (w - q) for w, q in zip(start_w, previous)]
        set_params(inner_model, begin)
        for x, y in data[k * H : (k + 1) * H]:
            inner.zero_grad()
            loss_of(inner_model, x, y).backward()
            inner.step()
        base = start_w if kind == "elastic" else begin  # elastic: toward the worker's weights, from the pull
        delta = [w - p.detach() for w, p in zip(base, inner_model.parameters())]
        ratio = flat_norm([b - w for b, w in zip(begin, start_w)]) / flat_norm(delta)  # the metric's value
        if kind == "elastic":  # toward the worker's weights: w_now + lr (w_local - w_now)
            delta = [d + r.detach() - w for d, r, w in zip(delta, ref.parameters(), start_w)]
        outer(list(ref.parameters()), delta)
        history.append([p.detach().clone() for p in ref.parameters()])
    start = [p.detach().clone() for p in model.parameters()]

    cfg = default_config("sgd", local_steps=H, **fields)
    local = LocalSteps(model, INNER, H, lookahead=lookahead, workers=LOOKAHEAD_P, push_from_pull=kind == "elastic")
    pulled = []
    with PSClient(
        [s.address for s in servers], model, optimizer=cfg, staleness=0, worker_id="solo", options=FAST_FAIL
    ) as ps:
        for k in range(pushes):
            ps.pull()
            pulled.append(([p.detach().clone() for p in model.parameters()], list(ps.stats.versions)))
            weights, versions = pulled[max(0, k - DELAY)]
            set_params(model, weights)
            local.begin()
            for x, y in data[k * H : (k + 1) * H]:
                loss_of(model, x, y).backward()
                local.step()
            local.finish()
            ps.push(samples=H, read_versions=versions)
        ps.pull()
    for got, w, s0 in zip(model.parameters(), ref.parameters(), start):
        assert rel_err(w, s0) > 1e-3
        assert rel_err(got, w) < 1e-5, kind
    assert local.lookahead_ratio == pytest.approx(ratio, rel=1e-4) and (ratio > 0.01) == bool(lookahead)


def test_synchronous_local_steps_two_workers_equal_diloco(start_server):
    """s = 0 with averaging and local steps: every round, both workers' H AdamW steps from the
    same weights, their pseudo-gradients averaged, one outer Nesterov step (DiLoCo)."""
    servers = start_server.shards(2, staleness=0)
    rounds = 4
    data = [batches(rounds * H, seed=10 + r) for r in range(2)]
    model = mlp()
    ref = copy.deepcopy(model)
    inners = [copy.deepcopy(model) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01) for m in inners]
    outer = outer_reference("nesterov", 0.7, 0.9, 1)
    for k in range(rounds):
        start_w = [p.detach().clone() for p in ref.parameters()]
        deltas = []
        for r in range(2):
            set_params(inners[r], start_w)
            for x, y in data[r][k * H : (k + 1) * H]:
                opts[r].zero_grad()
                loss_of(inners[r], x, y).backward()
                opts[r].step()
            deltas.append([w - p.detach() for w, p in zip(start_w, inners[r].parameters())])
        outer(list(ref.parameters()), [(a + b) / 2 for a, b in zip(*deltas)])

    cfg = default_config("sgd", lr=0.7, momentum=0.9, nesterov=True, local_steps=H, average_gradients=True)
    models = [copy.deepcopy(model) for _ in range(2)]
    errors: list[BaseException] = []
    registered = threading.Barrier(2, timeout=60)  # both live before the first push: every clock has 2

    def work(r: int) -> None:
        try:
            local = LocalSteps(models[r], INNER, H)
            with PSClient(
                [s.address for s in servers],
                models[r],
                optimizer=cfg,
                staleness=0,
                worker_id=f"w{r}",
                options=FAST_FAIL,
            ) as ps:
                registered.wait()
                for k in range(rounds):
                    ps.pull()
                    local.begin()
                    for x, y in data[r][k * H : (k + 1) * H]:
                        loss_of(models[r], x, y).backward()
                        local.step()
                    local.finish()
                    ps.push(samples=H)
                ps.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    final = mlp()
    with PSClient(
        [s.address for s in servers], final, staleness=0, worker_id="reader", options=FAST_FAIL, initialize=False
    ) as ps:
        ps.pull()
        assert ps.stats.versions == [rounds, rounds]  # one outer step per round
    for got, w, s0 in zip(final.parameters(), ref.parameters(), model.parameters()):
        assert rel_err(w, s0) > 1e-3
        assert rel_err(got, w) < 1e-5


@pytest.mark.slow
def test_cluster_with_dynamic_local_steps_records_its_mode(tmp_path, procs, corpus):
    """ps-cluster end to end with asynchronous local steps: iterations count batches, summary.json
    names the mode (with the workers' look-ahead), and with --dynamic-local-steps the slowed worker
    is given the smaller H."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [
        *[sys.executable, "-m", "worker.cluster", "--servers", "2", "--workers", "2", "--steps", "160"],
        *["--data", str(corpus), "--out", str(out), *SMALL, "--heartbeat-timeout", "10", "--no-metrics"],
        *["--staleness", "2", "--no-average-gradients", "--local-steps", "4", "--dynamic-local-steps"],
        *["--lookahead", "0.5"],
    ]
    proc = procs.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 160 and summary["local_steps"] == 4 and summary["staleness"] == 2
    assert summary["update_rule"] == "plain" and summary["outer_optimizer"] == "sgd"
    assert summary["average_gradients"] is False and summary["outer_lr"] == pytest.approx(0.6 / 2)
    assert summary["lookahead"] == 0.5 and summary["outer_lr_follows_split"] is True  # the default with dynamic H
    assert summary["heldout_loss"] < 5.0
    for rank in range(2):  # each push took the share of H the servers gave it, summing to 8 once both are measured
        lines = [json.loads(x) for x in (out / "logs" / f"worker-{rank}.jsonl").read_text().splitlines()]
        steps = [x["step"] for x in lines if x["event"] == "progress"]
        assert steps[-1] == 80 and all(b > a for a, b in itertools.pairwise(steps))


@contextlib.contextmanager
def fast_and_slow(address: str, cfg, fast: torch.nn.Module, slow: torch.nn.Module, options=FAST_FAIL):
    """Two clients of the shard at `address` (replicas joined by "|") with H = 4 each, "fast"
    training `fast` and "slow" training `slow`."""
    with contextlib.ExitStack() as stack:
        yield tuple(
            stack.enter_context(
                PSClient([address], m, optimizer=cfg, staleness=8, worker_id=w, options=options, batch_size=4)
            )
            for w, m in (("fast", fast), ("slow", slow))
        )


def test_dynamic_local_steps_split_h_by_measured_speed(start_server):
    """Without averaging, the shards still measure each worker's inner steps per second from its
    pushes and hand each its share of the combined H with the pull: the slower one gets fewer."""
    server = start_server(staleness=8)
    cfg = default_config("sgd", lr=0.5, local_steps=4, balance_batches=True)
    fast, slow = mlp(), mlp()
    with fast_and_slow(server.address, cfg, fast, slow) as (a, b):
        for _ in range(3):
            for ps, seconds in ((a, 0.1), (b, 0.3)):  # the same steps, the slow one 3x the compute time
                ps.pull()
                ps.push(samples=ps.batch_size, busy_seconds=seconds * ps.batch_size / 4)
        a.pull()
        b.pull()
        assert (a.batch_size, b.batch_size) == (6, 2)


@pytest.mark.parametrize(
    "follows, failover", [(True, False), (False, False), (True, True)], ids=["follows-split", "fixed", "new-head"]
)
def test_outer_lr_follows_the_split_of_the_push_clock(start_server, procs, tmp_path, follows, failover):
    """With lr_follows_split every push enters at the outer lr times its clock's split spread
    (largest H / mean H): 1 while the workers are equal, 6 / 4 = 1.5 once a 3x slower worker gets
    2 of the 8 steps. Without it every push enters at the outer lr alone. A replicated shard
    (new-head): the head is killed after the fast worker pulled its 6 steps and before it pushed;
    the follower, now head, applies that push at 1.5 too, from the split the old head made."""
    chain = start_chain(start_server, procs, tmp_path, staleness=8, heartbeat_timeout=3) if failover else None
    address = chain.servers_flag if chain else start_server(staleness=8).address
    cfg = default_config("sgd", lr=0.5, local_steps=4, balance_batches=True, lr_follows_split=follows)
    fast, slow = mlp(), mlp()
    g = 0.01

    def flat(model) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()

    def factor(before: torch.Tensor, after: torch.Tensor) -> float:
        """The lr factor an SGD step of lr 0.5 on the pseudo-gradient g everywhere took."""
        ratio = (before - after) / (0.5 * g)
        assert float(ratio.max() - ratio.min()) < 1e-3  # one factor for the whole shard
        return float(ratio.mean())

    with fast_and_slow(address, cfg, fast, slow, options=dataclasses.replace(FAST_FAIL, retry_seconds=60)) as (a, b):
        factors, before, fast_h = [], flat(fast), 0
        for i in range(4):
            for ps, seconds in ((a, 0.1), (b, 0.3)):  # the same steps, the slow one 3x the compute time
                ps.pull()
                if ps is a and i in (1, 3):  # the known push of round 0 or 2 is in these weights
                    factors.append(factor(before, flat(fast)))
                if ps is a and i in (0, 2):
                    fast_h = a.batch_size  # the split of the clock this push is for
                    before = flat(fast)
                    for p in fast.parameters():
                        p.grad = torch.full_like(p, g)
                    if chain and i == 2:
                        chain.servers[0].proc.kill()
                # the other pushes carry no gradient: nothing else moves the weights
                ps.push(samples=ps.batch_size, busy_seconds=seconds * ps.batch_size / 4).wait()
            if i == 2:
                assert (fast_h, b.batch_size) == (6, 2)
        assert factors[0] == pytest.approx(1.0, rel=1e-4)  # round 0: no speed measured, equal shares
        assert factors[1] == pytest.approx(1.5 if follows else 1.0, rel=1e-4)
    if chain:  # the push of round 2 reached the old follower as its new head
        assert status(chain.addresses[1]).role == "head" and try_status(chain.addresses[0]) is None
