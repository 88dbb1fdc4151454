"""The TCP data plane (ps_server/dataplane.py, worker/dataplane.py) against real `ps-server`s.

* The protocol as any client would speak it (protos/datasock.py, framing in protos.wire):
  a raw push and pull are bit-exact, and agree with gRPC's pull of the same version.
* Bad input changes nothing: a wrong magic is hung up on; a missing or wrong token is
  UNAUTHENTICATED; a corrupt, oversized or truncated header, a payload of the wrong size,
  a truncated payload, a NaN, a pull carrying a payload are INVALID_ARGUMENT; a wrong plan
  or session FAILED_PRECONDITION (with the unknown-worker reason), a repeated clock
  ALREADY_EXISTS; after each the shard's version, checksum and clocks are unchanged, and
  a refusal that keeps the stream in step leaves the connection usable.
* TLS and mutual TLS wrap the data plane as they wrap gRPC: PSClient uses it over TLS;
  a plaintext or untrusted client gets nothing.
* PSClient: follows a data port that moved (a restarted server), falls back to gRPC
  under transport "auto" when the data port is unreachable but gRPC is not, fails under
  "tcp"; `--data-port off` serves gRPC only.
* A pull waiting under the bound whose client hangs up is cancelled and leaves no lease.
"""

from __future__ import annotations

import socket
import ssl
import time

import grpc
import pytest
import torch

from asyncps_common.optimizer import default_config
from asyncps_common.security import NONE, Security
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import DataConn, DataError
from ps_server.servicer import ServerConfig
from worker import CallOptions, PSClient, RpcFailed
from worker.dataplane import DataChannel

from .support import FAST_FAIL, RPC_TIMEOUT, batches, grpc_pull, mlp, poll, status, stub
from .test_security import client, pki, tls_flags  # noqa: F401 (a fixture)
from .test_wire_path import InProcessServer

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

Code = grpc.StatusCode
TOKEN = "data-plane-Token_7"
PLAN, N = "d" * 64, 10_007
AUTH = Security(token=TOKEN)


def data_port(address: str, sec: Security = AUTH) -> int:
    port = status(address, sec).data_port
    assert port, "the server offers no data plane"
    return port


def connect(port: int, token: str | None = TOKEN, tls: ssl.SSLContext | None = None) -> DataConn:
    """A raw data-plane connection that has said hello (the answer is checked by the caller)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    conn = DataConn(sock, f"127.0.0.1:{port}")
    sock.sendall(wire.DATA_MAGIC)
    conn.send(pb.DataRequest(hello=pb.DataHello(token=token or "")), deadline=deadline())
    return conn


def deadline() -> float:
    return time.monotonic() + RPC_TIMEOUT


def answer(conn: DataConn) -> pb.DataResponse | None:
    return conn.recv_header(pb.DataResponse, deadline())


def ready(port: int) -> DataConn:
    conn = connect(port)
    assert answer(conn).code == 0
    return conn


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it hangs up (a reset counts as hanging up)."""
    got = b""
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def hung_up(conn: DataConn) -> bool:
    try:
        return conn.recv_header(pb.DataResponse, deadline()) is None
    except DataError:
        return True


@pytest.fixture
def shard(start_server):
    """A token-protected server with an initialized shard (SGD lr 1) and registered worker "w"."""
    server = start_server(token=TOKEN, heartbeat_timeout=3600)
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
    head = pb.InitHeader(
        plan_hash=PLAN, shard_index=0, num_shards=1, numel=N, optimizer=default_config("sgd", lr=1.0), worker_id="w"
    )
    with stub(server.address, AUTH) as s:
        assert s.Init(
            iter([wire.encode_frame(pb.Frame(init=head)), *wire.chunk_frames(w0, 1 << 14)]), timeout=RPC_TIMEOUT
        ).accepted
        session = s.Register(pb.RegisterRequest(worker_id="w", plan_hash=PLAN), timeout=RPC_TIMEOUT).session
    return server, session, w0


def push_header(session: int, clock: int = 0, plan: str = PLAN) -> pb.PushHeader:
    return pb.PushHeader(worker_id="w", session=session, plan_hash=plan, clock=clock, read_version=clock)


def pull_request(session: int, clock: int = 0) -> pb.PullRequest:
    return pb.PullRequest(worker_id="w", session=session, plan_hash=PLAN, clock=clock)


