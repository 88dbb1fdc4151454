"""Update rules for stale pushes, and the outer optimizer of asynchronous local steps.

A shard applies every push with the optimizer of its `OptimizerConfig`. The config's
`update_rule` says what happens to a push before that step:

- `plain` (default): the pushed gradient as it is.
- `dc`: delay compensation (DC-ASGD-a, Zheng et al. 2017). A gradient g computed on the
  weights of version r (the push's `read_version`) and applied at version v > r is
  corrected with a diagonal curvature term, g + λ·g⊙g⊙(w_v − w_r)/sqrt(ms + eps), where
  ms is a running mean of g⊙g (decay `DC_DECAY`): the adaptive λ of the paper
  (`dc_lambda`, default 2). It needs the weights each gradient was computed on, so a
  shard with this rule keeps the weights of its last versions (`History`): s + 1 with a
  finite bound s, `history_versions` if set (it must be at least s + 1), and
  `UNBOUNDED_HISTORY` with s = inf. A push older than every kept version is compensated
  against the oldest one (a partial correction) and counted (`History.missed`).
- `elastic` (local steps only): elastic averaging, the center update of EASGD (Zhang et al.
  2015) with the worker re-synced by its next pull. A pseudo-gradient Δ = w_r − w_local read
  at version r and applied at version v moves the shard toward the worker's weights,
  w ← w_v + lr·(w_local − w_v), i.e. the outer step on Δ + (w_v − w_r): a push takes back
  lr of the other pushes it did not see, where plain local steps add its change on top of
  them. It keeps the same history as `dc` (`History`, and the same cap with s = inf); a
  push older than every kept version is pulled toward the oldest one.
- `delayed-nesterov` (local steps only): the outer optimizer of asynchronous
  Local-SGD after Liu et al. 2024. Every push is applied as a plain step of the outer lr;
  the pushes are also summed, and once every `outer_period` pushes their mean enters the
  Nesterov momentum buffer m ← β·m + mean, and the weights take the momentum's step
  −lr·β·m. With period 1 it is exactly SGD with Nesterov momentum.

With `lr_follows_split` (dynamic local steps without averaging; ps-worker's default there) every
push's lr is multiplied by the spread of the split its clock was given (ps_server/balance.py
`Balancer.spread`: the largest H over the mean H, 1 when the workers are equal): the slower
the slowest worker, the larger every push enters. Measured (docs/asynchrony.md): the best outer
lr was 0.6/P with equal workers and 1/P with a 3x straggler, whose split of 8 steps is 6 + 2
(spread 1.5: 0.6/P x 1.5 = 0.45 with P = 2, as good there as 0.5).

With `local_steps` H > 0 every push is a pseudo-gradient (weights pulled − weights after
the worker's H inner steps, worker/local_steps.py) and the shard's optimizer is the outer
one: `sgd` (optionally with Nesterov momentum, DiLoCo's outer step) or `delayed-nesterov`.
`dc` needs plain gradients (its curvature term is the gradient's), so it refuses local
steps; `delayed-nesterov` and `elastic` refuse plain gradients. Not thread-safe: the store serializes.
"""

from __future__ import annotations

import math

import torch

from asyncps_common.fused import GroupOptimizer

RULES = ("plain", "dc", "elastic", "delayed-nesterov")
HISTORY_RULES = ("dc", "elastic")  # the rules that need the weights each push read
DC_DECAY = 0.95  # DC-ASGD-a's running mean of g*g
DC_EPS = 1e-7
DEFAULT_DC_LAMBDA = 2.0  # DC-ASGD-a's λ0
UNBOUNDED_HISTORY = 8  # versions kept with s = inf and no history_versions


def rule_of(cfg) -> str:
    return cfg.update_rule or "plain"


