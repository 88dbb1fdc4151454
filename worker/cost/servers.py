"""Pieces the cost probes share with `bench/wire.py`: real `ps-server` processes and a flat model.

`start_servers` launches n real shards on free loopback ports (port 0 + --port-file,
readiness by the gRPC health check) and blocks until all serve; `stop_servers` stops them
(SIGTERM, then SIGKILL). `FlatModel` is `nbytes` of fp32 parameters in uneven tensors, so
shards cut tensors. `apply_rates` times the shard store's optimizer step in this process.
Nothing here is thread-safe; call from one thread.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

GB = 1e9


class FlatModel(torch.nn.Module):
    """`nbytes` of fp32 parameters in a few tensors of uneven sizes (so shards cut tensors)."""

    def __init__(self, nbytes: int):
        super().__init__()
        n = nbytes // 4
        sizes = [n // 2, n // 4, n // 8]
        sizes.append(n - sum(sizes))
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(k) * 0.01) for k in sizes])


def start_servers(
    n: int, workdir: Path, chunk_bytes: int | None = None, extra: list[str] | None = None
) -> tuple[list[subprocess.Popen], list[str]]:
    """n shards of one model; returns their processes and addresses once every one serves."""
    from worker.rpc import wait_serving

    procs, files = [], []
    for i in range(n):
        pf = workdir / f"s{n}-{i}.port"
        pf.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "ps_server.cli",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(pf),
            "--shard-index",
            str(i),
            "--num-shards",
            str(n),
            "--heartbeat-timeout",
            "600",
            *(extra or []),
        ]
        if chunk_bytes:
            args += ["--chunk-bytes", str(chunk_bytes)]
        with open(workdir / f"s{n}-{i}.log", "wb") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        files.append(pf)
    try:
        addrs = []
        for p, pf in zip(procs, files):
            end = time.monotonic() + 60
            while not pf.exists():
                if p.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"ps-server did not start; see its log in {workdir}")
                time.sleep(0.02)
            addr = f"127.0.0.1:{int(pf.read_text())}"
            wait_serving(addr, timeout=60, is_alive=lambda p=p: p.poll() is None)  # type: ignore[misc]
            addrs.append(addr)
    except BaseException:
        stop_servers(procs)
        raise
    return procs, addrs


def stop_servers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def apply_rates(nbytes: int, reps: int) -> dict[str, list[float]]:
    """GB/s of gradient the shard store applies per optimizer step: SGD, SGD momentum, Adam, AdamW."""
    from asyncps_common.optimizer import default_config
    from ps_server.store import ShardStore

    n = nbytes // 4
    w, g = torch.randn(n), torch.randn(n) * 1e-3
    cfgs = {
        "sgd": default_config("sgd", lr=0.01),
        "sgd_momentum": default_config("sgd", lr=0.01, momentum=0.9),
        "adam": default_config("adam", lr=1e-3),
        "adamw": default_config("adamw", lr=1e-3),
    }
    out = {}
    for name, cfg in cfgs.items():
        store = ShardStore("bench", w, cfg)
        samples = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            store.apply(g, store.version)
            if i:  # the first step allocates the optimizer's state
                samples.append(nbytes / (time.perf_counter() - t0) / GB)
        out[name] = samples
    return out
