"""A throwaway certificate authority for the TLS tests, made with `cryptography`.

`make_pki(directory)` writes PEM files and returns their paths:

* `ca`: the test CA; `server.crt/.key`: signed by it, valid for 127.0.0.1 and localhost;
  `client.crt/.key`: a client certificate signed by it;
* `other-ca`: an unrelated CA; `other-client.crt/.key` and `other-server.crt/.key`:
  signed by that one (a client or server nobody here trusts).

EC P-256 keys, valid for one day. Pure functions of their arguments; thread-safe.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool = False, server: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key=None) -> None:
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def make_pki(directory: Path) -> dict[str, Path]:
    """Write the CAs and certificates described above into `directory`; returns name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix in ("", "other-"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name(f"asyncps {prefix}test CA")
        _write(directory, f"{prefix}ca", _cert(f"asyncps {prefix}test CA", ca_key, ca_name, ca_key, ca=True))
        for role in ("server", "client"):
            key = ec.generate_private_key(ec.SECP256R1())
            _write(
                directory,
                f"{prefix}{role}",
                _cert(f"asyncps {prefix}{role}", key, ca_name, ca_key, server=role == "server"),
                key,
            )
    return {p.name: p for p in directory.iterdir()}
