"""Atomic shard checkpoints: write a temporary file, fsync it, rename it over the old one.

A checkpoint holds everything a shard needs to resume: weights, optimizer state,
version, the clock table and the shard's identity. A crash at any moment leaves
either the previous checkpoint or the new one, never a torn file. Blocking file I/O:
call from a worker thread when on an event loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "asyncps.checkpoint.v1"


def checkpoint_path(directory: str | os.PathLike, shard_index: int, num_shards: int) -> Path:
    return Path(directory) / f"shard-{shard_index:03d}-of-{num_shards:03d}.pt"


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict | None:
    """The checkpoint at `path`, or None if there is none. Raises ValueError if unreadable."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise ValueError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an asyncps checkpoint")
    return state
