"""Striped data-plane exchanges (ps.proto, "Striping") against real `ps-server` processes.

Raw parts are sent as any client would send them: each on its own data connection,
from its own thread, at once (the server answers no part of a push before every part is
in). The shard is the `shard` fixture of test_dataplane.py: SGD at lr 1, N = 10007
elements (prime: no part count divides it), worker "w" registered.

* A striped push of 2 or 3 parts makes the server hold exactly w0 - g, bit for bit, one
  version and one applied push later; a striped pull then returns those weights bit-exact,
  every part's header naming the same version.
* Refusals change nothing (version, checksum, pushes applied, clocks): a NaN in one part,
  a part of the wrong size, a truncated part, a duplicate index, a count mismatch, a
  header mismatch, count 1 or 17, an index >= count, id 0, a stale session, a wrong plan;
  every part answered gets the refusal's code, and the server then applies the next push.
* A part of an exchange that already ended is ABORTED; a client that sends only part 0
  of 2 and hangs up gets nothing applied, and a new exchange works; a client that reads
  part 0 of a striped pull of 2 and hangs up has the lease given back at once (the
  server logs it), not after the exchange's 120 s.
* PSClient striping a few SGD steps over two shards (6 streams for the model: 3 per
  shard, small parts) ends with the very bits of an unstriped run (2 streams for the
  model: one per shard, no striping), and a striped pull of odd-sized parameters of every
  dtype is bit-exact.
* `ps-worker --data-streams` outside 1..16: exit 2, one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import DataError
from worker import CallOptions, PSClient
from worker.dataplane import Abort, DataChannel

from .support import RPC_TIMEOUT, batches, poll, status
from .test_dataplane import (
    AUTH,
    N,
    answer,
    data_port,
    deadline,
    pull_request,
    push_header,
    ready,  # noqa: F401
    shard,  # noqa: F401  (a fixture)
    state,
)
from .test_wire_path import OddModel, push_exact, raw

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

Code = grpc.StatusCode


def grad(seed: int = 4) -> torch.Tensor:
    g = torch.randn(N, generator=torch.Generator().manual_seed(seed))
    g[0] = -0.0
    return g


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


class Part:
    """One part to send: its request, payload, and how its client behaves."""

    def __init__(self, req: pb.DataRequest, payload: bytes = b"", cut: int | None = None, leave: bool = False):
        self.req, self.payload = req, payload
        self.cut = cut  # send only this many payload bytes, then half-close (a truncated part)
        self.leave = leave  # hang up after sending, without reading the answer


def push_parts(session: int, g: torch.Tensor, count: int, sid: int, head: pb.PushHeader | None = None) -> list[Part]:
    head = head or push_header(session)
    return [
        Part(
            pb.DataRequest(push=head, payload_bytes=(hi - lo) * 4, stripe=pb.Stripe(id=sid, index=i, count=count)),
            bytes(wire.tensor_bytes(g[lo:hi])),
        )
        for i, (lo, hi) in enumerate(wire.stripes(N, count))
    ]


def exchange(port: int, parts: list[Part]) -> list[pb.DataResponse | None]:
    """Send every part on its own connection at once; the answers (None: hung up unanswered)."""
    conns = [ready(port) for _ in parts]  # every hello done before any part is sent
    go = threading.Barrier(len(parts))

    def one(i: int) -> pb.DataResponse | None:
        conn, part = conns[i], parts[i]
        go.wait(RPC_TIMEOUT)
        payload = part.payload if part.cut is None else part.payload[: part.cut]
        conn.send(part.req, memoryview(payload), deadline())
        if part.leave:
            conn.close()
            return None
        if part.cut is not None:
            conn.sock.shutdown(socket.SHUT_WR)
        try:
            return answer(conn)
        except DataError:
            return None

    try:
        with ThreadPoolExecutor(len(parts)) as pool:
            return list(pool.map(one, range(len(parts))))
    finally:
        for conn in conns:
            conn.close()


def striped_pull(port: int, session: int, clock: int, count: int, sid: int) -> tuple[list[pb.PullHeader], torch.Tensor]:
    out = torch.full((N,), float("nan"))
    conns = [ready(port) for _ in range(count)]
    go = threading.Barrier(count)

    def one(i: int, lo: int, hi: int) -> pb.PullHeader:
        conn = conns[i]
        go.wait(RPC_TIMEOUT)
        conn.send(
            pb.DataRequest(pull=pull_request(session, clock), stripe=pb.Stripe(id=sid, index=i, count=count)),
            deadline=deadline(),
        )
        resp = answer(conn)
        assert resp is not None and resp.code == 0, resp
        assert resp.payload_bytes == (hi - lo) * 4 and resp.pull.numel == N
        conn.recv_into(wire.tensor_bytes(out[lo:hi]), deadline())
        return resp.pull

    try:
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(one, i, lo, hi) for i, (lo, hi) in enumerate(wire.stripes(N, count))]
            return [f.result() for f in futures], out
    finally:
        for conn in conns:
            conn.close()


def codes(answers: list[pb.DataResponse | None]) -> list[Code | None]:
    by_value = {c.value[0]: c for c in Code}
    return [None if a is None else by_value[a.code] for a in answers]


def assert_push_works(address: str, port: int, session: int, sid: int = 999) -> None:
    """The server still applies an unstriped push, then a striped one (at w's clock)."""
    before = state(address)
    clock = dict(before[3])["w"]
    g = torch.full((N,), 0.5)
    whole = Part(pb.DataRequest(push=push_header(session, clock), payload_bytes=N * 4), bytes(wire.tensor_bytes(g)))
    got = exchange(port, [whole]) + exchange(port, push_parts(session, g, 2, sid, push_header(session, clock + 1)))
    assert codes(got) == [Code.OK] * 3, [a.message for a in got if a is not None]
    after = state(address)
    assert after[0] == before[0] + 2 and after[2] == before[2] + 2 and dict(after[3])["w"] == clock + 2


# -- the good path ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
def test_striped_push_then_pull_is_bit_exact(shard, count):
    server, session, w0 = shard
    port = data_port(server.address)
    heads, got = striped_pull(port, session, 0, count, sid=11)
    assert [h.version for h in heads] == [0] * count and torch.equal(bits(got), bits(w0))
    g = grad()
    before = state(server.address)
    answers = exchange(port, push_parts(session, g, count, sid=12))
    assert codes(answers) == [Code.OK] * count, [a.message for a in answers]
    assert {(a.push.version, a.push.staleness) for a in answers} == {(1, 0)}  # one answer, given to every part
    after = state(server.address)
    assert after[0] == before[0] + 1 == 1 and after[2] == before[2] + 1 and after[3] == [("w", 1)]
    heads, got = striped_pull(port, session, 1, count, sid=13)
    assert [h.version for h in heads] == [1] * count
    assert all(h == heads[0] for h in heads)  # the very same header on every part
    assert torch.equal(bits(got), bits(w0 - g))


# -- refusals --------------------------------------------------------------------------------


def _refusals(session: int) -> dict:
    """Case -> (parts, the code every answered part gets)."""
    g = grad()
    nan = g.clone()
    nan[N - 5] = float("nan")  # in the last part
    stale = push_parts(session, g, 2, 21, push_header(session + 99))
    wrong_plan = push_parts(session, g, 2, 21, push_header(session, plan="x" * 64))
    bad_nan = push_parts(session, nan, 3, 21)
    short = push_parts(session, g, 2, 21)
    short[1] = Part(
        pb.DataRequest(
            push=push_header(session), payload_bytes=short[1].req.payload_bytes - 4, stripe=short[1].req.stripe
        ),
        short[1].payload[:-4],
    )
    long = push_parts(session, g, 2, 21)
    long[0] = Part(
        pb.DataRequest(
            push=push_header(session), payload_bytes=long[0].req.payload_bytes + 4, stripe=long[0].req.stripe
        ),
        long[0].payload + b"\0" * 4,
    )
    truncated = push_parts(session, g, 2, 21)
    truncated[1].cut = len(truncated[1].payload) // 2
    dup = push_parts(session, g, 2, 21)
    dup[1] = Part(
        pb.DataRequest(
            push=push_header(session), payload_bytes=dup[0].req.payload_bytes, stripe=pb.Stripe(id=21, index=0, count=2)
        ),
        dup[0].payload,
    )
    mismatch = push_parts(session, g, 2, 21)
    three = push_parts(session, g, 3, 21)
    mismatch[1] = three[1]  # says 3 parts, the other says 2
    other_head = push_parts(session, g, 2, 21)
    other_head[1].req.push.read_version = 5

    def with_stripe(**fields):
        parts = push_parts(session, g, 2, 21)
        for p in parts:
            for k, v in fields.items():
                setattr(p.req.stripe, k, v)
        return parts

    beyond = push_parts(session, g, 2, 21)
    for p, index in zip(beyond, (2, 7)):
        p.req.stripe.index = index
    return {
        "nan in one part": (bad_nan, Code.INVALID_ARGUMENT),
        "part too short": (short, Code.INVALID_ARGUMENT),
        "part too long": (long, Code.INVALID_ARGUMENT),
        "truncated part": (truncated, Code.INVALID_ARGUMENT),
        "duplicate index": (dup, Code.INVALID_ARGUMENT),
        "count mismatch": (mismatch, Code.INVALID_ARGUMENT),
        "header mismatch": (other_head, Code.INVALID_ARGUMENT),
        "count 1": (with_stripe(count=1), Code.INVALID_ARGUMENT),
        "count 17": (with_stripe(count=17), Code.INVALID_ARGUMENT),
        "index beyond count": (beyond, Code.INVALID_ARGUMENT),
        "id 0": (with_stripe(id=0), Code.INVALID_ARGUMENT),
        "stale session": (stale, Code.FAILED_PRECONDITION),
        "wrong plan": (wrong_plan, Code.FAILED_PRECONDITION),
    }


REFUSALS = list(_refusals(1))


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_striped_push_changes_nothing(shard, case):
    server, session, _ = shard
    port = data_port(server.address)
    before = state(server.address)
    parts, code = _refusals(session)[case]
    answers = exchange(port, parts)
    got = codes(answers)
    assert got == [code] * len(parts), f"{case}: {[(c, a.message if a else None) for c, a in zip(got, answers)]}"
    if case == "stale session":
        assert {a.reason for a in answers} == {service.UNKNOWN_WORKER}
    assert state(server.address) == before
    assert_push_works(server.address, port, session)


def test_a_part_of_an_ended_exchange_is_aborted(shard):
    server, session, w0 = shard
    port = data_port(server.address)
    parts = push_parts(session, grad(), 2, sid=31)
    assert codes(exchange(port, parts)) == [Code.OK, Code.OK]
    before = state(server.address)
    for part in parts:  # the same parts again, one by one: the exchange is over
        assert codes(exchange(port, [part])) == [Code.ABORTED]
    heads, got = striped_pull(port, session, 1, 2, sid=32)
    assert codes(
        exchange(port, [Part(pb.DataRequest(pull=pull_request(session, 1), stripe=pb.Stripe(id=32, index=1, count=2)))])
    ) == [Code.ABORTED]
    assert state(server.address) == before
    assert torch.equal(bits(got), bits(w0 - grad()))


def test_a_client_leaving_after_one_part_gets_nothing_applied(shard):
    server, session, _ = shard
    port = data_port(server.address)
    before = state(server.address)
    g = grad()
    parts = push_parts(session, g, 2, sid=41)
    parts[0].leave = True
    assert exchange(port, parts[:1]) == [None]
    # the server notices the hang-up and fails the exchange: it counts a rejected push
    poll(lambda: status(server.address, AUTH).pushes_rejected == 1, 20, "the abandoned exchange to end")
    assert state(server.address) == before
    late = codes(exchange(port, parts[1:]))  # its other part, late: refused, applies nothing
    assert late[0] in (Code.ABORTED, Code.CANCELLED), late
    assert state(server.address) == before
    assert_push_works(server.address, port, session, sid=42)


def test_a_striped_pull_whose_client_hangs_up_gives_its_lease_back_at_once(shard):
    server, session, w0 = shard
    port = data_port(server.address)
    conn = ready(port)
    try:  # part 0 of 2, read whole; part 1 never comes
        conn.send(
            pb.DataRequest(pull=pull_request(session), stripe=pb.Stripe(id=61, index=0, count=2)), deadline=deadline()
        )
        resp = answer(conn)
        assert resp.code == 0 and resp.payload_bytes == wire.stripes(N, 2)[0][1] * 4
        conn.recv_exact(resp.payload_bytes, deadline())
    finally:
        conn.close()
    # the server would otherwise hold the lease until the exchange's 120 s deadline
    poll(lambda: "ended unsent" in server.log.read_text(), 10, "the abandoned striped pull to give its lease back")
    line = next(x for x in server.log.read_text().splitlines() if "ended unsent" in x)
    assert "its version 0 given back" in line and "client went away" in line, line
    heads, got = striped_pull(port, session, 0, 2, sid=62)  # the next striped pull is whole
    assert [h.version for h in heads] == [0, 0] and torch.equal(bits(got), bits(w0))


def test_a_connection_lost_mid_part_fails_the_exchange(shard):
    server, session, _ = shard
    port = data_port(server.address)
    before = state(server.address)
    parts = push_parts(session, grad(), 2, sid=51)
    parts[1].cut, parts[1].leave = len(parts[1].payload) // 3, True  # hangs up a third of the way in
    got = codes(exchange(port, parts))
    assert got[0] in (Code.INVALID_ARGUMENT, Code.UNAVAILABLE), got
    assert state(server.address) == before
    assert_push_works(server.address, port, session)


ATTEMPTS = 100  # the race below loses a few percent of the time: 100 tries show it nearly always


def test_data_channel_reports_a_stale_session_as_unknown_worker(shard):
    """The worker's own client, striping over 3 streams: a stale session must come back as
    FAILED_PRECONDITION with the unknown-worker reason (the worker re-registers on it), for
    pulls and pushes alike, every time; and the right session still works afterwards."""
    server, session, w0 = shard
    before = state(server.address)
    channel = DataChannel("127.0.0.1", data_port(server.address), AUTH, streams=3, min_part_bytes=4096)
    try:
        assert wire.stripe_count(N, 3, 4096) == 3
        seen: dict[str, list] = {"push": [], "pull": []}
        for _ in range(ATTEMPTS):
            for op, fn in (
                ("push", lambda: channel.push(push_header(session + 99), grad(), deadline(), Abort())),
                ("pull", lambda: channel.pull_into(pull_request(session + 99), torch.empty(N), deadline(), Abort())),
            ):
                with pytest.raises(DataError) as err:
                    fn()
                seen[op].append((err.value.code().name, err.value.reason))
        assert state(server.address) == before
        out = torch.empty(N)
        assert channel.pull_into(pull_request(session), out, deadline(), Abort()).version == 0
        assert torch.equal(bits(out), bits(w0))
        assert channel.push(push_header(session), grad(), deadline(), Abort()).version == 1
    finally:
        channel.close()
    wanted = (Code.FAILED_PRECONDITION.name, service.UNKNOWN_WORKER)
    wrong = {op: sorted({c for c in got if c != wanted}) for op, got in seen.items()}
    assert seen["push"] == seen["pull"] == [wanted] * ATTEMPTS, (
        f"answers other than {wanted} in {ATTEMPTS} tries: {wrong}; "
        f"{sum(c != wanted for c in seen['push'])} pushes, {sum(c != wanted for c in seen['pull'])} pulls"
    )


# -- PSClient ---------------------------------------------------------------------------------


def wide_mlp() -> torch.nn.Module:
    """21060 parameters: ~42 KB a shard over two shards, 3 parts of >= 4 KiB each."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)
    )


def stripe_counts(monkeypatch) -> list[int]:
    """The part counts of the striped parts PSClient's data channels actually send (none: no striping)."""
    seen: list[int] = []
    real = DataChannel._part

    def spy(part, job, conns):
        seen.append(job[1].count)  # job: (connection, its Stripe, lo, hi)
        return real(part, job, conns)

    monkeypatch.setattr(DataChannel, "_part", staticmethod(spy))
    return seen


def train(addresses: list[str], streams: int) -> list[bytes]:
    model = wide_mlp()
    opts = CallOptions(
        timeout=10.0,
        push_timeout=30.0,
        pull_timeout=60.0,
        retry_seconds=5.0,
        transport="tcp",
        data_streams=streams,
        stripe_min_bytes=4096,
    )
    with PSClient(addresses, model, optimizer={"name": "sgd", "lr": 0.05}, options=opts) as ps:
        assert [s.transport for s in ps._shards] == ["tcp", "tcp"]
        for x, y in batches(4):
            ps.pull()
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push().wait(timeout=60)  # each step sees the last one applied: the runs must agree
        ps.pull()
        assert ps.status()[0].version == 4
    return [raw(p) for p in model.parameters()]


def test_psclient_striping_does_not_change_the_math(start_server, monkeypatch):
    first, second = start_server.shards(2, heartbeat_timeout=600), start_server.shards(2, heartbeat_timeout=600)
    seen = stripe_counts(monkeypatch)
    striped = train([s.address for s in first], streams=6)  # 6 connections for 2 shards: 3 parts each
    assert seen and set(seen) == {3}, f"striping was not used: {seen}"
    seen.clear()
    plain = train([s.address for s in second], streams=2)  # 2 shards are 2 streams already: no striping
    assert seen == []
    assert striped == plain
    assert striped != [raw(p) for p in wide_mlp().parameters()]  # it did train


def test_psclient_striped_pull_and_push_of_odd_sizes_are_bit_exact(start_server, monkeypatch):
    servers = start_server.shards(2, heartbeat_timeout=600)
    model = OddModel(seed=7)
    original = [raw(p) for p in model.parameters()]
    seen = stripe_counts(monkeypatch)
    opts = CallOptions(
        timeout=10.0,
        push_timeout=30.0,
        pull_timeout=60.0,
        retry_seconds=5.0,
        transport="tcp",
        data_streams=8,
        stripe_min_bytes=4096,
    )
    with PSClient([s.address for s in servers], model, optimizer={"name": "sgd", "lr": 1.0}, options=opts) as ps:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        ps.pull()
        assert [raw(p) for p in model.parameters()] == original
        assert seen and set(seen) == {4}, seen
        push_exact(ps, model)


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, env",
    [(["--data-streams", "0"], {}), (["--data-streams", "17"], {}), ([], {"ASYNCPS_DATA_STREAMS": "0"})],
    ids=["flag-0", "flag-17", "env-0"],
)
def test_worker_cli_refuses_data_streams_outside_1_to_16(args, env):
    cmd = [sys.executable, "-m", "worker.cli", "--servers", "127.0.0.1:1", *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=60, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("ps-worker: error: ") and "DATA_STREAMS" in lines[0].upper().replace("-", "_")
    assert proc.stdout == b""
    ok = subprocess.run(
        [*cmd[:3], "--data-streams", "16", "--help"], capture_output=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert ok.returncode == 0, ok.stderr.decode()  # 16 itself is accepted
