"""Would applying a push while it is still arriving make it faster? Measured, with no asyncps code.

    python bench/overlap.py --reps 15 --json bench/results/overlap.json

A push must be received whole, checked for NaN/Inf and applied atomically. The obvious
way to hide the optimizer step is to overlap it with the transfer: apply each chunk as
soon as it is in, into a second weight buffer (double-buffered weights, switched in one
step when every byte is in and checked, dropped when one is not: still atomic). This
measures whether that can pay on this machine, between two processes on loopback, the
payload cut over `--streams` TCP connections (one receiving thread each, as the data
plane does), one plain SGD step (lr 1e-3) per push, repeated `--reps` times after one
warm-up, in these ways:

* transfer: receive every byte, nothing else (the bytes alone: a lower bound);
* whole:    receive every byte, each thread checks its part (`protos.wire.all_finite`),
            then one in-place step of the servers' own optimizer (what `ps-server` does);
* inline:   each receiving thread checks each `--chunk-mb` chunk and writes
            `w - lr * g` for it into the second buffer right after receiving it;
* thread:   the receiving threads only receive; one more thread checks and applies each
            chunk as soon as it is in.

Prints the time per push (ms; median, min-max), each way's median ÷ whole's, and how
busy the cores were: the CPU time both processes used per push (`getrusage`, user +
system) ÷ (wall time × CPUs). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/overlap.py` from anywhere
    sys.path.insert(0, str(ROOT))

from asyncps_common import optimizer  # noqa: E402
from protos import wire  # noqa: E402

MODES = ("transfer", "whole", "inline", "thread")
LR = 1e-3


def _sink(port_conn, mode: str, numel: int, streams: int, chunk: int) -> None:
    """Child: receive pushes on `streams` connections and apply them the `mode` way; per
    push one answer byte (0 if the check failed) and the CPU seconds it used (a double)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port_conn.send(srv.getsockname()[1])
    conns = [srv.accept()[0] for _ in range(streams)]
    grad = torch.empty(numel)
    weights = torch.nn.Parameter(torch.randn(numel), requires_grad=False)
    staged = torch.empty(numel)  # the second weight buffer of the overlapping ways
    opt = optimizer.build(optimizer.default_config("sgd", lr=LR), weights)
    bounds = wire.stripes(numel, streams)
    work: queue.SimpleQueue = queue.SimpleQueue()
    ok = [True] * streams

    def apply_chunk(lo: int, hi: int) -> bool:
        torch.add(weights.detach()[lo:hi], grad[lo:hi], alpha=-LR, out=staged[lo:hi])
        return wire.all_finite(grad[lo:hi])

    def receive(i: int) -> None:
        lo, hi = bounds[i]
        good = True
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            view, got = wire.tensor_bytes(grad[a:b]), 0
            while got < view.nbytes:
                n = conns[i].recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("sender left")
                got += n
            if mode == "inline":
                good &= apply_chunk(a, b)
            elif mode == "thread":
                work.put((a, b))
        ok[i] = good and (mode != "whole" or wire.all_finite(grad[lo:hi]))  # transfer: no check

    def applier(done: threading.Event, results: list[bool]) -> None:
        left = numel
        while left:
            a, b = work.get()
            results.append(apply_chunk(a, b))
            left -= b - a
        done.set()

    while conns[0].recv(1) == b"g":  # one push per "go"
        cpu0 = _cpu()
        results: list[bool] = []
        done = threading.Event()
        helper = threading.Thread(target=applier, args=(done, results)) if mode == "thread" else None
        if helper:
            helper.start()
        threads = [threading.Thread(target=receive, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if helper:
            done.wait()
            helper.join()
        good = all(ok) and all(results)
        if mode == "whole" and good:
            weights.grad = grad
            with torch.no_grad():
                opt.step()
        elif good:
            weights.data, staged = staged, weights.data  # the switch: one step, whole
        conns[0].sendall((b"\x01" if good else b"\x00") + struct.pack("<d", _cpu() - cpu0))


def _cpu() -> float:
    """CPU seconds this process has used, all threads, user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = sock.recv(n - len(out))
        if not more:
            raise ConnectionError("the receiver left")
        out += more
    return out


def measure(mode: str, nbytes: int, streams: int, chunk_bytes: int, reps: int) -> tuple[list[float], list[float]]:
    """(milliseconds per push, the share of all CPUs both processes kept busy meanwhile),
    `reps` of each after one warm-up."""
    numel = nbytes // 4
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_sink, args=(child, mode, numel, streams, chunk_bytes // 4), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = torch.randn(numel)
        data = wire.tensor_bytes(payload)
        parts = [(lo * 4, hi * 4) for lo, hi in wire.stripes(numel, streams)]

        def send(i: int) -> None:
            lo, hi = parts[i]
            for a in range(lo, hi, 4 << 20):
                socks[i].sendall(data[a : min(hi, a + (4 << 20))])

        out, busy = [], []
        for r in range(reps + 1):
            cpu0 = _cpu()
            t0 = time.perf_counter()
            socks[0].sendall(b"g")
            threads = [threading.Thread(target=send, args=(i,)) for i in range(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            answer = _recv_exact(socks[0], 9)
            wall = time.perf_counter() - t0
            if answer[:1] != b"\x01":
                raise RuntimeError(f"{mode}: the receiver refused a finite payload")
            if r:
                out.append(wall * 1e3)
                busy.append((_cpu() - cpu0 + struct.unpack("<d", answer[1:])[0]) / (wall * (os.cpu_count() or 1)))
        socks[0].sendall(b"q")
        for s in socks:
            s.close()
        return out, busy
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--mb", type=int, default=64, help="payload size in MB (2^20 bytes)")
    p.add_argument("--streams", type=int, default=2, help="TCP connections per push (the data plane's default)")
    p.add_argument("--chunk-mb", type=int, default=4, help="chunk checked and applied at once by the overlapping ways")
    p.add_argument("--reps", type=int, default=15, help="timed pushes per way")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", help="write every sample here")
    args = p.parse_args(argv)
    if args.mb <= 0 or args.reps <= 0 or args.chunk_mb <= 0 or not 1 <= args.streams <= wire.MAX_STRIPES:
        p.error(f"--mb, --reps and --chunk-mb must be positive, --streams 1 to {wire.MAX_STRIPES}")
    nbytes = args.mb << 20
    res = {
        "payload_bytes": nbytes,
        "streams": args.streams,
        "chunk_bytes": args.chunk_mb << 20,
        "reps": args.reps,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "modes": {},
    }
    for mode in args.modes:
        ms, busy = measure(mode, nbytes, args.streams, args.chunk_mb << 20, args.reps)
        res["modes"][mode] = {
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "samples_ms": ms,
            "cpu_busy": statistics.median(busy),
            "cpu_busy_samples": busy,
        }
    base = res["modes"].get("whole")
    print(
        f"{args.mb} MB push over {args.streams} streams, one SGD step; ms per push, median (min-max) of {args.reps};"
        f" CPUs busy"
    )
    for mode, m in res["modes"].items():
        rel = f"   {m['median_ms'] / base['median_ms']:.2f}x whole's time" if base else ""
        print(
            f"  {mode:<8} {m['median_ms']:6.1f}  ({m['min_ms']:.1f}-{m['max_ms']:.1f})   {m['cpu_busy']:4.0%} busy{rel}"
        )
        if base:
            m["vs_whole"] = m["median_ms"] / base["median_ms"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
