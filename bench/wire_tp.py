"""TensorPipe (torch.distributed.rpc) measured the ways `bench/wire.py` sets asyncps against it.

One RPC session between this process and a spawned peer, loopback only, times four calls
of a `nbytes` fp32 tensor, each `reps` times after one warm-up, GB/s of the tensor's bytes:

* echo:  the tensor to the peer and back (`_echo` returns it). SPEC's "TensorPipe echo,
         64 MB: 1.3 GB/s" is this figure: the payload's bytes ÷ the round trip, so that is
         how `echo` counts (`tensorpipe_gbps`); the bytes of both directions are twice it;
* send:  the tensor to the peer, its element count back: TensorPipe's one-way rate
         towards a server, with nothing done there;
* fetch: a small request, the peer's tensor back (held behind an RRef): one-way towards
         a worker, what a pull does;
* push:  what a parameter server built on torch.distributed.rpc does with a gradient: the
         tensor to the peer, which checks it for NaN/Inf (`protos.wire.all_finite`) and
         applies one step of the servers' own SGD to its weights, as `ps-server` does, then
         answers the new version. Set against asyncps's push, which does exactly that work.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import torch

GB = 1e9


class _Shard:
    """The peer's weights and optimizer, for `push` (lives in the peer, behind an RRef)."""

    def __init__(self, numel: int) -> None:
        from asyncps_common import optimizer

        self.weights = torch.nn.Parameter(torch.randn(numel), requires_grad=False)
        self.opt = optimizer.build(optimizer.default_config("sgd", lr=1e-3), self.weights)
        self.version = 0

    def apply(self, grad: torch.Tensor) -> int:
        from protos import wire

        if not wire.all_finite(grad):
            raise ValueError("tensor contains NaN or Inf: not applied")
        self.weights.grad = grad
        with torch.no_grad():
            self.opt.step()
        self.weights.grad = None
        self.version += 1
        return self.version


def _weights(numel: int) -> torch.Tensor:
    return torch.randn(numel)


def _echo(t: torch.Tensor) -> torch.Tensor:
    return t


def _numel(t: torch.Tensor) -> int:
    return t.numel()


def _value(rref) -> torch.Tensor:
    return rref.local_value()


def _push(rref, grad: torch.Tensor) -> int:
    return rref.local_value().apply(grad)


def _env() -> None:
    os.environ["TP_SOCKET_IFNAME"] = "lo"  # TensorPipe's TCP transport: loopback only
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def _options(port: int, transports: list[str] | None):
    import torch.distributed.rpc as rpc

    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=4, _transports=transports
    )


def _peer(port: int, transports: list[str] | None) -> None:
    _env()
    import torch.distributed.rpc as rpc

    rpc.init_rpc("peer", rank=1, world_size=2, rpc_backend_options=_options(port, transports))
    rpc.shutdown()


def bench_tensorpipe(nbytes: int, reps: int, port: int, transports: list[str] | None) -> dict[str, list[float]]:
    """GB/s samples of `echo`, `send`, `fetch` and `push` (module docstring), `port` free."""
    _env()
    import torch.distributed.rpc as rpc

    proc = mp.get_context("spawn").Process(target=_peer, args=(port, transports), daemon=True)
    proc.start()
    rpc.init_rpc("main", rank=0, world_size=2, rpc_backend_options=_options(port, transports))
    try:
        t = torch.randn(nbytes // 4)  # finite: `push` applies it
        held = rpc.remote("peer", _weights, args=(t.numel(),))
        shard = rpc.remote("peer", _Shard, args=(t.numel(),))
        calls = {
            "echo": (_echo, (t,), lambda r: r.numel() == t.numel()),
            "send": (_numel, (t,), lambda r: r == t.numel()),
            "fetch": (_value, (held,), lambda r: r.numel() == t.numel()),
            "push": (_push, (shard, t), lambda r: r > 0),
        }
        out: dict[str, list[float]] = {k: [] for k in calls}
        for i in range(reps + 1):  # interleaved, so a disturbance falls on every kind alike
            for kind, (fn, args, ok) in calls.items():
                t0 = time.perf_counter()
                back = rpc.rpc_sync("peer", fn, args=args)
                dt = time.perf_counter() - t0
                assert ok(back), f"TensorPipe {kind} answered {back!r}"
                if i:  # the first round warms up
                    out[kind].append(nbytes / dt / GB)
        return out
    finally:
        rpc.shutdown()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
