"""ps-worker --snapshot-dir: the weights just pulled, saved whole, at most every --snapshot-every seconds."""

from __future__ import annotations

import time

import torch
from safetensors import safe_open

from worker.trainer import _Snapshots


def test_a_snapshot_holds_the_weights_and_the_time_and_comes_at_most_once_per_interval(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    snaps = _Snapshots(str(tmp_path / "s"), 60.0, rank=1)
    before = time.time()
    snaps.maybe(model, clock=7)
    snaps.maybe(model, clock=8)  # within the interval: skipped
    (path,) = (tmp_path / "s").iterdir()
    assert path.name == "weights-1-00000007.safetensors"
    with safe_open(str(path), "pt") as f:
        assert before <= float(f.metadata()["time"]) <= time.time()
        assert f.metadata()["clock"] == "7"
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_no_directory_or_no_interval_writes_nothing(tmp_path):
    model = torch.nn.Linear(2, 2)
    _Snapshots(None, 1.0, rank=0).maybe(model, clock=0)
    _Snapshots(str(tmp_path / "s"), 0.0, rank=0).maybe(model, clock=0)
    assert not (tmp_path / "s").exists()
