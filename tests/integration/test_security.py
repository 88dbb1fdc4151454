"""Authentication and TLS (asyncps_common/security.py) against real `ps-server` processes.

* Token: every asyncps RPC without the token, or with a wrong one, is answered
  UNAUTHENTICATED and changes nothing (Status with the right token, checksum included,
  is the same before and after); the health service answers without a token; PSClient
  with the token trains, without it fails at once (UNAUTHENTICATED is not retried).
* TLS, with a CA this module makes (tests/integration/certs.py): a PSClient round trip
  over TLS; a plaintext client, or one trusting another CA, fails (UNAVAILABLE) and
  changes nothing; under mutual TLS a client without a certificate, or with one from
  another CA, is refused; token and TLS together.
* `ps-cluster` trains with token + mutual TLS passed through to all its children.
* CLI mistakes (files missing, flags that need each other) are one line and exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncps_common.optimizer import default_config
from asyncps_common.security import NONE, Security
from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb
from worker import CallOptions, PSClient, RpcFailed

from .certs import make_pki
from .support import RPC_TIMEOUT, batches, call, clock_of, mlp, status, stub
from .test_cluster import cluster_cmd, corpus  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

TOKEN = "s3cret-Token_42"
PLAN, N = "p" * 64, 1000
Code = grpc.StatusCode
NO_RETRY = CallOptions(timeout=5.0, push_timeout=10.0, pull_timeout=10.0, retry_seconds=0.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client(
    pki: dict[str, Path], token: str | None = None, ca: str | None = "ca.crt", cert: str | None = None
) -> Security:
    """A client's Security from the test PKI: `cert` is a stem ("client", "other-client")."""
    return Security(
        token=token,
        ca=pki[ca].read_bytes() if ca else None,
        cert=pki[f"{cert}.crt"].read_bytes() if cert else None,
        key=pki[f"{cert}.key"].read_bytes() if cert else None,
    )


def tls_flags(pki: dict[str, Path], mutual: bool = False) -> dict[str, str]:
    flags = {"tls_cert": str(pki["server.crt"]), "tls_key": str(pki["server.key"])}
    if mutual:
        flags["tls_client_ca"] = str(pki["ca.crt"])
    return flags


def init_frames() -> list[bytes]:
    head = pb.InitHeader(
        plan_hash=PLAN, shard_index=0, num_shards=1, numel=N, optimizer=default_config("sgd", lr=0.1), worker_id="w"
    )
    return [wire.encode_frame(pb.Frame(init=head)), wire.encode_frame(tensor=torch.ones(N))]


def set_up(address: str, sec: Security) -> int:
    """Initialize the shard, register worker "w", apply one push; returns w's session."""
    with stub(address, sec) as s:
        assert s.Init(iter(init_frames()), timeout=RPC_TIMEOUT).accepted
        session = s.Register(pb.RegisterRequest(worker_id="w", plan_hash=PLAN), timeout=RPC_TIMEOUT).session
    assert call(address, "Push", push_frames(session, 0, 0), security=sec)[0] == Code.OK
    return session


def push_frames(session: int, clock: int, version: int) -> list[bytes]:
    head = pb.PushHeader(worker_id="w", session=session, plan_hash=PLAN, clock=clock, read_version=version)
    return [wire.encode_frame(pb.Frame(push=head)), wire.encode_frame(tensor=torch.full((N,), 0.5))]


def snapshot(address: str, sec: Security) -> tuple:
    st = status(address, sec)
    return (
        st.initialized,
        st.version,
        st.weights_checksum,
        st.pushes_applied,
        [(c.worker_id, c.clock) for c in st.clocks],
        st.checkpoint_version,
    )


def every_rpc(session: int, st: pb.StatusResponse) -> list[tuple[str, object]]:
    """One well-formed request per asyncps method (each would be accepted with credentials)."""
    clock = clock_of(st, "w")
    return [
        ("Register", pb.RegisterRequest(worker_id="intruder", plan_hash=PLAN)),
        ("Heartbeat", pb.HeartbeatRequest(worker_id="w", session=session)),
        ("Leave", pb.LeaveRequest(worker_id="w", session=session)),
        ("Init", init_frames()),
        ("Push", push_frames(session, clock, st.version)),
        ("Pull", pb.PullRequest(worker_id="w", session=session, plan_hash=PLAN, clock=clock)),
        ("Status", pb.StatusRequest(include_checksum=True)),
        ("Checkpoint", pb.CheckpointRequest()),
    ]


def health(address: str, sec: Security = NONE) -> int:
    with sec.channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service.SERVICE_NAME), timeout=RPC_TIMEOUT)
            .status
        )


def train(addresses: list[str], sec: Security, steps: int = 3, options: CallOptions = NO_RETRY) -> list[int]:
    """A PSClient trains `steps` iterations; returns the shards' versions after."""
    model = mlp()
    with PSClient(
        addresses, model, optimizer={"name": "sgd", "lr": 0.01}, worker_id="trainer", options=options, security=sec
    ) as ps:
        for x, y in batches(steps):
            ps.pull()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push()
        ps.wait()
        return [st.version for st in ps.status()]


