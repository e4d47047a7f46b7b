"""Two real sidecars on the real OpenBao: A signs (egress, ``venue: internal``), B verifies
(ingress) in front of a small internal service this test runs.

engine ──▶ A ──HFT-AUTH-V1 over TLS──▶ B (ingress) ──plain HTTP, loopback──▶ service

Both sidecars read the caller's key from KV v2 every ``POLL_MS``. The rotation test writes
a new version while A calls B at a steady rate and requires zero refusals anywhere: the
new version carries ``activates_at`` two poll intervals ahead (``activation_time``), so B
holds the key before A signs with it, and B keeps the old key for the overlap window.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from yarl import URL

from keycache.record import make_record, new_key_id
from proxy.demo import sidecar_config
from proxy.procs import Proc, sidecar_argv
from proxy.signers.internal import activation_time
from proxy.simulator.tlsca import make_tls_material

if TYPE_CHECKING:
    from tests.vaultserver import KVSpace

pytest_plugins = ["tests.vaultserver"]
pytestmark = pytest.mark.e2e

POLL_MS = 200
CALLER = "order_router"  # A's service, and the name of its key in the store
PROTECTED = "risk_engine"  # the internal service behind B
ADMIN_TOKEN = "admin-token-for-this-test-only"


def internal_record(
    created: datetime, activates: datetime | None = None
) -> tuple[dict[str, object], str]:
    """A fresh internal key (made here, never real): its record and its secret."""
    secret = secrets.token_hex(32)
    record = make_record(
        new_key_id(),
        secret,
        created_at=created.replace(microsecond=0),
        expires_at=created.replace(microsecond=0) + timedelta(days=30),
        activates_at=activates,
        permissions=["service_to_service_auth"],
    )
    return record, secret


@dataclass
class InternalService:
    """The protected service: answers 200 and records who the ingress said called."""

    port: int = 0
    seen: list[tuple[float, str, str, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        caller = request.headers.get("X-Authproxy-Caller", "")
        key_id = request.headers.get("X-Authproxy-Caller-Key-Id", "")
        self.seen.append((time.time(), caller, key_id, request.raw_path))
        leaked = [h for h in request.headers if h.lower().startswith("x-auth-")]
        return web.json_response(
            {"caller": caller, "key_id": key_id, "bytes": len(body), "leaked": leaked}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]


@pytest.fixture
async def service() -> AsyncIterator[InternalService]:
    svc = InternalService()
    await svc.start()
    try:
        yield svc
    finally:
        assert svc.runner is not None
        await svc.runner.cleanup()


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[Tls]:
    material = make_tls_material()
    files = Tls(tmp_path / "ca.pem", tmp_path / "ingress.pem", tmp_path / "ingress.key")
    files.ca.write_bytes(material.ca_cert_pem)
    files.cert.write_bytes(material.server_cert_pem)
    files.key.touch(mode=0o600)
    files.key.write_bytes(material.server_key_pem)
    yield files


def _config(run: Path, vault: KVSpace, services: dict[str, Any]) -> dict[str, Any]:
    run.mkdir()
    token_file = run / "vault-token"
    token_file.write_text(vault.server.root_token)
    token_file.chmod(0o600)
    admin_token = run / "admin-token"
    admin_token.write_text(ADMIN_TOKEN)
    admin_token.chmod(0o600)
    cfg = sidecar_config(run / "unused.enc", run / "unused.key", services)
    cfg["admin"]["token_file"] = str(admin_token)
    cfg["keystore"] = {
        "backend": "vault",
        "vault": {
            "address": vault.server.address,
            "mount_path": "secret",
            "path_prefix": vault.prefix,
            "tls_verify": True,
            "tls_ca_cert": str(vault.server.ca_file),
            "auth": {"method": "token", "token_file": str(token_file)},
            "poll_interval_ms": POLL_MS,
        },
    }
    audit = cfg["api_key_policy"]["audit"]
    audit.update(log_destination=str(run / "audit.log"), syslog_enabled=False)
    return cfg


def start_b(tmp: Path, vault: KVSpace, service: InternalService, tls: Tls) -> Proc:
    """The verifying sidecar: no services of its own, one ingress."""
    cfg = _config(tmp / "b", vault, {})
    cfg["ingress"] = {
        "service": PROTECTED,
        "address": "127.0.0.1",
        "port": 0,
        "upstream": f"http://127.0.0.1:{service.port}",
        "accept": [CALLER],
        "tls": {"cert_file": str(tls.cert), "key_file": str(tls.key)},
    }
    path = tmp / "b" / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Proc(sidecar_argv(path), stderr_path=tmp / "b" / "sidecar.log")


def start_a(tmp: Path, vault: KVSpace, b: Proc, tls: Tls) -> Proc:
    """The signing sidecar: one internal service, upstream = B's ingress."""
    service = {
        "venue": "internal",
        "key_type": "internal_service",
        "upstream": f"https://127.0.0.1:{b.ready['ingress']['port']}",
        "route": "/risk",
        "ca_file": str(tls.ca),
        "timeout_ms": 2000,
    }
    cfg = _config(tmp / "a", vault, {CALLER: service})
    path = tmp / "a" / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Proc(sidecar_argv(path), stderr_path=tmp / "a" / "sidecar.log")


