"""Bad input to replicated shards: one line and exit 2 on the CLI, SPEC's codes on the wire, nothing changed.

- `ps-server` given an inconsistent replica list (a replica twice, an index outside it, a port
  that is not its own, no arbiter, an arbiter without replicas, TLS) refuses to start;
- a worker's call to a follower: UNAVAILABLE, reason `not-head` (the worker tries the next);
- a Join from a replica of another shard: FAILED_PRECONDITION; a Join whose state transfer
  cannot reach the joiner: UNAVAILABLE, the chain unchanged;
- an entry of an older epoch: FAILED_PRECONDITION, reason `stale-epoch`, nothing applied;
- a state transfer that breaks off: FAILED_PRECONDITION, the joiner stays `joining`, empty.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb

from .chains import free_ports, start_arbiter, start_chain, status
from .support import RPC_TIMEOUT, poll

pytestmark = pytest.mark.slow  # ps-server processes (each CLI case imports torch): about a minute

R = "127.0.0.1:{}|127.0.0.1:{}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "5001", "--replicas", R.format(5001, 5001), "--arbiter", "127.0.0.1:1"], "names a replica twice"),
        (
            ["--port", "5001", "--replicas", R.format(5001, 5002), "--replica-index", "2", "--arbiter", "h:1"],
            "outside the 2 replicas",
        ),
        (["--port", "5003", "--replicas", R.format(5001, 5002), "--arbiter", "h:1"], "but it listens on port 5003"),
        (["--port", "5001", "--replicas", R.format(5001, 5002)], "needs --arbiter"),
        (["--port", "5001", "--arbiter", "127.0.0.1:1"], "give --replicas too"),
        (["--port", "5001", "--replicas", "nohost|127.0.0.1:5001", "--arbiter", "h:1"], "is not host:port"),
    ],
)
def test_an_inconsistent_replica_list_is_one_line_and_exit_2(flags, message):
    proc = subprocess.run([sys.executable, "-m", "ps_server.cli", *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("servers", ["127.0.0.1:5|127.0.0.1:5", "127.0.0.1:5||127.0.0.1:6"])
def test_a_worker_given_an_inconsistent_replica_list_is_one_line_and_exit_2(servers):
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--servers", servers, "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "must be distinct host:port entries" in lines[0], proc.stderr


def _code(fn, request) -> tuple[grpc.StatusCode, str, dict]:
    try:
        fn(request, timeout=RPC_TIMEOUT)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", dict(err.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", {}


def test_the_wire_refuses_bad_replica_traffic_and_changes_nothing(start_server, procs, tmp_path):
    chain = start_chain(start_server, procs, tmp_path)
    head, follower = chain.addresses
    before = status(head)
    with grpc.insecure_channel(follower) as ch:
        code, _, meta = _code(service.Stub(ch).Register, pb.RegisterRequest(worker_id="w", plan_hash="x"))
        assert code == grpc.StatusCode.UNAVAILABLE and meta.get(service.REASON_KEY) == service.NOT_HEAD
        stale = pb.ReplicaEntry(epoch=before.epoch - 1, seq=1, leave=pb.LeaveRequest(worker_id="w"))
        code, details, meta = _code(
            service.Stub(ch, name="Replica").Apply, iter([wire.encode_frame(pb.Frame(entry=stale))])
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and meta.get(service.REASON_KEY) == service.STALE_EPOCH
    with grpc.insecure_channel(head) as ch:
        replica = service.Stub(ch, name="Replica")
        other = pb.JoinRequest(address="127.0.0.1:9", shard_index=1, num_shards=2)
        code, details, _ = _code(replica.Join, other)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "shard 1 of 2" in details
        (nobody,) = free_ports(1)
        code, details, _ = _code(replica.Join, pb.JoinRequest(address=f"127.0.0.1:{nobody}", num_shards=1))
        assert code == grpc.StatusCode.UNAVAILABLE and "broke off" in details and "unchanged" in details
    after = status(head)
    assert (after.epoch, list(after.members), after.live_workers) == (before.epoch, list(before.members), 0)
    assert status(follower).live_workers == 0 and status(follower).role == "follower"


def test_a_broken_off_state_transfer_leaves_the_joiner_out(start_server, procs, tmp_path):
    """A replica not first in its list waits to join while the arbiter holds no chain: a state
    transfer to it that stops short is refused and leaves it joining and empty."""
    arbiter = start_arbiter(procs, tmp_path)
    a, b = (f"127.0.0.1:{p}" for p in free_ports(2))
    joiner = start_server(port=int(b.rsplit(":", 1)[1]), replicas=f"{a}|{b}", replica_index=1, arbiter=arbiter)
    poll(lambda: status(joiner.address).role == "joining", 30, "the replica to wait for its chain")
    entry = pb.ReplicaEntry(epoch=1, seq=0, state=pb.StateEntry(bytes=1000, members=[a, b]))
    import torch

    frames = [wire.encode_frame(pb.Frame(entry=entry)), *wire.chunk_frames(torch.zeros(10, dtype=torch.uint8))]
    with grpc.insecure_channel(joiner.address) as ch:
        code, details, _ = _code(service.Stub(ch, name="Replica").Apply, iter(frames))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "broke off after 10 of 1000 bytes" in details
    st = status(joiner.address)
    assert st.role == "joining" and not st.initialized and st.epoch == 0
