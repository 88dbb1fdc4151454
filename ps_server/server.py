"""Building and running a shard server: `build_server` apart from the process's `serve`.

`build_server(address, servicer, security)` returns a started-not-yet grpc.aio server
and its bound port (port 0 picks a free one); with `security` (asyncps_common/security.py)
it listens with TLS and/or refuses RPCs without the token (health stays open). `serve`
runs it on the current event loop with the standard gRPC health service, the servicer's
background work (eviction, periodic checkpoints), the TCP data plane beside it
(ps_server/dataplane.py; `data_port` 0 picks a free port, None turns it off), and a
graceful stop on SIGTERM/SIGINT: health goes NOT_SERVING, the data plane stops
accepting, in-flight calls get `grace` seconds, then a final checkpoint is written.
With `health_port`, the same health service is also served alone, in plaintext, on a
second port: Kubernetes' native gRPC probe speaks neither TLS nor mutual TLS.
If an update fails part-way (`Servicer.failed`), it stops at once instead, writes no
checkpoint (the last good one stays) and raises ShardFailed: `ps-server` exits 1, and
`ps-cluster` or compose restart it from that checkpoint (docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asyncps_common.security import NONE, Security
from protos import service
from protos.datasock import split_host
from ps_server.dataplane import DataPlane
from ps_server.servicer import Servicer

log = logging.getLogger(__name__)


def build_server(
    address: str, servicer: Servicer, security: Security = NONE
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A grpc.aio server for `servicer` bound to `address` ("host:port"); returns (server, port, health)."""
    limit = servicer.cfg.max_message_bytes
    server = grpc.aio.server(
        interceptors=security.interceptors(),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((service.method_handlers(servicer),))
    if servicer.replication is not None:  # a replicated shard: its chain's Replica service too
        server.add_generic_rpc_handlers((service.method_handlers(servicer.replication, "Replica"),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = security.server_credentials()
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, health_servicer


def _write_port_file(path: str, port: int) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


async def serve(
    servicer: Servicer,
    address: str,
    grace: float = 5.0,
    port_file: str | None = None,
    security: Security = NONE,
    data_port: int | None = 0,
    health_port: int | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; blocks (asynchronously) for the server's whole life.

    Call `servicer.restore()` first to resume from a checkpoint. Raises ShardFailed after
    stopping if an update failed part-way.
    """
    server, port, health_servicer = build_server(address, servicer, security)
    data = None
    if data_port is not None:
        data = DataPlane(servicer, asyncio.get_running_loop(), security)
        servicer.data_port = data.start(split_host(address), data_port)
    await server.start()
    probe = None
    if health_port:  # the health service alone: no asyncps RPC is reachable there
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
        probe.add_insecure_port(f"{address.rsplit(':', 1)[0]}:{health_port}")
        await probe.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(service.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    if port_file:
        _write_port_file(port_file, port)
    log.info(
        "shard %d of %d listening on port %d, data plane %s (%s%s)",
        servicer.cfg.shard_index,
        servicer.cfg.num_shards,
        port,
        f"on port {servicer.data_port}" if data else "off",
        ("mutual TLS" if security.client_ca else "TLS") if security.cert else "plaintext",
        ", token required" if security.token else "",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background = asyncio.create_task(servicer.run_background())
    chain = asyncio.create_task(servicer.replication.run()) if servicer.replication is not None else None
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(servicer.failed.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if servicer.failure is not None:
            grace = 0.0  # the calls in flight fail now; workers retry until the restarted shard answers
        log.info("stopping: %.1fs grace for calls in flight", grace)
        await health_servicer.enter_graceful_shutdown()
        if data is not None:
            servicer.data_port = 0
            await asyncio.gather(server.stop(grace), data.stop(grace))
        else:
            await server.stop(grace)
        if probe is not None:
            await probe.stop(0)
    finally:
        background.cancel()
        if chain is not None:
            chain.cancel()
        for w in waits:
            w.cancel()
        if servicer.checkpoint_file and servicer.store is not None and servicer.failure is None:
            await servicer.checkpoint_now()
    if servicer.failure is not None:
        raise servicer.failure
