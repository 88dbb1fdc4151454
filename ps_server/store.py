"""The shard store: one shard's fp32 weights, its optimizer and its version.

Thread-safety: every method may be called from any thread. `apply` holds the store's
lock for the optimizer step only. `lease` hands out the weights of the current version
for a pull to send without holding the lock, and `release` ends it; the data plane
sends straight from them. Copy-on-write keeps that consistent without a copy per
version: a lease is a view of the live weights, and only an update that starts while
a pull still reads them moves the live weights to another buffer first (the readers
keep the old version, and pulls arriving during that update are answered with it at
once); an update that starts with no reader changes the weights in place, and a pull
arriving meanwhile waits for it, no longer. Buffers no pull reads any more are reused,
so no pull or update pays for a fresh allocation (page faults cost more than a copy). `frames` is the
pull path's form of it: the weights of one version already encoded as wire frames,
made with one copy and shared by every pull of that version; while an update is being
applied, the previous version's frames are answered without waiting for the lock.
An update is applied whole or not at all: gradients are validated before the step starts.
With the `dc` and `elastic` update rules (asyncps_common/delay.py) the store also keeps the weights
of its last `history` versions: `dc` corrects each gradient for the updates since the version it
read, `elastic` moves the weights toward the pushing worker's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asyncps_common import delay
from asyncps_common import optimizer as optim
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb


@dataclass(eq=False)
class Snapshot:
    version: int
    weights: torch.Tensor  # not written while leased
    readers: int = 0  # leases not yet released (guarded by the store's lease lock)
    live: bool = True  # `weights` is the store's live buffer (else an old version's own)


class ShardStore:
    """Weights and optimizer state of one initialized shard."""

    def __init__(
        self,
        plan_hash: str,
        weights: torch.Tensor,
        cfg: pb.OptimizerConfig,
        version: int = 0,
        groups: Sequence[pb.ParamGroup] = (),
        history: int = 0,
    ):
        if weights.dtype != torch.float32 or weights.dim() != 1:
            raise ValueError("shard weights must be a 1-D float32 tensor")
        self.plan_hash = plan_hash
        self.config = cfg
        self._flat = torch.nn.Parameter(weights.clone(), requires_grad=False)
        self.groups = list(groups)  # parameter groups cutting the shard (empty: `cfg` for all of it)
        self._stepper = optim.FlatOptimizer(cfg, self._flat, self.groups)
        self._opt = self._stepper.opt
        self._version = version
        self.last_lr_factor = 1.0  # the latest update's lr factor (`apply`'s lr_factor)
        self._dc = (
            delay.DelayCompensation(cfg.dc_lambda or delay.DEFAULT_DC_LAMBDA) if delay.rule_of(cfg) == "dc" else None
        )
        keeps_history = delay.rule_of(cfg) in delay.HISTORY_RULES  # dc, elastic: the weights each push read
        self._history = delay.History(history or 1) if keeps_history else None
        if self._history is not None:
            self._history.add(version, self._flat.detach())
        self.observe_compensation = None  # called with each update's compensation size (metrics)
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._leases = threading.Lock()  # guards _snapshot, readers counts and spare buffers; never held long
        self._spare: list[torch.Tensor] = []  # buffers of old versions no pull reads
        self._frames: tuple[int, int, list[bytes]] | None = None  # (version, chunk_bytes, frames)

    @property
    def numel(self) -> int:
        return self._flat.numel()

    @property
    def version(self) -> int:
        return self._version

    def apply(
        self, grad: torch.Tensor, read_version: int, divisor: int = 1, consume: bool = False, lr_factor: float = 1.0
    ) -> tuple[int, int]:
        """Apply one gradient atomically; returns (new version, update staleness).

        With averaging on, `grad` is a sum and is divided by `divisor` (contributors, or
        samples when weighted) first: in place when the caller gives `grad` up
        (`consume`, e.g. a spent averaging bucket), else into a new tensor (a shard-sized
        allocation: ~15 ms of page faults for 64 MB, against ~1.5 ms in place).
        `lr_factor` multiplies the update's lr (`lr_follows_split`: the spread of the push's split).

        Blocks for the optimizer step. `grad` must be finite float32 of the shard's size
        (the caller validates; this checks again and raises ValueError, changing nothing).
        """
        if grad.shape != self._flat.shape or grad.dtype != torch.float32:
            raise ValueError(f"gradient must be float32 of {self.numel} elements")
        if self.config.average_gradients and divisor > 1:
            grad = grad.div_(divisor) if consume else grad / divisor
        with self._lock:
            self._before_write()
            staleness = max(0, self._version - read_version)
            if self._history is not None:  # dc or elastic: from the weights the push read
                read = self._history.get(read_version) if staleness else None
                if self._dc is not None:
                    grad, size = self._dc(grad, self._flat.detach(), read), self._dc.last
                else:
                    grad, size = delay.elastic(grad, self._flat.detach(), read)
                if self.observe_compensation is not None:
                    self.observe_compensation(size)
            self._stepper.step(grad, self.lr_scale(staleness) * lr_factor)
            self.last_lr_factor = lr_factor
            self._version += 1
            if self._history is not None:
                self._history.add(self._version, self._flat.detach())
            return self._version, staleness

    @property
    def history_missed(self) -> int:
        """Pushes compensated against the oldest kept version: the one they read was gone."""
        return self._history.missed if self._history is not None else 0

    def learning_rate(self, staleness: int) -> float:
        """The (first group's) lr for the next update: see `lr_scale`."""
        return self.config.lr * self.lr_scale(staleness)

    def lr_scale(self, staleness: int) -> float:
        """Every group's lr is multiplied by this: warmed up over the first updates, divided by staleness if asked."""
        lr = 1.0
        if self.config.warmup_updates:
            lr *= min(1.0, (self._version + 1) / self.config.warmup_updates)
        if self.config.staleness_aware_lr:
            lr /= max(1, staleness)
        return lr

    def lease(self) -> Snapshot:
        """The weights at the current version, not to be written to; `release` it after reading.

        Answered at once while an update runs if a pull was reading the current version
        when the update started; otherwise waits for that update to end.
        """
        snap = self.try_lease()
        if snap is not None:
            return snap
        with self._lock:  # no update runs: the live weights are the current version
            with self._leases:
                snap = self._snapshot
                if snap is None or snap.version != self._version:
                    if snap is not None and snap.readers == 0 and not snap.live:
                        self._recycle(snap.weights)
                    snap = self._snapshot = Snapshot(self._version, self._flat.detach())
                snap.readers += 1
                return snap

    def try_lease(self) -> Snapshot | None:
        """`lease` if it need not wait (the current version is already leased); else None."""
        with self._leases:
            snap = self._snapshot
            if snap is not None and snap.version == self._version:
                snap.readers += 1
                return snap
        return None

    def release(self, snap: Snapshot) -> None:
        """End a `lease`: an old version's buffer is reused once no pull reads it."""
        with self._leases:
            snap.readers -= 1
            if snap.readers == 0 and not snap.live and snap is not self._snapshot:
                self._recycle(snap.weights)

    def _before_write(self) -> None:
        """Call under the lock before changing the live weights: copy-on-write for readers."""
        with self._leases:
            snap = self._snapshot
            if snap is None or not snap.live:
                return
            if snap.readers == 0:  # nobody reads the live buffer: change it in place
                self._snapshot = None
                return
            buf = self._spare.pop() if self._spare else None
        if buf is None:
            buf = torch.empty_like(self._flat.detach())
        buf.copy_(self._flat.detach())  # the readers keep the old buffer; the optimizer gets the copy
        with self._leases:
            snap.live = False
        self._flat.data = buf
        self._stepper.rebind()

    def _recycle(self, buf: torch.Tensor) -> None:
        if len(self._spare) < 2:  # call with the lease lock held
            self._spare.append(buf)

    def frames(self, chunk_bytes: int) -> tuple[int, list[bytes]]:
        """(version, the weights at it as chunk frames of `chunk_bytes`), encoded once per version.

        Does not wait for an update being applied when the current version's frames
        exist already: until the update ends, that version is still the current one.
        """
        cached = self._frames  # one atomic read; a tuple is never changed in place
        if cached is not None and cached[0] == self._version and cached[1] == chunk_bytes:
            return cached[0], cached[2]
        with self._lock:
            cached = self._frames
            if cached is None or cached[0] != self._version or cached[1] != chunk_bytes:
                cached = (self._version, chunk_bytes, list(wire.chunk_frames(self._flat.detach(), chunk_bytes)))
                self._frames = cached
            return cached[0], cached[2]

    def checksum(self) -> float:
        with self._lock:
            return float(self._flat.detach().double().abs().sum())

    def state_dict(self) -> dict:
        """Weights, optimizer state and version, for a checkpoint (copies taken under the lock)."""
        with self._lock:
            opt_state = self._opt.state_dict()
            opt_state = {
                "state": {
                    k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                    for k, s in opt_state["state"].items()
                },
                "param_groups": opt_state["param_groups"],
            }
            return {
                "plan_hash": self.plan_hash,
                "optimizer_config": self.config.SerializeToString(),
                "groups": [g.SerializeToString() for g in self.groups],
                "weights": self._flat.detach().clone(),
                "optimizer": opt_state,
                "version": self._version,
                "history": self._history.size if self._history is not None else 0,
                "dc": self._dc.state_dict() if self._dc is not None else None,
            }

    @classmethod
    def from_state_dict(cls, state: dict) -> ShardStore:
        cfg = pb.OptimizerConfig.FromString(state["optimizer_config"])
        groups = [pb.ParamGroup.FromString(g) for g in state.get("groups", [])]
        store = cls(
            state["plan_hash"],
            state["weights"],
            cfg,
            version=int(state["version"]),
            groups=groups,
            history=int(state.get("history", 0)),
        )
        store._opt.load_state_dict(state["optimizer"])
        if store._dc is not None and state.get("dc"):
            store._dc.load_state_dict(state["dc"])
        return store
