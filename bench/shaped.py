"""A shaped multi-host network on one machine: every host in its own network namespace.

    with ShapedNet(["server-0", "worker-0", "worker-1"], rate_mbit=1000, delay_ms=0.1) as net:
        net.popen("worker-0", [sys.executable, "-c", "..."])   # runs inside worker-0's namespace
        net.address("server-0")                                 # 10.77.0.1

Layout: one namespace per host and one more holding a Linux bridge (the "switch"); each
host is joined to the bridge by a veth pair created directly inside the two namespaces
(`ip -n BRIDGE link add ... peer ... netns HOST`), so nothing is ever created in, or
addressed from, the machine's own namespace. Every host link is shaped in both
directions with netem (rate and one-way delay): the host end's egress is the host's
upload, the bridge end's egress its download, as one full-duplex NIC port of that rate.
Two hosts thus see 2 × delay one way (4 × delay round trip) and, alone on the network,
the link rate between them. Addresses are 10.77.0.N/24, only inside these namespaces.

Everything is named `<prefix><pid>x<n>-...` (prefix `apsnet`), so `cleanup_leftovers`
can find and delete what a killed run left, and `close` (the context manager's exit, on
every path) kills the processes still inside the namespaces and deletes them, which
takes their veths and qdiscs along. Needs root and iproute2 (`ip`, `tc`). Not thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)
PREFIX = "apsnet"
SUBNET = "10.77.0"
DEFAULT_RATE_MBIT = 1000.0
DEFAULT_DELAY_MS = 0.1
# A link's queue, in time at its rate (a switch port's buffer). 20 ms keeps four senders into
# one link (4 -> 1: 48.1 of 50 Mbit/s) and both directions busy at once (46.7) at the rate;
# 200 ms moved no more (47.4, 47.7) and only delays small messages behind bulk ones.
DEFAULT_QUEUE_MS = 20.0
_serial = itertools.count()


class NetError(RuntimeError):
    """The network could not be built (no root, no iproute2, a name in use)."""


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise NetError(f"{args[0]} not found (install iproute2): {exc}") from None
    if check and r.returncode:
        raise NetError(f"`{' '.join(args)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


_NETEM: dict[str, bool] = {}


def netem_available(ns: str | None = None) -> bool:
    """True if the kernel has the netem qdisc (delay); probed once on a throwaway veth in `ns`.

    Some kernels (this project's 2-core VM: CONFIG_NET_SCH_NETEM unset) have only tbf and
    htb: links are then shaped by rate alone and `ShapedNet.delay_applied` is False.
    """
    if "probe" not in _NETEM:
        if ns is None:
            raise RuntimeError("netem_available needs a namespace the first time")
        _run(["ip", "-n", ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"])
        try:
            r = _run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms"],
                check=False,
            )
            _NETEM["probe"] = r.returncode == 0
        finally:
            _run(["ip", "-n", ns, "link", "del", "probe0"], check=False)
    return _NETEM["probe"]


def namespaces() -> list[str]:
    """Every network namespace name on the machine."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL every process still inside namespace `ns` (only our harness's namespaces get here)."""
    for _ in range(50):
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def delete_namespace(ns: str) -> None:
    _kill_inside(ns)
    _run(["ip", "netns", "del", ns], check=False)


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces a harness whose process is gone left behind; returns their names."""
    gone = []
    for ns in namespaces():
        if not ns.startswith(prefix):
            continue
        owner = ns[len(prefix) :].split("x", 1)[0]
        if owner.isdigit() and _alive(int(owner)):
            continue
        delete_namespace(ns)
        gone.append(ns)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShapedNet:
    """Hosts in namespaces on one shaped bridge; see the module docstring."""

    def __init__(
        self,
        hosts: Sequence[str],
        rate_mbit: float = DEFAULT_RATE_MBIT,
        delay_ms: float = DEFAULT_DELAY_MS,
        prefix: str = PREFIX,
        queue_ms: float = DEFAULT_QUEUE_MS,
    ):
        if not hosts or len(set(hosts)) != len(hosts):
            raise ValueError("hosts must be distinct names, at least one")
        if len(hosts) > 250:
            raise ValueError("at most 250 hosts")
        if rate_mbit <= 0 or delay_ms < 0:
            raise ValueError(f"rate must be > 0 and delay >= 0, got {rate_mbit} Mbit/s, {delay_ms} ms")
        self.hosts, self.rate_mbit, self.delay_ms = list(hosts), float(rate_mbit), float(delay_ms)
        self.queue_ms = float(queue_ms)
        self.tag = f"{prefix}{os.getpid()}x{next(_serial)}"
        self.bridge_ns = f"{self.tag}-br"
        self._ns = {h: f"{self.tag}-h{i}" for i, h in enumerate(self.hosts)}
        self._addr = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.hosts)}
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self.closed = False
        self.delay_applied = False

    # -- building -------------------------------------------------------------------------
    def __enter__(self) -> ShapedNet:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._made.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def build(self) -> None:
        cleanup_leftovers()
        self._netns(self.bridge_ns)
        br = self.bridge_ns
        self.delay_applied = bool(self.delay_ms) and netem_available(br)
        if self.delay_ms and not self.delay_applied:
            log.warning(
                "this kernel has no netem qdisc: links shaped by rate only, the %g ms delay is not added", self.delay_ms
            )
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i, host in enumerate(self.hosts):
            ns, port = self._ns[host], f"v{i}"
            self._netns(ns)
            _run(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", br, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", br, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self._addr[host]}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._shape(ns, "eth0")  # upload
            self._shape(br, port)  # download
        log.info(
            "shaped network %s: %d hosts at %g Mbit/s, %g ms one way per link",
            self.tag,
            len(self.hosts),
            self.rate_mbit,
            self.delay_ms,
        )

    def _shape(self, ns: str, dev: str) -> None:
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root"]
        if self.delay_applied:
            # netem's queue must hold a bandwidth-delay product and a few bursts of 64 KB GSO packets
            limit = max(1000, int(self.rate_mbit * 1e6 / 8 * 0.05 / 1500))
            _run([*tc, "netem", "delay", f"{self.delay_ms}ms", "rate", f"{self.rate_mbit}mbit", "limit", str(limit)])
        else:  # token bucket: the rate, no added delay (see `netem_available`)
            burst = max(64 << 10, int(self.rate_mbit * 1e6 / 8 * 1e-3))  # 1 ms of traffic, at least a GSO packet
            _run([*tc, "tbf", "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", f"{self.queue_ms:g}ms"])

    # -- using ----------------------------------------------------------------------------
    def namespace(self, host: str) -> str:
        return self._ns[host]

    def address(self, host: str) -> str:
        return self._addr[host]

    def wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` as run inside `host`'s namespace."""
        return ["ip", "netns", "exec", self._ns[host], *argv]

    def popen(self, host: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start `argv` inside `host`'s namespace; killed by `close` if still running."""
        proc = subprocess.Popen(self.wrap(host, argv), start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def qdisc(self, host: str) -> str:
        """`tc qdisc show` of the host's link (both ends), for checks and reports."""
        up = _run(["ip", "netns", "exec", self._ns[host], "tc", "qdisc", "show", "dev", "eth0"]).stdout
        port = f"v{self.hosts.index(host)}"
        down = _run(["ip", "netns", "exec", self.bridge_ns, "tc", "qdisc", "show", "dev", port]).stdout
        return up + down

    def describe(self) -> dict:
        return {
            "hosts": len(self.hosts),
            "rate_mbit": self.rate_mbit,
            "delay_ms_one_way_per_link": self.delay_ms,
            "delay_applied": self.delay_applied,
            "bridge": "linux bridge in its own namespace",
            "shaping": ("tc netem rate+delay" if self.delay_applied else "tc tbf rate") + ", both directions",
        }

    # -- ending ---------------------------------------------------------------------------
    def close(self) -> None:
        """Kill what runs inside, delete every namespace made (veths and qdiscs go with them). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._made):
            delete_namespace(ns)
        left = [ns for ns in namespaces() if ns.startswith(self.tag + "-")]
        if left:
            raise NetError(f"namespaces left behind after cleanup: {left}")


def tcp_rate_mbit(net: ShapedNet, src: str, dst: str, seconds: float = 1.5) -> float:
    """Raw TCP goodput (Mbit/s of payload) from host `src` to `dst`, measured by the receiver.

    As root, both ends run at a raised CPU priority (nice -10), so that other work on a small
    machine (a parallel test process) does not starve the measurement below the link's rate.
    """
    import sys

    port = 5201
    boost = ["nice", "-n", "-10"] if os.geteuid() == 0 else []
    recv = net.popen(
        dst,
        [*boost, sys.executable, "-c", _RECEIVER, net.address(dst), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = recv.stdout.readline()
    if ready.strip() != "ready":
        recv.kill()
        raise NetError(f"receiver did not start: {ready!r} {recv.stderr.read()[-500:]}")
    send = net.popen(
        src,
        [*boost, sys.executable, "-c", _SENDER, net.address(dst), str(port), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = recv.communicate(timeout=seconds + 30)
        send.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise NetError("raw TCP measurement timed out") from None
    if recv.returncode:
        raise NetError(f"receiver failed: {err[-500:]}")
    return float(out.split()[-1])


def exchange_rate_mbit(net: ShapedNet, left: Sequence[str], right: Sequence[str], nbytes: int) -> float:
    """Raw TCP goodput of the busiest link, per direction (Mbit/s), of an all-to-all exchange
    both ways at once: every host of `left` sends `nbytes` to every host of `right` and every
    host of `right` to every one of `left`, all flows started together (one process per host,
    a thread per flow). Divides the bytes the busiest host sends (max(len(left), len(right))
    flows) by the time the last flow took: what a pipelined parameter server's clock moves
    (workers `left` pushing to and pulling from servers `right`), where a single long flow
    (`tcp_rate_mbit`) is the best case.
    """
    import sys

    port = 5203
    boost = ["nice", "-n", "-10"] if os.geteuid() == 0 else []
    hosts = [*left, *right]
    peers = {h: right if h in left else left for h in hosts}
    procs = {
        h: net.popen(
            h,
            [*boost, sys.executable, "-c", _EXCHANGE, net.address(h), str(port), str(nbytes)]
            + [net.address(x) for x in peers[h]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in hosts
    }
    try:
        for h, pr in procs.items():
            if pr.stdout.readline().strip() != "ready":
                raise NetError(f"exchange helper on {h} did not start: {pr.stderr.read()[-500:]}")
        start = time.time() + 1.0 + 0.05 * len(hosts)  # every helper connected by then
        for pr in procs.values():
            pr.stdin.write(f"{start}\n")
            pr.stdin.flush()
        took = []
        for h, pr in procs.items():
            out, err = pr.communicate(timeout=60 + nbytes * len(peers[h]) * 8 / (net.rate_mbit * 1e6) * 4)
            if pr.returncode:
                raise NetError(f"exchange helper on {h} failed: {err[-500:]}")
            took.append(float(out.split()[-1]))
    except subprocess.TimeoutExpired:
        raise NetError("exchange measurement timed out") from None
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                pr.kill()
                pr.wait()
    return nbytes * max(len(left), len(right)) * 8 / max(took) / 1e6


def tcp_rtt_ms(net: ShapedNet, src: str, dst: str, rounds: int = 200) -> float:
    """Median round trip (ms) of a 1-byte TCP ping-pong from `src` to `dst` (no Nagle delay)."""
    import sys

    port = 5202
    echo = net.popen(
        dst,
        [sys.executable, "-c", _ECHO, net.address(dst), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if echo.stdout.readline().strip() != "ready":
        echo.kill()
        raise NetError(f"echo server did not start: {echo.stderr.read()[-500:]}")
    ping = net.popen(
        src,
        [sys.executable, "-c", _PING, net.address(dst), str(port), str(rounds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = ping.communicate(timeout=60)
        echo.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise NetError("TCP round-trip measurement timed out") from None
    if ping.returncode:
        raise NetError(f"ping failed: {err[-500:]}")
    return float(out.split()[-1])


_ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := c.recv(1)): c.sendall(b)
"""
_PING = """
import socket, statistics, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); t = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter(); c.sendall(b"x"); c.recv(1); t.append(time.perf_counter() - t0)
print(statistics.median(t) * 1e3)
"""


# The receiver times from the first byte after a 0.3 s warm-up (TCP slow start) to the end.
_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0; t0 = None; first = None
while True:
    k = c.recv_into(buf)
    if not k: break
    now = time.perf_counter()
    if first is None: first = now
    if t0 is None and now - first >= 0.3: t0, n = now, 0
    elif t0 is not None: n += k
print(n * 8 / (time.perf_counter() - t0) / 1e6)
"""
_SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = bytes(1 << 20); end = time.perf_counter() + 0.3 + float(sys.argv[3])
while time.perf_counter() < end: c.sendall(buf)
c.close()
"""
# One host of exchange_rate_mbit: serve (read every connection to its end, then close it),
# print "ready", take the start time from stdin, connect to every peer, send each nbytes from
# its own thread at the start time, print how long until every peer had taken all of it, and
# leave once every peer's flow to it has been read in full.
_EXCHANGE = """
import socket, sys, threading, time
me, port, n, peers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((me, port)); s.listen(64)
drained = threading.Semaphore(0)
def drain(c):
    buf = bytearray(1 << 20)
    while c.recv_into(buf): pass
    c.close(); drained.release()
def serve():
    while True:
        c, _ = s.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
start = float(sys.stdin.readline())
conns = [socket.create_connection((p, port), timeout=30) for p in peers]
data = bytes(n)
def send(c):
    c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1)
time.sleep(max(0.0, start - time.time()))
t0 = time.perf_counter()
ts = [threading.Thread(target=send, args=(c,)) for c in conns]
for t in ts: t.start()
for t in ts: t.join()
print(time.perf_counter() - t0, flush=True)
for _ in peers:  # every peer's flow to us taken in full before leaving
    drained.acquire(timeout=120)
"""
