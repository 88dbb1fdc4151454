"""deploy/docker-compose.replicated.yml: replicated shards under compose.

`docker-compose config` accepts the override on top of docker-compose.yml; every replica's
environment parses as `ps-server` flags with a consistent replica list (its own name first
or second, its own port, the arbiter named); the arbiter's as `ps-arbiter` flags; each worker
names every shard's replicas, head first, in shard order.
"""

from __future__ import annotations

import pytest

from ps_server import arbiter as arbiter_cli
from ps_server import cli as server_cli

from .test_deploy import COMPOSE, DEPLOY, asyncps_services, compose_config, parse_service

REPLICATED = DEPLOY / "docker-compose.replicated.yml"


def test_replicated_compose_gives_each_shard_two_consistent_replicas_and_an_arbiter(monkeypatch, capsys):
    cfg = compose_config(COMPOSE, REPLICATED)
    services = asyncps_services(cfg)
    assert sorted(services) == ["server-0", "server-0b", "server-1", "server-1b", "worker-0", "worker-1"]
    chains: dict[int, str] = {}
    dirs = set()
    for name, svc in services.items():
        parser, args = parse_service(monkeypatch, svc, capsys)
        if svc["command"][0] != "ps-server":
            continue
        try:
            members = server_cli.replica_list(parser, args)
        except SystemExit:
            pytest.fail(f"{name}: {capsys.readouterr().err.strip()}")
        assert members[args.replica_index] == f"{name}:{args.port}" and args.arbiter == "arbiter:50050"
        assert chains.setdefault(args.shard_index, args.replicas) == args.replicas
        dirs.add(args.checkpoint_dir)
        assert svc.get("restart") == "on-failure"
    assert len(dirs) == 2  # replica-0 and replica-1: replicas of one shard never share a checkpoint file
    for name in ("worker-0", "worker-1"):
        assert services[name]["environment"]["ASYNCPS_SERVERS"] == f"{chains[0]},{chains[1]}"
    arb = cfg["services"]["arbiter"]
    for k, v in arb["environment"].items():
        monkeypatch.setenv(k, v)
    args = arbiter_cli.build_parser().parse_args([])
    assert args.port == 50050 and args.state_file and arb["command"] == ["ps-arbiter"]
