"""Unit tests for ps_server.store, asyncps_common.optimizer and ps_server.checkpoint."""

from __future__ import annotations

import math
import os
import threading

import pytest
import torch

from asyncps_common import optimizer as optim
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server import checkpoint
from ps_server.clock import ClockTable
from ps_server.store import ShardStore

SHAPES = [(3, 4), (5,), (2, 2, 3), (), (7, 1)]
PLAN = "f" * 64

# (name, lr, OptimizerConfig fields, torch.optim constructor kwargs). torch's own defaults
# fill in what is not given on the torch side, so default_config is checked against them.
CASES = {
    "sgd": ("sgd", 0.1, {}, {}),
    "sgd-momentum": ("sgd", 0.05, dict(momentum=0.9), dict(momentum=0.9)),
    "sgd-dampening": ("sgd", 0.05, dict(momentum=0.8, dampening=0.5), dict(momentum=0.8, dampening=0.5)),
    "sgd-nesterov": ("sgd", 0.05, dict(momentum=0.9, nesterov=True), dict(momentum=0.9, nesterov=True)),
    "sgd-wd": ("sgd", 0.05, dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, weight_decay=0.01)),
    "adam": ("adam", 1e-2, {}, {}),
    "adam-wd": (
        "adam",
        3e-3,
        dict(weight_decay=0.1, beta1=0.8, beta2=0.99, eps=1e-6),
        dict(weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adamw": ("adamw", 1e-2, {}, {}),
    "adamw-custom": (
        "adamw",
        5e-3,
        dict(weight_decay=0.05, beta1=0.85, beta2=0.95, eps=1e-7),
        dict(weight_decay=0.05, betas=(0.85, 0.95), eps=1e-7),
    ),
}
TORCH_OPT = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def make_store(cfg: pb.OptimizerConfig, n: int = 40, seed: int = 0) -> ShardStore:
    g = torch.Generator().manual_seed(seed)
    return ShardStore(PLAN, torch.randn(n, generator=g), cfg)


def grads(n: int, steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for _ in range(steps)]


def weights(store: ShardStore) -> torch.Tensor:
    snap = store.lease()
    try:
        return snap.weights.clone()
    finally:
        store.release(snap)


# -- the update rule equals torch.optim ------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_flat_store_equals_torch_optim_per_parameter(case: str) -> None:
    name, lr, fields, torch_kw = CASES[case]
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    ref = TORCH_OPT[name](params, lr=lr, **torch_kw)
    store = ShardStore(PLAN, flat(params), optim.default_config(name, lr, **fields))
    assert store._opt.kind == name  # the fused kernels of torch.optim's optimizer of that name
    for step in range(20):
        gs = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        ref.step()
        version, staleness = store.apply(flat(gs), read_version=store.version)
        assert (version, staleness) == (step + 1, 0)
        torch.testing.assert_close(weights(store), flat(params), rtol=1e-6, atol=1e-7)
    assert not torch.equal(
        weights(store), flat([torch.randn(s, generator=torch.Generator().manual_seed(3)) for s in SHAPES])
    )


# -- versions and staleness --------------------------------------------------------------------


def test_apply_returns_version_and_staleness() -> None:
    store = make_store(optim.default_config("sgd", 0.01))
    g = grads(store.numel, 1)[0]
    assert store.version == 0
    assert store.apply(g, read_version=0) == (1, 0)
    assert store.apply(g, read_version=0) == (2, 1)
    assert store.apply(g, read_version=2) == (3, 0)
    assert store.apply(g, read_version=0) == (4, 3)
    assert store.apply(g, read_version=10) == (5, 0)  # never negative
    assert store.version == 5


def test_staleness_aware_lr_divides_by_staleness() -> None:
    lr = 0.2
    store = make_store(optim.default_config("sgd", lr, staleness_aware_lr=True))
    gs = grads(store.numel, 6)
    read_versions = [0, 0, 0, 1, 4, 0]  # staleness 0, 1, 2, 2, 0, 5
    for g, rv in zip(gs, read_versions):
        before = weights(store).clone()
        version, staleness = store.apply(g, read_version=rv)
        assert staleness == max(0, version - 1 - rv)
        expected = before - (lr / max(1, staleness)) * g
        torch.testing.assert_close(weights(store), expected, rtol=1e-6, atol=1e-7)
        assert store._opt.param_groups[0]["lr"] == pytest.approx(lr / max(1, staleness))


@pytest.mark.parametrize("aware", [False, True])
def test_warmup_ramps_the_lr_over_the_first_updates(aware: bool) -> None:
    lr, warmup = 0.4, 4
    store = make_store(optim.default_config("sgd", lr, warmup_updates=warmup, staleness_aware_lr=aware))
    for i, g in enumerate(grads(store.numel, 7)):
        rv = max(0, store.version - (i % 3))
        before, version_before = weights(store).clone(), store.version
        _, staleness = store.apply(g, read_version=rv)
        step_lr = lr * min(1.0, (version_before + 1) / warmup)
        if aware:
            step_lr /= max(1, staleness)
        torch.testing.assert_close(weights(store), before - step_lr * g, rtol=1e-6, atol=1e-7)


def test_without_staleness_aware_lr_the_lr_is_fixed() -> None:
    lr = 0.2
    store = make_store(optim.default_config("sgd", lr))
    g = grads(store.numel, 1)[0]
    for _ in range(3):
        store.apply(g, read_version=0)
    before = weights(store).clone()
    _, staleness = store.apply(g, read_version=0)
    assert staleness == 3
    torch.testing.assert_close(weights(store), before - lr * g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("average, live, divisor", [(True, 4, 4), (True, 1, 1), (True, 0, 1), (False, 4, 1)])
def test_average_gradients_divides_by_live_workers(average: bool, live: int, divisor: int) -> None:
    lr = 0.3
    store = make_store(optim.default_config("sgd", lr, average_gradients=average))
    g = grads(store.numel, 1)[0]
    g_copy = g.clone()
    before = weights(store).clone()
    store.apply(g, read_version=0, divisor=live)
    torch.testing.assert_close(weights(store), before - lr * g / divisor, rtol=1e-6, atol=1e-7)
    assert torch.equal(g, g_copy)  # the caller's gradient is not modified


def test_a_consumed_sum_is_divided_in_place_with_the_same_result() -> None:
    cfg = optim.default_config("adamw", 0.01, average_gradients=True)
    a, b = make_store(cfg), make_store(cfg)
    g = grads(a.numel, 1)[0] * 3
    kept, given = g.clone(), g.clone()
    a.apply(kept, read_version=0, divisor=3)
    b.apply(given, read_version=0, divisor=3, consume=True)
    assert torch.equal(weights(a), weights(b))
    assert torch.equal(kept, g) and torch.equal(given, g / 3)  # only the consumed one was divided, in place


def test_apply_does_not_modify_or_keep_the_callers_gradient() -> None:
    store = make_store(optim.default_config("sgd", 0.1, momentum=0.9, weight_decay=0.1))
    g = grads(store.numel, 1)[0]
    g_copy = g.clone()
    store.apply(g, read_version=0)
    assert torch.equal(g, g_copy)
    g.fill_(1e6)  # the caller reuses its buffer: the optimizer state must not see it
    other = make_store(optim.default_config("sgd", 0.1, momentum=0.9, weight_decay=0.1))
    other.apply(g_copy, read_version=0)
    store.apply(g_copy, read_version=1)
    other.apply(g_copy, read_version=1)
    assert torch.equal(weights(store), weights(other))


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(39),
        torch.zeros(41),
        torch.zeros(40, 1),
        torch.zeros(40, dtype=torch.float64),
        torch.zeros(40, dtype=torch.float16),
        torch.zeros(40, dtype=torch.int32),
    ],
    ids=["short", "long", "2d", "f64", "f16", "i32"],
)
def test_rejects_wrong_shape_or_dtype_and_changes_nothing(bad: torch.Tensor) -> None:
    store = make_store(optim.default_config("adam", 0.01))
    store.apply(grads(40, 1)[0], read_version=0)
    before = store.state_dict()
    with pytest.raises(ValueError, match="float32 of 40 elements"):
        store.apply(bad, read_version=0)
    after = store.state_dict()
    assert after["version"] == before["version"] == 1
    assert torch.equal(after["weights"], before["weights"])
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(after["optimizer"]["state"][0][k], before["optimizer"]["state"][0][k])


