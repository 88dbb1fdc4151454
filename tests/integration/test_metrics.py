"""Metrics against the real thing: a live ps-cluster scraped by a real Prometheus.

`ps-cluster` (2 servers, 2 workers, a small model) runs with a metrics port per process;
the Debian `prometheus` binary scrapes them every second with deploy/prometheus.yml's
jobs (targets rewritten to the live ports) and deploy/alerts.yml loaded. The test then
asserts every target is up, that every PromQL expression of the Grafana dashboard
(`$__rate_interval` replaced by 1m) returns data, and that every alert rule parses,
is evaluated without error, and that each operand of its condition returns data
(`promql.operands`: the sides of each comparison, and of and/or/unless).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from . import support
from .promql import operands
from .test_cluster import SMALL, corpus  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "asyncps.json"
RULES = DEPLOY / "alerts.yml"
HTTP_TIMEOUT = 5.0
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes here
METRICS_LINE = re.compile(r"^metrics\s+(\S+)\s+(http://\S+/metrics)$", re.M)


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
        return json.loads(resp.read())


def query(base: str, expr: str) -> dict:
    """/api/v1/query; returns the JSON answer (errors included, never raises for a bad expression)."""
    try:
        return http_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    except urllib.error.HTTPError as err:  # 400/422 carry the parse error as JSON
        return json.loads(err.read())


def has_data(answer: dict) -> bool:
    data = answer.get("data", {})
    return answer.get("status") == "success" and (data.get("resultType") == "scalar" or bool(data.get("result")))


def dashboard_exprs() -> list[str]:
    def walk(panels):
        for p in panels:
            yield from (t["expr"] for t in p.get("targets", []) if t.get("expr"))
            yield from walk(p.get("panels", []))

    exprs = list(walk(json.loads(DASHBOARD.read_text())["panels"]))
    return [e.replace("$__rate_interval", RATE_INTERVAL) for e in exprs]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


poll = functools.partial(support.poll, interval=0.25)  # Prometheus answers in its own time


def prometheus_config(targets: dict[str, str], path: Path) -> None:
    """deploy/prometheus.yml with the live cluster's targets, a 1 s interval and the rules file."""
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(RULES)]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"asyncps-server", "asyncps-worker"}
    for job, prefix in (("asyncps-server", "server-"), ("asyncps-worker", "worker-")):
        hosts = [urllib.parse.urlparse(url).netloc for name, url in sorted(targets.items()) if name.startswith(prefix)]
        jobs[job]["static_configs"] = [{"targets": hosts}]
    path.write_text(yaml.safe_dump(cfg))


