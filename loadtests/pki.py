"""A throwaway CA and a leaf certificate for the benchmark's local TLS upstream.

Pure apart from `write_tls_files`, which writes PEM files into the run directory (private
keys mode 0600). Nothing here is a real secret: the CA lives for one run and its private
key is never written to disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Short validity: the certificates live as long as one run; the back-dating absorbs clock
# skew between the moment we sign and the moment nginx / the sidecar checks.
CERT_VALIDITY = dt.timedelta(days=2)
CERT_BACKDATE = dt.timedelta(hours=1)
# The names the upstream answers to: the sidecar dials https://127.0.0.1:PORT (IP SAN), nginx
# verifies `proxy_ssl_name localhost` (nginx matches DNS SANs only, not IP SANs).
LEAF_DNS_NAME = "localhost"
LEAF_IP = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of the PEM files one run uses."""

    ca_cert: Path
    leaf_cert: Path
    leaf_key: Path


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM bytes of the CA certificate and of the leaf's certificate and private key."""

    ca_cert_pem: bytes
    leaf_cert_pem: bytes
    leaf_key_pem: bytes


def make_tls_material(now: dt.datetime) -> TlsMaterial:
    """Make a P-256 CA and a leaf for 127.0.0.1 / localhost signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authproxy bench throwaway CA")])
    not_before = now - CERT_BACKDATE
    not_after = now + CERT_VALIDITY
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

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LEAF_DNS_NAME)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
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
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(LEAF_DNS_NAME),
                    x509.IPAddress(ipaddress.ip_address(LEAF_IP)),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return TlsMaterial(
        ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        leaf_cert_pem=leaf_cert.public_bytes(serialization.Encoding.PEM),
        leaf_key_pem=leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) with mode 0600 and write `data` to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_tls_files(run_dir: Path) -> TlsFiles:
    """Make fresh TLS material and write it into `run_dir`; returns the file paths."""
    material = make_tls_material(dt.datetime.now(dt.UTC))
    files = TlsFiles(
        ca_cert=run_dir / "ca.pem",
        leaf_cert=run_dir / "upstream-cert.pem",
        leaf_key=run_dir / "upstream-key.pem",
    )
    files.ca_cert.write_bytes(material.ca_cert_pem)
    files.leaf_cert.write_bytes(material.leaf_cert_pem)
    write_private_file(files.leaf_key, material.leaf_key_pem)
    return files
