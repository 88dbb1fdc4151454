"""The optimizers the training flags describe: the servers' (plain gradients, or the outer
optimizer of `--local-steps`) and each worker's own inner one.

Pure functions of the parsed flags (an argparse.Namespace with ps-worker's training flags);
ps-worker, ps-cluster and summary.json (worker/report.py) derive the same configs from them.
"""

from __future__ import annotations

import argparse

from asyncps_common.optimizer import default_config

# Without averaging each push's change enters at ASYNC_OUTER_LR / P as it arrives. 1/P (the mean
# of the workers' changes, had they arrived together) is too much: the other workers' pushes that
# land between a pull and its push act as momentum (Mitliagkas et al. 2016), and damping it learns
# more per sample. bench/staleness.py, delay 2: held-out 2.049 at 1/P, 1.921 at 0.8/P, 1.894 at
# 0.6/P, 1.926 at 0.5/P; the system (2 workers, s = 2, H = 4): 1.312 at 0.6/P against 1.373 at 1/P
# and the synchronous default's 1.369 (docs/asynchrony.md).
ASYNC_OUTER_LR = 0.6
# With --update-rule elastic a push moves the weights toward the worker's, lr (w_local - w_now), so
# 1/P makes the servers' weights a running average of the P workers' latest models (EASGD's centre).
# bench/staleness.py, held-out at 1000 batches: 1.761 / 1.888 / 2.107 at delays 1 / 2 / 4 (plain at 0.6/P:
# 1.765 / 1.895 / 2.129); at delay 2 1.888 at 1.5/P too, 1.907 at 2/P, 1.921 at 0.7/P (docs/asynchrony.md).
ELASTIC_OUTER_LR = 1.0


def inner_config(args: argparse.Namespace):
    """The optimizer the training flags describe: the servers' (gradients) or each worker's own (local steps)."""
    return default_config(
        args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        beta1=args.beta1,
        beta2=args.beta2,
        staleness_aware_lr=args.staleness_aware_lr,
        average_gradients=args.average_gradients,
        balance_batches=args.balance_batches,
        warmup_updates=args.warmup,
    )


def outer_lr(given: float | None, average_gradients: bool, world: int, rule: str = "plain") -> float:
    """The outer lr of local steps: `given`, else 1 with averaging, else ASYNC_OUTER_LR / world
    (ELASTIC_OUTER_LR / world with the elastic rule)."""
    if given or average_gradients:
        return given or 1.0
    return (ELASTIC_OUTER_LR if rule == "elastic" else ASYNC_OUTER_LR) / max(1, world)


def follows_split(args: argparse.Namespace) -> bool:
    """Whether each push's outer lr follows the split of H: dynamic local steps without averaging,
    unless --no-outer-lr-follows-split (OptimizerConfig.lr_follows_split)."""
    return bool(
        args.local_steps and args.dynamic_local_steps and args.outer_lr_follows_split and not args.average_gradients
    )


def optimizer_config(args: argparse.Namespace):
    """The servers' OptimizerConfig: the training flags' optimizer, or with --local-steps the outer one."""
    if not args.local_steps:
        cfg = inner_config(args)
        cfg.update_rule, cfg.history_versions = args.update_rule, args.dc_history
        cfg.dc_lambda = args.dc_lambda if args.update_rule == "dc" else 0.0
        return cfg
    kind = args.outer_optimizer or "sgd"
    lr = outer_lr(args.outer_lr, args.average_gradients, getattr(args, "world", 1), args.update_rule)
    momentum = args.outer_momentum if args.outer_momentum is not None else (0.0 if kind == "sgd" else 0.9)
    return default_config(
        "sgd",
        lr=lr,
        momentum=momentum,
        nesterov=kind == "nesterov",
        update_rule=kind if kind == "delayed-nesterov" else args.update_rule,
        outer_period=(args.outer_period or max(1, getattr(args, "world", 1))) if kind == "delayed-nesterov" else 0,
        local_steps=args.local_steps,
        history_versions=args.dc_history,
        average_gradients=args.average_gradients,
        balance_batches=args.dynamic_local_steps,
        lr_follows_split=follows_split(args),
        staleness_aware_lr=args.staleness_aware_lr,
    )
