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
from proxy.http11 import build_response

RECONNECT_BASE_S = 0.05  # first retry soon: a venue closing one idle connection is routine
RECONNECT_MAX_S = 1.0  # cap: a venue back up is in use again within a second, yet never hammered
SWEEP_INTERVAL_S = 0.01  # timeout resolution: a request times out within 10 ms of timeout_ms
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def is_passthrough(raw: bytes, head_end: int, body_len: int) -> bool:
    """Whether a complete response can go to a keep-alive HTTP/1.1 engine byte for byte.

    ``head_end`` is the offset of the blank line ending the head, ``body_len`` the length
    of the (de-chunked) body. The caller has already required that the venue keeps the
    connection alive. Checked, cheapest first, on the lowercased head (venue heads run
    to a kilobyte, so each check is one C-level scan, never a per-header Python loop):

    - ``HTTP/1.1`` status line (an HTTP/1.0 head would mislead the engine's framing);
    - Content-Length framing: the raw body is exactly the body (so not chunked);
    - no ``Keep-Alive`` header, and ``Connection`` absent or exactly ``keep-alive``
      (true of the engine's connection too): anything else is hop-by-hop for this hop;
    - no ``X-Authproxy-Error``: only the sidecar may mark an answer as its own.

    Trade-off, measured (loadtests/hotpath.py): the other hop-by-hop names (``Upgrade``
    without ``Connection: upgrade``, ``Proxy-*`` outside a 407, ``TE``, ``Trailer``
    without chunking) carry no meaning in such a response and are not searched for;
    a regex over every header name cost three times as much on a 1 KB Binance head.
    """
    if not raw.startswith(b"HTTP/1.1 ") or len(raw) - head_end - 4 != body_len:
        return False
    low = raw[:head_end].lower()
    if low.find(b"\r\nkeep-alive:") >= 0 or low.find(b"\r\nx-authproxy-error:") >= 0:
        return False
    at = low.find(b"\r\nconnection:")
    if at < 0:
        return True
    end = low.find(b"\r\n", at + 2)
    value = low[at + 13 : end if end >= 0 else len(low)]
    return value.strip() == b"keep-alive" and low.find(b"\r\nconnection:", at + 2) < 0


class ParsedResponse:
    """A response parsed in full, for the slow path: reason, headers, de-chunked body.

    Interim 1xx responses before the final one are skipped.
    """

    def __init__(self, raw: bytes) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._done = False
        with contextlib.suppress(httptools.HttpParserError):
            self._parser.feed_data(raw)

    def on_message_begin(self) -> None:
        if not self._done:
            self.reason, self.headers, self._body = b"", [], []

    def on_status(self, reason: bytes) -> None:
        if not self._done:
            self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._done:
            self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        if not self._done:
            self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if not self._done and status >= 200:
            self.status = status
            self.body = b"".join(self._body)
            self._done = True


def reframed(raw: bytes, status: int, keep_alive: bool, head: bool) -> bytes:
    """The venue's answer re-encoded for the engine (the slow path, when ``raw`` cannot go
    byte for byte): parsed in full (de-chunked, 1xx skipped), then framed by
    ``proxy.http11.build_response``. ``head``: the request was a HEAD."""
    parsed = ParsedResponse(raw)
    return build_response(
        parsed.status or status,
        parsed.reason,
        parsed.headers,
        parsed.body,
        keep_alive=keep_alive,
        head=head,
    )


class ResponseSink(Protocol):
    """Where an exchange's outcome goes (the engine's connection). Called on the loop."""

    def upstream_response(self, status: int, raw: bytes, passthrough: bool) -> None:
        """``raw``: the venue's response bytes as received (head and body, possibly
        chunked). ``passthrough``: they form a keep-alive HTTP/1.1 message that may be
        forwarded unchanged; otherwise parse them with ``ParsedResponse``."""
        ...

    def upstream_failed(self, error: ProxyError) -> None: ...