def validate(cfg, staleness: float | None = None) -> None:
    """Raise ValueError naming the conflict if `cfg`'s rule, local steps or history cannot go together."""
    rule = rule_of(cfg)
    if rule not in RULES:
        raise ValueError(f"unknown update rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "dc" and cfg.local_steps:
        raise ValueError("update rule dc needs plain gradients: it cannot be used with local steps")
    if rule == "delayed-nesterov" and not cfg.local_steps:
        raise ValueError("the outer optimizer delayed-nesterov needs local steps (--local-steps H)")
    if rule == "elastic" and not cfg.local_steps:
        raise ValueError("update rule elastic averages weights: it needs local steps (--local-steps H)")
    if rule == "delayed-nesterov" and (cfg.name != "sgd" or cfg.momentum <= 0 or cfg.nesterov):
        raise ValueError("delayed-nesterov is an outer sgd with momentum > 0 and without --nesterov")
    if cfg.outer_period and rule != "delayed-nesterov":
        raise ValueError("an outer period is for the delayed-nesterov outer optimizer only")
    if cfg.local_steps and cfg.name != "sgd":
        raise ValueError("with local steps the servers' optimizer is the outer one: it must be sgd")
    if cfg.local_steps and cfg.staleness_aware_lr:
        raise ValueError("staleness-aware lr is for plain gradients, not local steps")
    if cfg.dc_lambda < 0 or not math.isfinite(cfg.dc_lambda):
        raise ValueError(f"dc_lambda must be finite and >= 0, got {cfg.dc_lambda}")
    if cfg.lr_follows_split and not (cfg.local_steps and cfg.balance_batches and not cfg.average_gradients):
        raise ValueError(
            "lr_follows_split is for dynamic local steps without averaging "
            "(--local-steps H --dynamic-local-steps --no-average-gradients)"
        )
    if cfg.history_versions and rule not in HISTORY_RULES:
        raise ValueError("history_versions is for the dc and elastic update rules only")
    if (
        rule in HISTORY_RULES
        and staleness is not None
        and math.isfinite(staleness)
        and cfg.history_versions
        and cfg.history_versions < staleness + 1
    ):
        raise ValueError(
            f"history_versions {cfg.history_versions} is below s + 1 = {int(staleness) + 1}: "
            "a push the bound allows could find its weights gone"
        )


def history_size(cfg, staleness: float) -> int:
    """Versions a shard with `cfg` keeps for its update rule (0: the rule needs none)."""
    if rule_of(cfg) not in HISTORY_RULES:
        return 0
    if cfg.history_versions:
        return int(cfg.history_versions)
    return int(staleness) + 1 if math.isfinite(staleness) else UNBOUNDED_HISTORY


class History:
    """The weights of the shard's last `size` versions (copies; the live buffer is never kept)."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._kept: dict[int, torch.Tensor] = {}
        self.missed = 0  # pushes older than every kept version

    def add(self, version: int, weights: torch.Tensor) -> None:
        old = None
        if len(self._kept) >= self.size:
            old = self._kept.pop(min(self._kept))
        buf = old if old is not None else torch.empty_like(weights)
        self._kept[version] = buf.copy_(weights)

    def get(self, version: int) -> torch.Tensor | None:
        """The weights of `version`, or the oldest kept ones if it is gone (counted in `missed`)."""
        if version in self._kept:
            return self._kept[version]
        if not self._kept:
            return None
        self.missed += 1
        return self._kept[min(self._kept)]


class DelayCompensation:
    """DC-ASGD-a's correction of a stale gradient; `last` is the size of the latest one,
    ||correction|| / ||g|| (0 for a fresh gradient)."""

    def __init__(self, lam: float):
        self.lam = lam
        self.mean_square: torch.Tensor | None = None
        self.last = 0.0

    def __call__(self, grad: torch.Tensor, w_now: torch.Tensor, w_read: torch.Tensor | None) -> torch.Tensor:
        if self.mean_square is None:
            self.mean_square = grad * grad
        else:
            self.mean_square.mul_(DC_DECAY).addcmul_(grad, grad, value=1 - DC_DECAY)
        if w_read is None or w_read is w_now or self.lam == 0:
            self.last = 0.0
            return grad
        corr = (w_now - w_read).mul_(grad).mul_(grad).div_(self.mean_square.sqrt().add_(DC_EPS)).mul_(self.lam)
        norm = float(grad.norm())
        self.last = float(corr.norm()) / norm if norm > 0 else 0.0
        return grad + corr

    def state_dict(self) -> dict:
        return {"mean_square": None if self.mean_square is None else self.mean_square.clone(), "lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        ms = state.get("mean_square")
        self.mean_square = None if ms is None else ms.clone()


def elastic(delta: torch.Tensor, w_now: torch.Tensor, w_read: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """The `elastic` rule's outer gradient Δ + (w_now − w_read), and the size of the added
    term against Δ (0 when nothing landed since the read)."""
    if w_read is None or w_read is w_now:
        return delta, 0.0
    drift = w_now - w_read
    norm = float(delta.norm())
    size = float(drift.norm()) / norm if norm > 0 else 0.0
    return drift.add_(delta), size


class DelayedNesterov(GroupOptimizer):
    """Outer optimizer: a plain step per push, Nesterov momentum once every `period` pushes."""

    def __init__(self, params, lr: float, momentum: float, period: int):
        if period < 1:
            raise ValueError("period must be >= 1")
        super().__init__(params, {"lr": lr, "momentum": momentum, "period": period})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta, period = group["lr"], group["momentum"], group["period"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["pending"] = torch.zeros_like(p)
                    st["momentum_buffer"] = torch.zeros_like(p)
                st["step"] += 1
                g = p.grad
                st["pending"].add_(g)
                p.add_(g, alpha=-lr)
                if st["step"] % period == 0:
                    m = st["momentum_buffer"].mul_(beta).add_(st["pending"], alpha=1.0 / period)
                    p.add_(m, alpha=-lr * beta)
                    st["pending"].zero_()
