"""Unit tests for worker.data: corpus loading/splitting, slices, batches, held-out loss."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from worker.data import (
    BatchStream,
    Corpus,
    default_corpus_path,
    heldout_loss,
    worker_slice,
)
from worker.task import ByteGPT, TaskConfig


def _write_folder(root: Path, n_files: int = 60) -> dict[str, bytes]:
    """Write files with unique, recognizable contents; return {relative path: bytes}."""
    files: dict[str, bytes] = {}
    for i in range(n_files):
        rel = f"pkg{i % 3}/mod_{i:03d}.py"
        body = f"# file {i:03d} <{'#' * 5}>\n".encode() + bytes([65 + i % 26]) * (50 + i)
        files[rel] = body
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    (root / "blob.bin").write_bytes(b"abc\0def" * 100)  # binary: skipped
    return files


def _expected_heldout(rel: str, fraction: float) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % round(1 / fraction) == 0


def test_default_corpus_path_is_stdlib() -> None:
    path = default_corpus_path()
    assert (path / "os.py").is_file()


def test_folder_split_by_file(tmp_path: Path) -> None:
    files = _write_folder(tmp_path)
    corpus = Corpus.load(tmp_path, heldout_fraction=0.1, context=8)
    held = sorted(r for r in files if _expected_heldout(r, 0.1))
    train = sorted(r for r in files if not _expected_heldout(r, 0.1))
    assert held and train  # the fixture exercises both sides
    assert corpus.split == "file"
    assert (corpus.files_train, corpus.files_heldout) == (len(train), len(held))
    assert corpus.train.dtype == torch.uint8 and corpus.train.dim() == 1
    assert bytes(corpus.train.tolist()) == b"".join(files[r] for r in train)
    assert bytes(corpus.heldout.tolist()) == b"".join(files[r] for r in held)
    train_bytes = bytes(corpus.train.tolist())
    for r in held:
        assert files[r][:16] not in train_bytes  # each file header is unique
    again = Corpus.load(tmp_path, heldout_fraction=0.1, context=8)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.heldout, corpus.heldout)


def test_single_file_split_by_bytes(tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    data = bytes(range(256)) * 8
    path.write_bytes(data)
    corpus = Corpus.load(path, heldout_fraction=0.25, context=16)
    assert corpus.split == "bytes"
    assert corpus.heldout.numel() == len(data) // 4
    assert bytes(corpus.train.tolist()) + bytes(corpus.heldout.tolist()) == data


def test_folder_with_one_side_empty_splits_by_bytes(tmp_path: Path) -> None:
    # With a single file the by-file split leaves one side empty.
    (tmp_path / "only.py").write_bytes(b"x = 1\n" * 200)
    corpus = Corpus.load(tmp_path, heldout_fraction=0.1, context=8)
    assert corpus.split == "bytes"
    assert corpus.train.numel() + corpus.heldout.numel() == 1200
    assert corpus.heldout.numel() == 120


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Corpus.load("/nonexistent/corpus/path")


def test_too_small_corpus(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"hello world" * 10)
    with pytest.raises(ValueError, match="too small"):
        Corpus.load(path, context=128)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable files"):
        Corpus.load(empty)
    with pytest.raises(ValueError, match="heldout_fraction"):
        Corpus.load(path, heldout_fraction=0.0)


@pytest.mark.parametrize("n, world", [(0, 1), (10, 3), (1001, 4), (5, 8)])
def test_worker_slice_disjoint_and_covering(n: int, world: int) -> None:
    data = torch.arange(n)
    parts = [worker_slice(data, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), data)
    assert sum(p.numel() for p in parts) == n
    assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1
    with pytest.raises(ValueError):
        worker_slice(data, world, world)


def test_batch_stream_deterministic_and_shifted() -> None:
    data = torch.arange(1000, dtype=torch.int64) % 251
    data = data.to(torch.uint8)
    a = BatchStream(data, batch_size=4, context=10, seed=7)
    b = BatchStream(data, batch_size=4, context=10, seed=7)
    c = BatchStream(data, batch_size=4, context=10, seed=8)
    for _ in range(3):
        xa, ya = a.next()
        xb, yb = b.next()
        assert xa.shape == ya.shape == (4, 10)
        assert xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        assert torch.equal(ya[:, -1], (xa[:, -1] + 1) % 251)  # next byte in the data
    assert not torch.equal(a.next()[0], c.next()[0])


def test_batch_stream_covers_last_window() -> None:
    data = torch.arange(13, dtype=torch.uint8)
    x, y = BatchStream(data, batch_size=64, context=11, seed=0).next()
    assert set(x[:, 0].tolist()) == {0, 1}  # both possible windows, nothing past the end
    assert int(y.max()) == 12
    with pytest.raises(ValueError):
        BatchStream(data, batch_size=1, context=13, seed=0)


def test_heldout_loss_untrained_and_fixed() -> None:
    torch.manual_seed(0)
    config = TaskConfig(context=32, d_model=32, n_layer=1, n_head=2, mlp_ratio=2)
    model = ByteGPT(config)
    model.train()
    g = torch.Generator().manual_seed(0)
    heldout = torch.randint(0, 256, (5000,), generator=g, dtype=torch.uint8)
    loss = heldout_loss(model, heldout, context=32, max_windows=20, batch_size=8)
    assert abs(loss - math.log(256)) < 0.3
    assert model.training  # mode restored
    assert heldout_loss(model, heldout, context=32, max_windows=20, batch_size=8) == loss
    # Same windows regardless of batching.
    assert heldout_loss(model, heldout, 32, max_windows=20, batch_size=3) == pytest.approx(loss)
    with pytest.raises(ValueError):
        heldout_loss(model, heldout[:32], context=32)
