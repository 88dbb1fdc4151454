"""bench/peers_eval.py's time to a loss level: the crossing between two snapshots, interpolated."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the bench scripts import each other by name
from peers_eval import crossing  # noqa: E402


def test_crossing_lies_on_the_line_between_the_bracketing_snapshots():
    curve = [[0.0, 5.0], [1.0, 3.0], [2.0, 2.4], [3.0, 2.0], [4.0, 2.1]]
    # 2.2 is halfway from 2.4 (t=2) to 2.0 (t=3); the first snapshot at or below it is t=3
    assert crossing(curve, 2.2) == pytest.approx(2.5)
    assert crossing(curve, 2.0) == 3.0  # reached exactly at a snapshot
    assert crossing(curve, 4.0) == pytest.approx(0.5)
    assert crossing(curve, 5.0) == 0.0  # already there at the start
    assert crossing(curve, 1.9) is None  # never reached (2.1 later does not count)


def test_crossing_after_a_diverged_point_is_the_snapshot_itself():
    assert crossing([[0.0, 5.0], [1.0, math.nan], [2.0, 2.0]], 2.2) == 2.0
    assert crossing([[0.0, 5.0], [1.0, math.nan]], 2.2) is None