def test_constructor_rejects_non_flat_fp32() -> None:
    cfg = optim.default_config()
    for w in (torch.zeros(4, dtype=torch.float64), torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="1-D float32"):
            ShardStore(PLAN, w, cfg)
    with pytest.raises(ValueError, match="unknown optimizer"):
        ShardStore(PLAN, torch.zeros(4), pb.OptimizerConfig(name="lbfgs", lr=1))


def test_constructor_copies_the_initial_weights() -> None:
    w = torch.ones(5)
    store = ShardStore(PLAN, w, optim.default_config("sgd", 1.0))
    store.apply(torch.ones(5), read_version=0)
    assert torch.equal(w, torch.ones(5))
    assert torch.equal(weights(store), torch.zeros(5))


# -- snapshots -----------------------------------------------------------------------------------


def test_a_lease_is_the_live_weights_without_a_copy_and_cached_per_version() -> None:
    store = make_store(optim.default_config("sgd", 0.1, momentum=0.5))
    s0 = store.lease()
    assert store.lease() is s0 and s0.readers == 2 and s0.version == 0
    assert s0.weights.data_ptr() == store._flat.data_ptr()  # no copy
    store.release(s0)
    store.release(s0)
    store.apply(grads(store.numel, 1)[0], read_version=0)  # nobody reads: in place
    s1 = store.lease()
    assert s1 is not s0 and s1.version == 1 and s1.weights.data_ptr() == store._flat.data_ptr()
    assert torch.equal(s1.weights, store._flat.detach())
    store.release(s1)


