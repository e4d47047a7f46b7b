"""Warm keep-alive TLS connections to one venue, on asyncio Protocols (uvloop).

Hot path: ``UpstreamPool.submit`` hands an ``Exchange`` (the serialized, signed request
and where its answer goes) to an idle connection, or queues it until one is free. The
response is parsed with httptools and delivered by callback: no task, no future per
request. Connections are opened at start-up and re-opened in the background when the
venue closes one, so the pool stays warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

import httptools

from proxy.config import ServiceConfig
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable

RECONNECT_BASE_S = 0.05  # first retry soon: a venue closing one idle connection is routine
RECONNECT_MAX_S = 1.0  # cap: a venue back up is in use again within a second, yet never hammered
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})


class ResponseSink(Protocol):
    """Where an exchange's outcome goes (the engine's connection). Called on the loop."""

    def upstream_response(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None: ...

    def upstream_failed(self, error: ProxyError) -> None: ...


class Exchange:
    """One request on its way to the venue. Completes exactly once."""

    __slots__ = ("conn", "data", "done", "head", "method", "retried", "sink", "timer")

    def __init__(self, sink: ResponseSink, data: bytes, method: bytes) -> None:
        self.sink = sink
        self.data = data
        self.method = method
        self.head = method == b"HEAD"
        self.conn: UpstreamConnection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.retried = False

    def complete(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.sink.upstream_response(status, reason, headers, body)

    def fail(self, error: ProxyError) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.sink.upstream_failed(error)

    def on_timeout(self) -> None:
        conn = self.conn
        self.fail(UpstreamTimeout("the venue did not answer in time"))
        if conn is not None:
            # A late answer must not be read as the next request's: drop the connection.
            conn.abort()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive TLS connection; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.used = 0  # requests completed on this connection
        self.got_bytes = False
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes nobody asked for: the framing can no longer be trusted.
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            ex = self.exchange
            self.exchange = None
            self.abort()
            if ex is not None:
                ex.fail(UpstreamUnavailable("the venue sent a malformed HTTP response"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        self.exchange = None
        self.pool.lost(self)
        if ex is not None and not ex.done:
            if (
                ex.conn is self
                and not self.got_bytes
                and self.used
                and not ex.retried
                and (ex.method in _IDEMPOTENT)
            ):
                # A reused keep-alive connection the venue closed before answering: safe to
                # send an idempotent request once more. Orders (POST) are never resent.
                ex.retried = True
                ex.conn = None
                self.pool.submit(ex)
            else:
                ex.fail(UpstreamUnavailable("the venue closed the connection"))

    # httptools callbacks
    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is not None and ex.head:
            # httptools cannot be told the request was HEAD; a HEAD response has no body.
            self._finish()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self._finish()

    def _finish(self) -> None:
        ex = self.exchange
        assert ex is not None
        status = self.parser.get_status_code()
        keep = self.parser.should_keep_alive() and not ex.head
        headers, body, reason = self.headers, b"".join(self.body), self.reason
        self.exchange = None
        self.headers, self.body, self.reason = [], [], b""
        self.got_bytes = False
        self.used += 1
        if ex.head:
            self.parser = httptools.HttpResponseParser(self)
        ex.complete(status, reason, headers, body)
        if keep and not self.closed:
            self.pool.release(self)
        else:
            self.abort() if ex.head else self.close()

    # used by the pool
    def send(self, ex: Exchange) -> None:
        assert self.transport is not None
        self.exchange = ex
        ex.conn = self
        self.transport.write(ex.data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """TLS 1.2+ with certificate and host verification always on.

    ``ca_file`` is an extra CA bundle for this upstream, added to the system's roots.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class UpstreamPool:
    """The warm connections to one service's upstream.

    ``submit``/``release`` run on the loop and never block; connecting happens in
    background tasks. The pool keeps ``service.pool_size`` connections open and opens
    more on demand when every connection is busy (bounded by ``max_size``).
    """

    def __init__(
        self,
        service: ServiceConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_size: int | None = None,
        on_event: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        self.service = service
        self.loop = loop
        self.ssl = ssl_context or make_ssl_context(
            str(service.ca_file) if service.ca_file else None
        )
        self.warm = service.pool_size
        self.max_size = max_size or max(4 * service.pool_size, 16)
        self.timeout_s = service.timeout_ms / 1000
        self.idle: list[UpstreamConnection] = []
        self.busy: set[UpstreamConnection] = set()
        self.waiters: deque[Exchange] = deque()
        self.connecting = 0
        self.failures = 0
        self.closing = False
        self.last_error: str | None = None
        self.down_reason = "the venue is unreachable"
        self._on_event = on_event
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy)

    async def start(self) -> None:
        """Open the warm connections; returns when each attempt has finished once."""
        await asyncio.gather(*(self._connect() for _ in range(self.warm)))

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for conn in [*self.idle, *self.busy]:
            conn.close()
        self.idle.clear()
        while self.waiters:
            self.waiters.popleft().fail(UpstreamUnavailable("the sidecar is shutting down"))

    # hot path
    def submit(self, ex: Exchange) -> None:
        if ex.timer is None:
            ex.timer = self.loop.call_later(self.timeout_s, ex.on_timeout)
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            self.busy.add(conn)
            conn.send(ex)
            return
        if self.failures and not self.busy:
            # The venue is down (no connection, the last attempt failed): answer now rather
            # than let the engine wait for the timeout. Reconnects go on in the background.
            ex.fail(UpstreamUnavailable(self.down_reason))
            return
        self.waiters.append(ex)
        if self.size + self.connecting < self.max_size and self.connecting < len(self.waiters):
            self._spawn(self._connect())

    def release(self, conn: UpstreamConnection) -> None:
        waiters = self.waiters
        while waiters:
            ex = waiters.popleft()
            if not ex.done:
                conn.send(ex)
                return
        self.busy.discard(conn)
        self.idle.append(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if not self.closing and self.size + self.connecting < self.warm:
            self._spawn(self._connect(delay=True))

    # background
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, *, delay: bool = False) -> None:
        self.connecting += 1
        try:
            if delay and self.failures:
                backoff = min(RECONNECT_MAX_S, RECONNECT_BASE_S * 2 ** min(self.failures, 10))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            host, port = self.service.upstream_host, self.service.upstream_port
            try:
                _, proto = await asyncio.wait_for(
                    self.loop.create_connection(
                        lambda: UpstreamConnection(self),
                        host,
                        port,
                        ssl=self.ssl,
                        server_hostname=host,
                    ),
                    self.timeout_s,
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, ssl.SSLError):
                    self.down_reason = "TLS verification of the venue failed"
                elif isinstance(exc, ConnectionRefusedError):
                    self.down_reason = "the venue refused the connection"
                else:
                    self.down_reason = "the venue is unreachable"
                self._event("upstream_connect_failed", error=self.last_error)
                self._fail_waiters_if_down(exc)
                if not self.closing and self.size + self.connecting - 1 < self.warm:
                    self._spawn(self._connect(delay=True))
                return
        finally:
            self.connecting -= 1
        assert isinstance(proto, UpstreamConnection)
        self.failures = 0
        if self.closing:
            proto.close()
            return
        self.busy.add(proto)
        self.release(proto)

    def _fail_waiters_if_down(self, exc: BaseException) -> None:
        # No connection exists and opening one failed: waiting would only end in a timeout.
        if self.size == 0 and self.connecting <= 1:
            while self.waiters:
                self.waiters.popleft().fail(UpstreamUnavailable(self.down_reason))

    def _event(self, name: str, **fields: object) -> None:
        if self._on_event is not None:
            self._on_event(name, {"service": self.service.name, **fields})
