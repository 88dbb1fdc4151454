"""After a run: held-out loss of its snapshots, throughput and time to the target loss.

Runs in peers.py's own process between runs, never while a system trains. Every
system's snapshots are evaluated the same way: `heldout_loss` on the same fixed
held-out windows: each is a state dict with the time it was taken (in-process copies for
single, DDP rank 0 and the rpc PS; for asyncps, the weights worker 0 had just pulled,
saved by `ps-worker --snapshot-dir`). The curve starts at (0, loss of the initial
weights), the same for every system.
Blocking, single-threaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from peers_common import RunSpec, merge_traces, samples_per_second
from worker.data import Corpus, heldout_loss
from worker.task import ByteGPT

OTHER_LEVELS = (3.0, 2.5, 2.2, 2.0, 1.8)  # time to each of these too, for reading the curves at other targets


class Evaluator:
    def __init__(self, spec: RunSpec, corpus: Corpus, windows: int):
        self.corpus, self.windows = corpus, windows
        torch.set_num_threads(1)  # small forward passes: one thread is fastest, and immune to a busy machine
        torch.manual_seed(spec.seed)
        self.model = ByteGPT(spec.task)
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}

    def loss(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state)
        return heldout_loss(self.model, self.corpus.heldout, self.model.config.context, max_windows=self.windows)


def crossing(curve: list[list[float]], level: float) -> float | None:
    """When `curve` ([time, loss] pairs) first reaches `level`, interpolated linearly between
    the snapshot before and the first at or below it; None if it never does.

    The first snapshot at or below the level is late by up to one snapshot interval (about
    a second: 7 % of a 13 s result); the straight line between the two snapshots that
    bracket the crossing takes most of that quantization out, the same way for every system.
    """
    for i, (t, loss) in enumerate(curve):
        if loss <= level:
            if i == 0:
                return t
            t0, l0 = curve[i - 1]
            if not math.isfinite(l0):  # no line to draw from a diverged point
                return t
            return round(t0 + (l0 - level) / (l0 - loss) * (t - t0), 3)
    return None


def evaluate(spec: RunSpec, ev: Evaluator, target: float, budget: float) -> dict:
    """Read the run's raw-*.pt files and return its row (without system/scenario labels)."""
    raws = [torch.load(p, map_location="cpu", weights_only=False) for p in sorted(Path(spec.out).glob("raw-*.pt"))]
    main = raws[0]
    t_start = main["t_start"]
    curve = [[0.0, round(ev.loss(ev.initial), 4)]]
    for t, state in main["snapshots"]:
        rel = t - t_start
        if rel <= 0 or rel > budget + 1.0:
            continue
        curve.append([round(rel, 3), round(ev.loss(state), 4)])
    trace = merge_traces([r["trace"] for r in raws])
    sps = samples_per_second(trace, t_start)
    reached = next((t for t, loss in curve if loss <= target), None)
    finite = [loss for _, loss in curve if math.isfinite(loss)]
    return {
        "samples_per_second": round(sps, 2) if sps else None,
        "time_to_target_seconds": reached,
        "time_to_target_interpolated_seconds": crossing(curve, target),
        "target_loss": target,
        "seconds_to_loss": {
            f"{level:g}": next((t for t, loss in curve if loss <= level), None) for level in OTHER_LEVELS
        },
        "final_heldout_loss": curve[-1][1],
        "best_heldout_loss": min(finite) if finite else None,
        "updates": int(main.get("updates", 0)),
        "samples": trace[-1][1] if trace else 0,
        "train_seconds": round(trace[-1][0] - t_start, 3) if trace else None,
        "curve": curve,
    }
