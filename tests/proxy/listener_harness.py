"""The real listener (``ClientConnection``) and upstream connection, driven in-process with
fake transports: bytes in from the engine, the exact bytes that would go to the venue out.
For fuzzing and for the listener's limits, where sockets would only add time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httptools

from keycache.record import make_record
from keycache.ring import build_ring
from loadtests.hotpath import FakeTransport
from proxy.config import ServiceConfig
from proxy.ratelimit import limiter_for
from proxy.server import ClientConnection, Router
from proxy.service import KeySet, ServiceRuntime
from proxy.upstream import UpstreamConnection, UpstreamPool
from tests.proxy.helpers import PERMS, random_hmac_secret

VENUE_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\n{}"
)
VENUE_OK_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
API_KEY = "k" * 64


class Listener:
    """One service (Binance, route ``/binance``) behind a real Router; ``connect`` gives a
    ClientConnection on a fake transport; what reaches the venue is in ``sent``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **router_options: Any) -> None:
        now = datetime.now(UTC)
        rec = make_record(
            API_KEY,
            random_hmac_secret(),
            created_at=now - timedelta(days=1),
            expires_at=now + timedelta(days=1),
            permissions=PERMS,
        )
        ring = build_ring("fuzz", [(1, rec)], now=now, overlap=timedelta(hours=24))
        cfg = ServiceConfig(
            name="fuzz",
            venue="binance",
            key_type="exchange_api",
            upstream="https://127.0.0.1:9443",
            route="/binance",
            ca_file=None,
            timeout_ms=2000,
            recv_window_ms=5000,
            pool_size=1,
        )
        self.service = ServiceRuntime(cfg, None)
        self.service.keys = KeySet(ring, self.service.venue, cfg)
        # Never refuse for budget: what is under test is the parsing.
        self.service.limiter = limiter_for(10**9, 10**10)
        self.pool = UpstreamPool(cfg, loop)
        self.service.pool = self.pool
        self.up_transport = FakeTransport()
        self.upstream = UpstreamConnection(self.pool)
        self.upstream.connection_made(self.up_transport)  # type: ignore[arg-type]
        self.pool.idle.append(self.upstream)
        self.router = Router({"fuzz": self.service}, max_body=4096, **router_options)
        self.extra_connects = 0  # see answer_all

    def connect(self) -> tuple[ClientConnection, FakeTransport]:
        transport = FakeTransport()
        conn = ClientConnection(self.router)
        conn.connection_made(transport)  # type: ignore[arg-type]
        return conn, transport

    def answer_all(self) -> list[bytes]:
        """Answer every request that reached the venue; return those requests. A venue
        connection the sidecar dropped is replaced, as the pool would reconnect."""
        sent = []
        while self.up_transport.written:
            data = b"".join(self.up_transport.written)
            self.up_transport.written.clear()
            sent.append(data)
            head = data.startswith(b"HEAD ")
            self.upstream.data_received(VENUE_OK_HEAD if head else VENUE_OK)
        # Connections the pool scheduled (a reconnect, or one more for a request that found
        # none idle): the loop never runs here, so they never would. Closed, not left to
        # be collected as never-awaited coroutines; counted when the one venue connection
        # is still open (one engine connection never needs a second: the fuzz test checks).
        if not self.up_transport.closed:
            self.extra_connects += len(self.pool._tasks)
        for task in self.pool._tasks:
            task.cancel()
            task.get_coro().close()
        self.pool._tasks.clear()
        if self.up_transport.closed:
            self.up_transport = FakeTransport()
            self.upstream = UpstreamConnection(self.pool)
            self.upstream.connection_made(self.up_transport)  # type: ignore[arg-type]
            self.pool.idle.append(self.upstream)
        return sent


class ParsedRequest:
    """A request as the venue would parse it (httptools, strict)."""

    def __init__(self, data: bytes) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.body = b""
        self.complete = 0
        parser = httptools.HttpRequestParser(self)
        parser.feed_data(data)
        self.method = parser.get_method()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1
