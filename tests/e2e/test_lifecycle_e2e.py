"""``authproxy keys rotate --emergency`` against a running sidecar on the real OpenBao.

The sidecar polls Vault every 200 ms and signs a steady load for the venue simulator; the
emergency rotation is the real CLI as a subprocess. After the command returns, no request
signed with the old key may reach the venue later than one second.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from proxy.demo import binance_service, sidecar_config
from proxy.procs import Proc, sidecar_argv
from tests.e2e.conftest import Venue
from tests.e2e.test_vault_e2e import POLL_MS, SERVICE, Load, new_key, register, signed_by

if TYPE_CHECKING:
    from tests.vaultserver import KVSpace, VaultServer

pytest_plugins = ["tests.vaultserver"]
pytestmark = pytest.mark.e2e

#: The issue's bound: nothing signed with the old key later than this after the command.
OLD_KEY_GONE_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sidecar(tmp: Path, server: VaultServer, prefix: str, venue: Venue) -> Proc:
    """The sidecar on OpenBao (poll 200 ms) with its admin API on a fixed port and a
    bearer token, so the CLI can tell it about revocations."""
    token_file = tmp / "vault-token"
    token_file.write_text(server.root_token)
    token_file.chmod(0o600)
    admin_token = tmp / "admin-token"
    admin_token.write_text(secrets.token_hex(16))
    admin_token.chmod(0o600)
    cfg = sidecar_config(
        tmp / "unused.enc",
        tmp / "unused.key",
        {SERVICE: binance_service(venue.port, venue.ca_file, "/hmac")},
    )
    cfg["admin"] = {"address": "127.0.0.1", "port": _free_port(), "token_file": str(admin_token)}
    cfg["keystore"] = {
        "backend": "vault",
        "vault": {
            "address": server.address,
            "mount_path": "secret",
            "path_prefix": prefix,
            "tls_verify": True,
            "tls_ca_cert": str(server.ca_file),
            "auth": {"method": "token", "token_file": str(token_file)},
            "poll_interval_ms": POLL_MS,
        },
    }
    path = tmp / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Proc(sidecar_argv(path), stderr_path=tmp / "sidecar.log")


def _cli(
    config: Path, audit: Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "keys",
            *args,
            "--config",
            str(config),
            "--audit-log",
            str(audit),
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_emergency_rotation_on_a_running_sidecar(
    vault: KVSpace, venue: Venue, tmp_path: Path
) -> None:
    old, old_venue = new_key(minutes_ago=60)
    new, new_venue = new_key()
    await register(venue, old_venue, new_venue)
    vault.write(SERVICE, old)
    sc = start_sidecar(tmp_path, vault.server, vault.prefix, venue)
    config = tmp_path / "authproxy.yaml"
    audit = tmp_path / "audit.log"
    outputs: list[str] = []
    try:
        port = int(sc.ready["listen"]["port"])
        returned: list[float] = []

        def emergency() -> None:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "keys",
                    "rotate",
                    "--service",
                    SERVICE,
                    "--emergency",
                    "--from-stdin",
                    "--config",
                    str(config),
                    "--audit-log",
                    str(audit),
                ],
                input=json.dumps(new),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            returned.append(time.time())
            outputs.extend((out.stdout, out.stderr))
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["revoked"] == [old["key_id"]]
            # The sidecar answered on its admin port: no "not told" warning.
            assert "sidecar not told" not in out.stderr

        load = Load(port, "em", rate=50)
        await load.run(5.0, {1.5: emergency})
        assert load.errors == []
        assert dict(load.statuses) == {200: load.sent}, load.statuses
        seen = await signed_by(venue, "em-")
        (t_return,) = returned
        late = [k for t, k, _ in seen if t > t_return + OLD_KEY_GONE_S]
        assert late and set(late) == {new["key_id"]}
        last_old = max(t for t, k, _ in seen if k == old["key_id"])
        print(f"last order signed with the old key {last_old - t_return:+.3f} s after return")
        # The live sidecar holds the store's newest version.
        await asyncio.sleep(2 * POLL_MS / 1000)
        verified = _cli(config, audit, "verify")
        outputs.extend((verified.stdout, verified.stderr))
        report = {e["service"]: e for e in json.loads(verified.stdout)}
        assert report[SERVICE]["sidecar_matches"] is True, verified.stdout
        # Revoking through the CLI reaches the running sidecar at once.
        revoked = _cli(config, audit, "revoke", "--service", SERVICE, "--key-id", new["key_id"])
        outputs.extend((revoked.stdout, revoked.stderr))
        assert revoked.returncode == 0, revoked.stderr
        assert "sidecar not told" not in revoked.stderr
        metrics = _metrics(sc.ready)
        if metrics is not None:
            outputs.append(metrics)
    finally:
        code = sc.stop()
        outputs.append(sc.stderr_tail(1 << 20))
        assert code == 0
    outputs.append(audit.read_text())
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert "KEY_REVOKED" in events and "KEY_ROTATION_COMPLETED" in events
    text = "\n".join(outputs)
    for record in (old, new):
        assert str(record["secret_key"]) not in text


def _metrics(ready: dict[str, object]) -> str | None:
    admin = ready.get("admin")
    if not isinstance(admin, dict) or not admin.get("port"):
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin['port']}/metrics", timeout=3) as resp:
            return bytes(resp.read()).decode()
    except OSError:
        return None
