"""What keeps the sidecar's resident memory in budget (loadtests/memory.py measures it):
one verifying context per CA among services built together, and no Vault client
libraries in a process that does not use Vault."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from proxy.config import ServiceConfig
from proxy.simulator.tlsca import make_tls_material
from proxy.upstream import SSLContexts

BASE = ServiceConfig(
    name="a",
    venue="bybit",
    key_type="exchange_api",
    upstream="https://127.0.0.1:9443",
    route="/a",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)


def test_services_with_one_ca_share_a_context_and_a_new_build_reads_afresh(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(make_tls_material().ca_cert_pem)
    other = tmp_path / "other.pem"
    other.write_bytes(make_tls_material().ca_cert_pem)
    contexts = SSLContexts()
    b = dataclasses.replace(BASE, name="b", route="/b")
    assert contexts.for_service(BASE) is contexts.for_service(b)
    with_ca = contexts.for_service(dataclasses.replace(BASE, ca_file=ca))
    assert with_ca is contexts.for_service(dataclasses.replace(b, ca_file=ca))
    assert with_ca is not contexts.for_service(BASE)
    assert with_ca is not contexts.for_service(dataclasses.replace(BASE, ca_file=other))
    # the extra CA is really in the shared context, and verification is on
    assert (
        with_ca.cert_store_stats()["x509_ca"]
        > contexts.for_service(BASE).cert_store_stats()["x509_ca"]
    )
    assert with_ca.check_hostname
    assert SSLContexts().for_service(BASE) is not contexts.for_service(BASE)  # a reload


def test_a_sidecar_without_vault_does_not_load_the_vault_client() -> None:
    code = (
        "import sys, proxy.cli, proxy.runtime\n"
        "print(sorted(m for m in ('hvac', 'requests', 'keycache.vault') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
