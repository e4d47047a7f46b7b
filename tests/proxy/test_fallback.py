"""Which venue answers make the sidecar re-sign with the other key: only key_rejected."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from keycache.record import make_record
from loadtests.hotpath import FakeTransport
from proxy.config import ServiceConfig
from proxy.server import ClientConnection, Router
from proxy.service import KeySet, ServiceRuntime
from proxy.upstream import UpstreamConnection, UpstreamPool
from tests.proxy.helpers import NOW, PERMS, random_hmac_secret, record, ring_of

SERVICE = ServiceConfig(
    name="svc",
    venue="binance",
    key_type="exchange_api",
    upstream="https://127.0.0.1:9",
    route="/b",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
REQUEST = (
    b"POST /b/api/v3/order?symbol=BTCUSDT&side=BUY HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
)


def venue_answer(status: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(data), data)


def setup(
    loop: asyncio.AbstractEventLoop,
) -> tuple[
    ClientConnection,
    list[UpstreamConnection],
    FakeTransport,
    list[FakeTransport],
    list[tuple[str, str, str]],
]:
    older = record("old-key", random_hmac_secret())
    # The new version appeared an hour ago: both live, inside the 24 h overlap window.
    newer = make_record(
        "new-key",
        random_hmac_secret(),
        created_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(days=30),
        permissions=PERMS,
    )
    ring = ring_of("svc", older, newer, now=NOW)
    rt = ServiceRuntime(SERVICE, None)
    rt.keys = KeySet(ring, rt.venue, SERVICE)
    pool = UpstreamPool(SERVICE, loop)
    rt.pool = pool
    conns, transports = [], []
    for _ in range(2):
        t = FakeTransport()
        c = UpstreamConnection(pool)
        c.connection_made(t)  # type: ignore[arg-type]
        pool.idle.append(c)
        conns.append(c)
        transports.append(t)
    fallbacks: list[tuple[str, str, str]] = []
    client = ClientConnection(
        Router(
            {"svc": rt},
            max_body=1 << 20,
            clock=NOW.timestamp,
            on_fallback=lambda *a: fallbacks.append(a),
        )
    )
    ct = FakeTransport()
    client.connection_made(ct)  # type: ignore[arg-type]
    return client, conns, ct, transports, fallbacks


def sent_key(data: bytes) -> str:
    line = next(ln for ln in data.split(b"\r\n") if ln.startswith(b"X-MBX-APIKEY"))
    return line.split(b": ")[1].decode()


def busy(conns: list[UpstreamConnection]) -> UpstreamConnection:
    (conn,) = [c for c in conns if c.exchange is not None]
    return conn


@pytest.mark.parametrize(
    ("status", "body", "falls_back"),
    [
        (401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, True),
        (401, {"code": -2014, "msg": "API-key format invalid."}, True),
        (400, {"code": -1022, "msg": "Signature for this request is not valid."}, False),
        (
            400,
            {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."},
            False,
        ),
        (429, {"code": -1003, "msg": "Too many requests."}, False),
        (418, {"code": -1003, "msg": "Way too many requests; IP banned."}, False),
        (503, {"code": -1001, "msg": "Internal error."}, False),
        (400, {"code": -2010, "msg": "Account has insufficient balance."}, False),
    ],
)
def test_only_key_rejected_is_retried_with_the_other_key(
    status: int, body: dict[str, Any], falls_back: bool
) -> None:
    loop = asyncio.new_event_loop()
    try:
        client, conns, ct, transports, fallbacks = setup(loop)
        client.data_received(REQUEST)
        first = busy(conns)
        assert sent_key(b"".join(transports[conns.index(first)].written)) == "new-key"
        first.data_received(venue_answer(status, body))
        if falls_back:
            assert ct.written == []  # nothing answered yet: the order went out again
            second = busy(conns)
            assert sent_key(transports[conns.index(second)].written[-1]) == "old-key"
            assert fallbacks == [("svc", "new-key", "old-key")]
            # Refused again: no third attempt, the venue's answer goes to the engine.
            second.data_received(venue_answer(status, body))
            assert all(c.exchange is None for c in conns)
        else:
            assert fallbacks == []
            assert all(c.exchange is None for c in conns)
        (answer,) = ct.written
        assert answer.startswith(b"HTTP/1.1 %d" % status)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == body
    finally:
        loop.close()


def test_no_fallback_without_an_overlap_partner() -> None:
    loop = asyncio.new_event_loop()
    try:
        client, conns, ct, _, fallbacks = setup(loop)
        rt = client.router.routes[b"/b"]
        rt.keys = KeySet(ring_of("svc", record("only", random_hmac_secret())), rt.venue, SERVICE)
        client.data_received(REQUEST)
        busy(conns).data_received(venue_answer(401, {"code": -2015, "msg": "x"}))
        assert fallbacks == []
        assert ct.written[0].startswith(b"HTTP/1.1 401")
    finally:
        loop.close()
