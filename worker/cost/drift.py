"""Whether this machine still computes as fast as when it was calibrated.

The cost model assumes it does. On a shared or virtual machine it may not: on the 2-core
development VM the calibration's one-process probe of `small` took 55 ms per iteration, and
the same probe 67–75 ms half an hour later, while the runs predicted from that calibration
ran 12–23 % over their predictions at P = 1 (docs/benchmarks.md, "Start-up without
torch._dynamo"). `measure(cal, params)` reruns that probe now, in this process: the
calibrated model nearest `params`, one process with the calibration's threads, the faster of
two rounds of median iteration times, as `ps-cost calibrate` takes it (1–3 s on 2 cores).
`ps-cost predict` warns past `WARN_RATIO`; `ps-cost validate` records it beside every run.

It is skipped (None) where it would not compare like with like: a calibration made on another
host or on a device this machine lacks, one without a one-process compute probe (`--from-summary`),
or one whose model entries this version does not know.
Blocks for the probe; not thread-safe (it sets torch's thread count, and restores it).
"""

from __future__ import annotations

import socket
import statistics
from dataclasses import dataclass

import torch

from worker.cost.calibrate import ModelSpec, _compute_probe

WARN_RATIO = 0.10  # |now / calibrated - 1| above this: ps-cost predict warns
ROUNDS = 2
ITERS = 12  # as ps-cost calibrate's default --iters


@dataclass(frozen=True)
class Drift:
    """The one-process compute probe of `model`: at calibration and now (seconds per iteration)."""

    model: str
    calibrated_seconds: float
    now_seconds: float

    @property
    def ratio(self) -> float:
        return self.now_seconds / self.calibrated_seconds

    def large(self) -> bool:
        return abs(self.ratio - 1) > WARN_RATIO

    def describe(self) -> str:
        way = "slower" if self.ratio >= 1 else "faster"
        return (
            f"this machine computes {abs(self.ratio - 1):.0%} {way} than when calibrated "
            f"({1e3 * self.calibrated_seconds:.1f} -> {1e3 * self.now_seconds:.1f} ms per iteration of "
            f"the calibrated model {self.model!r}, one process)"
        )


def measure(cal: dict, params: int | None = None) -> Drift | None:
    """Rerun the calibration's one-process compute probe of the model nearest `params` (None: the first)."""
    if cal.get("machine", {}).get("hostname") != socket.gethostname():
        return None
    device = cal.get("settings", {}).get("device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return None
    rows = {
        r.get("model"): r
        for r in cal.get("compute", [])
        if r.get("workers") == 1 and r.get("threads") and r.get("mean_seconds")
    }
    specs = [m for m in cal.get("models", []) if m.get("name") in rows and m.get("params")]
    if not specs:
        return None
    spec = min(specs, key=lambda m: abs(m["params"] - params)) if params else specs[0]
    row = rows[spec["name"]]
    try:
        model = ModelSpec(**{k: v for k, v in spec.items() if k != "params"})
    except TypeError:  # a calibration whose model entries this version does not know: nothing to compare
        return None
    before = torch.get_num_threads()
    try:
        now = min(
            statistics.median(
                _compute_probe(
                    0,
                    None,
                    task=model.task(),
                    batch=model.batch_size,
                    threads=row["threads"],
                    iters=ITERS,
                    device=device,
                )["iter"]
            )
            for _ in range(ROUNDS)
        )
    finally:
        torch.set_num_threads(before)
    return Drift(spec["name"], float(row["mean_seconds"]), now)
