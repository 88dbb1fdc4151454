"""A worker cut off from its server (link down) for longer than the heartbeat timeout.

The test builds its own network: a namespace and a veth pair with addresses from a
private range (10.231.N.0/30) on that veth only; the server listens on the host end,
one worker runs inside the namespace (`ip netns exec`), another on the host. Cutting
is `ip link set <host end> down`, reconnecting `up`. Nothing but those two addresses is
ever addressed, and the namespace is always deleted (finalizer). Needs root (CI is).

What must hold (docs/guarantees.md): the cut worker is evicted after the timeout, so
the other worker is held back at most that long; it rejoins after the link is back;
nothing hangs; and a push from before the cut is applied at most once: a late one of
the old session is refused, so the shard's version equals the pushes the workers were
told were applied, plus at most the cut worker's pushes in flight at the cut whose answer
was lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from worker.rpc import wait_serving

from .support import clock_of, poll, start_worker, status, wait_exit

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

TIMEOUT = 1.5  # the server's --heartbeat-timeout


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    """(namespace, host-side interface, host address, namespace address); deleted afterwards."""
    n = os.getpid() % 250
    ns, host_if, ns_if = f"asyncps{os.getpid()}", f"aps{os.getpid()}h", f"aps{os.getpid()}n"
    host_addr, ns_addr = f"10.231.{n}.1", f"10.231.{n}.2"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        _cleanup(ns, host_if)
        pytest.fail(f"cannot build the test network (needs root and iproute2): {exc}")
    try:
        yield ns, host_if, host_addr, ns_addr
    finally:
        _cleanup(ns, host_if)


def _cleanup(ns: str, host_if: str) -> None:
    subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)  # takes its peer along
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_cut_worker_is_evicted_rejoins_and_no_push_is_applied_twice(netns, start_server, procs, tmp_path):
    ns, host_if, host_addr, _ = netns
    pending = start_server.launch(host=host_addr, heartbeat_timeout=TIMEOUT, staleness=2)
    poll(pending.port_file.exists, 60, "the server's port file")
    address = f"{host_addr}:{int(pending.port_file.read_text())}"
    wait_serving(address, timeout=60, is_alive=lambda: pending.proc.poll() is None)

    # s = 2: the host worker can run at most 2 clocks ahead of the cut one until it is evicted.
    host, host_files = start_worker(procs, [address], "host", 300, tmp_path, sleep=0.01, staleness=2)
    cut, cut_files = start_worker(
        procs, [address], "cut", 120, tmp_path, sleep=0.01, staleness=2, prefix=("ip", "netns", "exec", ns)
    )
    poll(lambda: (clock_of(status(address), "cut") or 0) >= 10, 60, "the namespaced worker to train")

    _ip("link", "set", host_if, "down")
    t_cut = time.monotonic()
    try:
        host_at_cut = clock_of(status(address), "host")
        poll(lambda: clock_of(status(address), "cut") is None, 30, "the cut worker to be evicted")
        evicted_after = time.monotonic() - t_cut
        # others are held back no longer than the timeout: the host worker moves on during the cut
        poll(lambda: clock_of(status(address), "host") > host_at_cut + 3, 30, "the host worker to go on")
    finally:
        _ip("link", "set", host_if, "up")
    assert evicted_after >= TIMEOUT - 0.2, f"evicted after {evicted_after:.2f}s, before the {TIMEOUT}s timeout"

    poll(
        lambda: clock_of(status(address), "cut") is not None or cut.poll() is not None,
        60,
        "the cut worker to register again",
    )
    assert wait_exit(cut, 90, cut_files["log"]) == 0
    assert wait_exit(host, 90, host_files["log"]) == 0
    cut_stats = json.loads(cut_files["stats"].read_text())
    host_stats = json.loads(host_files["stats"].read_text())
    assert cut_stats["reregistrations"] >= 1
    st = status(address)
    assert st.evictions >= 1
    # Nothing applied twice: every acknowledged push was applied once, and the only applied pushes a
    # worker was not told of are the cut worker's in flight when the link went down (the server took
    # the whole gradient, the answer was lost, and the retry of the old session was refused).
    assert st.version == st.pushes_applied, st
    acked = cut_stats["accepted"] + host_stats["accepted"]
    unanswered = min(cut_stats["pushes"] - cut_stats["accepted"], 2)  # PSClient's default max_inflight
    assert acked <= st.version <= acked + unanswered, (st, cut_stats, host_stats)
    assert cut_stats["accepted"] + cut_stats["refused"] <= cut_stats["pushes"]
