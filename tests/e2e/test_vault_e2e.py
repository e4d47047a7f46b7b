"""The real sidecar on the real OpenBao: rotation under load, revocation, outage.

The sidecar watches KV v2 at secret/data/<prefix>/<service> every 200 ms; the venue
simulator verifies every order and logs which key signed it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import yaml

from keycache.record import make_record
from proxy.demo import PERMISSIONS, binance_service, random_key_id, sidecar_config
from proxy.procs import Proc, sidecar_argv
from tests.e2e.conftest import Venue

if TYPE_CHECKING:
    from tests.vaultserver import KVSpace, VaultServer

pytest_plugins = ["tests.vaultserver"]
pytestmark = pytest.mark.e2e

POLL_MS = 200
SERVICE = "binance_hmac"
# Load runs at tens of orders per second for longer than Binance's 100 orders per 10 s
# allow (the sidecar keeps to that limit), so it sends test orders: signed, checked and
# refused exactly like orders, weight 1, not counted as orders.
ORDER = (
    "/hmac/api/v3/order/test?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
    "&quantity=0.01&price=30000"
)


def new_key(minutes_ago: float = 0) -> tuple[dict[str, object], dict[str, str]]:
    """A fresh HMAC key: its record (created ``minutes_ago``) and what the venue knows."""
    secret = "vault-e2e-" + random_key_id()
    key_id = random_key_id()
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=minutes_ago)
    record = make_record(
        key_id, secret, created_at=now, expires_at=now + timedelta(days=30), permissions=PERMISSIONS
    )
    return record, {"api_key": key_id, "algorithm": "hmac-sha256", "secret": secret}


async def sim_call(venue: Venue, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, f"https://127.0.0.1:{venue.port}{path}", json=body, ssl=venue.ssl_context()
        ) as resp,
    ):
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def register(venue: Venue, *keys: dict[str, str]) -> None:
    """Add keys to the venue (keeping the session's own)."""
    current = [v for _, v in venue.keys.values() if v]
    await sim_call(venue, "POST", "/__sim/keys", {"binance": current + list(keys)})


async def signed_by(venue: Venue, tag: str) -> list[tuple[float, str, str]]:
    """(time received in epoch seconds, api key, verdict) of every order tagged ``tag``."""
    log = (await sim_call(venue, "GET", "/__sim/log"))["entries"]
    return [
        (float(e["time"]) / 1000, e["api_key"], str(e["verdict"]))
        for e in log
        if f"newClientOrderId={tag}" in e["query"]
    ]


def start_sidecar(tmp: Path, server: VaultServer, prefix: str, venue: Venue, token: str) -> Proc:
    token_file = tmp / "vault-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    cfg = sidecar_config(
        tmp / "unused.enc",
        tmp / "unused.key",
        {SERVICE: binance_service(venue.port, venue.ca_file, "/hmac")},
    )
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


