"""The shard store: one shard's fp32 weights, its optimizer and its version.

Thread-safety: every method may be called from any thread. `apply` holds the store's
lock for the optimizer step only; `lease` hands out an immutable copy of the weights
at one version (cached, so many pulls of one version share one copy), so a pull
streams consistent weights without holding the lock while it sends, and `release`
gives it back: a copy no pull reads any more is reused for a later version, so no
pull pays for a fresh allocation (page faults cost more than the copy itself). `frames` is the
pull path's form of it: the weights of one version already encoded as wire frames,
made with one copy and shared by every pull of that version; while an update is being
applied, the previous version's frames are answered without waiting for the lock.
An update is applied whole or not at all: gradients are validated before the step starts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server import optimizer as optim


@dataclass(eq=False)
class Snapshot:
    version: int
    weights: torch.Tensor  # not written while leased
    readers: int = 0       # leases not yet released (guarded by the store's lease lock)


class ShardStore:
    """Weights and optimizer state of one initialized shard."""

    def __init__(self, plan_hash: str, weights: torch.Tensor, cfg: pb.OptimizerConfig, version: int = 0):
        if weights.dtype != torch.float32 or weights.dim() != 1:
            raise ValueError("shard weights must be a 1-D float32 tensor")
        self.plan_hash = plan_hash
        self.config = cfg
        self._flat = torch.nn.Parameter(weights.clone(), requires_grad=False)
        self._opt = optim.build(cfg, self._flat)
        self._version = version
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._leases = threading.Lock()  # guards readers counts and the spare buffers; never held long
        self._spare: list[torch.Tensor] = []  # snapshot buffers no pull reads
        self._frames: tuple[int, int, list[bytes]] | None = None  # (version, chunk_bytes, frames)

    @property
    def numel(self) -> int:
        return self._flat.numel()

    @property
    def version(self) -> int:
        return self._version

    def apply(self, grad: torch.Tensor, read_version: int, live_workers: int = 1) -> tuple[int, int]:
        """Apply one gradient atomically; returns (new version, update staleness).

        Blocks for the optimizer step. `grad` must be finite float32 of the shard's size
        (the caller validates; this checks again and raises ValueError, changing nothing).
        """
        if grad.shape != self._flat.shape or grad.dtype != torch.float32:
            raise ValueError(f"gradient must be float32 of {self.numel} elements")
        if self.config.average_gradients and live_workers > 1:
            grad = grad / live_workers
        with self._lock:
            staleness = max(0, self._version - read_version)
            self._opt.param_groups[0]["lr"] = self.learning_rate(staleness)
            self._flat.grad = grad
            with torch.no_grad():
                self._opt.step()
            self._flat.grad = None
            self._version += 1
            return self._version, staleness

    def learning_rate(self, staleness: int) -> float:
        """The lr for the next update: warmed up over the first updates, divided by staleness if asked."""
        lr = self.config.lr
        if self.config.warmup_updates:
            lr *= min(1.0, (self._version + 1) / self.config.warmup_updates)
        if self.config.staleness_aware_lr:
            lr /= max(1, staleness)
        return lr

    def lease(self) -> Snapshot:
        """The weights at the current version, copied once per version; `release` it after reading.

        Does not wait for an update being applied when the current version's copy exists
        already: until the update ends, that version is still the current one.
        """
        with self._leases:
            snap = self._snapshot
            if snap is not None and snap.version == self._version:
                snap.readers += 1
                return snap
        with self._lock:  # weights stable: no update runs
            if self._snapshot is None or self._snapshot.version != self._version:
                with self._leases:
                    buf = self._spare.pop() if self._spare else None
                if buf is None:
                    buf = torch.empty_like(self._flat.detach())
                buf.copy_(self._flat.detach())
                with self._leases:
                    old, self._snapshot = self._snapshot, Snapshot(self._version, buf)
                    if old is not None and old.readers == 0:
                        self._recycle(old.weights)
            with self._leases:
                self._snapshot.readers += 1
                return self._snapshot

    def release(self, snap: Snapshot) -> None:
        """End a `lease`: the copy may be reused once no pull reads it and a newer one exists."""
        with self._leases:
            snap.readers -= 1
            if snap.readers == 0 and snap is not self._snapshot:
                self._recycle(snap.weights)

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
                "state": {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in opt_state["state"].items()},
                "param_groups": opt_state["param_groups"],
            }
            return {
                "plan_hash": self.plan_hash,
                "optimizer_config": self.config.SerializeToString(),
                "weights": self._flat.detach().clone(),
                "optimizer": opt_state,
                "version": self._version,
            }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ShardStore":
        cfg = pb.OptimizerConfig.FromString(state["optimizer_config"])
        store = cls(state["plan_hash"], state["weights"], cfg, version=int(state["version"]))
        store._opt.load_state_dict(state["optimizer"])
        return store
