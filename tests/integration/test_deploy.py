"""deploy/ checked with the real tools and the project's own parsers (no Docker engine needed).

`promtool check config` / `check rules` accept prometheus.yml and the alert rules;
`docker-compose config` accepts docker-compose.yml alone and with the GPU override; every
asyncps service's command line, with the ASYNCPS_* environment it sets, is accepted by
`ps_server.cli.build_parser` / `worker.cli.build_parser` (and names only flags that
exist); Prometheus scrapes exactly the compose services' metrics ports; Grafana's
provisioning points at files that exist and the data source the dashboard uses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncps_common.flags import ENV_PREFIX
from ps_server import cli as server_cli
from worker import cli as worker_cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GPU = DEPLOY / "docker-compose.gpu.yml"
PARSERS = {"ps-server": server_cli.build_parser, "ps-worker": worker_cli.build_parser}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/setup.sh installs it from Debian's packages (as root)"
    return path


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)


def compose_config(*files: Path) -> dict:
    args = [tool("docker-compose")]
    for f in files:
        args += ["-f", str(f)]
    r = run([*args, "config"])
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def asyncps_services(cfg: dict) -> dict[str, dict]:
    return {name: svc for name, svc in cfg["services"].items() if svc.get("command", [None])[0] in PARSERS}


def test_promtool_accepts_config_and_rules():
    promtool = tool("promtool")
    r = run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr
    r = run([promtool, "check", "rules", str(DEPLOY / "alerts.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_worker_down_alert_fires_for_a_worker_that_died_not_for_one_that_finished(tmp_path):
    """`promtool test rules` on deploy/alerts.yml: three workers stop being scraped at 2m15s.

    `finished` said asyncps_worker_finished 1 in its last scrape (ps-worker --metrics-linger
    holds it up for that scrape); `crashed` never did; `rerun` finished once, was started
    again (0 again) and then died at 5m45s.
    """
    rule = next(
        r
        for r in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
        if r.get("alert") == "AsyncpsWorkerDown"
    )
    job = 'job="asyncps-worker"'

    def series(instance: str, up: str, finished: str) -> list[dict]:
        return [
            {"series": f'up{{{job}, instance="{instance}"}}', "values": up},
            {
                "series": f'asyncps_worker_finished{{{job}, instance="{instance}", worker="{instance}"}}',
                "values": finished,
            },
        ]

    def firing(*instances: str) -> list[dict]:
        return [
            {
                "exp_labels": {"job": "asyncps-worker", "instance": i, **rule["labels"]},
                "exp_annotations": {k: v.replace("{{ $labels.instance }}", i) for k, v in rule["annotations"].items()},
            }
            for i in instances
        ]

    cases = {
        "rule_files": [str(DEPLOY / "alerts.yml")],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series("finished", "1x8 0x40", "0x7 1 stale")
                + series("crashed", "1x8 0x40", "0x8 stale")
                + series("rerun", "1x8 0x4 1x8 0x30", "0x7 1 stale _x4 0x8 stale"),
                "alert_rule_test": [
                    {"eval_time": "1m30s", "alertname": "AsyncpsWorkerDown", "exp_alerts": []},
                    {"eval_time": "3m", "alertname": "AsyncpsWorkerDown", "exp_alerts": []},  # down < 1m: pending
                    {"eval_time": "4m", "alertname": "AsyncpsWorkerDown", "exp_alerts": firing("crashed")},
                    {"eval_time": "9m", "alertname": "AsyncpsWorkerDown", "exp_alerts": firing("crashed", "rerun")},
                ],
            }
        ],
    }
    spec = tmp_path / "worker_down_test.yml"
    spec.write_text(yaml.safe_dump(cases, sort_keys=False))
    r = run([tool("promtool"), "test", "rules", str(spec)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def parse_service(monkeypatch, svc: dict, capsys):
    """Parse a service's command with exactly its environment; returns (parser, args)."""
    for var in [v for v in os.environ if v.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(var)
    env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    command = svc["command"]
    try:
        parser = PARSERS[command[0]]()
        args = parser.parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"{command} with {env} rejected: {capsys.readouterr().err.strip()}")
    flags = {ENV_PREFIX + a.dest.upper() for a in parser._actions if a.option_strings}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in flags)
    assert not unknown, f"{command[0]} has no flag for {unknown}"
    return parser, args


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, GPU)], ids=["cpu", "gpu"])
def test_compose_file_and_every_service_command_are_accepted(files, monkeypatch, capsys):
    cfg = compose_config(*files)
    services = asyncps_services(cfg)
    assert sorted(services) == ["server-0", "server-1", "worker-0", "worker-1"]
    assert {"prometheus", "grafana"} <= set(cfg["services"])
    servers = {}
    for name, svc in services.items():
        parser, args = parse_service(monkeypatch, svc, capsys)
        assert svc.get("restart") == "on-failure"
        assert args.metrics_port > 0 and (args.metrics_host or args.host) == "0.0.0.0", name
        if svc["command"][0] == "ps-server":
            assert args.host == "0.0.0.0" and args.shard_index < args.num_shards == 2 and args.checkpoint_dir
            servers[args.shard_index] = f"{name}:{args.port}"
        else:
            assert args.rank < args.world == 2 and args.worker_id == name
            # a restarted server comes back within this (python start + restore, and compose's own delay)
            assert args.retry_seconds >= 60, name
            if GPU in files:
                assert args.device == "cuda" and svc["deploy"]["resources"]["reservations"]["devices"]
            else:
                worker_cli.check_training_args(parser, args)  # exits 2 on inconsistent flags
    workers = [s for s in services.values() if s["command"][0] == "ps-worker"]
    for svc in workers:  # every worker lists every shard, in shard order
        assert svc["environment"]["ASYNCPS_SERVERS"] == ",".join(servers[i] for i in sorted(servers))


def bind_mount(volume) -> tuple[str, str]:
    """(target, source) of a compose volume in short ("src:dst[:mode]") or long syntax."""
    if isinstance(volume, dict):
        return volume["target"], volume.get("source", "")
    source, target = volume.split(":")[:2]
    return target, source


def test_prometheus_scrapes_every_service_and_grafana_is_provisioned(monkeypatch, capsys):
    cfg = compose_config(COMPOSE)
    expected = set()
    for name, svc in asyncps_services(cfg).items():
        _, args = parse_service(monkeypatch, svc, capsys)
        expected.add(f"{name}:{args.metrics_port}")
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    scraped = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert scraped == expected
    mounts = dict(bind_mount(v) for svc in ("prometheus", "grafana") for v in cfg["services"][svc]["volumes"])
    assert mounts["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus.yml")
    assert mounts["/etc/prometheus/alerts.yml"] == str(DEPLOY / "alerts.yml")
    for target in (
        "/etc/grafana/provisioning/datasources",
        "/etc/grafana/provisioning/dashboards",
        "/var/lib/grafana/dashboards",
    ):
        assert Path(mounts[target]).is_dir(), target
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/asyncps.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/asyncps.json").read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"]} | {
        t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]
    }
    assert used == uids


@pytest.mark.parametrize(
    "module, argv",
    [
        ("ps_server.cli", ["--port", "0"]),
        ("worker.cli", ["--servers", "127.0.0.1:1", "--steps", "1"]),
    ],
)
def test_metrics_port_taken_is_one_line_and_exit_2(module, argv):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", module, *argv, "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot serve metrics" in lines[0], r.stderr