def test_an_update_copies_on_write_while_a_pull_reads() -> None:
    store = make_store(optim.default_config("sgd", 0.1, momentum=0.5))
    g = grads(store.numel, 1)[0]
    s0 = store.lease()
    frozen = s0.weights.clone()
    store.apply(g, read_version=0)  # s0 is read: the update moves the live weights away first
    assert torch.equal(s0.weights, frozen)
    assert store._flat.data_ptr() != s0.weights.data_ptr() and not s0.live
    s1 = store.lease()
    assert s1.version == 1 and not torch.equal(s1.weights, frozen)
    frozen1 = s1.weights.clone()
    store.apply(g, read_version=1)  # s1 (and still s0) read
    assert torch.equal(s1.weights, frozen1) and torch.equal(s0.weights, frozen)
    ptrs = {s0.weights.data_ptr(), s1.weights.data_ptr()}
    assert store._flat.data_ptr() not in ptrs
    store.release(s0)  # an old version no pull reads: its buffer is spare
    store.release(s1)
    assert [b.data_ptr() for b in store._spare] == [s0.weights.data_ptr()]
    s2 = store.lease()  # replaces version 1's entry, which nobody reads: spare too
    assert {b.data_ptr() for b in store._spare} == ptrs
    store.apply(g, read_version=2)  # s2 read: the copy goes to a spare buffer, no allocation
    assert store._flat.data_ptr() in ptrs
    store.release(s2)


def test_the_update_rule_is_the_same_with_readers_in_between() -> None:
    cfg = optim.default_config("adam", 0.01)
    plain, read = make_store(cfg), make_store(cfg)
    held = []
    for i, g in enumerate(grads(plain.numel, 6)):
        plain.apply(g, read_version=i)
        held.append(read.lease())  # a pull reading every version: every update copies on write
        read.apply(g, read_version=i)
        if len(held) > 2:
            read.release(held.pop(0))
    assert torch.equal(weights(plain), weights(read))


