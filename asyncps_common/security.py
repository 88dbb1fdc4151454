"""Authentication and TLS for both ends of every asyncps channel.

* **Token.** `--token X` or `--token-file PATH` (`ASYNCPS_TOKEN`, `ASYNCPS_TOKEN_FILE`; a
  file's trailing newline is stripped). A server given a token runs `TokenInterceptor`:
  every asyncps RPC must carry the metadata `authorization: Bearer <token>` (compared in
  constant time) or it is answered UNAUTHENTICATED before any handler runs, so a rejected
  request changes nothing. The standard gRPC health service stays open, so orchestrators
  can probe a server without the secret. Clients attach the token to every call
  (`Security.metadata`, bound into `protos.service.Stub`).
* **TLS.** A server with `--tls-cert/--tls-key` listens with TLS only; `--tls-client-ca`
  makes it mutual (clients must present a certificate signed by that CA). A client uses
  TLS when given `--tls-ca` (the root it verifies servers with), and presents
  `--tls-cert/--tls-key` as its own certificate for mutual TLS.

`add_security_flags` registers the flags of a role ("server", "client" or "cluster"),
`from_args` reads and checks the files (a mistake is one line and exit 2 through the
parser); the resulting `Security` is immutable and safe to share between threads.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTH_KEY = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # exempt from the token: probes need no secret


@dataclass(frozen=True, repr=False)
class Security:
    """Credentials of one process; PEM bytes, already read. Empty: plaintext, no token."""

    token: str | None = None
    ca: bytes | None = None  # client: root certificate(s) to verify servers with (TLS on)
    cert: bytes | None = None  # server: its certificate; client: its own (mutual TLS)
    key: bytes | None = None
    client_ca: bytes | None = None  # server: require client certificates signed by this CA

    def __repr__(self) -> str:  # what is on, never the secrets
        on = [name for name in ("token", "ca", "cert", "key", "client_ca") if getattr(self, name) is not None]
        return f"Security({', '.join(on) or 'off'})"

    # -- client side ------------------------------------------------------------------
    @property
    def tls(self) -> bool:
        return self.ca is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata to send with every call (empty without a token)."""
        return ((AUTH_KEY, f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def aio_channel(self, address: str, options: list | None = None) -> grpc.aio.Channel:
        if self.tls:
            return grpc.aio.secure_channel(address, self.channel_credentials(), options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def channel(self, address: str, options: list | None = None) -> grpc.Channel:
        if self.tls:
            return grpc.secure_channel(address, self.channel_credentials(), options=options)
        return grpc.insecure_channel(address, options=options)

    # -- server side ------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for `add_secure_port`, or None for a plaintext port."""
        if self.cert is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=self.client_ca is not None
        )

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS (mutual with `client_ca`) for the data plane's connections, as on the gRPC port."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(ctx, self.cert, self.key)
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=self.client_ca.decode("ascii"))
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """TLS for a client's data-plane connections: verifies the server (name included) with `ca`."""
        if self.ca is None:
            raise ValueError("a TLS client needs the CA to verify servers with")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca.decode("ascii"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None:
            _load_chain(ctx, self.cert, self.key)
        return ctx

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []


NONE = Security()


def _load_chain(ctx: ssl.SSLContext, cert: bytes | None, key: bytes | None) -> None:
    """`ctx.load_cert_chain` from PEM bytes (it reads files only: a private 0700 folder, removed at once)."""
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate and its key")
    with tempfile.TemporaryDirectory(prefix="asyncps-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Answer UNAUTHENTICATED to every non-health RPC without `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._rejected = 0
        self._last_log = -float("inf")

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        got = None
        for key, value in details.invocation_metadata or ():
            if key == AUTH_KEY:
                got = value.encode() if isinstance(value, str) else value
        if got is not None and hmac.compare_digest(got, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without a token
            return None
        why = (
            "missing credentials: send the metadata 'authorization: Bearer <token>'" if got is None else "invalid token"
        )
        self._note(details.method, why)
        return _refusal(handler, f"{details.method}: {why}")

    def _note(self, method: str, why: str) -> None:
        """Log rejections at most once every 10 s (a client retrying must not flood the log)."""
        self._rejected += 1
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.warning("refused %s: %s (%d refused so far)", method, why, self._rejected)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that aborts UNAUTHENTICATED without reading the request."""
    code = grpc.StatusCode.UNAUTHENTICATED

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
        yield b""  # never reached; makes this an async generator

    make = {
        (False, False): (grpc.unary_unary_rpc_method_handler, unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, streaming),
        (True, False): (grpc.stream_unary_rpc_method_handler, unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, streaming),
    }
    factory, behaviour = make[(handler.request_streaming, handler.response_streaming)]
    return factory(behaviour)  # no deserializer: an unauthenticated body is never parsed


# -- flags ----------------------------------------------------------------------------------


def add_security_flags(p: Any, role: str) -> None:
    """Register the token and TLS flags of `role`: "server", "client" or "cluster"."""
    p.env_flag("token", help="shared secret: servers refuse RPCs without it (UNAUTHENTICATED); clients send it")
    p.env_flag("token-file", help="read the token from this file (trailing newline stripped)")
    if role in ("server", "cluster"):
        p.env_flag("tls-cert", help="server certificate chain (PEM): serve TLS only")
        p.env_flag("tls-key", help="private key (PEM) of --tls-cert")
        p.env_flag("tls-client-ca", help="mutual TLS: require client certificates signed by this CA (PEM)")
    if role in ("client", "cluster"):
        p.env_flag("tls-ca", help="CA certificate (PEM) to verify servers with: connect over TLS")
    if role == "client":
        p.env_flag("tls-cert", help="this client's certificate chain (PEM), for mutual TLS")
        p.env_flag("tls-key", help="private key (PEM) of --tls-cert")
    if role == "cluster":
        p.env_flag("tls-client-cert", help="certificate (PEM) workers and the launcher present under mutual TLS")
        p.env_flag("tls-client-key", help="private key (PEM) of --tls-client-cert")


def read_pem(p: Any, flag: str, path: str | None, marker: bytes) -> bytes | None:
    """The PEM file at `path` (None if no path); exit 2 if unreadable or without `marker`."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        p.error(f"cannot read --{flag} {path}: {exc.strerror or exc}")
    if marker not in data:
        p.error(f"--{flag} {path} holds no PEM {'certificate' if marker == CERT else 'private key'}")
    return data


CERT, KEY = b"-----BEGIN CERTIFICATE-----", b"PRIVATE KEY-----"


def read_token(p: Any, args: argparse.Namespace) -> str | None:
    token, path = args.token or None, args.token_file or None
    if token and path:
        p.error("give --token or --token-file (ASYNCPS_TOKEN or ASYNCPS_TOKEN_FILE), not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            p.error(f"cannot read --token-file {path}: {getattr(exc, 'strerror', None) or exc}")
        if not token:
            p.error(f"--token-file {path} is empty")
    if token is not None and not all(0x21 <= ord(c) <= 0x7E for c in token):
        p.error("the token must be printable ASCII without spaces")
    return token


def from_args(p: Any, args: argparse.Namespace, role: str) -> Security:
    """The `Security` of a "server" or "client" from its parsed flags; one-line errors, exit 2."""
    token = read_token(p, args)
    cert_path, key_path = args.tls_cert or None, args.tls_key or None
    if bool(cert_path) != bool(key_path):
        p.error("--tls-cert and --tls-key go together")
    cert = read_pem(p, "tls-cert", cert_path, CERT)
    key = read_pem(p, "tls-key", key_path, KEY)
    if role == "server":
        client_ca = read_pem(p, "tls-client-ca", args.tls_client_ca or None, CERT)
        if client_ca is not None and cert is None:
            p.error("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS")
        return Security(token=token, cert=cert, key=key, client_ca=client_ca)
    ca = read_pem(p, "tls-ca", args.tls_ca or None, CERT)
    if cert is not None and ca is None:
        p.error("--tls-cert needs --tls-ca: a client certificate is only sent over TLS")
    return Security(token=token, ca=ca, cert=cert, key=key)


def cluster_children(p: Any, args: argparse.Namespace) -> tuple[Security, list[str], list[str]]:
    """For `ps-cluster`: (the launcher's own client Security, server argv, worker argv).

    Checks the cluster flags as a whole. The token is not put on command lines (where
    `ps` shows it): the caller exports it as ASYNCPS_TOKEN for every child.
    """
    token = read_token(p, args)
    server_argv: list[str] = []
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if bool(args.tls_client_cert) != bool(args.tls_client_key):
        p.error("--tls-client-cert and --tls-client-key go together")
    read_pem(p, "tls-cert", args.tls_cert, CERT)
    read_pem(p, "tls-key", args.tls_key, KEY)
    client_ca = read_pem(p, "tls-client-ca", args.tls_client_ca, CERT)
    ca = read_pem(p, "tls-ca", args.tls_ca, CERT)
    cert = read_pem(p, "tls-client-cert", args.tls_client_cert, CERT)
    key = read_pem(p, "tls-client-key", args.tls_client_key, KEY)
    if args.tls_cert:
        if ca is None:
            p.error("--tls-cert needs --tls-ca: the CA workers verify the servers' certificate with")
        server_argv += ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key]
    elif ca is not None or client_ca is not None:
        p.error("--tls-ca and --tls-client-ca need --tls-cert and --tls-key for the servers")
    if client_ca is not None:
        if cert is None:
            p.error("--tls-client-ca needs --tls-client-cert and --tls-client-key for the workers")
        server_argv += ["--tls-client-ca", args.tls_client_ca]
    elif cert is not None:
        p.error("--tls-client-cert is only used with --tls-client-ca (mutual TLS)")
    worker_argv: list[str] = []
    if ca is not None:
        worker_argv += ["--tls-ca", args.tls_ca]
    if cert is not None:
        worker_argv += ["--tls-cert", args.tls_client_cert, "--tls-key", args.tls_client_key]
    return Security(token=token, ca=ca, cert=cert, key=key), server_argv, worker_argv


SECURITY_VARS = (
    "ASYNCPS_TOKEN",
    "ASYNCPS_TOKEN_FILE",
    "ASYNCPS_TLS_CERT",
    "ASYNCPS_TLS_KEY",
    "ASYNCPS_TLS_CA",
    "ASYNCPS_TLS_CLIENT_CA",
    "ASYNCPS_TLS_CLIENT_CERT",
    "ASYNCPS_TLS_CLIENT_KEY",
)


def export_token(token: str | None) -> None:
    """For `ps-cluster`: leave children (restarted ones too) exactly the launcher's settings.

    Removes every token/TLS variable from this process's environment, which children
    inherit (a cluster's ASYNCPS_TLS_CERT is the servers' certificate, not a worker's),
    and sets ASYNCPS_TOKEN to `token` if there is one; certificates go by flag.
    """
    for var in SECURITY_VARS:
        os.environ.pop(var, None)
    if token:
        os.environ["ASYNCPS_TOKEN"] = token
