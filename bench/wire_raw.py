"""The baselines `bench/wire.py` sets asyncps against that run no asyncps code at all.

* raw TCP (`bench_tcp`): one direction between this process and a spawned sink on
  127.0.0.1, 4 MB `sendall` from / `recv_into` a preallocated buffer, over one or several
  connections at once (the payload cut in parts, each on its own thread); with `apply`,
  the least work a push must do: each receiving thread checks its part for NaN/Inf and one
  step of the servers' SGD is applied before the answer byte (the push floor);
* raw gRPC (`bench_grpc_raw`): grpc.aio streaming prebuilt 4 MB `bytes` messages between
  two processes, pull and push: the ceiling gRPC itself sets.

Each is repeated `reps` times after one warm-up; GB/s per sample.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time

import torch

TCP_CHUNK = 4 << 20
GB = 1e9


# -- (a) raw TCP --------------------------------------------------------------------------


def _parts(nbytes: int, streams: int) -> list[tuple[int, int]]:
    step = -(-nbytes // streams)
    return [(lo, min(nbytes, lo + step)) for lo in range(0, nbytes, step)]


def _in_threads(fn, items) -> list:
    """fn(item) for every item, each in its own thread (one item: in this thread); their results."""
    if len(items) == 1:
        return [fn(items[0])]
    out: list = [None] * len(items)

    def run(i: int) -> None:
        out[i] = fn(items[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _tcp_sink(port_conn, nbytes: int, streams: int, apply: bool) -> None:
    """Child: accept `streams` connections, then per round receive `nbytes` (stream i its i-th
    part, each in its own thread, into one buffer) and answer one byte. With `apply`, as a
    push must: each thread then checks its part for NaN/Inf, and one SGD step (the servers'
    optimizer, lr 1e-3) applies the buffer as a gradient before the answer."""
    from asyncps_common import optimizer
    from protos import wire

    srv = socket.create_server(("127.0.0.1", 0))
    port_conn.send(srv.getsockname()[1])
    conns = [srv.accept()[0] for _ in range(streams)]
    for conn in conns:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    grad = torch.empty(nbytes // 4)
    buf = wire.tensor_bytes(grad)
    if apply:
        weights = torch.nn.Parameter(torch.randn(grad.numel()), requires_grad=False)
        opt = optimizer.build(optimizer.default_config("sgd", lr=1e-3), weights)

    def receive(job) -> bool:
        conn, (got, hi) = job
        lo = got
        while got < hi:
            n = conn.recv_into(buf[got:hi], min(TCP_CHUNK, hi - got))
            if n == 0:
                return False
            got += n
        return not apply or wire.all_finite(grad[lo // 4 : hi // 4])

    jobs = list(zip(conns, _parts(nbytes, streams)))
    while all(_in_threads(receive, jobs)):
        if apply:
            weights.grad = grad
            with torch.no_grad():
                opt.step()
        conns[0].sendall(b"k")


def bench_tcp(nbytes: int, reps: int, streams: int = 1, apply: bool = False) -> list[float]:
    """Raw TCP, one direction; with `streams` > 1 the payload is cut into that many parts,
    each sent over its own connection by its own thread, all at once. With `apply` the
    receiver also checks and applies it as a push must (`_tcp_sink`): a push's floor."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_tcp_sink, args=(child, nbytes, streams, apply), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        from protos import wire

        payload = torch.randn(nbytes // 4)  # finite floats: the floor's check passes
        data = wire.tensor_bytes(payload)

        def send(job) -> None:
            sock, (lo, hi) = job
            for a in range(lo, hi, TCP_CHUNK):
                sock.sendall(data[a : min(hi, a + TCP_CHUNK)])

        jobs = list(zip(socks, _parts(nbytes, streams)))
        out = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            _in_threads(send, jobs)
            assert socks[0].recv(1) == b"k"
            if i:  # the first round warms up
                out.append(nbytes / (time.perf_counter() - t0) / GB)
        for sock in socks:
            sock.close()
        return out
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


# -- (e) the gRPC ceiling: grpc.aio streaming prebuilt frames, no asyncps code ------------------

_GRPC_OPTS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]


def _grpc_peer(port_conn, nbytes: int, chunk: int) -> None:
    import grpc
    import uvloop

    async def run() -> None:
        frames = [os.urandom(chunk) for _ in range(nbytes // chunk)]

        async def pull(req, ctx):
            for f in frames:
                yield f

        async def push(it, ctx):
            async for _ in it:
                pass
            return b"ok"

        h = grpc.method_handlers_generic_handler(
            "bench.Raw",
            {"Pull": grpc.unary_stream_rpc_method_handler(pull), "Push": grpc.stream_unary_rpc_method_handler(push)},
        )
        server = grpc.aio.server(options=_GRPC_OPTS)
        server.add_generic_rpc_handlers((h,))
        port_conn.send(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    uvloop.run(run())


def bench_grpc_raw(nbytes: int, reps: int, chunk: int) -> dict[str, list[float]]:

    import grpc
    import uvloop

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_grpc_peer, args=(child, nbytes, chunk), daemon=True)
    proc.start()

    async def run() -> dict[str, list[float]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{parent.recv()}", options=_GRPC_OPTS) as ch:
            pull, push = ch.unary_stream("/bench.Raw/Pull"), ch.stream_unary("/bench.Raw/Push")
            frames = [os.urandom(chunk) for _ in range(nbytes // chunk)]
            out: dict[str, list[float]] = {"pull": [], "push": []}
            for i in range(reps + 1):
                t0 = time.perf_counter()
                async for _ in pull(b""):
                    pass
                t1 = time.perf_counter()
                await push(iter(frames))
                t2 = time.perf_counter()
                if i:
                    out["pull"].append(nbytes / (t1 - t0) / GB)
                    out["push"].append(nbytes / (t2 - t1) / GB)
            return out

    try:
        return uvloop.run(run())
    finally:
        proc.kill()
        proc.join(timeout=10)
