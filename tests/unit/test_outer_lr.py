"""The outer lr of local steps, as ps-worker's flags give it to the servers' OptimizerConfig:
`--outer-lr` when given, else 1 with averaging (the mean of the P changes, synchronous DiLoCo),
else 0.6/P (each push's change as it arrives; measured to learn more per sample than 1/P),
and 1/P with the elastic rule (a running average of the workers' models)."""

from __future__ import annotations

import pytest

from worker.cli import build_parser
from worker.optim_config import ASYNC_OUTER_LR, ELASTIC_OUTER_LR, optimizer_config


def config(*flags: str):
    return optimizer_config(build_parser().parse_args(["--servers", "127.0.0.1:1", *flags]))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_without_averaging_each_push_enters_at_0_6_over_p(world: int) -> None:
    cfg = config("--local-steps", "4", "--staleness", "2", "--no-average-gradients", "--world", str(world))
    assert ASYNC_OUTER_LR == 0.6
    assert cfg.lr == pytest.approx(0.6 / world) and cfg.momentum == 0.0 and cfg.local_steps == 4


@pytest.mark.parametrize("world", [1, 2, 3])
def test_elastic_averages_the_workers_models_at_1_over_p(world: int) -> None:
    cfg = config(
        "--local-steps", "4", "--staleness", "2", "--no-average-gradients", "--update-rule", "elastic",
        "--world", str(world),
    )  # fmt: skip
    assert ELASTIC_OUTER_LR == 1.0
    assert cfg.lr == pytest.approx(1.0 / world) and cfg.update_rule == "elastic"


def test_with_averaging_the_mean_enters_whole() -> None:
    cfg = config("--local-steps", "4", "--staleness", "0", "--average-gradients", "--world", "2")
    assert cfg.lr == pytest.approx(1.0)


def test_a_given_outer_lr_wins() -> None:
    cfg = config("--local-steps", "4", "--no-average-gradients", "--world", "2", "--outer-lr", "0.45")
    assert cfg.lr == pytest.approx(0.45)


def test_without_local_steps_the_lr_is_the_optimizers() -> None:
    cfg = config("--lr", "0.002", "--world", "2", "--no-average-gradients")
    assert cfg.lr == pytest.approx(0.002) and cfg.local_steps == 0


@pytest.mark.parametrize(
    "flags,follows",
    [
        (["--dynamic-local-steps", "--no-average-gradients"], True),  # the default with dynamic H
        (["--dynamic-local-steps", "--no-average-gradients", "--no-outer-lr-follows-split"], False),
        (["--no-average-gradients"], False),  # fixed H: no split to follow
        (["--dynamic-local-steps", "--average-gradients", "--staleness", "0"], False),  # one averaged step per round
    ],
)
def test_the_outer_lr_follows_the_split_only_with_dynamic_local_steps_without_averaging(flags, follows) -> None:
    cfg = config("--local-steps", "4", "--world", "2", *flags)
    assert cfg.lr_follows_split is follows
    assert cfg.lr == pytest.approx(0.6 / 2 if "--no-average-gradients" in flags else 1.0)  # the base lr is unchanged