def raw_pull(conn: DataConn, session: int, clock: int) -> tuple[int, torch.Tensor]:
    conn.send(pb.DataRequest(pull=pull_request(session, clock)), deadline=deadline())
    resp = answer(conn)
    assert resp.code == 0, resp.message
    assert resp.payload_bytes == N * 4 and resp.pull.numel == N
    out = torch.empty(N)
    conn.recv_into(wire.tensor_bytes(out), deadline())
    return resp.pull.version, out


def state(address: str) -> tuple:
    st = status(address, AUTH)
    return st.version, st.weights_checksum, st.pushes_applied, [(c.worker_id, c.clock) for c in st.clocks]


def test_raw_push_and_pull_are_bit_exact_and_agree_with_grpc(shard):
    server, session, w0 = shard
    conn = ready(data_port(server.address))
    version, got = raw_pull(conn, session, 0)
    assert version == 0 and torch.equal(got.view(torch.int32), w0.view(torch.int32))
    g = torch.randn(N, generator=torch.Generator().manual_seed(4))
    g[0] = -0.0
    conn.send(pb.DataRequest(push=push_header(session), payload_bytes=N * 4), wire.tensor_bytes(g), deadline())
    resp = answer(conn)
    assert resp.code == 0 and resp.push.version == 1
    version, got = raw_pull(conn, session, 1)
    assert version == 1 and torch.equal(got.view(torch.int32), (w0 - g).view(torch.int32))
    with stub(server.address, AUTH) as s:  # the gRPC path sends the very same bytes
        seen, out = grpc_pull(s, pull_request(session, 1), N)
    assert seen == 1 and torch.equal(out.view(torch.int32), got.view(torch.int32))
    conn.close()


def test_hello_needs_the_magic_and_the_token(shard):
    server, _, _ = shard
    port = data_port(server.address)
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert until_closed(sock) == b""  # not an asyncps client: hung up on, nothing said
    for token in (None, TOKEN + "x"):
        conn = connect(port, token=token)
        resp = answer(conn)
        assert Code.UNAUTHENTICATED.value[0] == resp.code, resp.message
        assert hung_up(conn)
    conn = DataConn(socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT), "raw")
    conn.sock.sendall(wire.DATA_MAGIC)
    conn.send(pb.DataRequest(pull=pb.PullRequest()), deadline=deadline())
    assert answer(conn).code == Code.INVALID_ARGUMENT.value[0]


def _nan() -> torch.Tensor:
    g = torch.zeros(N)
    g[N - 3] = float("nan")
    return g


# Each case: what to send after the hello, the status expected, and whether the server
# must then hang up (the stream is out of step) or keep the connection usable.
def _cases(session: int) -> dict:
    good = torch.full((N,), 0.25)
    return {
        "garbage header": ([(7).to_bytes(4, "little") + b"\xff" * 7], Code.INVALID_ARGUMENT, True),
        "oversized header": ([(wire.HEADER_LIMIT + 1).to_bytes(4, "little")], Code.INVALID_ARGUMENT, True),
        "truncated header": ([(50).to_bytes(4, "little") + b"\x12\x03"], Code.INVALID_ARGUMENT, "half-close"),
        "pull with a payload": (
            [wire.pack_header(pb.DataRequest(pull=pull_request(session), payload_bytes=4)), b"\0" * 4],
            Code.INVALID_ARGUMENT,
            True,
        ),
        "push of the wrong size": (
            [wire.pack_header(pb.DataRequest(push=push_header(session), payload_bytes=8)), b"\0" * 8],
            Code.INVALID_ARGUMENT,
            False,
        ),
        "push with a NaN": (
            [
                wire.pack_header(pb.DataRequest(push=push_header(session), payload_bytes=N * 4)),
                bytes(wire.tensor_bytes(_nan())),
            ],
            Code.INVALID_ARGUMENT,
            False,
        ),
        "truncated push": (
            [
                wire.pack_header(pb.DataRequest(push=push_header(session), payload_bytes=N * 4)),
                bytes(wire.tensor_bytes(good))[: N * 2],
            ],
            Code.INVALID_ARGUMENT,
            "half-close",
        ),
        "wrong plan": (
            [
                wire.pack_header(pb.DataRequest(push=push_header(session, plan="x" * 64), payload_bytes=N * 4)),
                bytes(wire.tensor_bytes(good)),
            ],
            Code.FAILED_PRECONDITION,
            False,
        ),
        "unknown session": (
            [
                wire.pack_header(pb.DataRequest(push=push_header(session + 99), payload_bytes=N * 4)),
                bytes(wire.tensor_bytes(good)),
            ],
            Code.FAILED_PRECONDITION,
            False,
        ),
        "repeated clock": (
            [
                wire.pack_header(pb.DataRequest(push=push_header(session, clock=0), payload_bytes=N * 4)),
                bytes(wire.tensor_bytes(good)),
            ],
            Code.ALREADY_EXISTS,
            False,
        ),
    }


