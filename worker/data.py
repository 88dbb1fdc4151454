"""Byte-level data pipeline for the built-in training task.

Contents:

* :func:`default_corpus_path` -- the running interpreter's standard-library
  source folder (``*.py`` files, site-packages excluded).
* :class:`Corpus` -- a file or folder loaded into two uint8 tensors, ``train``
  and ``heldout``, with a held-out split that depends only on relative file
  paths (never on the machine or directory-listing order).
* :func:`worker_slice` -- the disjoint contiguous part of the training bytes
  that worker ``rank`` of ``world`` trains on.
* :class:`BatchStream` -- deterministic random (x, y) windows from a tensor.
* :func:`heldout_loss` -- mean nats per byte on a fixed set of windows.

Threading: :meth:`Corpus.load` and :func:`heldout_loss` block (file I/O,
forward passes).  A loaded :class:`Corpus` is immutable by convention and
may be shared between threads.  A :class:`BatchStream` owns a
``torch.Generator`` and is not thread-safe; give each thread its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

_SNIFF_BYTES = 4096


def default_corpus_path() -> Path:
    """The standard-library source folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(rel_path: str, modulus: int) -> bool:
    digest = hashlib.sha1(rel_path.encode("utf-8", "surrogateescape")).hexdigest()
    return int(digest, 16) % modulus == 0


