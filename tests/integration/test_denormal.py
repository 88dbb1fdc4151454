"""ps-worker flushes denormal floats to zero on the CPU while it trains, and only then.

A model trained on stale weights can saturate its softmax; the tiny probabilities it then
makes are denormal floats, each of which costs the CPU about a hundred cycles (measured:
forward+backward 109 ms against 56 ms, docs/benchmarks.md, "Findings"). The
worker's training loop runs with flush-to-zero on (`--flush-denormal`, the default),
and leaves the process as it found it.
"""

from __future__ import annotations

import pytest
import torch

from asyncps_common.optimizer import default_config
from worker.task import ByteGPT, TaskConfig
from worker.trainer import WorkerConfig, train

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

TINY = TaskConfig(context=16, d_model=16, n_layer=1, n_head=2)


def flushing() -> bool:
    """True when this thread's CPU flushes denormals (a denormal times one becomes zero)."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


def run_worker(server, tmp_path, monkeypatch, flush: bool) -> list[bool]:
    """Train 3 steps in this process; returns whether denormals were flushed at each loss."""
    seen: list[bool] = []
    loss = ByteGPT.loss

    def spy(self, x, y):
        seen.append(flushing())
        return loss(self, x, y)

    monkeypatch.setattr(ByteGPT, "loss", spy)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    cfg = WorkerConfig(
        servers=[server.address],
        optimizer=default_config("adamw", lr=1e-3),
        task=TINY,
        data=str(text),
        steps=3,
        batch_size=2,
        device="cpu",
        flush_denormal=flush,
        worker_id=f"w-{flush}",
    )
    assert train(cfg)["steps"] == 3
    return seen


def test_training_flushes_denormals_and_restores_the_mode_after(start_server, tmp_path, monkeypatch):
    server = start_server()
    assert not flushing()  # torch's default
    assert run_worker(server, tmp_path, monkeypatch, flush=True) == [True, True, True]
    assert not flushing()


def test_no_flush_denormal_leaves_torch_default(start_server, tmp_path, monkeypatch):
    server = start_server()
    assert run_worker(server, tmp_path, monkeypatch, flush=False) == [False, False, False]
