"""Compressed tensors on the wire (protos/compress.py) against real `ps-server`s.

The shard keeps fp32 weights and optimizer state; what it promises, byte for byte, with
SGD lr 1 (w - g, one rounding, the same in torch here):
* a bf16/fp16 pull sends exactly w.to(dtype); a bf16/fp16 push is applied as exactly
  g.to(dtype).float(); a onebit push as exactly decode(encode(g)) — whole or striped
  (bf16 over the real client's DataChannel, two connections);
* PSClient end to end, over the data plane and over gRPC: the model holds exactly the
  rounded weights, the shard applies exactly the rounded gradient; with onebit the
  worker's residual is carried to the next push and dropped when it re-registers;
* bad input changes nothing: an unknown compression at Register, in a push or a pull;
  a payload of the wrong size; a striped onebit push; a compressed push over gRPC —
  all INVALID_ARGUMENT, the shard's version, checksum and clocks unchanged.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from protos import compress, wire
from protos.asyncps.v1 import ps_pb2 as pb
from worker import CallOptions, PSClient
from worker.dataplane import Abort, DataChannel

from .support import FAST_FAIL, call, grpc_pull, mlp, poll, status, stub
from .test_dataplane import (  # noqa: F401
    AUTH,
    PLAN,
    N,
    answer,
    data_port,
    deadline,
    pull_request,
    push_header,
    raw_pull,
    ready,
    shard,
    state,
)

Code = grpc.StatusCode
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _grad(seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 1e-2 + 1e-9


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _raw_push(conn, session: int, clock: int, name: str, payload: torch.Tensor) -> pb.DataResponse:
    head = push_header(session, clock)
    head.compression = name
    data = wire.tensor_bytes(payload)
    conn.send(pb.DataRequest(push=head, payload_bytes=data.nbytes), data, deadline())
    return answer(conn)


def test_every_codec_on_the_data_plane_is_exact(shard):
    server, session, w = shard
    conn = ready(data_port(server.address))
    for name, dtype in DTYPES.items():  # pulls: exactly w.to(dtype)
        req = pull_request(session, 0)
        req.compression = name
        conn.send(pb.DataRequest(pull=req), deadline=deadline())
        resp = answer(conn)
        assert resp.code == 0 and resp.payload_bytes == 2 * N
        got = torch.empty(N, dtype=dtype)
        conn.recv_into(wire.tensor_bytes(got), deadline())
        assert torch.equal(got.view(torch.int16), w.to(dtype).view(torch.int16))
    # pushes: applied as exactly what the payload decodes to (SGD lr 1: w - g)
    for clock, name in enumerate(["bf16", "fp16", "onebit"]):
        g = _grad(5 + clock)
        payload = compress.encode(name, g)
        assert _raw_push(conn, session, clock, name, payload).code == 0
        _, got = raw_pull(conn, session, clock + 1)  # float32: the master weights themselves
        applied = compress.decode_into(name, payload, torch.empty(N))
        if name != "onebit":
            assert torch.equal(_bits(applied), _bits(g.to(DTYPES[name]).float()))
            assert not torch.equal(applied, g)  # the rounding is real
        else:
            assert payload.numel() * 30 < N * 4  # about 1/30 of float32 on the wire
        w = w.clone().add_(applied, alpha=-1.0)
        assert torch.equal(_bits(got), _bits(w)), name
    # striped both ways, by the real client's DataChannel over two connections
    chan = DataChannel("127.0.0.1", data_port(server.address), AUTH, streams=2, min_part_bytes=1024)
    try:
        out = torch.empty(N)
        req = pull_request(session, 3)
        req.compression = "bf16"
        chan.pull_into(req, out, deadline(), Abort())
        assert torch.equal(_bits(out), _bits(w.to(torch.bfloat16).float()))
        g = _grad(9)
        head = push_header(session, 3)
        head.compression = "bf16"
        assert chan.push(head, compress.encode("bf16", g), deadline(), Abort()).version == 4
        _, got = raw_pull(conn, session, 4)
        assert torch.equal(_bits(got), _bits(w.clone().add_(g.to(torch.bfloat16).float(), alpha=-1.0)))
    finally:
        chan.close()


def test_bad_compression_is_refused_and_changes_nothing(shard):
    server, session, _ = shard
    before = state(server.address)
    conn = ready(data_port(server.address))
    g = _grad(8)
    resp = _raw_push(conn, session, 0, "zip", g)
    assert resp.code == Code.INVALID_ARGUMENT.value[0] and "unknown compression 'zip'" in resp.message
    conn = ready(data_port(server.address))
    resp = _raw_push(conn, session, 0, "bf16", g)  # float32 bytes announced as bf16
    assert resp.code == Code.INVALID_ARGUMENT.value[0] and "bytes as bf16" in resp.message
    conn = ready(data_port(server.address))  # a payload larger than promised is not read: hung up on
    req = pull_request(session, 0)
    req.compression = "zip"
    conn.send(pb.DataRequest(pull=req), deadline=deadline())
    assert answer(conn).code == Code.INVALID_ARGUMENT.value[0]
    # a striped onebit push: refused before any byte is taken
    head = push_header(session, 0)
    head.compression = "onebit"
    part = compress.encode("onebit", g)
    conn = ready(data_port(server.address))
    conn.send(
        pb.DataRequest(push=head, payload_bytes=part.numel(), stripe=pb.Stripe(id=1, index=0, count=2)),
        wire.tensor_bytes(part),
        deadline(),
    )
    resp = answer(conn)
    assert resp.code == Code.INVALID_ARGUMENT.value[0] and "cannot be striped" in resp.message
    # gRPC pushes are float32 only
    head.compression = "bf16"
    code, details, _ = call(
        server.address,
        "Push",
        [wire.encode_frame(pb.Frame(push=head)), *wire.chunk_frames(g.to(torch.bfloat16))],
        security=AUTH,
    )
    assert code == Code.INVALID_ARGUMENT and "data plane" in details
    # Register with an unknown compression: refused, the worker not registered
    code, details, _ = call(
        server.address, "Register", pb.RegisterRequest(worker_id="z", plan_hash=PLAN, compression="zip"), security=AUTH
    )
    assert code == Code.INVALID_ARGUMENT and "unknown compression" in details
    assert state(server.address) == before
    with pytest.raises(ValueError, match="unknown compression"):
        PSClient([server.address], mlp(), compression="zip")


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _set_grads(model: torch.nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2 + 1e-9
    return _flat(p.grad for p in model.parameters())


def _master(address: str, plan_hash: str, numel: int, session: int, worker: str, clock: int) -> torch.Tensor:
    with stub(address) as s:
        return grpc_pull(s, pb.PullRequest(worker_id=worker, session=session, plan_hash=plan_hash, clock=clock), numel)[
            1
        ]


@pytest.mark.parametrize("name,transport", [("bf16", "tcp"), ("fp16", "grpc")])
def test_psclient_pulls_and_pushes_exactly_what_it_promises(start_server, name, transport):
    server = start_server()
    model = mlp()
    w0 = _flat(model.parameters()).clone()
    dtype = DTYPES[name]
    opts = CallOptions(timeout=10.0, push_timeout=30.0, pull_timeout=60.0, retry_seconds=5.0, transport=transport)
    with PSClient(
        [server.address],
        model,
        optimizer={"name": "sgd", "lr": 1.0, "average_gradients": False},
        staleness=math.inf,
        worker_id="w",
        compression=name,
        options=opts,
    ) as ps:
        ps.pull()
        assert ps._shards[0].transport == transport
        assert torch.equal(_bits(_flat(model.parameters())), _bits(w0.to(dtype).float()))
        g = _set_grads(model, 11)
        ps.push()
        ps.wait()
        w1 = _master(server.address, ps.plan.hash, ps.plan.numel, ps._sessions[0], "w", 1)
        assert torch.equal(_bits(w1), _bits(w0.clone().add_(g.to(dtype).float(), alpha=-1.0)))


def test_onebit_residual_is_kept_across_steps_and_reset_on_rejoin(start_server):
    server = start_server(heartbeat_timeout=1.0)
    model = mlp()
    w = _flat(model.parameters()).clone()
    with PSClient(
        [server.address],
        model,
        optimizer={"name": "sgd", "lr": 1.0, "average_gradients": False},
        staleness=math.inf,
        worker_id="w",
        compression="onebit",
        options=FAST_FAIL,
    ) as ps:
        residual = torch.zeros_like(w)
        for step in range(3):
            ps.pull()
            c = _set_grads(model, 20 + step) + residual
            ps.push()
            ps.wait()
            applied = torch.cat(
                [
                    compress.decode_into("onebit", compress.encode("onebit", c[s.lo : s.hi]), torch.empty(s.numel))
                    for s in ps.plan.shards
                ]
            )
            residual = c - applied
            w = w.clone().add_(applied, alpha=-1.0)
            assert torch.equal(_bits(ps._feedback.residual), _bits(residual))
            got = _master(server.address, ps.plan.hash, ps.plan.numel, ps._sessions[0], "w", step + 1)
            assert torch.equal(_bits(got), _bits(w))
        assert ps._feedback.residual.abs().sum() > 0
        ps._heartbeat.cancel()  # fall silent: the shard evicts this worker after its 1 s timeout
        poll(lambda: not status(server.address).clocks, 30, "the silent worker to be evicted")
        ps.pull()
        _set_grads(model, 30)
        ps.push()  # refused (evicted): its compressed residual is for a forgotten session
        ps.wait()
        assert ps.stats.pushes_dropped == 1
        ps.pull()  # re-registers
        assert ps.stats.reregistrations == 1 and not ps._feedback.residual.any()
