"""A push that reached the optimizer stands: counted, its clock moved, never applied twice.

The apply runs in a worker thread while the event loop goes on serving; the worker that
pushed may be evicted, leave or register again meanwhile, and the call itself may be
cancelled. Seen in CI (test_netcut): a worker evicted during its push's apply left the
shard at version 419 with 418 pushes counted, and the push answered as refused.
"""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from asyncps_common.optimizer import default_config
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server.servicer import ServerConfig

from .support import RPC_TIMEOUT, InProcessServer, clock_of, poll, stub

N = 1000
PLAN = "p" * 64


def _push_frames(worker_id: str, session: int, clock: int, g: torch.Tensor) -> list[bytes]:
    head = pb.PushHeader(worker_id=worker_id, session=session, plan_hash=PLAN, clock=clock, read_version=0)
    return [wire.encode_frame(pb.Frame(push=head)), *wire.chunk_frames(g, 1 << 12)]


@pytest.mark.parametrize("meanwhile", ["re-register", "leave", "cancel"])
def test_a_push_applied_while_its_worker_changes_or_its_call_ends_is_counted_once(meanwhile):
    srv = InProcessServer(ServerConfig(heartbeat_timeout=600))
    release, started = threading.Event(), threading.Event()
    try:
        head = pb.InitHeader(
            plan_hash=PLAN, shard_index=0, num_shards=1, numel=N, optimizer=default_config("sgd", lr=1.0), worker_id="a"
        )
        g = torch.ones(N)
        with stub(srv.address) as s:
            s.Init(
                iter([wire.encode_frame(pb.Frame(init=head)), *wire.chunk_frames(torch.zeros(N), 1 << 12)]),
                timeout=RPC_TIMEOUT,
            )
            session = s.Register(pb.RegisterRequest(worker_id="a", plan_hash=PLAN), timeout=RPC_TIMEOUT).session

        opt = srv.servicer.store._opt
        real_step = opt.step

        def held_step(*args, **kw):  # inside ShardStore.apply, in its worker thread
            started.set()
            assert release.wait(60), "test never released the apply"
            return real_step(*args, **kw)

        opt.step = held_step
        outcome: dict[str, object] = {}

        def push() -> None:
            with stub(srv.address) as s:
                try:
                    outcome["response"] = s.Push(
                        iter(_push_frames("a", session, 0, g)), timeout=2.0 if meanwhile == "cancel" else 60
                    )
                except grpc.RpcError as exc:
                    outcome["code"] = exc.code()

        pusher = threading.Thread(target=push)
        pusher.start()
        assert started.wait(30), "the push never reached the apply"
        with stub(srv.address) as s:
            if meanwhile == "re-register":
                session = s.Register(pb.RegisterRequest(worker_id="a", plan_hash=PLAN), timeout=RPC_TIMEOUT).session
            elif meanwhile == "leave":
                s.Leave(pb.LeaveRequest(worker_id="a", session=session), timeout=RPC_TIMEOUT)
            else:
                pusher.join(30)  # the client's deadline passes while the apply is held
                assert outcome["code"] == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        pusher.join(30)
        if meanwhile != "cancel":
            assert outcome["response"].version == 1  # applied, so acknowledged
        with stub(srv.address) as s:
            # a cancelled call's commit finishes on its own, after the call has ended
            poll(
                lambda: s.Status(pb.StatusRequest(), timeout=RPC_TIMEOUT).pushes_applied >= 1,
                30,
                "the held push to be committed",
            )
            st = s.Status(pb.StatusRequest(), timeout=RPC_TIMEOUT)
            assert st.version == st.pushes_applied == 1, st
            snap = srv.servicer.store.lease()
            assert torch.equal(snap.weights, -g)  # applied exactly once (SGD, lr 1, from zero)
            srv.servicer.store.release(snap)
            if meanwhile == "leave":
                assert clock_of(st, "a") is None
                return
            assert clock_of(st, "a") == 1  # the (current) session stands past the applied clock
            with pytest.raises(grpc.RpcError) as again:  # a retry of clock 0 is refused, not applied twice
                s.Push(iter(_push_frames("a", session, 0, g)), timeout=RPC_TIMEOUT)
            assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert s.Status(pb.StatusRequest(), timeout=RPC_TIMEOUT).version == 1
    finally:
        release.set()
        srv.close()