def start_prometheus(tmp_path: Path, procs, binary: str, targets: dict[str, str]) -> str:
    """A real Prometheus scraping `targets` (see prometheus_config); returns its URL once ready."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "prometheus.yml"
    prometheus_config(targets, config)
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as f:
        prom = procs.popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )

    def ready():
        assert prom.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=HTTP_TIMEOUT) as resp:
                return resp.status == 200
        except OSError:
            return False

    poll(ready, 30, "Prometheus to be ready")
    return base


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    assert path, "the prometheus binary is missing: scripts/setup.sh installs Debian's package (as root)"
    return path


def test_live_cluster_feeds_every_dashboard_and_alert_expression(tmp_path, corpus, procs, prometheus_binary):
    out = tmp_path / "run"
    stdout = tmp_path / "cluster.out"
    with open(stdout, "wb") as f, open(tmp_path / "cluster.err", "wb") as err:
        cluster = procs.popen(
            [
                sys.executable,
                "-m",
                "worker.cluster",
                "--servers",
                "2",
                "--workers",
                "2",
                "--steps",
                "100000",
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--checkpoint-interval",
                "1",
                *SMALL,
            ],
            stdout=f,
            stderr=err,
        )

    def announced():
        assert cluster.poll() is None, (tmp_path / "cluster.err").read_text()[-3000:]
        found = dict(METRICS_LINE.findall(stdout.read_text()))
        return found if len(found) == 4 else None

    targets = poll(announced, 120, "ps-cluster to announce 4 metrics endpoints")
    assert set(targets) == {"server-0", "server-1", "worker-0", "worker-1"}

    base = start_prometheus(tmp_path, procs, prometheus_binary, targets)

    def all_up():
        active = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        return active if len(active) == 4 and all(t["health"] == "up" for t in active) else None

    active = poll(all_up, 30, lambda: f"4 targets up: {http_json(f'{base}/api/v1/targets')['data']['activeTargets']}")
    assert {t["scrapeUrl"] for t in active} == set(targets.values())
    assert {t["labels"]["job"] for t in active} == {"asyncps-server", "asyncps-worker"}

    # every dashboard expression, and every operand of every alert condition, returns data
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "AsyncpsWorkerDown",
        "AsyncpsUpdateStalenessAboveBound",
        "AsyncpsPullLatencyHigh",
        "AsyncpsShardNotCheckpointing",
    }
    must_have_data = dashboard_exprs() + [op for r in rules for op in operands(r["expr"])]
    assert len(must_have_data) > 40
    failing: dict[str, str] = {}

    def everything_has_data():
        failing.clear()
        for expr in must_have_data:
            answer = query(base, expr)
            if not has_data(answer):
                failing[expr] = answer.get("error") or "empty result"
        for rule in rules:  # whole conditions: they must parse (an empty result is fine)
            answer = query(base, rule["expr"])
            if answer.get("status") != "success":
                failing[rule["expr"]] = answer.get("error", "error")
        return not failing

    poll(everything_has_data, 40, lambda: f"data for: {json.dumps(failing, indent=1)}", interval=1.0)

    # Prometheus itself evaluated every rule without error
    def rules_evaluated():
        loaded = [r for g in http_json(f"{base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        return loaded if loaded and all(r["health"] != "unknown" for r in loaded) else None

    loaded = poll(rules_evaluated, 15, "every alert rule to be evaluated")
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules}
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]

    # labels where they apply: per-shard clocks of each worker
    clocks = query(base, "asyncps_server_worker_clock")["data"]["result"]
    assert {(c["metric"]["shard"], c["metric"]["worker"]) for c in clocks} == {
        (s, w) for s in ("0", "1") for w in ("worker-0", "worker-1")
    }
    assert has_data(query(base, "sum(asyncps_worker_steps_total) > 0"))

    cluster.send_signal(signal.SIGINT)
    assert cluster.wait(timeout=60) == 130


def test_cluster_summary_lists_each_process_metrics_endpoint(tmp_path, corpus, procs):
    out = tmp_path / "run"
    proc = procs.popen(
        [
            sys.executable,
            "-m",
            "worker.cluster",
            "--servers",
            "2",
            "--workers",
            "2",
            "--steps",
            "16",
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--eval-windows",
            "4",
            *SMALL,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    printed = dict(METRICS_LINE.findall(stdout.decode()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == printed
    assert set(printed) == {"server-0", "server-1", "worker-0", "worker-1"}
    assert len({urllib.parse.urlparse(u).port for u in printed.values()}) == 4  # a port each


def test_worker_down_alert_spares_a_worker_that_finished_and_names_one_that_was_killed(
    tmp_path, corpus, procs, start_server, prometheus_binary
):
    """Two real ps-workers scraped by a real Prometheus: `done` runs 4 steps and waits
    (--metrics-linger 60) for a scrape to read asyncps_worker_finished 1, then exits at once;
    `killed` is SIGKILLed mid-training. Once both are down, AsyncpsWorkerDown's condition
    holds for `killed` only."""
    server = start_server(staleness="inf", metrics_port=0, metrics_port_file=tmp_path / "server.mport")
    workers, logs, ports = {}, {}, {}
    for name, steps in (("done", 4), ("killed", 100000)):
        logs[name] = tmp_path / f"{name}.log"
        ports[name] = tmp_path / f"{name}.mport"
        with open(logs[name], "wb") as out:
            workers[name] = procs.popen(
                [
                    sys.executable,
                    "-m",
                    "worker.cli",
                    "--servers",
                    server.address,
                    "--worker-id",
                    name,
                    "--steps",
                    str(steps),
                    "--staleness",
                    "inf",
                    "--no-average-gradients",
                    "--data",
                    str(corpus),
                    "--d-model",
                    "32",
                    "--n-layer",
                    "1",
                    "--n-head",
                    "2",
                    "--context",
                    "32",
                    "--batch-size",
                    "4",
                    "--threads",
                    "1",
                    "--metrics-port",
                    "0",
                    "--metrics-port-file",
                    str(ports[name]),
                    "--metrics-linger",
                    "60",
                    "--log-level",
                    "INFO",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def port_of(path: Path, proc) -> int | None:
        assert proc.poll() is None, path
        return int(path.read_text()) if path.exists() else None

    targets = {
        "server-0": "http://127.0.0.1:{}/metrics".format(
            poll(lambda: port_of(tmp_path / "server.mport", server.proc), 30, "server metrics port")
        )
    }
    for i, name in enumerate(workers):
        port = poll(lambda name=name: port_of(ports[name], workers[name]), 60, f"{name}'s metrics port")
        targets[f"worker-{i}"] = f"http://127.0.0.1:{port}/metrics"
    base = start_prometheus(tmp_path, procs, prometheus_binary, targets)
    instance = {name: urllib.parse.urlparse(targets[f"worker-{i}"]).netloc for i, name in enumerate(workers)}

    # `done` exits as soon as Prometheus has read its final state, long before its 60 s linger
    assert support.wait_exit(workers["done"], 30, logs["done"]) == 0
    assert "final metrics scraped" in logs["done"].read_text()
    poll(
        lambda: has_data(query(base, f'asyncps_worker_steps_total{{instance="{instance["killed"]}"}} > 0')),
        60,
        "Prometheus to scrape killed's first steps",
    )
    support.kill_group(workers["killed"])
    workers["killed"].wait(timeout=10)

    def both_down():
        result = query(base, 'up{job="asyncps-worker"} == 0')["data"]["result"]
        return len(result) == 2

    poll(both_down, 30, "Prometheus to see both workers down")
    rule = next(r for r in alert_rules() if r["alert"] == "AsyncpsWorkerDown")
    answer = query(base, rule["expr"])
    assert answer["status"] == "success", answer
    assert {r["metric"]["instance"] for r in answer["data"]["result"]} == {instance["killed"]}


def test_a_finished_worker_nobody_scrapes_exits_after_its_linger(tmp_path, corpus, procs, start_server):
    server = start_server(staleness="inf")
    log = tmp_path / "w.log"
    with open(log, "wb") as out:
        proc = procs.popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "--servers",
                server.address,
                "--worker-id",
                "w",
                "--steps",
                "2",
                "--staleness",
                "inf",
                "--no-average-gradients",
                "--data",
                str(corpus),
                "--d-model",
                "32",
                "--n-layer",
                "1",
                "--n-head",
                "2",
                "--context",
                "32",
                "--batch-size",
                "4",
                "--threads",
                "1",
                "--metrics-port",
                "0",
                "--metrics-linger",
                "0.5",
                "--log-level",
                "INFO",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    assert support.wait_exit(proc, 60, log) == 0
    assert "no scrape of /metrics within --metrics-linger 0.5s after the last step" in log.read_text()
