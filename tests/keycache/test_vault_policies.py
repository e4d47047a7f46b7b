"""deploy/vault/policies loaded into a real OpenBao: the seed's access matrix holds.

ACCESS CONTROL MATRIX (seed): exchange keys are read by trading systems, written by
DevOps + Security, rotated by the Security Team; broker keys read by Risk Management;
internal service keys read by service accounts, written by CI/CD, rotated by the
automated system. Each row is checked from both sides: what a token may do and what it
may not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from keycache.errors import KeyStoreConflict, KeyStoreForbidden
from keycache.vault import VaultSource
from keycache.vaultauth import VaultAuthSettings
from tests.keycache.helpers import hmac_record

if TYPE_CHECKING:
    from tests.vaultserver import VaultServer

pytest_plugins = ["tests.vaultserver"]

POLICIES = Path(__file__).resolve().parents[2] / "deploy" / "vault" / "policies"
#: key type -> the seed service the policies name
SERVICES = {
    "exchange": "binance_spot_trading",
    "broker": "interactive_brokers",
    "internal": "risk_engine_service",
}


@pytest.fixture
def matrix(vault_server: VaultServer) -> Iterator[VaultServer]:
    """The session server with every seed service provisioned (v1 by root), cleaned up."""
    for service in SERVICES.values():
        vault_server.delete_all(f"api_keys/{service}")
        vault_server.write_version(f"api_keys/{service}", hmac_record(), cas=0)
    try:
        yield vault_server
    finally:
        for service in SERVICES.values():
            vault_server.delete_all(f"api_keys/{service}")


def can(server: VaultServer, token: str, method: str, path: str, body: Any = None) -> bool:
    status, _ = server.call(method, path, body, token=token)
    assert status in (200, 204, 403), (method, path, status)
    return status != 403


def test_every_matrix_row_has_its_three_policies() -> None:
    names = {p.stem for p in POLICIES.glob("*.hcl")}
    assert names == {f"{t}-{a}" for t in SERVICES for a in ("read", "write", "rotate")}


@pytest.mark.parametrize("key_type", sorted(SERVICES))
def test_readers_read_and_do_nothing_else(matrix: VaultServer, key_type: str) -> None:
    service = SERVICES[key_type]
    token = matrix.create_token([f"{key_type}-read"])
    data, meta = f"secret/data/api_keys/{service}", f"secret/metadata/api_keys/{service}"
    assert can(matrix, token, "GET", data)
    assert can(matrix, token, "GET", meta)
    assert not can(matrix, token, "POST", data, {"data": hmac_record()})
    assert not can(matrix, token, "POST", f"secret/delete/api_keys/{service}", {"versions": [1]})
    assert not can(matrix, token, "PUT", f"secret/destroy/api_keys/{service}", {"versions": [1]})
    assert not can(matrix, token, "DELETE", meta)
    assert not can(matrix, token, "LIST", "secret/metadata/api_keys")
    # Segregation: another key type's secrets are out of reach.
    for other_type, other in SERVICES.items():
        if other_type != key_type:
            assert not can(matrix, token, "GET", f"secret/data/api_keys/{other}")


@pytest.mark.parametrize("key_type", sorted(SERVICES))
def test_writers_provision_but_cannot_rotate_read_or_revoke(
    matrix: VaultServer, key_type: str
) -> None:
    service = SERVICES[key_type]
    token = matrix.create_token([f"{key_type}-write"])
    matrix.delete_all(f"api_keys/{service}")
    data = f"secret/data/api_keys/{service}"
    assert can(matrix, token, "POST", data, {"data": hmac_record(), "options": {"cas": 0}})
    # A second version is a rotation: not theirs.
    assert not can(matrix, token, "POST", data, {"data": hmac_record()})
    assert not can(matrix, token, "GET", data)
    assert can(matrix, token, "GET", f"secret/metadata/api_keys/{service}")
    assert not can(matrix, token, "POST", f"secret/delete/api_keys/{service}", {"versions": [1]})


@pytest.mark.parametrize("key_type", sorted(SERVICES))
def test_rotators_write_new_versions_and_revoke_without_reading(
    matrix: VaultServer, key_type: str
) -> None:
    service = SERVICES[key_type]
    token = matrix.create_token([f"{key_type}-rotate"])
    data = f"secret/data/api_keys/{service}"
    assert can(matrix, token, "POST", data, {"data": hmac_record(), "options": {"cas": 1}})
    assert not can(matrix, token, "GET", data)
    assert can(matrix, token, "POST", f"secret/delete/api_keys/{service}", {"versions": [1]})
    assert can(matrix, token, "POST", f"secret/undelete/api_keys/{service}", {"versions": [1]})
    assert can(matrix, token, "PUT", f"secret/destroy/api_keys/{service}", {"versions": [1]})
    # Deleting the whole key (every version at once) is nobody's in these policies.
    assert not can(matrix, token, "DELETE", f"secret/metadata/api_keys/{service}")


def test_the_sidecar_reads_with_the_trading_policy_through_vault_source(
    matrix: VaultServer, tmp_path: Path
) -> None:
    """The same matrix seen through VaultSource: the trading token reads (metadata and
    record) but its writes and deletes are refused as KeyStoreForbidden; the rotate
    token's check-and-set write goes through."""
    service = SERVICES["exchange"]

    def source(policy: str) -> VaultSource:
        token_file = tmp_path / f"{policy}.token"
        token_file.write_text(matrix.create_token([policy]))
        return VaultSource(
            matrix.address,
            auth=VaultAuthSettings("token", token_file=token_file),
            verify=matrix.ca_file,
        )

    trading = source("exchange-read")
    assert trading.read_metadata(service).current_version == 1
    assert trading.read_version(service, 1)["key_id"]
    with pytest.raises(KeyStoreForbidden):
        trading.write_version(service, hmac_record(), cas=1)
    with pytest.raises(KeyStoreForbidden):
        trading.delete_version(service, 1)
    with pytest.raises(KeyStoreForbidden):
        trading.read_metadata(SERVICES["broker"])

    rotate = source("exchange-rotate")
    assert rotate.write_version(service, hmac_record(), cas=1) == 2
    with pytest.raises(KeyStoreConflict) as info:
        rotate.write_version(service, hmac_record(), cas=1)
    assert info.value.current_version == 2
    rotate.destroy_version(service, 1)
    with pytest.raises(KeyStoreForbidden):
        rotate.read_version(service, 2)
