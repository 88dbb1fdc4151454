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
