"""The fast wire path, end to end: byte-exact through real servers, and pulls never stall on an apply.

* Byte-exactness: a model with odd-sized parameters of every floating dtype a model may
  have (fp32, fp16, bf16: all exact in the servers' fp32) is initialized on 1-3 real
  `ps-server` shards and pulled back with the real `PSClient`, with chunk sizes that do
  not divide the shards; every bit must come back. Then one push with SGD at lr = 1 and
  no momentum makes the servers hold w - g, which this process computes itself: every
  bit of the gradient had to arrive too.
* No needless blocking: an in-process server whose optimizer step is held until the test
  lets it go (the step is held inside the store's lock). A pull of the same shard must be
  answered while the apply is still held (so it cannot be waiting for it), and a pull of
  a version not yet encoded must be answered with the new version once the apply ends. Nothing here depends on timing: a
  pull that waited for the lock would hit its deadline while the step is held. Both
  transports: gRPC (frames encoded once per version) and the TCP data plane (the live
  weights, copied on write when an update starts while a pull reads them).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from asyncps_common.optimizer import default_config
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server.servicer import ServerConfig
from worker import CallOptions, PSClient
from worker.dataplane import Abort, DataChannel

from .support import RPC_TIMEOUT, InProcessServer, grpc_pull, stub

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

SIZES = [(7,), (1023,), (3, 5, 7), (10007,), (129, 31), (1,), (65537,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float32]


class OddModel(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        params = []
        for i, shape in enumerate(SIZES):
            dtype = DTYPES[i % len(DTYPES)]
            params.append(torch.nn.Parameter(awkward_values(shape, dtype, gen)))
        self.ps = torch.nn.ParameterList(params)


def awkward_values(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Finite values of `dtype` with every kind of bit pattern: random bits, denormals, -0.0, extremes."""
    n = 1
    for d in shape:
        n *= d
    bits_dtype = {4: torch.int32, 2: torch.int16}[dtype.itemsize]
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(bits_dtype)
    t = bits.view(dtype).clone()
    t[~torch.isfinite(t)] = 1.5  # Init refuses NaN/Inf
    info = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, info.tiny, -info.tiny, info.smallest_normal / 4, info.max, info.min], dtype=dtype
    )
    k = min(n, specials.numel())
    t[:k] = specials[:k]
    return t.reshape(shape)