CASES = list(_cases(0))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_and_changes_nothing(shard, case):
    server, session, _ = shard
    port = data_port(server.address)
    conn = ready(port)
    if case == "repeated clock":  # clock 0 is applied first, then offered again
        g = torch.full((N,), 0.25)
        conn.send(pb.DataRequest(push=push_header(session), payload_bytes=N * 4), wire.tensor_bytes(g), deadline())
        assert answer(conn).code == 0
    before = state(server.address)
    parts, code, closes = _cases(session)[case]
    for part in parts:
        conn.sock.sendall(part)
    if closes == "half-close":
        conn.sock.shutdown(socket.SHUT_WR)
    resp = answer(conn)
    assert resp is not None and resp.code == code.value[0], f"{case}: {resp}"
    if case == "unknown session":
        assert resp.reason == "unknown-worker"
    if closes:
        assert hung_up(conn), f"{case}: the connection should be closed"
    else:  # the refusal kept the stream in step: the same connection still pulls
        version, _ = raw_pull(conn, session, before[3][0][1])
        assert version == before[0]
    assert state(server.address) == before
    conn.close()


def test_psclient_over_tls_and_mutual_tls_uses_the_data_plane(start_server, pki):
    good = client(pki, token=TOKEN, cert="client")
    server = start_server(security=good, token=TOKEN, heartbeat_timeout=3600, **tls_flags(pki, mutual=True))
    model = mlp()
    with PSClient(
        [server.address], model, optimizer={"name": "sgd", "lr": 0.01}, options=FAST_FAIL, security=good
    ) as ps:
        for x, y in batches(3):
            ps.pull()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push()
        ps.wait()
        assert [s.transport for s in ps._shards] == ["tcp"]
        assert ps.status()[0].version == 3
    port = data_port(server.address, good)
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as sock:  # plaintext: hung up on
        sock.sendall(wire.DATA_MAGIC + wire.pack_header(pb.DataRequest(hello=pb.DataHello(token=TOKEN))))
        got = until_closed(sock)
        assert got[:1] in (b"", b"\x15"), got  # nothing, or a TLS alert: never an answer
    for name, sec in (
        ("no certificate", client(pki, token=TOKEN)),
        ("another CA's certificate", client(pki, token=TOKEN, cert="other-client")),
    ):
        channel = DataChannel("127.0.0.1", port, sec)
        with pytest.raises(DataError) as err:
            channel.pull_into(pull_request(1), torch.empty(N), deadline(), _abort())
        assert err.value.code() == Code.UNAVAILABLE, name
        channel.close()


def _abort():
    from worker.dataplane import Abort

    return Abort()


