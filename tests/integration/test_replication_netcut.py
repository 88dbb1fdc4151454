"""A partition between the two replicas of a shard: at most one side accepts updates.

The network is test_netcut.py's: a namespace and a veth pair the test makes. The head runs
on the host end; the follower and the arbiter run inside the namespace; the two workers
on the host. Cutting the link leaves the head with neither its follower nor the arbiter:
it cannot drop the follower, so it steps down and refuses every worker call, while the
follower (which reaches the arbiter) takes over with the next epoch. While cut, the old
head's version does not move (no divergent writes) and the workers wait; once the link is
back they go on with the new head, the old head re-joins by state transfer, and the run
ends with every push applied once and both replicas equal.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from worker.rpc import wait_serving

from .chains import Chain, free_ports, status, try_status
from .support import poll, start_worker, wait_exit
from .test_netcut import _ip, netns  # noqa: F401  (netns is a fixture)

pytestmark = pytest.mark.slow  # a network namespace and real processes for ~30 s

STEPS = 150
# the workers reach neither side while cut: a heartbeat timeout longer than the cut keeps them
# registered (with a shorter one they are evicted and re-register, as test_netcut.py shows)


def _popen_in(procs, ns: str, args: list[str], log):
    return procs.popen(["ip", "netns", "exec", ns, sys.executable, *args], stdout=log, stderr=log)


def test_a_partition_between_replicas_leaves_one_side_accepting_updates(netns, start_server, procs, tmp_path):  # noqa: F811
    ns, host_if, host_addr, ns_addr = netns
    (port,) = free_ports(1)
    head_addr, follower_addr, arbiter = f"{host_addr}:{port}", f"{ns_addr}:{port}", f"{ns_addr}:{port + 1}"
    with open(tmp_path / "arbiter.log", "wb") as log:
        _popen_in(procs, ns, ["-m", "ps_server.arbiter", "--host", ns_addr, "--port", str(port + 1)], log)
    chain = Chain([head_addr, follower_addr], arbiter, dict(staleness=2, heartbeat_timeout=30))
    common = ["--replicas", chain.servers_flag, "--arbiter", arbiter, "--staleness", "2", "--heartbeat-timeout", "30"]
    head = start_server.launch(
        host=host_addr,
        port=port,
        replicas=chain.servers_flag,
        replica_index=0,
        arbiter=arbiter,
        staleness=2,
        heartbeat_timeout=30,
    )
    with open(tmp_path / "follower.log", "wb") as log:
        _popen_in(
            procs,
            ns,
            ["-m", "ps_server.cli", "--host", ns_addr, "--port", str(port), "--replica-index", "1", *common],
            log,
        )
    wait_serving(head_addr, timeout=60, is_alive=lambda: head.proc.poll() is None)
    wait_serving(follower_addr, timeout=60)
    chain.wait_formed(60)
    workers = [
        start_worker(procs, [chain.servers_flag], f"w{i}", STEPS, tmp_path, sleep=0.01, staleness=2, retry_seconds=90)
        for i in range(2)
    ]
    poll(lambda: status(head_addr).version >= 30, 60, "training to start")

    _ip("link", "set", host_if, "down")
    try:
        poll(lambda: status(head_addr).role != "head", 20, "the cut-off head to step down")
        frozen = status(head_addr).version
        for _ in range(10):  # while cut, the old head applies nothing
            time.sleep(0.2)
            st = status(head_addr)
            assert st.role != "head" and st.version == frozen, st
    finally:
        _ip("link", "set", host_if, "up")
    poll(lambda: (try_status(follower_addr) or status(head_addr)).role == "head", 30, "the follower to lead")
    for proc, files in workers:
        assert wait_exit(proc, 150, files["log"]) == 0
    chain.wait_formed(60)  # the old head re-joined behind the new one
    new, old = status(follower_addr), status(head_addr)
    assert new.role == "head" and old.role == "follower" and list(new.members) == [follower_addr, head_addr]
    stats = [json.loads(files["stats"].read_text()) for _, files in workers]
    assert sum(s["refused"] for s in stats) == 0
    assert new.version == old.version == 2 * STEPS  # each push applied once, on the side that accepted it
    assert new.weights_checksum == old.weights_checksum