class Exchange:
    """One request on its way to the venue. Completes exactly once."""

    __slots__ = ("conn", "data", "deadline", "done", "head", "method", "retried", "sink")

    def __init__(self, sink: ResponseSink, data: bytes, method: bytes) -> None:
        self.sink = sink
        self.data = data
        self.method = method
        self.head = method == b"HEAD"
        self.conn: UpstreamConnection | None = None
        self.deadline = 0.0  # loop time; set when first submitted
        self.done = False
        self.retried = False

    def complete(self, status: int, raw: bytes, passthrough: bool) -> None:
        if self.done:
            return
        self.done = True
        self.sink.upstream_response(status, raw, passthrough)

    def fail(self, error: ProxyError) -> None:
        if self.done:
            return
        self.done = True
        self.sink.upstream_failed(error)

    def on_timeout(self) -> None:
        conn = self.conn
        self.fail(UpstreamTimeout("the venue did not answer in time"))
        if conn is not None:
            # A late answer must not be read as the next request's: drop the connection.
            conn.abort()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive TLS connection; carries one exchange at a time.

    The response is kept as the raw bytes received; httptools only finds where it ends
    (three callbacks a response), and the engine gets those bytes unchanged when they
    are a plain keep-alive HTTP/1.1 message (see ``is_passthrough``).
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.used = 0  # requests completed on this connection
        self.raw: list[bytes] = []  # bytes of the response in progress
        self.status = 0  # set when the final response is complete
        self.interim = False  # a 1xx came first: the raw bytes need the slow path
        self.body_len = 0  # de-chunked body bytes seen (framing check for passthrough)
        self.keep_alive = False
        self.extra = False  # bytes beyond the response: the connection cannot be reused
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
        ex = self.exchange
        if ex is None:
            # Bytes nobody asked for: the framing can no longer be trusted.
            self.abort()
            return
        self.raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.exchange = None
            self.abort()
            ex.fail(UpstreamUnavailable("the venue sent a malformed HTTP response"))
            return
        if self.status:
            self._deliver(ex)

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
                and not self.raw
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
    def on_message_begin(self) -> None:
        if self.status:
            self.extra = True  # a second message in one read: what we never asked for

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is not None and ex.head:
            # httptools cannot be told the request was HEAD; a HEAD response has no body.
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)

    def on_message_complete(self) -> None:
        if self.status:
            return
        status = self.parser.get_status_code()
        if status < 200:
            self.interim = True  # a 1xx: the final response follows
            self.body_len = 0
            return
        # llhttp answers should_keep_alive only inside the callback, not after feed_data.
        self.keep_alive = self.parser.should_keep_alive()
        self.status = status

    def _deliver(self, ex: Exchange) -> None:
        raw = self.raw[0] if len(self.raw) == 1 else b"".join(self.raw)
        keep = self.keep_alive and not ex.head and not self.extra and not self.closed
        passthrough = (
            keep and not self.interim and is_passthrough(raw, raw.find(b"\r\n\r\n"), self.body_len)
        )
        status = self.status
        self.raw = []
        self.body_len = 0
        self.status = 0
        self.interim = False
        self.exchange = None
        self.used += 1
        # The connection is handed back before the answer goes on: the answer may start
        # the engine's next pipelined request, which then finds it idle (completing first
        # left it busy, and every pipelined request opened one more TLS connection).
        if keep:
            self.pool.release(self)
        else:
            self.abort()
        ex.complete(status, raw, passthrough)

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


class SSLContexts:
    """The verifying contexts of services built together, one per distinct ``ca_file``.

    Each context holds the parsed system roots (about half a megabyte resident), and one
    context serves any number of connections, so ten services to venues with the same
    trust share one. Made per start or reload, so a reload reads the CA files afresh."""

    def __init__(self) -> None:
        self._by_ca: dict[str | None, ssl.SSLContext] = {}

    def for_service(self, service: ServiceConfig) -> ssl.SSLContext:
        ca = str(service.ca_file) if service.ca_file else None
        ctx = self._by_ca.get(ca)
        if ctx is None:
            ctx = self._by_ca[ca] = make_ssl_context(ca)
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
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy)

    async def start(self) -> None:
        """Open the warm connections; returns when each attempt has finished once."""
        await asyncio.gather(*(self._connect() for _ in range(self.warm)))

    async def close(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for conn in [*self.idle, *self.busy]:
            conn.close()
        self.idle.clear()
        while self.waiters:
            self.waiters.popleft().fail(UpstreamUnavailable("the sidecar is shutting down"))

    # hot path
    def submit(self, ex: Exchange) -> None:
        if not ex.deadline:
            # No timer per request (a uvloop timer costs a libuv handle each): one sweep
            # every SWEEP_INTERVAL_S checks the deadlines of what is in flight.
            ex.deadline = self.loop.time() + self.timeout_s
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)
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

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self.busy):
            ex = conn.exchange
            if ex is not None and ex.deadline <= now:
                ex.on_timeout()
        if self.waiters and self.waiters[0].deadline <= now:
            for ex in [w for w in self.waiters if w.deadline <= now]:
                self.waiters.remove(ex)
                ex.fail(UpstreamTimeout("no connection to the venue became free in time"))
        if (self.busy or self.waiters) and not self.closing:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

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
