"""Unit tests for worker.task: ByteGPT, TaskConfig, checkpoints and sampling."""

from __future__ import annotations

import math
from dataclasses import replace as dataclasses_replace

import pytest
import torch
from safetensors.torch import load_file

from worker.task import ByteGPT, TaskConfig, generate, load_model, save_model

SMALL = TaskConfig(context=16, d_model=32, n_layer=2, n_head=4, mlp_ratio=2)


def _model(config: TaskConfig = SMALL, seed: int = 0) -> ByteGPT:
    torch.manual_seed(seed)
    return ByteGPT(config)


def test_forward_shape_and_loss() -> None:
    model = _model()
    idx = torch.randint(0, 256, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, 256)
    loss = model.loss(idx, idx)
    assert loss.dim() == 0
    # Untrained: predictions close to uniform over 256 bytes.
    assert abs(loss.item() - math.log(256)) < 0.3


def test_forward_rejects_too_long_sequence() -> None:
    with pytest.raises(ValueError, match="context"):
        _model()(torch.zeros(1, SMALL.context + 1, dtype=torch.long))


def test_causality() -> None:
    model = _model()
    idx = torch.randint(0, 256, (2, SMALL.context))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_default_parameter_count() -> None:
    n = ByteGPT(TaskConfig()).num_parameters()
    assert 400_000 <= n <= 600_000


def test_init_is_deterministic() -> None:
    a, b = _model(seed=3), _model(seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb)
    assert not torch.equal(a.tok_emb.weight, _model(seed=4).tok_emb.weight)


def test_config_metadata_round_trip() -> None:
    config = TaskConfig(context=64, d_model=48, n_layer=3, n_head=6, mlp_ratio=3, dropout=0.1)
    meta = config.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert TaskConfig.from_metadata(meta) == config
    assert TaskConfig.from_metadata({**meta, "unrelated": "x"}) == config


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TaskConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError):
        TaskConfig(n_layer=0)
    with pytest.raises(ValueError):
        TaskConfig.from_metadata({"d_model": "wide"})


def test_save_load_round_trip(tmp_path) -> None:
    config = TaskConfig(context=16, d_model=32, n_layer=1, n_head=2, mlp_ratio=2, dropout=0.1)
    model = _model(config)
    with torch.no_grad():  # make the state differ from a fresh init
        for p in model.parameters():
            p.add_(0.01)
    path = tmp_path / "model.safetensors"
    save_model(model, config, path)
    assert sorted(load_file(str(path))) == sorted(model.state_dict())
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind

    loaded, loaded_config = load_model(path)
    assert loaded_config == config
    model.eval()
    loaded.eval()
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx), loaded(idx))


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.safetensors")


def test_generate_deterministic_and_length() -> None:
    model = _model()
    prompt = b"def f(x):\n    return" * 3  # longer than the context: must be cropped
    out = generate(model, prompt, 20, seed=5)
    assert isinstance(out, bytes) and len(out) == 20
    assert generate(model, prompt, 20, seed=5) == out
    assert generate(model, prompt, 20, seed=6) != out
    assert len(generate(model, b"", 7)) == 7
    assert generate(model, b"x", 0) == b""
    greedy = generate(model, b"abc", 5, temperature=0.0)
    assert greedy == generate(model, b"abc", 5, temperature=0.0, seed=99)


def test_generate_restores_training_mode() -> None:
    model = _model()
    model.train()
    generate(model, b"a", 2)
    assert model.training


def test_qk_norm_config_round_trips_and_rejects_non_bools() -> None:
    config = dataclasses_replace(SMALL, qk_norm=True)
    assert TaskConfig.from_metadata(config.to_metadata()) == config
    assert TaskConfig.from_metadata(SMALL.to_metadata()).qk_norm is False
    with pytest.raises(ValueError):
        TaskConfig(qk_norm=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TaskConfig.from_metadata({"qk_norm": "yes"})
    extra = sum(p.numel() for n, p in _model(config).named_parameters() if "_norm" in n)
    assert extra == SMALL.n_layer * 2 * 2 * (SMALL.d_model // SMALL.n_head)  # q and k LayerNorm, weight and bias


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(qk_norm: bool) -> None:
    """Stale updates grew the attention logits 20x (docs/benchmarks.md); with qk_norm their scale cannot matter."""
    model = _model(dataclasses_replace(SMALL, qk_norm=qk_norm))
    idx = torch.randint(0, 256, (2, SMALL.context))
    before = model(idx)
    d = SMALL.d_model
    with torch.no_grad():
        for block in model.blocks:  # queries and keys 30x larger, values untouched
            block.attn.qkv.weight[: 2 * d].mul_(30)
            block.attn.qkv.bias[: 2 * d].add_(0.5).mul_(30)
    changed = (model(idx) - before).abs().max().item()
    if qk_norm:
        assert changed < 1e-3
    else:
        assert changed > 1e-2
