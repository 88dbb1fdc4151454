"""Replicated shards in SSP mode (s = 2, no averaging), replicas killed and restarted by hand.

- a killed head: every acknowledged push was applied exactly once on the survivor
  (its version equals the pushes the workers made, none refused, none re-registered);
- a follower killed and started again mid-run re-joins by state transfer and ends
  bit-equal to the head (version, weights checksum, clocks).
"""

from __future__ import annotations

import json

import pytest

from .chains import start_chain, status, try_status
from .support import poll, start_worker, wait_exit

pytestmark = pytest.mark.slow  # real processes for several seconds each

STEPS = 120


def _workers(procs, chain, tmp_path, n: int = 2):
    return [
        start_worker(procs, [chain.servers_flag], f"w{i}", STEPS, tmp_path, sleep=0.01, staleness=2, retry_seconds=60)
        for i in range(n)
    ]


def test_killed_head_in_ssp_mode_loses_no_acknowledged_push_and_applies_none_twice(start_server, procs, tmp_path):
    chain = start_chain(start_server, procs, tmp_path, staleness=2, heartbeat_timeout=5)
    workers = _workers(procs, chain, tmp_path)
    poll(lambda: (chain.head() or status(chain.addresses[0])).version >= 40, 60, "training to start")
    chain.servers[0].proc.kill()
    for proc, files in workers:
        assert wait_exit(proc, 120, files["log"]) == 0
    st = status(chain.addresses[1])
    assert st.role == "head" and list(st.members) == [chain.addresses[1]]
    stats = [json.loads(files["stats"].read_text()) for _, files in workers]
    assert sum(s["refused"] for s in stats) == 0 and sum(s["reregistrations"] for s in stats) == 0
    # every push was acknowledged (as applied, or as already applied when retried on the new head)
    # and is in the survivor's version exactly once
    assert st.version == 2 * STEPS == st.pushes_applied
    accepted = sum(s["accepted"] for s in stats)
    assert 2 * STEPS - 2 <= accepted <= 2 * STEPS  # at most one in flight per worker at the kill
    assert st.lost_updates == 0


def test_a_restarted_replica_rejoins_by_state_transfer_and_ends_bit_equal(start_server, procs, tmp_path):
    chain = start_chain(start_server, procs, tmp_path, staleness=2, heartbeat_timeout=5)
    workers = _workers(procs, chain, tmp_path)
    poll(lambda: status(chain.addresses[0]).version >= 30, 60, "training to start")
    chain.servers[1].proc.kill()
    chain.servers[1].proc.wait(timeout=10)
    poll(lambda: len(status(chain.addresses[0]).members) == 1, 30, "the head to drop its dead follower")
    at_restart = status(chain.addresses[0]).version
    again = chain.start(start_server, 1).ready()
    chain.wait_formed(60)
    joined = status(chain.addresses[1])
    assert joined.role == "follower" and joined.version >= at_restart
    for proc, files in workers:
        assert wait_exit(proc, 120, files["log"]) == 0
    assert at_restart < 2 * STEPS  # it re-joined while training went on
    head, follower = status(chain.addresses[0]), status(chain.addresses[1])
    assert head.version == follower.version == 2 * STEPS
    assert head.weights_checksum == follower.weights_checksum
    assert [(c.worker_id, c.clock) for c in head.clocks] == [(c.worker_id, c.clock) for c in follower.clocks]
    assert head.incarnation == follower.incarnation and head.epoch == follower.epoch
    assert "joined the chain" in again.log.read_text()
    assert try_status(chain.addresses[1]) is not None


def test_a_new_head_hands_out_the_batch_split_the_old_one_made(start_server, procs, tmp_path):
    """Balanced batches: a clock's split is made on the head at the clock's first pull and logged.
    "a" reads clock 1 on the head (12 of the combined 16, being 3x faster at clock 0), then
    reports itself slow; the head is killed; "b" reads clock 1 on the new head and gets the
    4 that make 16, not a fresh split from the new speeds."""
    import torch

    from protos import wire
    from protos.asyncps.v1 import ps_pb2 as pb

    from .support import RPC_TIMEOUT, call, stub

    chain = start_chain(start_server, procs, tmp_path, staleness=0, heartbeat_timeout=60)
    head, follower = chain.addresses
    n, plan = 8, "p" * 64
    cfg = pb.OptimizerConfig(name="sgd", lr=0.5, average_gradients=True, balance_batches=True)
    init = pb.InitHeader(plan_hash=plan, shard_index=0, num_shards=1, numel=n, optimizer=cfg, staleness=0)
    assert (
        call(head, "Init", [wire.encode_frame(pb.Frame(init=init)), wire.encode_frame(tensor=torch.zeros(n))])[0].name
        == "OK"
    )

    def on(address: str, method: str, request):
        with stub(address) as s:
            return getattr(s, method)(request, timeout=RPC_TIMEOUT)

    def push(worker: str, session: int, clock: int, samples: int, busy: float) -> None:
        header = pb.PushHeader(
            worker_id=worker, session=session, plan_hash=plan, clock=clock, samples=samples, busy_seconds=busy
        )
        frames = [wire.encode_frame(pb.Frame(push=header)), wire.encode_frame(tensor=torch.ones(n))]
        assert call(head, "Push", frames)[0].name == "OK"

    def batch(address: str, worker: str, session: int, clock: int) -> int:
        with stub(address) as s:
            request = pb.PullRequest(worker_id=worker, session=session, plan_hash=plan, clock=clock)
            for raw in s.Pull(request, timeout=RPC_TIMEOUT):
                frame, _ = wire.decode_frame(raw)
                if frame.HasField("pull"):
                    return frame.pull.batch_size
        raise AssertionError("no pull header")

    a = on(head, "Register", pb.RegisterRequest(worker_id="a", plan_hash=plan, batch_size=8)).session
    b = on(head, "Register", pb.RegisterRequest(worker_id="b", plan_hash=plan, batch_size=8)).session
    push("a", a, 0, 8, 0.1)  # 80 samples/s
    push("b", b, 0, 8, 0.3)  # 27 samples/s: a third of a's speed
    assert batch(head, "a", a, 1) == 12
    push("a", a, 1, 12, 3.6)  # a now reports 3 samples/s: a fresh split would give b the larger share
    chain.servers[0].proc.kill()
    poll(lambda: (try_status(follower) or pb.StatusResponse()).role == "head", 30, "the follower to take over")
    assert batch(follower, "b", b, 1) == 4  # 12 + 4: the clock keeps its combined batch of 16
