"""Transient stragglers: at each step, with probability P, a worker sleeps F x its compute time.

The one jitter mechanism of the project: `ps-worker --jitter P,F` and every system of
bench/peers.py's `jitter` scenario use `Jitter`, so all of them see the same pauses.
Each worker draws from its own generator, seeded by (seed, rank), one draw per step (per
batch): worker r's sequence of pauses is the same in every system and every run.
With local steps a push of H batches makes H draws and sleeps F x (its compute / H) per
hit, the same pauses per batch as H single steps. Not thread-safe: one per worker loop.
"""

from __future__ import annotations

import argparse
import random
import time


def parse_jitter(text: str) -> tuple[float, float]:
    """`P,F` (probability in [0, 1], factor >= 0) from the command line; "" or "0" is off."""
    text = text.strip()
    if text in ("", "0", "off", "none"):
        return (0.0, 0.0)
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        probability, factor = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P,F (e.g. 0.1,4), got {text!r}") from None
    if not 0.0 <= probability <= 1.0 or not factor >= 0.0:
        raise argparse.ArgumentTypeError(f"P must be in [0, 1] and F >= 0, got {text!r}")
    return (probability, factor)


class Jitter:
    """Worker `rank`'s pauses: `pause(compute_seconds, steps)` sleeps and returns the seconds slept."""

    def __init__(self, probability: float, factor: float, seed: int = 0, rank: int = 0):
        if not 0.0 <= probability <= 1.0 or factor < 0:
            raise ValueError("jitter probability must be in [0, 1] and its factor >= 0")
        self.probability, self.factor = probability, factor
        self.rng = random.Random(seed * 1_000_003 + rank)

    @property
    def active(self) -> bool:
        return self.probability > 0 and self.factor > 0

    def hits(self, steps: int = 1) -> int:
        """How many of the next `steps` steps pause (one draw each)."""
        return sum(self.rng.random() < self.probability for _ in range(steps))

    def seconds(self, compute_seconds: float, steps: int = 1) -> float:
        """The pause after `steps` steps that together took `compute_seconds` (draws, does not sleep)."""
        if not self.active or steps < 1:
            return 0.0
        return self.factor * compute_seconds / steps * self.hits(steps)

    def pause(self, compute_seconds: float, steps: int = 1) -> float:
        slept = self.seconds(compute_seconds, steps)
        if slept > 0:
            time.sleep(slept)
        return slept