# -- token ----------------------------------------------------------------------------------


def test_token_refuses_every_rpc_without_it_and_changes_nothing(start_server):
    server = start_server(token=TOKEN, heartbeat_timeout=3600, checkpoint_dir=str(start_server.directory / "ck"))
    good, wrong = Security(token=TOKEN), Security(token=TOKEN + "x")
    assert health(server.address) == health_pb2.HealthCheckResponse.SERVING  # probes need no token

    for sec in (NONE, wrong):  # a blank server stays blank
        code, details, _ = call(server.address, "Init", init_frames(), security=sec)
        assert code == Code.UNAUTHENTICATED, details
    assert not status(server.address, good).initialized

    session = set_up(server.address, good)
    before = snapshot(server.address, good)
    assert before[1] == 1
    for sec, why in ((NONE, "missing credentials"), (wrong, "invalid token")):
        for method, request in every_rpc(session, status(server.address, good)):
            code, details, _ = call(server.address, method, request, security=sec)
            assert code == Code.UNAUTHENTICATED, f"{method}: {code.name} {details}"
            assert why in details and method in details
    assert snapshot(server.address, good) == before
    with stub(server.address, good) as s:  # the same requests with the token are accepted
        s.Heartbeat(pb.HeartbeatRequest(worker_id="w", session=session), timeout=RPC_TIMEOUT)
        s.Checkpoint(pb.CheckpointRequest(), timeout=RPC_TIMEOUT)
    assert call(server.address, "Push", push_frames(session, 1, 1), security=good)[0] == Code.OK
    assert status(server.address, good).version == 2


