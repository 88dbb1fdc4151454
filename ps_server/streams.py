"""Reading the gRPC service's tensor streams: a header frame, then chunk frames into a flat buffer.

Every malformed stream raises `FrameError` (a ValueError), which the servicer answers with
INVALID_ARGUMENT. Stateless; safe from any thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import torch

from protos import compress, wire
from protos.wire import FrameError


async def first_head(frames: AsyncIterator[bytes], kind: str):
    """The `kind` header of a stream's first frame; rejects anything else."""
    async for raw in frames:
        frame, payload = wire.decode_frame(raw)
        if frame.WhichOneof("head") != kind or payload is not None:
            raise FrameError(f"the first frame of this stream must be a bare {kind} header")
        if kind == "push" and compress.check(frame.push.compression) != "none":
            raise FrameError(f"{frame.push.compression} pushes travel on the data plane; gRPC pushes are float32")
        return getattr(frame, kind)
    raise FrameError("empty stream: expected a header frame")


async def receive_flat(frames: AsyncIterator[bytes], numel: int, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Read chunk frames into `buf` (fresh if None) that they must cover exactly once.

    Each chunk is checked for NaN/Inf right after it is copied, while it is in cache.
    """
    if buf is None:
        buf = torch.empty(numel, dtype=torch.float32)
    ranges = []
    async for raw in frames:
        frame, payload = wire.decode_frame(raw)
        if frame.WhichOneof("head") is not None:
            raise FrameError("a header frame may only come first in a stream")
        chunk = wire.payload_tensor(frame, payload)
        if chunk.dtype != torch.float32 or chunk.dim() != 1:
            raise FrameError(f"chunks must be 1-D float32, got {chunk.dtype} of shape {list(chunk.shape)}")
        lo, n = frame.tensor.offset, chunk.numel()
        if lo + n > numel:
            raise FrameError(f"chunk [{lo}, {lo + n}) runs past the shard's {numel} elements")
        dest = buf[lo : lo + n]
        dest.copy_(chunk)
        if not wire.all_finite(dest):
            raise FrameError("tensor contains NaN or Inf: not applied")
        ranges.append((lo, lo + n))
    ranges.sort()
    pos = 0
    for lo, hi in ranges:
        if lo != pos:
            what = "overlap or repeat" if lo < pos else "leave a gap"
            raise FrameError(f"chunks {what} at element {min(lo, pos)}")
        pos = hi
    if pos != numel:
        raise FrameError(f"chunks cover {pos} of the shard's {numel} elements")
    return buf
