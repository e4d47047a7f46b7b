"""A throwaway certificate authority and server certificate for the simulator's HTTPS listener.

Each simulator run makes a fresh CA, signs one server certificate with it and forgets the
CA's private key. Only the CA *certificate* is written to disk (``<state_dir>/ca.pem``), so
clients can verify the listener with an ordinary ``ssl.create_default_context(cafile=...)``.
The server's private key stays in memory; :func:`server_ssl_context` puts it in a 0600 temp
file just long enough for :mod:`ssl` to load it (``load_cert_chain`` only reads files).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE_NAME = "ca.pem"

# Validity: one hour of back-dating absorbs clock skew between this host and a client's
# view of it; one day outlives any test or demo run.
NOT_BEFORE_SLACK = dt.timedelta(hours=1)
LIFETIME = dt.timedelta(days=1)

DEFAULT_DNS_NAMES: tuple[str, ...] = ("localhost",)
DEFAULT_IP_ADDRESSES: tuple[str, ...] = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM bytes for one simulator run. The server key is excluded from ``repr``."""

    ca_cert_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes = field(repr=False)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "authproxy venue simulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_tls_material(
    *,
    now: dt.datetime | None = None,
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
    ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
) -> TlsMaterial:
    """Create a self-signed CA (EC P-256) and a server certificate it signs.

    The server certificate names ``dns_names`` and ``ip_addresses`` in its SubjectAltName,
    is valid from ``now - 1h`` to ``now + 1d`` and carries the extensions a strict verifier
    (``VERIFY_X509_STRICT``) wants: key usages, serverAuth, subject and authority key ids.
    Pure CPU work (a few milliseconds); safe to call before the event loop starts.
    """
    now = now or dt.datetime.now(dt.UTC)
    not_before = now - NOT_BEFORE_SLACK
    not_after = now + LIFETIME

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("authproxy simulator throwaway CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else ip_addresses[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    # ca_key goes out of scope here: nobody can mint further certificates under this CA.
    return TlsMaterial(
        ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert_pem=server_cert.public_bytes(serialization.Encoding.PEM),
        server_key_pem=server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_ca_file(material: TlsMaterial, state_dir: Path) -> Path:
    """Write the CA certificate to ``<state_dir>/ca.pem`` (replacing it); return its absolute path.

    Creates ``state_dir`` (mode 0700) if missing. Raises ``OSError`` on I/O failure.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = (state_dir / CA_FILE_NAME).resolve()
    tmp = path.with_name(f".{CA_FILE_NAME}.{os.getpid()}.tmp")
    tmp.write_bytes(material.ca_cert_pem)
    os.replace(tmp, path)  # atomic: a client never reads a half-written CA file
    return path


def server_ssl_context(material: TlsMaterial, state_dir: Path) -> ssl.SSLContext:
    """Build the listener's TLS context (TLS 1.2+, HTTP/1.1 ALPN).

    The certificate chain and key go through a 0600 temp file in ``state_dir`` (``ssl`` has no
    in-memory loader) that is unlinked before this returns, even on error. Raises
    ``OSError`` or ``ssl.SSLError`` on failure.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL + 0600: no other user can open it, and we never follow a planted symlink.
    path = state_dir / f".server-key.{os.getpid()}.{os.urandom(6).hex()}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(material.server_cert_pem + material.server_key_pem)
        ctx.load_cert_chain(path)
    finally:
        path.unlink(missing_ok=True)
    return ctx
