"""/metrics over TLS and mutual TLS (`--metrics-tls-cert/-key/-client-ca`), against a real
ps-server, a real ps-worker and a real Prometheus.

With a client CA, only a scraper presenting a certificate that CA signed is answered:
plain HTTP, TLS without a certificate, and a certificate from another CA all get nothing.
The handshake runs in each connection's own thread, so a client that connects and never
speaks does not hold up the next scrape. A real Prometheus scraping with `scheme: https`
and a `tls_config` (docs/security.md's snippet) reads the metrics; the same Prometheus job
without a client certificate finds the target down.
"""

from __future__ import annotations

import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .test_cluster import corpus  # noqa: F401 (a fixture)
from .test_metrics import HTTP_TIMEOUT, free_port, http_json, poll, prometheus_binary, query  # noqa: F401 (a fixture)
from .test_security import pki  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")


def tls_metrics_flags(pki: dict[str, Path], port_file: Path, mutual: bool = True) -> dict[str, str]:
    flags = {
        "metrics_port": "0",
        "metrics_port_file": str(port_file),
        "metrics_tls_cert": str(pki["server.crt"]),
        "metrics_tls_key": str(pki["server.key"]),
    }
    if mutual:
        flags["metrics_tls_client_ca"] = str(pki["ca.crt"])
    return flags


def scraper(pki: dict[str, Path], cert: str | None) -> ssl.SSLContext:
    """A scraper's TLS: trusts the test CA; presents `cert` ("client", "other-client") if given."""
    ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    if cert:
        ctx.load_cert_chain(str(pki[f"{cert}.crt"]), str(pki[f"{cert}.key"]))
    return ctx


def fetch(url: str, ctx: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT, context=ctx) as resp:
        return resp.read().decode()


def refused(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    """True if the endpoint answers `url` with no metrics (a failed handshake or a dropped connection)."""
    try:
        body = fetch(url, ctx)
    except (urllib.error.URLError, ssl.SSLError, ConnectionError, OSError):
        return True
    return "asyncps_" not in body


def test_server_metrics_over_mutual_tls_answer_only_certified_scrapers(start_server, pki, tmp_path):
    port_file = tmp_path / "server.mport"
    start_server(**tls_metrics_flags(pki, port_file))
    port = int(port_file.read_text())
    url = f"https://127.0.0.1:{port}/metrics"

    silent = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)  # connects, never speaks
    try:
        assert "asyncps_server_live_workers" in fetch(url, scraper(pki, "client"))  # not held up by `silent`
    finally:
        silent.close()
    assert refused(f"http://127.0.0.1:{port}/metrics")  # plain HTTP
    assert refused(url, scraper(pki, None))  # TLS, no client certificate
    assert refused(url, scraper(pki, "other-client"))  # a certificate nobody here trusts
    untrusting = ssl.create_default_context(cafile=str(pki["other-ca.crt"]))
    untrusting.load_cert_chain(str(pki["client.crt"]), str(pki["client.key"]))
    assert refused(url, untrusting)  # the scraper does not trust the server
    assert "asyncps_server_pushes_total" in fetch(url, scraper(pki, "client"))  # still serving after all that


def prometheus_tls_config(pki: dict[str, Path], target: str, path: Path) -> None:
    """Two jobs scraping the same HTTPS target every second: `certified` presents the
    client certificate, `anonymous` only trusts the CA."""
    tls = {"ca_file": str(pki["ca.crt"])}
    jobs = [
        {
            "job_name": "certified",
            "scheme": "https",
            "static_configs": [{"targets": [target]}],
            "tls_config": {**tls, "cert_file": str(pki["client.crt"]), "key_file": str(pki["client.key"])},
        },
        {"job_name": "anonymous", "scheme": "https", "static_configs": [{"targets": [target]}], "tls_config": tls},
    ]
    path.write_text(
        yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": jobs})
    )


def test_a_real_prometheus_scrapes_a_worker_over_mutual_tls(
    tmp_path, pki, corpus, procs, start_server, prometheus_binary
):
    """ps-worker serves the same flags (one shared endpoint): a real Prometheus with the
    client certificate scrapes it; without one, its target is down."""
    server = start_server(staleness="inf")
    port_file = tmp_path / "worker.mport"
    log = tmp_path / "worker.log"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in tls_metrics_flags(pki, port_file).items()]
    with open(log, "wb") as out:
        worker = procs.popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "--servers",
                server.address,
                "--worker-id",
                "w-tls",
                "--steps",
                "100000",
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
                *flags,
            ],
            stdout=out,
            stderr=out,
        )
    port = int(
        poll(
            lambda: port_file.exists() and port_file.read_text().strip(),
            60,
            lambda: f"the worker's metrics port: {log.read_text()[-2000:]}",
        )
    )
    assert worker.poll() is None, log.read_text()[-2000:]

    prom_port = free_port()
    base = f"http://127.0.0.1:{prom_port}"
    config = tmp_path / "prometheus.yml"
    prometheus_tls_config(pki, f"127.0.0.1:{port}", config)
    with open(tmp_path / "prometheus.log", "wb") as out:
        procs.popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=out,
        )

    def both_scraped():
        try:
            active = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        except OSError:
            return None  # not listening yet
        health = {t["labels"]["job"]: t for t in active}
        return health if len(health) == 2 and all(t["health"] != "unknown" for t in health.values()) else None

    targets = poll(both_scraped, 60, "Prometheus to scrape both jobs")
    assert targets["certified"]["health"] == "up", targets["certified"]
    assert targets["anonymous"]["health"] == "down", targets["anonymous"]
    assert "certificate" in targets["anonymous"]["lastError"] or "tls" in targets["anonymous"]["lastError"].lower()

    def worker_steps():
        answer = query(base, 'asyncps_worker_steps_total{job="certified",worker="w-tls"}')
        result = answer.get("data", {}).get("result", [])
        return result if result and float(result[0]["value"][1]) > 0 else None

    poll(worker_steps, 30, "Prometheus to read the worker's steps over TLS")
    assert worker.poll() is None, log.read_text()[-2000:]


def test_tls_without_client_ca_answers_any_scraper_that_trusts_it(start_server, pki, tmp_path):
    port_file = tmp_path / "server.mport"
    start_server(**tls_metrics_flags(pki, port_file, mutual=False))
    port = int(port_file.read_text())
    assert "asyncps_server_live_workers" in fetch(f"https://127.0.0.1:{port}/metrics", scraper(pki, None))
    assert refused(f"http://127.0.0.1:{port}/metrics")
