"""ps-server --health-port: the health service alone, in plaintext, beside a mutual-TLS port.

Kubernetes' native gRPC probe speaks neither TLS nor mutual TLS, so deploy/k8s probes
this port. It answers SERVING (and NOT_SERVING on the way down, from the same health
service); no asyncps RPC is reachable there, and the main port still refuses plaintext.
"""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncps_common.security import Security
from protos import service
from protos.asyncps.v1 import ps_pb2 as pb

from .certs import make_pki
from .support import RPC_TIMEOUT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plaintext_health_port_beside_mutual_tls(start_server, tmp_path):
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    sec = Security(
        token="t0ken",
        ca=pki["ca.crt"].read_bytes(),
        cert=pki["client.crt"].read_bytes(),
        key=pki["client.key"].read_bytes(),
    )
    server = start_server(
        security=sec,
        tls_cert=pki["server.crt"],
        tls_key=pki["server.key"],
        tls_client_ca=pki["ca.crt"],
        token="t0ken",
        health_port=port,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for name in ("", service.SERVICE_NAME):
            assert (
                check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        with pytest.raises(grpc.RpcError) as err:
            service.Stub(channel).Status(pb.StatusRequest(), timeout=RPC_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(server.address) as channel:  # the main port stays TLS only
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