def push_exact(ps: PSClient, model: torch.nn.Module) -> None:
    """Push a gradient of awkward values (a -0.0 in each) through `ps` (SGD, lr 1, no
    momentum) and pull back: every parameter must be w - g to the bit, as fp32 computes it."""
    gen = torch.Generator().manual_seed(99)
    weights = [p.detach().float().clone() for p in model.parameters()]
    grads = []
    for p in model.parameters():
        g = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.dtype)
        g.view(-1)[0] = -0.0
        p.grad = g.clone()
        grads.append(g)
    ps.push().wait(timeout=60)
    ps.pull()
    for p, w, g in zip(model.parameters(), weights, grads):
        assert raw(p) == raw((w - g.float()).to(p.dtype))  # SGD at lr 1 in fp32


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
@pytest.mark.parametrize(
    "num_shards, chunk_bytes",
    [(1, wire.DEFAULT_CHUNK_BYTES), (2, 4100), (3, 65532 + 4 * 7)],
    ids=["1-shard-default-chunks", "2-shards-4100B", "3-shards-65560B"],
)
def test_init_pull_push_round_trip_is_bit_exact(start_server, num_shards, chunk_bytes, transport):
    servers = start_server.shards(num_shards, heartbeat_timeout=600)
    model = OddModel(seed=num_shards)
    original = [raw(p) for p in model.parameters()]
    opts = CallOptions(
        timeout=10.0,
        push_timeout=30.0,
        pull_timeout=60.0,
        retry_seconds=5.0,
        chunk_bytes=chunk_bytes,
        transport=transport,
    )
    with PSClient([s.address for s in servers], model, optimizer={"name": "sgd", "lr": 1.0}, options=opts) as ps:
        assert [s.transport for s in ps._shards] == [transport] * num_shards
        assert all(s.numel % (chunk_bytes // 4) for s in ps.plan.shards), "chunks should not divide the shards"
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # the pull must bring back every element
        ps.pull()
        assert [raw(p) for p in model.parameters()] == original

        push_exact(ps, model)


# -- a pull during an apply --------------------------------------------------------------

N = 300_001


def _pull(
    srv: InProcessServer, transport: str, worker_id: str, session: int, timeout: float
) -> tuple[int, torch.Tensor]:
    if transport == "tcp":
        return _pull_data(srv.servicer.data_port, worker_id, session, timeout)
    return _pull_grpc(srv.address, worker_id, session, timeout)


def _pull_data(port: int, worker_id: str, session: int, timeout: float) -> tuple[int, torch.Tensor]:
    channel = DataChannel("127.0.0.1", port)
    try:
        out = torch.empty(N)
        head = channel.pull_into(
            pb.PullRequest(worker_id=worker_id, session=session, plan_hash="p" * 64, clock=0),
            out,
            time.monotonic() + timeout,
            Abort(),
        )
        return head.version, out
    finally:
        channel.close()


def _pull_grpc(address: str, worker_id: str, session: int, timeout: float) -> tuple[int, torch.Tensor]:
    with stub(address) as s:
        return grpc_pull(
            s,
            pb.PullRequest(worker_id=worker_id, session=session, plan_hash="p" * 64, clock=0, chunk_bytes=1 << 16),
            N,
            timeout,
        )


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_pull_is_not_stalled_by_an_apply_in_progress(transport):
    srv = InProcessServer(ServerConfig(heartbeat_timeout=600), data_plane=True)
    release = threading.Event()
    try:
        w0 = torch.randn(N, generator=torch.Generator().manual_seed(0))
        g = torch.randn(N, generator=torch.Generator().manual_seed(1))
        head = pb.InitHeader(
            plan_hash="p" * 64,
            shard_index=0,
            num_shards=1,
            numel=N,
            optimizer=default_config("sgd", lr=1.0),
            worker_id="a",
        )
        with stub(srv.address) as s:
            s.Init(iter([wire.encode_frame(pb.Frame(init=head)), *wire.chunk_frames(w0, 1 << 16)]), timeout=RPC_TIMEOUT)
            sess = {
                w: s.Register(pb.RegisterRequest(worker_id=w, plan_hash="p" * 64), timeout=RPC_TIMEOUT).session
                for w in ("a", "b")
            }

        opt = srv.servicer.store._opt
        real_step, started = opt.step, threading.Event()

        def held_step(*args, **kw):  # runs inside ShardStore.apply, under the store's lock
            started.set()
            assert release.wait(60), "test never released the apply"
            return real_step(*args, **kw)

        opt.step = held_step
        results: dict[str, object] = {}

        def push(clock: int) -> None:
            frames = [
                wire.encode_frame(
                    pb.Frame(
                        push=pb.PushHeader(
                            worker_id="a", session=sess["a"], plan_hash="p" * 64, clock=clock, read_version=clock
                        )
                    )
                )
            ]
            with stub(srv.address) as s:
                results[f"push{clock}"] = s.Push(iter(frames + list(wire.chunk_frames(g, 1 << 16))), timeout=60)

        # 1. Version 0 is being read (gRPC: its frames exist once pulled; data plane: a slow pull
        #    still sends it, held here as a lease): a pull during the held apply is answered at once.
        assert _pull(srv, transport, "b", sess["b"], RPC_TIMEOUT)[0] == 0
        reading = srv.servicer.store.lease() if transport == "tcp" else None
        pusher = threading.Thread(target=push, args=(0,))
        pusher.start()
        assert started.wait(30), "the push never reached the apply"
        version, weights = _pull(srv, transport, "b", sess["b"], timeout=5.0)  # DEADLINE_EXCEEDED if it waits
        assert not release.is_set() and pusher.is_alive()
        assert version == 0 and torch.equal(weights, w0)
        release.set()
        pusher.join(30)
        assert results["push0"].version == 1
        if reading is not None:
            assert torch.equal(reading.weights, w0)  # copied on write: the reader's version never moved
            srv.servicer.store.release(reading)

        # 2. Version 1 was never pulled (nobody reads it): a pull during the next held apply waits
        #    for it, no longer (the data plane updates the weights in place then, without a copy).
        started.clear()
        release.clear()
        pusher = threading.Thread(target=push, args=(1,))
        pusher.start()
        assert started.wait(30)
        puller = threading.Thread(target=lambda: results.update(pull=_pull(srv, transport, "b", sess["b"], 30.0)))
        puller.start()
        release.set()
        puller.join(30)
        pusher.join(30)
        assert results["push1"].version == 2
        version, weights = results["pull"]
        assert version == 2 and torch.equal(weights, w0 - g - g)
    finally:
        release.set()
        srv.close()