@pytest.mark.parametrize("reader", [True, False])
def test_a_lease_during_an_update(reader: bool) -> None:
    """With a pull reading when the update starts, a new lease of that version is answered
    during the update; without, it waits for the update (no longer) and gets the new version."""
    store = make_store(optim.default_config("sgd", 0.1))
    first = store.lease()
    if not reader:
        store.release(first)
    real_step, started, go = store._opt.step, threading.Event(), threading.Event()

    def held_step(*args, **kw):
        started.set()
        assert go.wait(30)
        return real_step(*args, **kw)

    store._opt.step = held_step
    updater = threading.Thread(target=store.apply, args=(grads(store.numel, 1)[0], 0))
    updater.start()
    assert started.wait(30)
    got: list = []
    leaser = threading.Thread(target=lambda: got.append(store.lease()))
    leaser.start()
    leaser.join(2.0 if reader else 0.3)
    if reader:
        assert got and got[0] is first and got[0].version == 0  # answered while the step is held
    else:
        assert not got  # waiting for the update
    go.set()
    updater.join(30)
    leaser.join(30)
    assert got[0].version == (0 if reader else 1)


def test_checksum_is_sum_of_abs() -> None:
    store = make_store(optim.default_config())
    assert store.checksum() == pytest.approx(float(weights(store).double().abs().sum()), rel=1e-12)


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["sgd-momentum", "sgd-nesterov", "adam-wd", "adamw"])
@pytest.mark.parametrize("aware", [False, True])
def test_checkpoint_round_trip_continues_exactly(tmp_path, case: str, aware: bool) -> None:
    name, lr, fields, _ = CASES[case]
    cfg = optim.default_config(name, lr, staleness_aware_lr=aware, average_gradients=True, **fields)
    store = make_store(cfg, n=33)
    gs = grads(33, 12)
    for i, g in enumerate(gs[:7]):
        store.apply(g, read_version=max(0, i - 2), divisor=2)
    clocks = ClockTable(2, 10.0)
    session, _ = clocks.register("w0")
    clocks.advance("w0", session, 0)
    path = checkpoint.checkpoint_path(tmp_path / "ckpt", 1, 4)
    assert path.name == "shard-001-of-004.pt"
    checkpoint.save(path, {**store.state_dict(), "clocks": clocks.state_dict(), "shard_index": 1})

    state = checkpoint.load(path)
    assert state["format"] == checkpoint.FORMAT and state["shard_index"] == 1
    restored = ShardStore.from_state_dict(state)
    assert restored.plan_hash == PLAN
    assert restored.version == store.version == 7
    assert restored.config == cfg
    assert torch.equal(weights(restored), weights(store))
    a, b = store.state_dict()["optimizer"], restored.state_dict()["optimizer"]
    assert a["state"].keys() == b["state"].keys() == {0}
    for k, v in a["state"][0].items():
        assert torch.equal(v, b["state"][0][k]) if torch.is_tensor(v) else v == b["state"][0][k]
    assert a["param_groups"] == b["param_groups"]
    table = ClockTable(0, 10.0)
    table.load_state_dict(state["clocks"])
    assert table.restored_clock("w0") == 1  # the clock survives; the session must register again

    # The restored store goes on exactly like the original.
    for i, g in enumerate(gs[7:]):
        rv = store.version - (i % 3)
        assert store.apply(g, rv, divisor=3) == restored.apply(g, rv, divisor=3)
        assert torch.equal(weights(store), weights(restored))


def test_state_dict_is_a_copy() -> None:
    store = make_store(optim.default_config("sgd", 0.1, momentum=0.9))
    store.apply(grads(40, 1)[0], read_version=0)
    state = store.state_dict()
    w, buf = state["weights"].clone(), state["optimizer"]["state"][0]["momentum_buffer"].clone()
    store.apply(grads(40, 1, seed=5)[0], read_version=1)
    assert torch.equal(state["weights"], w)
    assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"], buf)
    assert state["version"] == 1


