"""The transient-straggler mechanism (asyncps_common/jitter.py) shared by ps-worker and bench/peers.py.

The same (seed, rank) gives the same pauses in every system: `ps-worker --jitter` and the
peers' RunSpec build the same generator; a local-steps push of H batches draws H times,
the same draws as H single steps. Bad `--jitter` values are one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from asyncps_common.jitter import Jitter, parse_jitter
from worker import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from peers_common import RunSpec  # noqa: E402


def test_same_sequence_in_every_system() -> None:
    args = cli.build_parser().parse_args(["--jitter", "0.1,4", "--seed", "3", "--rank", "1", "--world", "2"])
    worker = Jitter(*args.jitter, seed=args.seed, rank=args.rank)
    spec = RunSpec(system="ddp-gloo", scenario="jitter", workers=2, out="", seed=3)
    bench = spec.jitter_of(1)
    a = [worker.seconds(0.01) for _ in range(2000)]
    b = [bench.seconds(0.01) for _ in range(2000)]
    assert a == b
    hits = sum(x > 0 for x in a)
    assert 150 < hits < 250  # p = 0.1 of 2000
    assert {round(x, 9) for x in a} == {0.0, 0.04}  # F x compute
    other_rank = spec.jitter_of(0)
    assert [other_rank.seconds(0.01) for _ in range(2000)] != a  # each worker its own generator


def test_local_steps_draw_once_per_batch() -> None:
    single, pushed = Jitter(0.3, 4.0, seed=1, rank=0), Jitter(0.3, 4.0, seed=1, rank=0)
    per_step = [single.seconds(0.01) for _ in range(400)]
    per_push = [pushed.seconds(0.04, steps=4) for _ in range(100)]  # 4 batches of 0.01 s each
    for i, pause in enumerate(per_push):
        assert pause == pytest.approx(sum(per_step[4 * i : 4 * i + 4]))


def test_off_outside_the_jitter_scenario() -> None:
    spec = RunSpec(system="ddp-gloo", scenario="straggler", workers=2, out="")
    assert not spec.jitter_of(0).active and spec.jitter_of(0).pause(1.0) == 0.0
    assert cli.build_parser().parse_args([]).jitter == (0.0, 0.0)


@pytest.mark.parametrize("text", ["0.1", "x,4", "1.5,4", "0.1,-1", "0.1,4,2"])
def test_bad_jitter_is_one_line_exit_2(capsys, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_jitter(text)
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--jitter", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jitter" in err[0] and "Traceback" not in err[0]