async def metrics(proc: Proc) -> dict[str, float]:
    """The sidecar's /metrics as {name{labels}: value}."""
    url = f"http://127.0.0.1:{proc.ready['admin']['port']}/metrics"
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def refusals(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k.startswith("authproxy_ingress_refusals_total") and v}


class Load:
    """A steady open-loop rate from an engine through A, bounded in count and time."""

    def __init__(self, port: int, rate: float, limit: int) -> None:
        self.port, self.interval, self.limit = port, 1.0 / rate, limit
        self.statuses: Counter[int] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.sent = 0

    async def run(self, seconds: float, events: dict[float, Any]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending = sorted(events.items())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            while (elapsed := loop.time() - start) < seconds and self.sent < self.limit:
                while pending and elapsed >= pending[0][0]:
                    _, action = pending.pop(0)
                    await asyncio.to_thread(action)
                n = self.sent
                url = f"http://127.0.0.1:{self.port}/risk/internal/v1/limits?n={n}"
                try:
                    async with session.post(url, json={"order": n}) as resp:
                        self.statuses[resp.status] += 1
                        if resp.status == 200:
                            self.bodies.append(await resp.json())
                        else:
                            self.errors.append(await resp.text())
                except aiohttp.ClientError as exc:
                    self.errors.append(repr(exc))
                self.sent += 1
                await asyncio.sleep(max(0.0, start + self.sent * self.interval - loop.time()))


async def test_rotation_while_a_calls_b_refuses_nothing(
    vault: KVSpace, service: InternalService, tls: Tls, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    old, _ = internal_record(now - timedelta(hours=1))
    vault.write(CALLER, old)
    b = start_b(tmp_path, vault, service, tls)
    a: Proc | None = None
    try:
        assert b.ready["ingress"]["service"] == PROTECTED and b.ready["ingress"]["tls"] is True
        a = start_a(tmp_path, vault, b, tls)
        rotated: list[tuple[float, dict[str, object]]] = []

        def rotate() -> None:
            # What `authproxy keys rotate` writes for an internal key: activates_at two
            # poll intervals after the write (docs/ingress.md).
            written = datetime.now(UTC)
            new, _ = internal_record(written, activation_time(written, POLL_MS))
            vault.write(CALLER, new)
            rotated.append((time.time(), new))

        load = Load(int(a.ready["listen"]["port"]), rate=50, limit=700)
        await load.run(10.0, {3.0: rotate})

        assert load.errors == [], load.errors[:3]
        assert dict(load.statuses) == {200: load.sent}, load.statuses
        assert load.sent >= 400
        ((t_write, new),) = rotated
        # The service saw every call, each from the verified caller, never a credential.
        assert len(service.seen) == load.sent
        assert {caller for _, caller, _, _ in service.seen} == {CALLER}
        assert all(not body["leaked"] for body in load.bodies)
        keys = [k for _, _, k, _ in service.seen]
        assert keys[0] == old["key_id"] and keys[-1] == new["key_id"]
        # The switch happened once, at activates_at, not when A first saw the key.
        switch = keys.index(str(new["key_id"]))
        assert set(keys[:switch]) == {old["key_id"]} and set(keys[switch:]) == {new["key_id"]}
        activates = datetime.fromisoformat(str(new["activates_at"])).timestamp()
        t_first_new = service.seen[switch][0]
        assert t_first_new >= activates - 0.05
        print(
            f"{load.sent} calls; new key written at +0, first signed with it at "
            f"+{t_first_new - t_write:.2f} s (activates_at +{activates - t_write:.2f} s)"
        )
        # Nobody refused anything: no refusal at B, no key fallback at A.
        mb, ma = await metrics(b), await metrics(a)
        assert refusals(mb) == {}
        assert (
            mb['authproxy_ingress_requests_total{ingress="risk_engine",outcome="ok"}'] == load.sent
        )
        assert ma['authproxy_key_fallbacks_total{service="order_router"}'] == 0
        assert mb['authproxy_ingress_keys_live{ingress="risk_engine"}'] == 2
    finally:
        codes = [p.stop() for p in (a, b) if p is not None]
        assert codes == [0] * len(codes), b.stderr_tail() + (a.stderr_tail() if a else "")


def signed_headers(
    key_id: str, secret: str, method: str, target: str, body: bytes, ts_ms: int
) -> dict[str, str]:
    """docs/internal-auth.md, written out in the test: an independent signer."""
    nonce = secrets.token_hex(16)
    content = hashlib.sha256(body).hexdigest()
    path, _, query = target.partition("?")
    canonical = "\n".join(["HFT-AUTH-V1", method, path, query, str(ts_ms), nonce, content])
    sig = hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return {
        "X-Auth-Key-Id": key_id,
        "X-Auth-Timestamp": str(ts_ms),
        "X-Auth-Nonce": nonce,
        "X-Auth-Content-SHA256": content,
        "X-Auth-Signature": sig,
    }


async def test_replay_stale_tampered_and_revoked_are_refused_with_their_codes(
    vault: KVSpace, service: InternalService, tls: Tls, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    old, old_secret = internal_record(now - timedelta(hours=1))
    new, new_secret = internal_record(now - timedelta(minutes=1))
    v_old = vault.write(CALLER, old)
    vault.write(CALLER, new)
    b = start_b(tmp_path, vault, service, tls)
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        base = f"https://127.0.0.1:{b.ready['ingress']['port']}"
        target = "/internal/v1/limits?account=main"
        body = b'{"order": 1}'

        async def send(
            session: aiohttp.ClientSession, headers: dict[str, str], data: bytes = body
        ) -> tuple[int, str | None]:
            async with session.post(
                URL(base + target, encoded=True), data=data, headers=headers, ssl=ctx
            ) as resp:
                payload = await resp.json()
                if resp.status == 200:
                    return 200, None
                assert resp.headers["X-Authproxy-Error"] == payload["error"]["code"]
                return resp.status, payload["error"]["code"]

        def sign(key: dict[str, object], secret: str, skew_ms: int = 0) -> dict[str, str]:
            ts = int(time.time() * 1000) + skew_ms
            return signed_headers(str(key["key_id"]), secret, "POST", target, body, ts)

        async with aiohttp.ClientSession() as session:
            # Both live keys of the overlap verify.
            assert await send(session, sign(old, old_secret)) == (200, None)
            fresh = sign(new, new_secret)
            assert await send(session, fresh) == (200, None)
            # Replay: the same request, byte for byte.
            assert await send(session, fresh) == (401, "replayed_nonce")
            # Stale: 31 s old, and 31 s ahead.
            assert await send(session, sign(new, new_secret, -31_000)) == (401, "stale_timestamp")
            assert await send(session, sign(new, new_secret, 31_000)) == (401, "stale_timestamp")
            # Tampered body: same headers, another body.
            tampered = sign(new, new_secret)
            assert await send(session, tampered, b'{"order": 9}') == (401, "bad_signature")
            # Unknown key id.
            stranger, stranger_secret = internal_record(now)
            assert await send(session, sign(stranger, stranger_secret)) == (401, "unknown_key")

            # Revoked in the store (destroyed, an emergency rotation): refused at the next
            # polls, with its own code; the other key goes on verifying.
            vault.destroy(CALLER, v_old)
            deadline = time.monotonic() + 20 * POLL_MS / 1000
            while True:
                status, code = await send(session, sign(old, old_secret))
                if code == "revoked_key" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL_MS / 1000 / 4)
            assert (status, code) == (401, "revoked_key")
            assert await send(session, sign(new, new_secret)) == (200, None)

            # Revoked through the admin API (what `authproxy keys revoke` calls): at once.
            admin = f"http://127.0.0.1:{b.ready['admin']['port']}/keys/revoke"
            async with session.post(
                admin,
                json={"service": CALLER, "key_id": new["key_id"]},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
            assert await send(session, sign(new, new_secret)) == (401, "revoked_key")

        mb = await metrics(b)
        assert refusals(mb) == {
            'authproxy_ingress_refusals_total{code="bad_signature",ingress="risk_engine"}': 1.0,
            'authproxy_ingress_refusals_total{code="replayed_nonce",ingress="risk_engine"}': 1.0,
            'authproxy_ingress_refusals_total{code="revoked_key",ingress="risk_engine"}': 2.0,
            'authproxy_ingress_refusals_total{code="stale_timestamp",ingress="risk_engine"}': 2.0,
            'authproxy_ingress_refusals_total{code="unknown_key",ingress="risk_engine"}': 1.0,
        }
    finally:
        assert b.stop() == 0, b.stderr_tail()
    # Every refusal audited (flushed at drain), with the key id and never a secret.
    audit_path = tmp_path / "b" / "audit.log"
    text = audit_path.read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    codes = Counter(e["detail"]["code"] for e in entries if e["event"] == "AUTH_REFUSED")
    assert codes == {
        "replayed_nonce": 1,
        "stale_timestamp": 2,
        "bad_signature": 1,
        "unknown_key": 1,
        "revoked_key": 2,
    }
    revoked = [e for e in entries if e["detail"]["code"] == "revoked_key"]
    assert [e["key_id"] for e in revoked] == [old["key_id"], new["key_id"]]
    assert all(e["service"] == PROTECTED for e in entries)
    for secret in (old_secret, new_secret, stranger_secret):
        assert secret not in text
        assert secret not in b.stderr_tail(1_000_000)


async def test_file_store_ingress_on_a_unix_socket(
    service: InternalService, tmp_path: Path
) -> None:
    """The embedded default store, no services, the ingress on a unix socket; the ready
    line and check-config show it."""
    from proxy.demo import write_key_file

    record, secret = internal_record(datetime.now(UTC) - timedelta(hours=1))
    keys_path, kek_path = write_key_file(tmp_path, {CALLER: record})
    cfg = sidecar_config(keys_path, kek_path, {})
    cfg["api_key_policy"]["audit"].update(
        log_destination=str(tmp_path / "audit.log"), syslog_enabled=False
    )
    sock = tmp_path / "ingress.sock"
    cfg["ingress"] = [
        {
            "service": PROTECTED,
            "address": f"unix:{sock}",
            "upstream": f"http://localhost:{service.port}",
            "accept": [CALLER],
        }
    ]
    path = tmp_path / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    check = await asyncio.create_subprocess_exec(
        *sidecar_argv(path)[:3],
        "check-config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(check.communicate(), 60)
    assert check.returncode == 0
    assert json.loads(out)["ingress"][0]["accept"] == [CALLER]
    proc = Proc(sidecar_argv(path), stderr_path=tmp_path / "sidecar.log")
    try:
        # One ingress: an object (a list of them when there are several).
        assert proc.ready["ingress"] == {
            "service": PROTECTED,
            "address": f"unix:{sock}",
            "upstream": f"http://127.0.0.1:{service.port}",
            "tls": False,
        }
        target = "/internal/v1/limits"
        ts = int(time.time() * 1000)
        headers = signed_headers(str(record["key_id"]), secret, "GET", target, b"", ts)
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session,
            session.get(f"http://ingress{target}", headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["caller"] == CALLER
    finally:
        assert proc.stop() == 0, proc.stderr_tail()