def _list_files(root: Path, stdlib: bool) -> list[tuple[str, Path]]:
    """Regular files under ``root`` (no symlinks) as (posix relative path, path), sorted."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if stdlib:
            dirnames[:] = [d for d in dirnames if d != "site-packages"]
        for name in filenames:
            if stdlib and not name.endswith(".py"):
                continue
            full = Path(dirpath, name)
            if full.is_symlink() or not full.is_file():
                continue
            found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return found


def _to_tensor(data: bytes | bytearray) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass(frozen=True, eq=False)
class Corpus:
    """Training and held-out bytes of a corpus.

    ``split`` is ``"file"`` when whole files were held out (``files_train``
    and ``files_heldout`` count them) or ``"bytes"`` when the tail of the
    concatenated bytes was held out (then ``files_heldout`` is 0).
    """

    train: torch.Tensor
    heldout: torch.Tensor
    files_train: int
    files_heldout: int
    split: str

    @classmethod
    def load(cls, path: str | Path, heldout_fraction: float = 0.05, context: int = 128) -> Corpus:
        """Load a file or a folder (recursively, sorted relative-path order).

        For the default stdlib folder only ``*.py`` outside ``site-packages``
        is read; for any other folder, every regular file without a NUL byte
        in its first 4 KB.  Unreadable files are skipped.  A file is held out
        iff ``int(sha1(relative_path), 16) % round(1 / heldout_fraction) == 0``;
        a single file, or a folder where that leaves a side empty, holds out
        the last ``heldout_fraction`` of its bytes instead.

        Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for
        a bad fraction or a corpus whose train or held-out part is shorter
        than one window of ``context + 1`` bytes.
        """
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"corpus path does not exist: {root}")

        if root.is_dir():
            stdlib = root.resolve() == default_corpus_path().resolve()
            modulus = round(1.0 / heldout_fraction)
            parts: dict[bool, list[bytes]] = {False: [], True: []}
            skipped = 0
            for rel, full in _list_files(root, stdlib):
                try:
                    data = full.read_bytes()
                except OSError as exc:
                    logger.debug("skipping unreadable %s: %s", full, exc)
                    skipped += 1
                    continue
                if not stdlib and b"\0" in data[:_SNIFF_BYTES]:
                    continue
                parts[_is_heldout(rel, modulus)].append(data)
            if skipped:
                logger.info("skipped %d unreadable files under %s", skipped, root)
            if not parts[False] and not parts[True]:
                raise ValueError(f"corpus folder {root} contains no usable files")
            if parts[False] and parts[True]:
                corpus = cls(
                    train=_to_tensor(b"".join(parts[False])),
                    heldout=_to_tensor(b"".join(parts[True])),
                    files_train=len(parts[False]),
                    files_heldout=len(parts[True]),
                    split="file",
                )
            else:
                files = parts[False] or parts[True]
                corpus = cls._split_bytes(b"".join(files), heldout_fraction, len(files))
        else:
            try:
                data = root.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read corpus file {root}: {exc}") from exc
            corpus = cls._split_bytes(data, heldout_fraction, 1)

        need = context + 1
        if corpus.train.numel() < need or corpus.heldout.numel() < need:
            raise ValueError(
                f"corpus {root} is too small: {corpus.train.numel()} training and "
                f"{corpus.heldout.numel()} held-out bytes, need at least {need} each "
                f"for one context window of {context}"
            )
        logger.info(
            "corpus %s: %d train bytes (%d files), %d held-out bytes (%d files), split by %s",
            root,
            corpus.train.numel(),
            corpus.files_train,
            corpus.heldout.numel(),
            corpus.files_heldout,
            corpus.split,
        )
        return corpus

    @classmethod
    def _split_bytes(cls, data: bytes, heldout_fraction: float, n_files: int) -> Corpus:
        cut = len(data) - int(len(data) * heldout_fraction)
        return cls(
            train=_to_tensor(data[:cut]),
            heldout=_to_tensor(data[cut:]),
            files_train=n_files,
            files_heldout=0,
            split="bytes",
        )


def worker_slice(data: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Contiguous slice ``[rank*n//world, (rank+1)*n//world)`` of 1-D ``data`` (a view)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    n = data.numel()
    return data[rank * n // world : (rank + 1) * n // world]


class BatchStream:
    """Deterministic stream of random training windows (not thread-safe).

    ``next()`` returns ``(x, y)``, int64 tensors of shape ``[batch_size,
    context]`` with ``y[:, i] == x[:, i + 1]`` shifted by one byte in the data.
    Window starts are uniform over the data, drawn from a generator seeded
    with ``seed``, so equal arguments give equal streams.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, context: int, seed: int) -> None:
        if data.dim() != 1:
            raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
        if batch_size < 1 or context < 1:
            raise ValueError(f"batch_size and context must be >= 1, got {batch_size}, {context}")
        if data.numel() < context + 1:
            raise ValueError(f"data has {data.numel()} bytes, need at least {context + 1}")
        self.data = data
        self.batch_size = batch_size
        self.context = context
        self._gen = torch.Generator()
        self._gen.manual_seed(seed)
        self._offsets = torch.arange(context + 1)

    def next(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the next ``(x, y)`` batch, of ``batch_size`` windows if given (else the stream's)."""
        n = self.batch_size if batch_size is None else batch_size
        if n < 1:
            raise ValueError(f"batch_size must be >= 1, got {n}")
        high = self.data.numel() - self.context
        starts = torch.randint(0, high, (n,), generator=self._gen)
        chunk = self.data[starts.unsqueeze(1) + self._offsets].long()
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()


def heldout_windows(n: int, context: int, max_windows: int) -> list[int]:
    """Start offsets of up to ``max_windows`` evenly spaced windows of ``context + 1`` bytes."""
    last = n - context - 1
    if last < 0:
        raise ValueError(f"held-out data has {n} bytes, need at least {context + 1}")
    count = max(1, min(max_windows, (n - 1) // context))
    if count == 1:
        return [0]
    return [i * last // (count - 1) for i in range(count)]


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    heldout: torch.Tensor,
    context: int,
    max_windows: int = 64,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> float:
    """Mean cross-entropy in nats per byte over a fixed set of held-out windows.

    The windows depend only on ``heldout.numel()``, ``context`` and
    ``max_windows``, so results are comparable across calls and runs.  The
    model is put in eval mode and its previous mode restored.  ``model``
    must expose ``forward(idx) -> logits`` and already live on ``device``.
    """
    starts = torch.tensor(heldout_windows(heldout.numel(), context, max_windows))
    offsets = torch.arange(context + 1)
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    try:
        for i in range(0, starts.numel(), batch_size):
            chunk = heldout[starts[i : i + batch_size].unsqueeze(1) + offsets].long().to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            logits = model(x)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum"
                )
            )
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count
