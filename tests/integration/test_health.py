"""A server answers the standard gRPC health check, and stops gracefully on SIGTERM.

* SERVING for the whole server ("") and for asyncps.v1.ParameterServer; NOT_FOUND for an
  unknown service (the standard health protocol).
* Idle, SIGTERM makes it exit 0 at once.
* With a call in flight that can never finish (a pull held by read-my-writes), SIGTERM
  gives the call the grace period, then cancels it: the process exits 0 within about
  `--grace`, and the caller gets an error rather than hanging.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncps_common.optimizer import default_config
from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb

from .support import RPC_TIMEOUT, call, kill_group, poll, status, stub, wait_exit

GRACE = 1.5


def health(address: str, name: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT)
            .status
        )


def test_health_serving_and_sigterm_exits_0(start_server):
    server = start_server(grace=GRACE)
    assert health(server.address, "") == health_pb2.HealthCheckResponse.SERVING
    assert health(server.address, service.SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    try:
        health(server.address, "no.such.Service")
        raise AssertionError("an unknown service should be NOT_FOUND")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND

    t0 = time.monotonic()
    kill_group(server.proc, signal.SIGTERM)
    assert wait_exit(server.proc, GRACE + 10, server.log) == 0, server.log.read_text()[-3000:]
    assert time.monotonic() - t0 < GRACE + 3.0


@pytest.mark.slow
def test_sigterm_with_a_call_in_flight_exits_0_within_the_grace_period(start_server):
    server = start_server(grace=GRACE, staleness=0, heartbeat_timeout=3600)
    plan = "h" * 64
    head = pb.InitHeader(plan_hash=plan, shard_index=0, num_shards=1, numel=16, optimizer=default_config())
    assert (
        call(
            server.address, "Init", [wire.encode_frame(pb.Frame(init=head)), wire.encode_frame(tensor=torch.zeros(16))]
        )[0]
        == grpc.StatusCode.OK
    )
    with stub(server.address) as s:
        session = s.Register(pb.RegisterRequest(worker_id="w", plan_hash=plan), timeout=RPC_TIMEOUT).session

    def seen(st: pb.StatusResponse) -> float:
        return next(c.seconds_since_seen for c in st.clocks if c.worker_id == "w")

    # Let the worker fall silent a little, so the pull's arrival shows as a fresh sign of life.
    poll(lambda: seen(status(server.address)) > 0.3, 10, "the worker to be silent for 0.3 s")
    result: dict = {}

    def pull() -> None:  # clock 1 needs w's own push of clock 0, which never comes: held forever
        req = pb.PullRequest(worker_id="w", session=session, plan_hash=plan, clock=1)
        result["code"] = call(server.address, "Pull", req, timeout=30)[0]
        result["t"] = time.monotonic()

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    poll(lambda: seen(status(server.address)) < 0.2, 10, "the pull to reach the server")

    t0 = time.monotonic()
    kill_group(server.proc, signal.SIGTERM)
    assert wait_exit(server.proc, GRACE + 10, server.log) == 0, server.log.read_text()[-3000:]
    elapsed = time.monotonic() - t0
    thread.join(timeout=10)
    assert not thread.is_alive(), "the held pull never ended"
    assert result["code"] != grpc.StatusCode.OK
    # The slack covers the final checkpoint and interpreter exit on a loaded 2-core machine; a server
    # that waited for the held pull instead of its grace period would take 30 s.
    assert GRACE - 0.3 <= elapsed < GRACE + 6.0, f"stopped after {elapsed:.2f}s with --grace {GRACE}"
    assert result["t"] - t0 < GRACE + 6.0
