"""What a launched worker learns from its environment: servers, rank, world, id, security.

`ps-cluster -- CMD` (worker/launch.py) and Kubernetes (deploy/k8s/) start workers that
name no addresses; they read the same variables `ps-worker` reads for its flags:

    ASYNCPS_SERVERS      comma-separated host:port of every shard, in shard order
    ASYNCPS_RANK         this worker's index; else JOB_COMPLETION_INDEX (a Kubernetes
                         Indexed Job's pod index); else 0 when the world is 1
    ASYNCPS_WORLD        number of workers (default 1)
    ASYNCPS_WORKER_ID    its name at the servers (default worker-RANK when the rank came
                         from the environment, else host-pid)
    ASYNCPS_TOKEN[_FILE], ASYNCPS_TLS_CA / _CERT / _KEY   as ps-worker's flags
    ASYNCPS_METRICS_PORT / _HOST / _PORT_FILE             /metrics, as ps-worker's flags

A missing or contradictory value raises `ValueError` with one readable line (the
CLIs turn it into exit status 2).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import NoReturn

from asyncps_common import security
from asyncps_common.flags import FlagParser
from asyncps_common.metrics_http import OFF, add_metrics_flags, metrics_tls, serve_metrics

COMPLETION_INDEX = "JOB_COMPLETION_INDEX"


@dataclass(frozen=True)
class Placement:
    """Where a worker stands: the servers, its rank in the world and its id."""

    servers: list[str]
    rank: int
    world: int
    worker_id: str


def split_servers(text: str | None) -> list[str]:
    return [a.strip() for a in (text or "").split(",") if a.strip()]


def resolve_rank(rank: int | None, world: int, environ: dict[str, str] | None = None) -> tuple[int, bool]:
    """(rank, whether it came from JOB_COMPLETION_INDEX): the flag or ASYNCPS_RANK if given, else the index.

    Raises ValueError for no rank in a world of more than one, or one outside [0, world).
    """
    env = os.environ if environ is None else environ
    from_index = False
    if rank is None and env.get("ASYNCPS_RANK", "").strip():
        rank = _int("ASYNCPS_RANK", env["ASYNCPS_RANK"])
    if rank is None and env.get(COMPLETION_INDEX, "").strip():
        rank, from_index = _int(COMPLETION_INDEX, env[COMPLETION_INDEX]), True
    if rank is None:
        if world != 1:
            raise ValueError(
                f"no rank for this worker of {world}: give --rank, ASYNCPS_RANK or "
                f"{COMPLETION_INDEX} (a Kubernetes Indexed Job sets it)"
            )
        rank = 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} workers (0..{world - 1})")
    return rank, from_index


def _int(var: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{var}={text!r} is not a whole number") from None


def default_worker_id(rank: int, rank_from_env: bool) -> str:
    return f"worker-{rank}" if rank_from_env else f"{socket.gethostname()}-{os.getpid()}"


def placement(servers: list[str] | None = None, worker_id: str | None = None) -> Placement:
    """The servers (given or ASYNCPS_SERVERS), rank, world and worker id of this process."""
    servers = list(servers) if servers else split_servers(os.environ.get("ASYNCPS_SERVERS"))
    if not servers:
        raise ValueError("no servers: pass them, or set ASYNCPS_SERVERS (ps-cluster -- CMD and deploy/k8s do)")
    world = _int("ASYNCPS_WORLD", os.environ.get("ASYNCPS_WORLD", "1"))
    if world < 1:
        raise ValueError(f"ASYNCPS_WORLD={world} must be at least 1")
    rank, from_index = resolve_rank(None, world)
    from_env = from_index or bool(os.environ.get("ASYNCPS_RANK", "").strip())
    worker_id = worker_id or os.environ.get("ASYNCPS_WORKER_ID", "").strip() or default_worker_id(rank, from_env)
    return Placement(servers, rank, world, worker_id)


class _EnvParser(FlagParser):
    """Reads only the environment; a mistake raises ValueError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def security_from_env() -> security.Security:
    """The client token and TLS settings of ASYNCPS_TOKEN[_FILE] and ASYNCPS_TLS_CA/_CERT/_KEY."""
    p = _EnvParser(prog="asyncps")
    security.add_security_flags(p, "client")
    return security.from_args(p, p.parse_args([]), "client")


def serve_metrics_from_env(registry) -> int | None:
    """Serve `registry` as ASYNCPS_METRICS_PORT (and _HOST, _PORT_FILE, _TLS_*) ask; None when unset or off."""
    if not os.environ.get("ASYNCPS_METRICS_PORT", "").strip():
        return None
    p = _EnvParser(prog="asyncps")
    add_metrics_flags(p, "127.0.0.1", "")
    args = p.parse_args([])
    if args.metrics_port == OFF:
        return None
    tls = metrics_tls(p, args)
    try:
        return serve_metrics(registry, args.metrics_host, args.metrics_port, args.metrics_port_file, tls)
    except OSError as exc:
        raise ValueError(
            f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc.strerror or exc}"
        ) from None
