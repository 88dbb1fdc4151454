"""Compressed tensors on the wire: what a compression name means, in exactly one place.

Servers keep fp32 master weights and optimizer state; only the bytes on the wire change.
A worker chooses one compression (`ps-worker --compression`, sent at Register, where an
unknown name is refused INVALID_ARGUMENT) and names it in every data-plane push
(`PushHeader.compression`) and pull (`PullRequest.compression`):

| name     | push payload                                   | pull payload        | bytes / element |
| ---      | ---                                            | ---                 | ---             |
| `none`   | float32                                        | float32             | 4 / 4           |
| `bf16`   | bfloat16 (`grad.to(torch.bfloat16)`)           | bfloat16            | 2 / 2           |
| `fp16`   | float16 (`grad.to(torch.float16)`)             | float16             | 2 / 2           |
| `onebit` | signs + one scale per block, error feedback    | float32             | ~0.13 / 4       |

The promises, byte-exact: a bf16/fp16 pull delivers exactly `w.to(dtype)` of the shard's
fp32 weights (round to nearest even, as torch); a bf16/fp16 push is applied as exactly
`g.to(dtype).to(torch.float32)`; a onebit push is applied as exactly `decode(encode(c))`,
where the worker compresses c = gradient + residual and keeps residual = c - decode(encode(c))
for its next push (error feedback, as 1-bit SGD and BytePS), reset when it re-registers.

onebit layout (little-endian): `ceil(n / BLOCK)` float32 scales, then `ceil(n / 8)` bytes of
sign bits, element i at bit i % 8 of byte i // 8 (1: the element was >= 0). Element i
decodes to +scale or -scale of its block, scale = mean |c| over the block. Sizes depend
only on n, so both ends check a payload's length before reading it.

Pure functions on CPU tensors; thread-safe.
"""

from __future__ import annotations

import numpy as np
import torch

NAMES = ("none", "bf16", "fp16", "onebit")
BLOCK = 1024  # onebit: elements sharing one scale
_DTYPE = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check(name: str) -> str:
    """`name` as a known compression ("" counts as "none"); ValueError (INVALID_ARGUMENT) otherwise."""
    name = name or "none"
    if name not in NAMES:
        raise ValueError(f"unknown compression {name!r}; choose from {', '.join(NAMES)}")
    return name


def pull_dtype(name: str) -> torch.dtype:
    """The dtype a pull's weights travel in under compression `name`."""
    name = check(name)
    return _DTYPE.get(name, torch.float32)


def elementwise(name: str) -> bool:
    """True if a push payload is one value per element (so it can be striped by element)."""
    return check(name) != "onebit"


def push_bytes(name: str, numel: int) -> int:
    """Bytes of a push payload of `numel` elements."""
    name = check(name)
    if name == "onebit":
        return 4 * -(-numel // BLOCK) + -(-numel // 8)
    return numel * _DTYPE[name].itemsize


def encode(name: str, x: torch.Tensor) -> torch.Tensor:
    """The push payload of a 1-D float32 CPU tensor `x`: a contiguous tensor whose bytes are sent."""
    name = check(name)
    if name != "onebit":
        return x.to(_DTYPE[name]).contiguous()
    n = x.numel()
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, dtype=torch.float32)
    padded[:n] = x
    sums = padded.view(blocks, BLOCK).abs().sum(dim=1, dtype=torch.float64)
    counts = torch.full((blocks,), float(BLOCK), dtype=torch.float64)
    if n % BLOCK:
        counts[-1] = n % BLOCK
    scales = (sums / counts).to(torch.float32)
    bits = np.packbits((x >= 0).numpy(), bitorder="little")
    out = torch.empty(4 * blocks + bits.size, dtype=torch.uint8)
    out[: 4 * blocks] = scales.view(torch.uint8)
    out[4 * blocks :] = torch.from_numpy(bits)
    return out


def decode_into(name: str, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Decode a push payload (as `encode` made it, or its raw bytes as uint8) into float32 `out`."""
    name = check(name)
    n = out.numel()
    raw = payload.reshape(-1).view(torch.uint8) if payload.dtype != torch.uint8 else payload.reshape(-1)
    if raw.numel() != push_bytes(name, n):
        raise ValueError(f"{name} payload of {raw.numel()} bytes; {n} elements need {push_bytes(name, n)}")
    if name != "onebit":
        out.copy_(raw.view(_DTYPE[name]))
        return out
    blocks = -(-n // BLOCK)
    scales = raw[: 4 * blocks].view(torch.float32)
    signs = np.unpackbits(raw[4 * blocks :].numpy(), count=n, bitorder="little")
    per = scales.repeat_interleave(BLOCK)[:n]
    torch.where(torch.from_numpy(signs).bool(), per, -per, out=out)
    return out


class ErrorFeedback:
    """The worker's onebit state: the residual carried from one push to the next (1-bit SGD).

    `compress(grad, ranges)` adds the residual to `grad` (in place), encodes each shard's
    range on its own, writes the decoded values back into `grad` (what the servers will
    apply) and keeps the difference as the next residual; returns the payloads. `reset()`
    on re-registering: what was owed to a session the servers forgot is dropped.
    """

    def __init__(self, numel: int):
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def compress(self, grad: torch.Tensor, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        grad.add_(self.residual)
        self.residual.copy_(grad)
        payloads = []
        for lo, hi in ranges:
            payloads.append(encode("onebit", grad[lo:hi]))
            decode_into("onebit", payloads[-1], grad[lo:hi])
        self.residual.sub_(grad)
        return payloads

    def reset(self) -> None:
        self.residual.zero_()
