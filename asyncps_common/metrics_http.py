"""The Prometheus `/metrics` endpoint of any asyncps process: plain HTTP, or HTTPS with
optional client certificates.

Shared by `ps-server` and `ps-worker`. `add_metrics_flags` registers `--metrics-port` (-1,
the default: off; 0: a free port, written to `--metrics-port-file`), `--metrics-host` and
the TLS flags `--metrics-tls-cert/--metrics-tls-key` (serve HTTPS only) and
`--metrics-tls-client-ca` (mutual TLS: only scrapers presenting a certificate signed by
that CA are answered), each with its `ASYNCPS_*` variable; `metrics_tls` checks them (one
line and exit 2 for a missing, non-PEM or mismatched file). `serve_metrics` starts the
endpoint on daemon threads: prometheus-client's WSGI app (`make_wsgi_app`) behind a
threading server whose TLS handshake runs in each connection's own thread with a timeout,
so a client that connects and never speaks cannot hold up anyone else's scrape
(prometheus-client's own `start_http_server` shakes hands in its accept loop).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from asyncps_common.security import CERT, KEY, Security, read_pem

log = logging.getLogger(__name__)

OFF = -1  # --metrics-port value (and default) that disables the endpoint
CONNECTION_SECONDS = 30.0  # a scraper must shake hands, ask and read within this (Prometheus's own timeout is 10 s)


def metrics_port(text: str) -> int:
    """--metrics-port: a port number, 0 for a free one, -1 for off."""
    value = int(text)
    if not OFF <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port 0-65535, or -1 for off, got {text}")
    return value


def add_metrics_flags(p: Any, host_default: str | None, host_help: str) -> None:
    """Add the /metrics flags (module docstring) to a FlagParser."""
    p.env_flag(
        "metrics-port",
        type=metrics_port,
        default=OFF,
        help="serve Prometheus /metrics on this port (0: a free one; -1: off)",
    )
    p.env_flag("metrics-host", default=host_default, help=host_help)
    p.env_flag("metrics-port-file", help="write the bound metrics port to this file once serving")
    p.env_flag("metrics-tls-cert", help="certificate chain (PEM): serve /metrics over HTTPS only")
    p.env_flag("metrics-tls-key", help="private key (PEM) of --metrics-tls-cert")
    p.env_flag(
        "metrics-tls-client-ca",
        help="answer /metrics only to scrapers presenting a certificate signed by this CA (PEM): mutual TLS",
    )


def metrics_tls(p: argparse.ArgumentParser, args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context the metrics flags ask for (None: plain HTTP); one-line errors, exit 2."""
    cert_path, key_path = args.metrics_tls_cert or None, args.metrics_tls_key or None
    ca_path = args.metrics_tls_client_ca or None
    if bool(cert_path) != bool(key_path):
        p.error("--metrics-tls-cert and --metrics-tls-key go together")
    if ca_path and not cert_path:
        p.error("--metrics-tls-client-ca needs --metrics-tls-cert and --metrics-tls-key: mutual TLS runs over TLS")
    if not cert_path:
        return None
    sec = Security(
        cert=read_pem(p, "metrics-tls-cert", cert_path, CERT),
        key=read_pem(p, "metrics-tls-key", key_path, KEY),
        client_ca=read_pem(p, "metrics-tls-client-ca", ca_path, CERT),
    )
    try:
        return sec.server_ssl_context()
    except ssl.SSLError as exc:
        p.error(
            f"cannot use --metrics-tls-cert {cert_path} with --metrics-tls-key {key_path}"
            f"{f' and --metrics-tls-client-ca {ca_path}' if ca_path else ''}: {exc.reason or exc}"
        )


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # one line per scrape is noise; failures are logged by _Server


class _Server(ThreadingMixIn, WSGIServer):
    """One daemon thread per connection; with `tls`, the handshake happens in that thread."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:  # a socket.socket
        request.settimeout(CONNECTION_SECONDS)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:  # takes the socket over: shutdown_request then finds it detached and does nothing
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("metrics: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: request from %s failed", client_address[0], exc_info=True)


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, port_file: str | None = None, tls: ssl.SSLContext | None = None
) -> int:
    """Serve `registry` at http(s)://host:port/metrics on daemon threads; returns the bound port.

    Raises OSError when the address cannot be bound.
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("_MetricsServer", (_Server,), {"address_family": family, "tls": tls})
    httpd: WSGIServer = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="asyncps-metrics", daemon=True).start()
    bound = int(httpd.server_port)
    if port_file:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(f"{bound}\n")
        os.replace(tmp, port_file)
    log.info(
        "metrics at %s://%s:%d/metrics%s",
        "https" if tls else "http",
        host,
        bound,
        " (client certificates required)" if tls is not None and tls.verify_mode == ssl.CERT_REQUIRED else "",
    )
    return bound
