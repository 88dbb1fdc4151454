"""protos/compress.py: each compression is exactly what it promises, byte for byte."""

from __future__ import annotations

import pytest
import torch

from protos import compress


def _grad(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 1e-2 + 1e-9  # not representable in 16 bits


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_16_bit_codecs_are_torch_casts_byte_for_byte(name, dtype):
    x = _grad(5001)
    payload = compress.encode(name, x)
    assert payload.dtype == dtype and torch.equal(payload.view(torch.int16), x.to(dtype).view(torch.int16))
    assert compress.push_bytes(name, x.numel()) == 2 * x.numel() == payload.numel() * payload.element_size()
    out = torch.empty_like(x)
    compress.decode_into(name, payload.view(torch.uint8), out)  # from the raw bytes, as the server does
    assert torch.equal(out.view(torch.int32), x.to(dtype).to(torch.float32).view(torch.int32))
    assert compress.pull_dtype(name) == dtype


@pytest.mark.parametrize("n", [1, 8, 1023, 1024, 3000])
def test_onebit_is_signs_times_block_mean_magnitude(n):
    x = _grad(n, seed=n)
    x[0] = 0.0  # zero counts as non-negative
    payload = compress.encode("onebit", x)
    assert payload.dtype == torch.uint8 and payload.numel() == compress.push_bytes("onebit", n)
    blocks = -(-n // compress.BLOCK)
    assert payload.numel() == 4 * blocks + -(-n // 8)
    out = compress.decode_into("onebit", payload, torch.empty(n))
    want = torch.empty(n)
    for b in range(blocks):
        lo, hi = b * compress.BLOCK, min(n, (b + 1) * compress.BLOCK)
        scale = (x[lo:hi].double().abs().sum() / (hi - lo)).float()
        want[lo:hi] = torch.where(x[lo:hi] >= 0, scale, -scale)
    assert torch.equal(out, want)


def test_error_feedback_carries_the_residual_and_resets():
    n, steps = 2500, 6
    ef = compress.ErrorFeedback(n)
    ranges = [(0, 1200), (1200, n)]  # two shards, each encoded on its own
    sent, total = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        g = _grad(n, seed=100 + t)
        total += g.double()
        expect_c = g + ef.residual
        buf = g.clone()
        payloads = ef.compress(buf, ranges)
        for p, (lo, hi) in zip(payloads, ranges):
            assert torch.equal(compress.decode_into("onebit", p, torch.empty(hi - lo)), buf[lo:hi])
        assert torch.equal(ef.residual, expect_c - buf)  # exactly what was not sent
        sent += buf.double()
    # nothing is lost, only delayed: what was applied plus what is owed is every gradient
    assert torch.allclose(sent + ef.residual.double(), total, atol=1e-6)
    assert ef.residual.abs().sum() > 0
    ef.reset()
    assert not ef.residual.any()


def test_bad_names_and_lengths_are_refused():
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        compress.check("zip")
    assert compress.check("") == "none"
    with pytest.raises(ValueError, match="payload of 7 bytes"):
        compress.decode_into("bf16", torch.zeros(7, dtype=torch.uint8), torch.empty(4))
    with pytest.raises(ValueError, match="onebit payload"):
        compress.decode_into("onebit", torch.zeros(3, dtype=torch.uint8), torch.empty(100))
    assert not compress.elementwise("onebit") and compress.elementwise("bf16")