def test_psclient_with_token_trains_and_without_fails_at_once(start_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # the trailing newline is not part of the token
    servers = start_server.shards(2, token_file=str(token_file))
    addresses = [s.address for s in servers]
    for sec in (NONE, Security(token="nope")):
        with pytest.raises(RpcFailed) as err:
            train(addresses, sec, options=CallOptions(timeout=5.0, retry_seconds=30.0))
        assert err.value.code == Code.UNAUTHENTICATED
    assert train(addresses, Security(token=TOKEN), steps=3) == [3, 3]


# -- TLS ------------------------------------------------------------------------------------


def test_tls_round_trip_and_untrusted_clients_fail(start_server, pki):
    tls = client(pki)
    server = start_server(security=tls, heartbeat_timeout=3600, **tls_flags(pki))
    assert train([server.address], tls) == [3]
    before = snapshot(server.address, tls)
    st = status(server.address, tls)
    for name, sec in (("plaintext", NONE), ("wrong CA", client(pki, ca="other-ca.crt"))):
        for method, request in (("Status", pb.StatusRequest()), ("Push", push_frames(1, 0, st.version))):
            code, details, _ = call(server.address, method, request, timeout=5, security=sec)
            assert code == Code.UNAVAILABLE, f"{name} {method}: {code.name} {details}"
    assert snapshot(server.address, tls) == before


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(start_server, pki):
    good = client(pki, cert="client")
    server = start_server(security=good, heartbeat_timeout=3600, **tls_flags(pki, mutual=True))
    assert train([server.address], good) == [3]
    before = snapshot(server.address, good)
    for name, sec in (("no certificate", client(pki)), ("certificate of another CA", client(pki, cert="other-client"))):
        code, details, _ = call(server.address, "Status", pb.StatusRequest(), timeout=5, security=sec)
        assert code == Code.UNAVAILABLE, f"{name}: {code.name} {details}"
        with pytest.raises(RpcFailed) as err:
            train([server.address], sec)
        assert err.value.code == Code.UNAVAILABLE, name
    assert snapshot(server.address, good) == before


def test_token_and_tls_together(start_server, pki):
    good = client(pki, token=TOKEN, cert="client")
    server = start_server(security=good, token=TOKEN, heartbeat_timeout=3600, **tls_flags(pki, mutual=True))
    assert health(server.address, client(pki, cert="client")) == health_pb2.HealthCheckResponse.SERVING
    assert train([server.address], good) == [3]
    code, details, _ = call(server.address, "Status", pb.StatusRequest(), security=client(pki, cert="client"))
    assert code == Code.UNAUTHENTICATED, details
    code, _, _ = call(server.address, "Status", pb.StatusRequest(), timeout=5, security=Security(token=TOKEN))
    assert code == Code.UNAVAILABLE  # the right token over plaintext never reaches the server


def test_cluster_passes_token_and_mutual_tls_to_every_child(pki, corpus, tmp_path):
    out = tmp_path / "run"
    args = cluster_cmd(
        out,
        corpus,
        20,
        "--no-metrics",
        "--eval-windows",
        "4",
        "--tls-cert",
        str(pki["server.crt"]),
        "--tls-key",
        str(pki["server.key"]),
        "--tls-ca",
        str(pki["ca.crt"]),
        "--tls-client-ca",
        str(pki["ca.crt"]),
        "--tls-client-cert",
        str(pki["client.crt"]),
        "--tls-client-key",
        str(pki["client.key"]),
    )
    # Configured through the environment too: ASYNCPS_TLS_CERT is the servers' certificate, which the
    # workers must not take for their own; the token reaches every child without a command line.
    env = {**os.environ, "ASYNCPS_TOKEN": TOKEN, "ASYNCPS_TLS_CERT": str(pki["server.crt"])}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 20
    for i in (0, 1):
        assert "(mutual TLS, token required)" in (out / "logs" / f"server-{i}.log").read_text()


# -- the command line ---------------------------------------------------------------------------


def _cli_cases(pki: dict[str, Path], tmp: Path) -> dict[str, tuple[str, list[str], dict]]:
    (tmp / "empty").write_text("\n")
    (tmp / "not-pem").write_text("hello\n")
    cert, key, ca = str(pki["server.crt"]), str(pki["server.key"]), str(pki["ca.crt"])
    return {
        "server-cert-missing": ("ps_server.cli", ["--tls-cert", str(tmp / "nope.crt"), "--tls-key", key], {}),
        "server-key-without-cert": ("ps_server.cli", ["--tls-key", key], {}),
        "server-client-ca-without-cert": ("ps_server.cli", ["--tls-client-ca", ca], {}),
        "server-cert-not-pem": ("ps_server.cli", ["--tls-cert", str(tmp / "not-pem"), "--tls-key", key], {}),
        "server-key-is-a-cert": ("ps_server.cli", ["--tls-cert", cert, "--tls-key", cert], {}),
        "server-token-file-env-missing": ("ps_server.cli", [], {"ASYNCPS_TOKEN_FILE": str(tmp / "nope")}),
        "server-token-file-empty": ("ps_server.cli", ["--token-file", str(tmp / "empty")], {}),
        "server-token-and-file": ("ps_server.cli", ["--token", "a", "--token-file", str(pki["ca.crt"])], {}),
        "server-token-with-space": ("ps_server.cli", ["--token", "a b"], {}),
        "worker-cert-without-ca": (
            "worker.cli",
            ["--servers", "127.0.0.1:1", "--tls-cert", cert, "--tls-key", key],
            {},
        ),
        "worker-ca-missing": ("worker.cli", ["--servers", "127.0.0.1:1", "--tls-ca", str(tmp / "nope")], {}),
        "server-metrics-key-without-cert": ("ps_server.cli", ["--metrics-tls-key", key], {}),
        "server-metrics-client-ca-without-cert": (
            "ps_server.cli",
            ["--metrics-port", "0", "--metrics-tls-client-ca", ca],
            {},
        ),
        "server-metrics-key-of-another-cert": (
            "ps_server.cli",
            ["--metrics-port", "0", "--metrics-tls-cert", cert, "--metrics-tls-key", str(pki["other-server.key"])],
            {},
        ),
        "worker-metrics-cert-not-pem": (
            "worker.cli",
            ["--servers", "127.0.0.1:1", "--metrics-tls-cert", str(tmp / "not-pem"), "--metrics-tls-key", key],
            {},
        ),
        "worker-metrics-cert-env-missing": (
            "worker.cli",
            ["--servers", "127.0.0.1:1", "--metrics-tls-key", key],
            {"ASYNCPS_METRICS_TLS_CERT": str(tmp / "nope.crt")},
        ),
        "cluster-cert-without-ca": ("worker.cluster", ["--tls-cert", cert, "--tls-key", key], {}),
        "cluster-client-ca-without-client-cert": (
            "worker.cluster",
            ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca, "--tls-client-ca", ca],
            {},
        ),
    }


CLI_CASES = [
    "server-cert-missing",
    "server-key-without-cert",
    "server-client-ca-without-cert",
    "server-cert-not-pem",
    "server-key-is-a-cert",
    "server-token-file-env-missing",
    "server-token-file-empty",
    "server-token-and-file",
    "server-token-with-space",
    "worker-cert-without-ca",
    "worker-ca-missing",
    "cluster-cert-without-ca",
    "cluster-client-ca-without-client-cert",
    "server-metrics-key-without-cert",
    "server-metrics-client-ca-without-cert",
    "server-metrics-key-of-another-cert",
    "worker-metrics-cert-not-pem",
    "worker-metrics-cert-env-missing",
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_security_mistake_is_one_line_and_exit_2(pki, tmp_path, name):
    module, args, env = _cli_cases(pki, tmp_path)[name]
    proc = subprocess.run(
        [sys.executable, "-m", module, "--port", "0", *args]
        if module == "ps_server.cli"
        else [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert ": error: " in lines[0]
