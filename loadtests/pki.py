"""A throwaway CA and a leaf certificate for the benchmark's local TLS upstream.

Pure apart from `write_tls_files`, which writes PEM files into the run directory (private
keys mode 0600). Nothing here is a real secret: the CA lives for one run and its private
key is never written to disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from proxy.simulator.tlsca import make_tls_material

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


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) with mode 0600 and write `data` to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_tls_files(run_dir: Path) -> TlsFiles:
    """Make fresh TLS material and write it into `run_dir`; returns the file paths."""
    # The simulator's CA maker: one place that knows what a strict verifier wants.
    material = make_tls_material(dns_names=(LEAF_DNS_NAME,), ip_addresses=(LEAF_IP,))
    files = TlsFiles(
        ca_cert=run_dir / "ca.pem",
        leaf_cert=run_dir / "upstream-cert.pem",
        leaf_key=run_dir / "upstream-key.pem",
    )
    files.ca_cert.write_bytes(material.ca_cert_pem)
    files.leaf_cert.write_bytes(material.server_cert_pem)
    write_private_file(files.leaf_key, material.server_key_pem)
    return files