def _refusing_port() -> socket.socket:
    """A bound, never-listening socket: connecting to its port is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def on_data_plane(ps: PSClient) -> float | None:
    return ps.metrics.registry.get_sample_value("asyncps_worker_data_plane", {"worker": ps.worker_id, "shard": "0"})


def _train(ps: PSClient, model, steps: int) -> None:
    for x, y in batches(steps):
        ps.pull()
        torch.nn.functional.mse_loss(model(x), y).backward()
        ps.push()
    ps.wait()


def test_psclient_follows_a_moved_data_port(start_server):
    server = start_server(heartbeat_timeout=3600)
    model = mlp()
    with PSClient([server.address], model, optimizer={"name": "sgd", "lr": 0.01}, options=FAST_FAIL) as ps:
        shard = ps._shards[0]
        real = shard.data.port
        with _refusing_port() as stale:
            shard._use_data_port(stale.getsockname()[1])  # as if the server had restarted elsewhere
            _train(ps, model, 2)
        assert shard.transport == "tcp" and shard.data.port == real
        assert ps.status()[0].version == 2
        assert on_data_plane(ps) == 1.0


def test_a_pull_whose_channel_is_replaced_meanwhile_is_retried_on_the_new_one(start_server, monkeypatch):
    """Another call finds the data port moved and closes the channel a pull is about to use (a
    server restart, both of a worker's calls in flight): the pull goes on over the new channel
    instead of failing the worker with CANCELLED."""
    server = start_server(heartbeat_timeout=3600)
    model = mlp()
    with PSClient([server.address], model, optimizer={"name": "sgd", "lr": 0.01}, options=FAST_FAIL) as ps:
        shard = ps._shards[0]
        old = shard.data
        take = type(old)._take
        replaced = []

        def take_after_a_move(chan, deadline):
            if chan is old and not replaced:  # what the other call's `_use_data_port` does, meanwhile
                replaced.append(True)
                shard.data = DataChannel(old.host, old.port, old.security)
                old.close()
            return take(chan, deadline)

        monkeypatch.setattr(type(old), "_take", take_after_a_move)
        _train(ps, model, 2)
        assert replaced and shard.data is not old and shard.transport == "tcp"
        assert ps.status()[0].version == 2


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_unreachable_data_port_falls_back_to_grpc_only_under_auto(transport):
    srv = InProcessServer(ServerConfig(heartbeat_timeout=600))  # gRPC only: no data plane listens
    stale = _refusing_port()
    try:
        srv.servicer.data_port = stale.getsockname()[1]  # ...but the server offers one
        model = mlp()
        opts = CallOptions(timeout=5.0, push_timeout=10.0, pull_timeout=10.0, retry_seconds=1.0, transport=transport)
        with PSClient([srv.address], model, optimizer={"name": "sgd", "lr": 0.01}, options=opts) as ps:
            if transport == "tcp":
                with pytest.raises(RpcFailed) as err:
                    ps.pull()
                assert err.value.code == Code.UNAVAILABLE and "data plane" in err.value.details
                return
            _train(ps, model, 2)
            assert ps._shards[0].transport == "grpc"
            assert ps.status()[0].version == 2
            assert on_data_plane(ps) == 0.0  # the metric tells the user
    finally:
        stale.close()
        srv.close()


def test_data_port_off_serves_grpc_only(start_server):
    server = start_server(heartbeat_timeout=3600, data_port="off")
    assert status(server.address, NONE).data_port == 0
    model = mlp()
    with PSClient([server.address], model, optimizer={"name": "sgd", "lr": 0.01}, options=FAST_FAIL) as ps:
        _train(ps, model, 2)
        assert ps._shards[0].transport == "grpc"


def test_a_client_gone_during_a_bound_wait_leaves_nothing_behind():
    """A data-plane pull waiting under read-my-writes whose client hangs up is cancelled: it
    waits no more, holds no lease (an update then runs in place, copying nothing), counts no pull."""
    srv = InProcessServer(ServerConfig(heartbeat_timeout=600), data_plane=True)
    try:
        w0 = torch.randn(N, generator=torch.Generator().manual_seed(5))
        head = pb.InitHeader(
            plan_hash=PLAN, shard_index=0, num_shards=1, numel=N, optimizer=default_config("sgd", lr=1.0), worker_id="w"
        )
        with stub(srv.address) as s:
            assert s.Init(
                iter([wire.encode_frame(pb.Frame(init=head)), *wire.chunk_frames(w0, 1 << 14)]), timeout=RPC_TIMEOUT
            ).accepted
            session = s.Register(pb.RegisterRequest(worker_id="w", plan_hash=PLAN), timeout=RPC_TIMEOUT).session
        sv = srv.servicer
        conn = connect(sv.data_port, token=None)
        assert answer(conn).code == 0
        conn.send(pb.DataRequest(pull=pull_request(session, clock=1)), deadline=deadline())  # needs w's clock 0
        poll(lambda: len(sv.clocks._changed._waiters) == 1, 10, "the pull to wait under the bound")
        conn.close()
        poll(lambda: not sv.clocks._changed._waiters, 10, "the abandoned wait to be cancelled")
        g = torch.ones(N)
        with stub(srv.address) as s:
            s.Push(
                iter([wire.encode_frame(pb.Frame(push=push_header(session))), *wire.chunk_frames(g, 1 << 14)]),
                timeout=RPC_TIMEOUT,
            )
        store = sv.store
        assert store.version == 1 and torch.equal(store._flat.detach(), w0 - g)
        assert store._snapshot is None or store._snapshot.readers == 0
        assert sv.metrics.pulls._value.get() == 0
    finally:
        srv.close()
