"""The ingress listener in one process: real sockets on 127.0.0.1, a small aiohttp service
behind it, requests signed by the sidecar's own signer.

What the protected service sees (the verified caller, never the credentials or a forged
identity), the refusals as the caller sees them, their metrics and their audit lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.audit import AuditLog
from proxy.config import IngressConfig
from proxy.ingress import Ingress, IngressConnection, KeyTable, LocalPool, RefusalAudit
from proxy.metrics import I_OK, I_REFUSED, I_UPSTREAM_FAILED, Metrics
from proxy.signers.base import SignerContext
from proxy.signers.internal import REFUSAL_CODES, InternalVenue
from tests.proxy.helpers import NOW
from tests.proxy.test_ingress import CALLER, KEY_ID, OVERLAP, RING, SECRET, SERVICE

NOW_S = NOW.timestamp()


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("utf-8", "replace"),
        }
    )


@dataclass
class Setup:
    port: int
    ingress: Ingress
    metrics: Metrics
    audit_path: Path
    service_runner: web.AppRunner

    def url(self, target: str) -> URL:
        # encoded=True: the target goes out byte for byte (yarl would decode %2F).
        return URL(f"http://127.0.0.1:{self.port}{target}", encoded=True)


def sign(method: str, target: str, body: bytes, now_ms: int | None = None) -> dict[str, str]:
    path, _, query = target.encode().partition(b"?")
    signer = InternalVenue().signer(RING.keys[-1], SERVICE, SignerContext())
    _, lines, _ = signer.sign(
        method.encode(), path, query, body, now_ms if now_ms is not None else int(NOW_S * 1000)
    )
    pairs = [line.split(b": ", 1) for line in lines.split(b"\r\n") if line]
    return {n.decode(): v.decode() for n, v in pairs}


async def _service() -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return runner, server.sockets[0].getsockname()[1]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    runner, service_port = await _service()
    cfg = IngressConfig(
        service="risk_engine_service",
        address="127.0.0.1",
        port=0,
        upstream=f"http://127.0.0.1:{service_port}",
        accept=(CALLER,),
        timeout_ms=2000,
    )
    table = KeyTable(cfg.accept, OVERLAP)
    table.update(CALLER, RING, NOW)
    loop = asyncio.get_running_loop()
    pool = LocalPool(cfg.upstream_host, cfg.upstream_port, loop, timeout_s=2.0, max_size=4)
    metrics = Metrics([], {cfg.service: REFUSAL_CODES})
    audit_path = tmp_path / "audit.log"
    audit = RefusalAudit(AuditLog(audit_path, None, actor="ingress"))
    ingress = Ingress(cfg, table, pool, metrics.ingress[cfg.service], audit, clock=lambda: NOW_S)
    server = await loop.create_server(lambda: IngressConnection(ingress), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Setup(port, ingress, metrics, audit_path, runner)
    finally:
        server.close()
        pool.close()
        await runner.cleanup()


async def call(
    session: aiohttp.ClientSession,
    s: Setup,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    async with session.request(
        method, s.url(target), data=body or None, headers=headers or {}
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_verified_call_reaches_the_service_with_the_callers_identity(setup: Setup) -> None:
    target = "/internal/v1/echo?account=main&tag=a%2Fb"
    body = b'{"qty":"0.5"}'
    headers = sign("POST", target, body)
    headers |= {
        "X-Authproxy-Caller": "admin_service",  # a forged identity: dropped
        "X-Authproxy-Caller-Key-Id": "hft_" + "0" * 32,
        "Content-Type": "application/json",
    }
    connections = 0

    async def counted(*_: Any) -> None:
        nonlocal connections
        connections += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(counted)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        status, _, seen = await call(session, setup, "POST", target, body, headers)
        assert status == 200, seen
        got = {k.lower(): v for k, v in seen["headers"]}
        assert seen["target"] == target and seen["body"] == body.decode()
        assert got["x-authproxy-caller"] == CALLER
        assert got["x-authproxy-caller-key-id"] == KEY_ID
        assert [k for k, _ in seen["headers"]].count("X-Authproxy-Caller") == 1
        assert not any(k.startswith("x-auth-") for k in got), got
        assert got["content-type"] == "application/json"
        # keep-alive: more calls, one connection
        for n in range(3):
            t = f"/internal/v1/positions?n={n}"
            status, _, _ = await call(session, setup, "GET", t, headers=sign("GET", t, b""))
            assert status == 200
    assert connections == 1
    assert setup.ingress.metrics.outcomes[I_OK] == 4
    assert setup.ingress.pool.size == 1


async def test_refusals_carry_their_code_are_counted_and_audited(setup: Setup) -> None:
    table = setup.ingress.table
    async with aiohttp.ClientSession() as session:
        body = b'{"qty":"1"}'
        h = sign("POST", "/orders", body)
        status, hdrs, err = await call(session, setup, "POST", "/orders", b'{"qty":"9"}', h)
        assert (status, err["error"]["code"]) == (401, "bad_signature")
        assert hdrs["X-Authproxy-Error"] == "bad_signature"
        assert hdrs["WWW-Authenticate"] == "HFT-AUTH-V1"
        assert (await call(session, setup, "POST", "/orders", body, h))[0] == 200
        status, _, err = await call(session, setup, "POST", "/orders", body, h)
        assert (status, err["error"]["code"]) == (401, "replayed_nonce")
        stale = sign("GET", "/x", b"", now_ms=int(NOW_S * 1000) - 31_000)
        assert (await call(session, setup, "GET", "/x", headers=stale))[2]["error"]["code"] == (
            "stale_timestamp"
        )
        unknown = sign("GET", "/x", b"") | {"X-Auth-Key-Id": "hft_" + "e" * 32}
        assert (await call(session, setup, "GET", "/x", headers=unknown))[2]["error"]["code"] == (
            "unknown_key"
        )
        missing = sign("GET", "/x", b"")
        del missing["X-Auth-Nonce"]
        status, _, err = await call(session, setup, "GET", "/x", headers=missing)
        assert (status, err["error"]["code"]) == (400, "malformed_auth")
        # revoked while live: refused at once, with its own code
        table.mark_revoked(KEY_ID.encode())
        table.keys = {}
        status, _, err = await call(session, setup, "GET", "/x", headers=sign("GET", "/x", b""))
        assert (status, err["error"]["code"]) == (401, "revoked_key")
    m = setup.ingress.metrics
    assert m.outcomes[I_REFUSED] == 6 and m.outcomes[I_OK] == 1
    assert {c: n for c, n in m.refusals.items() if n} == {
        "bad_signature": 1,
        "replayed_nonce": 1,
        "stale_timestamp": 1,
        "unknown_key": 1,
        "malformed_auth": 1,
        "revoked_key": 1,
    }
    text = setup.metrics.render().decode()
    assert (
        'authproxy_ingress_refusals_total{code="revoked_key",ingress="risk_engine_service"} 1.0'
        in text
    )
    await setup.ingress.audit.flush()
    lines = [json.loads(x) for x in setup.audit_path.read_text().splitlines()]
    assert [x["detail"]["code"] for x in lines] == [
        "bad_signature",
        "replayed_nonce",
        "stale_timestamp",
        "unknown_key",
        "malformed_auth",
        "revoked_key",
    ]
    assert all(
        x["event"] == "AUTH_REFUSED" and x["service"] == "risk_engine_service" for x in lines
    )
    assert lines[0]["key_id"] == KEY_ID and lines[0]["detail"]["caller"] == CALLER
    assert lines[3]["key_id"] == "hft_" + "e" * 32
    assert SECRET not in setup.audit_path.read_text()


async def test_a_junk_key_id_is_never_written_to_the_audit_log(setup: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        h = sign("GET", "/x", b"") | {"X-Auth-Key-Id": "secret-pasted-by-mistake"}
        assert (await call(session, setup, "GET", "/x", headers=h))[0] == 400
    await setup.ingress.audit.flush()
    (line,) = [json.loads(x) for x in setup.audit_path.read_text().splitlines()]
    assert line["key_id"] is None
    assert "secret-pasted" not in setup.audit_path.read_text()


async def test_a_service_that_is_down_answers_502_after_verification(setup: Setup) -> None:
    await setup.service_runner.cleanup()
    async with aiohttp.ClientSession() as session:
        status, _, err = await call(session, setup, "GET", "/x", headers=sign("GET", "/x", b""))
    assert (status, err["error"]["code"]) == (502, "upstream_unavailable")
    assert setup.ingress.metrics.outcomes[I_UPSTREAM_FAILED] == 1


async def test_malformed_http_gets_400_and_the_connection_closes(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: zz\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"code": "bad_request"' in answer


async def test_pipelined_calls_share_one_connection_to_the_service(setup: Setup) -> None:
    """Three signed calls pipelined on one connection are answered in order over one
    connection to the protected service: each answer hands that connection back before it
    starts the next call (passing the answer on first opened a connection per call)."""
    calls = b""
    for n in range(3):
        target = f"/internal/v1/echo?n={n}"
        headers = sign("GET", target, b"")
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        calls += f"GET {target} HTTP/1.1\r\nHost: a\r\n{lines}\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(calls)
    await writer.drain()
    targets = []
    for _ in range(3):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        targets.append(json.loads(await reader.readexactly(length))["target"])
    writer.close()
    assert targets == [f"/internal/v1/echo?n={n}" for n in range(3)]
    assert setup.ingress.pool.size == 1


class _Sink:
    """A fake transport: collects writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_PREFIX = st.sampled_from(
    [
        b"",
        b"GET /x HTTP/1.1\r\n",
        b"POST /orders?a=1 HTTP/1.1\r\nX-Auth-Key-Id: " + KEY_ID.encode() + b"\r\n",
        b"GET /x HTTP/1.1\r\nContent-Length: 5\r\nX-Auth-Nonce: 00\r\n\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(_PREFIX, st.lists(st.binary(max_size=200), max_size=5))
def test_the_listener_never_raises_on_junk(prefix: bytes, chunks: list[bytes]) -> None:
    """Whatever arrives, the connection answers with our errors (or waits for more) and
    nothing unsigned reaches the protected service."""
    loop = asyncio.new_event_loop()
    try:
        cfg = IngressConfig(
            service="risk_engine_service",
            address="127.0.0.1",
            port=0,
            upstream="http://127.0.0.1:9",
            accept=(CALLER,),
        )
        table = KeyTable(cfg.accept, OVERLAP)
        table.update(CALLER, RING, NOW)
        pool = LocalPool("127.0.0.1", 9, loop, timeout_s=1.0, max_size=1)
        metrics = Metrics([], {cfg.service: REFUSAL_CODES}).ingress[cfg.service]
        ingress = Ingress(cfg, table, pool, metrics, RefusalAudit(None), clock=lambda: NOW_S)
        conn = IngressConnection(ingress)
        sink = _Sink()
        conn.connection_made(sink)  # type: ignore[arg-type]
        for chunk in [prefix, *chunks]:
            conn.data_received(chunk)
        conn.eof_received()
        assert not pool.waiters and not pool.busy  # nothing went to the service
        for answer in sink.written:
            assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 401 ", b"HTTP/1.1 413 "))
            assert answer.startswith(b"HTTP/1.1 4") and b"X-Authproxy-Error: " in answer
        conn.connection_lost(None)
    finally:
        loop.close()