class Load:
    """A steady open-loop rate through one keep-alive connection, counting reconnects."""

    def __init__(self, port: int, tag: str, rate: float) -> None:
        self.port, self.tag, self.interval = port, tag, 1.0 / rate
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.connections = 0
        self.sent = 0

    async def run(self, seconds: float, events: dict[float, Any] | None = None) -> None:
        trace = aiohttp.TraceConfig()

        async def on_conn(*_: Any) -> None:
            self.connections += 1

        trace.on_connection_create_end.append(on_conn)
        connector = aiohttp.TCPConnector(limit=1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending = sorted((events or {}).items())
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            n = 0
            while (elapsed := loop.time() - start) < seconds:
                while pending and elapsed >= pending[0][0]:
                    _, action = pending.pop(0)
                    await asyncio.to_thread(action)
                url = f"http://127.0.0.1:{self.port}{ORDER}&newClientOrderId={self.tag}-{n}"
                try:
                    async with session.post(url) as resp:
                        await resp.read()
                        self.statuses[resp.status] += 1
                except aiohttp.ClientError as exc:
                    self.errors.append(repr(exc))
                n += 1
                self.sent = n
                await asyncio.sleep(max(0.0, start + n * self.interval - loop.time()))


async def test_rotation_under_load_then_fallback_then_revocation(
    vault: KVSpace, venue: Venue, tmp_path: Path
) -> None:
    old, old_venue = new_key(minutes_ago=60)
    new, new_venue = new_key()
    await register(venue, old_venue, new_venue)
    vault.write(SERVICE, old)
    sc = start_sidecar(tmp_path, vault.server, vault.prefix, venue, vault.server.root_token)
    try:
        port = int(sc.ready["listen"]["port"])
        written: list[float] = []

        def rotate() -> None:
            vault.write(SERVICE, new)
            written.append(time.time())

        load = Load(port, "rot", rate=50)
        await load.run(20.0, {10.0: rotate})
        assert load.errors == []
        assert dict(load.statuses) == {200: load.sent}, load.statuses
        assert load.connections == 1  # the sidecar never closed the engine's connection
        seen = await signed_by(venue, "rot-")
        assert len(seen) == load.sent and all(v == "ok" for _, _, v in seen)
        (t_write,) = written
        deadline = t_write + 2 * POLL_MS / 1000
        assert all(k == old["key_id"] for t, k, _ in seen if t < t_write)
        assert all(k == new["key_id"] for t, k, _ in seen if t > deadline)
        first_new = min(t for t, k, _ in seen if k == new["key_id"])
        print(f"first order signed with the new key {first_new - t_write:.3f} s after the write")

        # The overlap: the venue stops accepting the new key; the old one still signs.
        await sim_call(venue, "DELETE", f"/__sim/keys/{new['key_id']}")
        fb = Load(port, "fb", rate=20)
        await fb.run(1.0)
        assert dict(fb.statuses) == {200: fb.sent}
        tried = [k for _, k, _ in await signed_by(venue, "fb-")]
        assert tried[:2] == [new["key_id"], old["key_id"]]
        await register(venue, old_venue, new_venue)

        # Revocation: destroy the new version; nothing is signed with it 2 polls later.
        version = int(vault.metadata(SERVICE)["current_version"])
        rv = Load(port, "rv", rate=50)
        destroyed: list[float] = []

        def destroy() -> None:
            vault.destroy(SERVICE, version)
            destroyed.append(time.time())

        await rv.run(3.0, {1.0: destroy})
        assert dict(rv.statuses) == {200: rv.sent}
        late = destroyed[0] + 2 * POLL_MS / 1000
        after = [k for t, k, _ in await signed_by(venue, "rv-") if t > late]
        assert after and set(after) == {old["key_id"]}
    finally:
        assert sc.stop() == 0, sc.stderr_tail()


async def test_outage_and_seal_keep_signing_and_the_watcher_resumes(
    own_vault: VaultServer, venue: Venue, tmp_path: Path
) -> None:
    from tests.vaultserver import KVSpace

    space = KVSpace(own_vault, "outage")
    old, old_venue = new_key(minutes_ago=60)
    await register(venue, old_venue)
    space.write(SERVICE, old)
    sc = start_sidecar(tmp_path, own_vault, "outage", venue, own_vault.root_token)
    try:
        port = int(sc.ready["listen"]["port"])
        # Sealed: the held key keeps signing.
        sealed = Load(port, "sealed", rate=40)
        await sealed.run(2.0, {0.2: own_vault.seal})
        assert dict(sealed.statuses) == {200: sealed.sent}
        # Back: the watcher resumes by itself and picks up a rotation.
        new, new_venue = new_key()
        await register(venue, old_venue, new_venue)
        await asyncio.to_thread(own_vault.unseal)
        space.write(SERVICE, new)
        await asyncio.sleep(35 * POLL_MS / 1000 + 2.0)  # outage backoff is capped
        back = Load(port, "unsealed", rate=20)
        await back.run(1.0)
        assert dict(back.statuses) == {200: back.sent}
        assert {k for _, k, _ in await signed_by(venue, "unsealed-")} == {new["key_id"]}

        # Stopped: the held keys keep signing; the server comes back empty and re-seeded.
        down = Load(port, "down", rate=40)
        await down.run(2.0, {0.2: own_vault.stop})
        assert dict(down.statuses) == {200: down.sent}
        events = [json.loads(line) for line in sc.stderr_tail(1_000_000).splitlines()]
        assert any("unreachable" in json.dumps(e) or "sealed" in json.dumps(e) for e in events)
    finally:
        assert sc.stop() == 0, sc.stderr_tail()
