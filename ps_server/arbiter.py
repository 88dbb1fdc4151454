"""The arbiter: the one register of every replicated shard's chain configuration (`ps-arbiter`).

A shard's configuration is (epoch, members, head first). Only `Acquire` changes it, as a
compare-and-set: it succeeds only while the shard's epoch is the caller's `from_epoch`
and the caller is a member of that epoch (any caller while the epoch is 0: the first
configuration), and the new configuration (epoch + 1) is written to the state file
atomically (temporary file, fsync, rename) before the answer. So only one change per
epoch can win, and a replica that lost is told the configuration in force.

The arbiter is not on the write path: pushes and pulls never reach it. A dead arbiter
blocks failover and re-joins (they wait, retrying), not training (docs/replication.md).
Runs on one asyncio event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asyncps_common import security
from asyncps_common.flags import FlagParser, non_negative
from protos import service
from protos.asyncps.v1 import ps_pb2 as pb

log = logging.getLogger(__name__)


class Arbiter:
    """Chain configurations by shard index, kept in `state_file` (None: in memory only)."""

    def __init__(self, state_file: str | None = None):
        self.state_file = Path(state_file) if state_file else None
        self.configs: dict[int, tuple[int, list[str]]] = {}
        if self.state_file and self.state_file.exists():
            try:
                raw = json.loads(self.state_file.read_text())
                self.configs = {int(k): (int(v["epoch"]), list(v["members"])) for k, v in raw.items()}
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"arbiter state {self.state_file} is unreadable: {exc}") from None

    def _save(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
        with open(tmp, "w") as f:
            json.dump({str(k): {"epoch": e, "members": m} for k, (e, m) in self.configs.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def config(self, shard: int) -> pb.ChainConfig:
        epoch, members = self.configs.get(shard, (0, []))
        return pb.ChainConfig(shard_index=shard, epoch=epoch, members=members)

    def acquire(self, req: pb.AcquireRequest) -> pb.AcquireResponse:
        epoch, members = self.configs.get(req.shard_index, (0, []))
        new = list(req.members)
        ok = (
            req.from_epoch == epoch
            and (epoch == 0 or req.caller in members)
            and bool(new)
            and len(set(new)) == len(new)
            and req.caller in new
        )
        if ok:
            self.configs[req.shard_index] = (epoch + 1, new)
            self._save()
            log.info("shard %d: epoch %d, chain %s (asked by %s)", req.shard_index, epoch + 1, new, req.caller)
        else:
            log.info(
                "shard %d: refused %s's change from epoch %d (current %d, %s)",
                req.shard_index,
                req.caller,
                req.from_epoch,
                epoch,
                members,
            )
        return pb.AcquireResponse(acquired=ok, config=self.config(req.shard_index))

    # -- RPCs -------------------------------------------------------------------------
    async def Config(self, request: pb.ConfigRequest, context) -> pb.ChainConfig:
        return self.config(request.shard_index)

    async def Acquire(self, request: pb.AcquireRequest, context) -> pb.AcquireResponse:
        return self.acquire(request)


def build_parser() -> FlagParser:
    p = FlagParser(prog="ps-arbiter", description="Hold the chain configurations of replicated asyncps shards.")
    p.env_flag("host", default="127.0.0.1", help="address to listen on")
    p.env_flag("port", type=non_negative(int), default=50050, help="port to listen on (0: a free one)")
    p.env_flag("port-file", help="write the bound port to this file once serving")
    p.env_flag("state-file", help="where the configurations are kept across restarts (unset: memory only)")
    security.add_security_flags(p, "server")
    p.env_flag("log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return p


async def serve(arbiter: Arbiter, address: str, sec: security.Security, port_file: str | None) -> None:
    server = grpc.aio.server(interceptors=sec.interceptors())
    server.add_generic_rpc_handlers((service.method_handlers(arbiter, "Arbiter"),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = sec.server_credentials()
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if port_file:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, port_file)
    log.info("arbiter listening on port %d", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sec = security.from_args(parser, args, "server")
    logging.basicConfig(level=args.log_level, format="%(asctime)s ps-arbiter %(levelname)s %(message)s")
    try:
        arbiter = Arbiter(args.state_file)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    host = f"[{args.host}]" if ":" in args.host else args.host
    try:
        uvloop.run(serve(arbiter, f"{host}:{args.port}", sec, args.port_file))
    except OSError as exc:
        sys.stderr.write(f"ps-arbiter: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