def test_checkpoint_save_is_atomic_and_replaces(tmp_path) -> None:
    path = checkpoint.checkpoint_path(tmp_path, 0, 1)
    assert checkpoint.load(path) is None
    checkpoint.save(path, {"version": 1, "weights": torch.ones(3)})
    checkpoint.save(path, {"version": 2, "weights": torch.full((3,), 2.0)})
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    state = checkpoint.load(path)
    assert state["version"] == 2 and torch.equal(state["weights"], torch.full((3,), 2.0))


def test_checkpoint_failed_write_keeps_the_old_one(tmp_path, monkeypatch) -> None:
    path = checkpoint.checkpoint_path(tmp_path, 2, 3)
    checkpoint.save(path, {"version": 1})

    def torn_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"version": 2})
    assert os.listdir(tmp_path) == [path.name]
    assert checkpoint.load(path)["version"] == 1


def test_checkpoint_load_rejects_bad_files(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"version": 3, "weights": torch.arange(100.0)})
    good = path.read_bytes()
    for content in (b"", b"not a checkpoint at all", good[: len(good) // 2]):
        path.write_bytes(content)
        with pytest.raises(ValueError, match="unreadable"):
            checkpoint.load(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an asyncps checkpoint"):
        checkpoint.load(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not an asyncps checkpoint"):
        checkpoint.load(path)


# -- optimizer configs ---------------------------------------------------------------------------


def test_default_config_matches_torch_defaults() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    for name, cls in TORCH_OPT.items():
        cfg = optim.default_config(name, 0.5)
        built = optim.build(cfg, torch.nn.Parameter(torch.zeros(3)))
        ref = cls(p, lr=0.5).param_groups[0]
        group = built.param_groups[0]
        assert built.kind == name
        for key in ("lr", "weight_decay", "momentum", "dampening", "nesterov", "betas", "eps"):
            if key in ref:
                assert group[key] == pytest.approx(ref[key]), (name, key)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (pb.OptimizerConfig(name="rmsprop", lr=0.1), "unknown optimizer 'rmsprop'; choose one of sgd, adam, adamw"),
        (pb.OptimizerConfig(name="", lr=0.1), "unknown optimizer ''"),
        (pb.OptimizerConfig(name="SGD", lr=0.1), "unknown optimizer 'SGD'"),
        (optim.default_config("sgd", 0.0), "learning rate must be positive, got 0.0"),
        (optim.default_config("adam", -1e-3), "learning rate must be positive"),
        (optim.default_config("sgd", math.nan), "learning rate must be positive"),
        (optim.default_config("sgd", 0.1, nesterov=True), "Nesterov momentum needs momentum > 0"),
        (optim.default_config("sgd", 0.1, nesterov=True, momentum=0.9, dampening=0.1), "dampening = 0"),
        (optim.default_config("adam", 0.1, beta1=1.0), "betas must lie in"),
        (optim.default_config("adamw", 0.1, beta2=1.5), "betas must lie in"),
        (optim.default_config("adam", 0.1, beta1=-0.1), "betas must lie in"),
        (optim.default_config("sgd", 0.1, weight_decay=-0.1), "must not be negative"),
        (optim.default_config("sgd", 0.1, momentum=-0.9), "must not be negative"),
        (optim.default_config("adam", 0.1, eps=-1e-8), "must not be negative"),
    ],
)
def test_validate_rejects_with_a_readable_message(cfg: pb.OptimizerConfig, message: str) -> None:
    with pytest.raises(ValueError) as info:
        optim.validate(cfg)
    assert message in str(info.value)
    with pytest.raises(ValueError):
        optim.build(cfg, torch.nn.Parameter(torch.zeros(2)))


@pytest.mark.parametrize(
    "cfg",
    [
        optim.default_config("sgd", 0.1),
        optim.default_config("sgd", 0.1, nesterov=True, momentum=0.9),
        optim.default_config("adam", 1e-3, beta1=0.0, beta2=0.0),
        optim.default_config("adamw", 1e-3, weight_decay=0.0),
    ],
)
def test_validate_accepts_good_configs(cfg: pb.OptimizerConfig) -> None:
    optim.validate(cfg)
