"""`ps-server`: run one parameter-server shard.

Every flag can also be set through its environment variable (shown in --help), so a
compose file configures servers without a command line.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

import uvloop

from asyncps_common import security
from asyncps_common.flags import FlagParser, non_negative, positive, staleness_flag
from asyncps_common.metrics_http import OFF, add_metrics_flags, metrics_tls, serve_metrics
from protos import wire
from ps_server.replication import Replication
from ps_server.server import serve
from ps_server.servicer import ServerConfig, Servicer, ShardFailed
from ps_server.transfer import warm_up


def data_port_flag(text: str) -> int | None:
    if text.strip().lower() == "off":
        return None
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'off', got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def build_parser() -> FlagParser:
    p = FlagParser(prog="ps-server", description="Run one asyncps parameter-server shard.")
    p.env_flag("host", default="127.0.0.1", help="address to listen on")
    p.env_flag("port", type=non_negative(int), default=50051, help="port to listen on (0: a free one)")
    p.env_flag("port-file", help="write the bound port to this file once serving")
    p.env_flag(
        "data-port",
        type=data_port_flag,
        default=0,
        help="port of the TCP data plane, the fast path for pulls and pushes (0: a free one; off: none)",
    )
    p.env_flag(
        "health-port",
        type=data_port_flag,
        default=None,
        help="also serve the gRPC health service alone, in plaintext, on this port (off: not), for "
        "orchestrators whose probes cannot speak TLS (Kubernetes' gRPC probe)",
    )
    p.env_flag("shard-index", type=non_negative(int), default=0, help="which shard this server holds")
    p.env_flag("num-shards", type=positive(int), default=1, help="how many shards the model is cut into")
    p.env_flag("staleness", type=staleness_flag, help="staleness bound s (a number or inf); unset: the first worker's")
    p.env_flag(
        "heartbeat-timeout",
        type=positive(float),
        default=10.0,
        help="seconds of silence after which a worker is evicted",
    )
    p.env_flag("checkpoint-dir", help="where to write checkpoints and restore from on start")
    p.env_flag("checkpoint-interval", type=positive(float), default=60.0, help="seconds between checkpoints")
    p.env_flag("chunk-bytes", type=positive(int), default=wire.DEFAULT_CHUNK_BYTES, help="bytes per streamed chunk")
    p.env_flag("max-message-bytes", type=positive(int), default=8 << 20, help="largest gRPC message accepted")
    p.env_flag("max-shard-bytes", type=positive(int), default=8 << 30, help="largest shard accepted at Init")
    p.env_flag(
        "replicas",
        help="replicated shard: this shard's replicas as host:port|host:port|... (the first starts the chain); "
        "needs --arbiter and --replica-index",
    )
    p.env_flag("replica-index", type=non_negative(int), default=0, help="which of --replicas this server is")
    p.env_flag("arbiter", help="host:port of ps-arbiter, which holds the chain's configuration (with --replicas)")
    p.env_flag(
        "lease",
        type=positive(float),
        default=1.0,
        help="seconds without word from the head after which a follower takes over (with --replicas)",
    )
    p.env_flag("grace", type=non_negative(float), default=5.0, help="seconds given to calls in flight on stop")
    add_metrics_flags(p, None, "address for /metrics (default: --host)")
    security.add_security_flags(p, "server")
    p.env_flag("log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return p


def check_can_listen(host: str, port: int) -> None:
    """Raise OSError if (host, port) cannot be bound (before gRPC tries, which logs and raises)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
        sock.bind(addr)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        staleness=args.staleness,
        heartbeat_timeout=args.heartbeat_timeout,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_interval=args.checkpoint_interval,
        chunk_bytes=args.chunk_bytes,
        max_message_bytes=args.max_message_bytes,
        max_shard_bytes=args.max_shard_bytes,
    )


def replica_list(parser: FlagParser, args: argparse.Namespace) -> list[str]:
    """The checked --replicas list (empty: not replicated); one line + exit 2 for an inconsistent one."""
    if not args.replicas:
        if args.arbiter:
            parser.error("--arbiter is for replicated shards: give --replicas too")
        return []
    members = [a.strip() for a in args.replicas.split("|")]
    for a in members:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--replicas: {a!r} is not host:port with a port in 1..65535")
    if len(set(members)) != len(members):
        parser.error(f"--replicas names a replica twice: {args.replicas}")
    if args.replica_index >= len(members):
        parser.error(f"--replica-index {args.replica_index} is outside the {len(members)} replicas of --replicas")
    if int(members[args.replica_index].rpartition(":")[2]) != args.port:
        parser.error(
            f"--replicas names this server (index {args.replica_index}) {members[args.replica_index]}, "
            f"but it listens on port {args.port}"
        )
    if not args.arbiter:
        parser.error("--replicas needs --arbiter (host:port of ps-arbiter)")
    if args.tls_cert:
        parser.error("--tls-cert is not supported with --replicas (replicas talk plaintext with a token)")
    return members


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_index >= args.num_shards:
        parser.error(f"--shard-index {args.shard_index} must be below --num-shards {args.num_shards}")
    if args.chunk_bytes + 1024 > args.max_message_bytes:
        parser.error("--chunk-bytes must be at least 1 KiB below --max-message-bytes")
    sec = security.from_args(parser, args, "server")
    metrics_ssl = metrics_tls(parser, args)  # checked even with the endpoint off: a wrong file is a mistake
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s ps-server[{args.shard_index}] %(levelname)s %(message)s"
    )
    members = replica_list(parser, args)
    servicer = Servicer(config_from_args(args))
    if members:
        Replication(servicer, members[args.replica_index], args.replica_index == 0, args.arbiter, args.lease, sec)
        warm_up()
    try:
        servicer.restore()
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"ps-server: error: {exc}\n")
        return 2
    host = f"[{args.host}]" if ":" in args.host else args.host
    try:
        check_can_listen(args.host, args.port)
    except OSError as exc:
        parser.error(f"cannot listen on {host}:{args.port}: {exc.strerror or exc}")
    if args.data_port:
        try:
            check_can_listen(args.host, args.data_port)
        except OSError as exc:
            parser.error(f"cannot listen on {host}:{args.data_port} (--data-port): {exc.strerror or exc}")
    if args.health_port:
        try:
            check_can_listen(args.host, args.health_port)
        except OSError as exc:
            parser.error(f"cannot listen on {host}:{args.health_port} (--health-port): {exc.strerror or exc}")
    if args.metrics_port != OFF:
        try:
            serve_metrics(
                servicer.metrics.registry,
                args.metrics_host or args.host,
                args.metrics_port,
                args.metrics_port_file,
                metrics_ssl,
            )
        except OSError as exc:
            parser.error(
                f"cannot serve metrics on {args.metrics_host or args.host}:{args.metrics_port}: {exc.strerror or exc}"
            )
    try:
        uvloop.run(
            serve(
                servicer,
                f"{host}:{args.port}",
                grace=args.grace,
                port_file=args.port_file,
                security=sec,
                data_port=args.data_port,
                health_port=args.health_port,
            )
        )
    except OSError as exc:
        sys.stderr.write(f"ps-server: error: {exc}\n")
        return 2
    except ShardFailed as exc:  # logged with its cause where it happened
        sys.stderr.write(f"ps-server: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
