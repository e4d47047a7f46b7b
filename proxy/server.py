"""The engine-facing listener: HTTP/1.1 on asyncio Protocols with the httptools parser.

One ``ClientConnection`` per engine connection. Requests are parsed as bytes arrive,
queued in order (pipelining), and handled one at a time per connection so responses go
back in request order. Each request is routed, signed, and handed to the service's
upstream pool; the answer comes back by callback. Every local failure becomes the JSON
error contract, and the listener goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import perf_counter_ns
from typing import cast

import httptools

from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    HeadersTooLarge,
    ProxyError,
    RateLimited,
    RequestTimeout,
    TooManyConnections,
    Unauthorized,
    UnknownRoute,
)
from proxy.http11 import PLAIN_CONNECTION, error_response
from proxy.metrics import (
    BUCKET_CUT,
    BUCKET_HIGH,
    BUCKET_LOW,
    OK,
    RATE_LIMITED,
    REJECTED,
    UPSTREAM_FAILED,
    VENUE_ERROR,
)
from proxy.ratelimit import Share
from proxy.service import REQUEST_DROP, ServiceRuntime
from proxy.signers import KeySigner, Rejection
from proxy.upstream import Exchange, ParsedResponse, UpstreamPool, reframed
from proxy.venue_limits import observe as observe_usage

MAX_HEADERS = 100  # more than any venue client sends; bounds per-request memory
MAX_HEADER_BYTES = 32 * 1024  # same reason; nginx's default large_client_header_buffers
MAX_PIPELINED = 64  # requests queued per connection before we stop reading from it
MAX_CONNECTIONS = 1024  # engine connections at once; beyond, 503 and close (floods)
HEADER_TIMEOUT_S = 10.0  # a request's head must arrive whole within this (slow-loris)
BODY_TIMEOUT_S = 30.0  # and its body within this from its first byte
SWEEP_EVERY_S = 1.0  # how often partial requests are checked (timeouts are this coarse)


class _Request:
    __slots__ = (
        "body",
        "client",
        "deadline_us",
        "fell_back",
        "headers",
        "keep_alive",
        "method",
        "orders",
        "overlap",
        "path",
        "probe",
        "query",
        "service",
        "signer",
        "t0",
        "t_up",
        "up_ns",
        "url",
        "weight",
    )

    def __init__(
        self,
        method: bytes,
        url: bytes,
        headers: bytes,
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        # set at dispatch, kept for a fallback re-sign with the other key
        self.service: ServiceRuntime | None = None
        self.signer: KeySigner | None = None
        self.path = b""
        self.query = b""
        self.fell_back = False
        self.overlap = False
        self.probe = False  # the one request let through after a venue's stop
        self.client: Client | None = None  # who sent it, when the listener asks for tokens
        # its cost in the venue's units, and (parked under on_limit) how long it may wait
        self.weight = 1
        self.orders = 0
        self.deadline_us = 0
        # metrics (perf_counter_ns): arrival, last submit to the venue, time upstream
        self.t0 = 0
        self.t_up = 0
        self.up_ns = 0


def _observe(req: _Request, outcome: int) -> None:
    """Record one answered request in its service's pre-bound metrics (no allocation
    beyond the integers themselves; no label lookup)."""
    service = req.service
    sm = service.metrics if service is not None else None
    if sm is None:
        return
    # Histogram.observe inlined, with proxy.metrics.bucket_index inlined in turn: a call
    # costs more than its body (measured with loadtests.hotpath under callgrind).
    total = perf_counter_ns() - req.t0
    up = req.up_ns
    b = total.bit_length()
    h = sm.duration
    h.counts[BUCKET_HIGH[b] if total > BUCKET_CUT[b] else BUCKET_LOW[b]] += 1
    h.total += total
    own = total - up
    b = own.bit_length()
    h = sm.overhead
    h.counts[BUCKET_HIGH[b] if own > BUCKET_CUT[b] else BUCKET_LOW[b]] += 1
    h.total += own
    if up:
        b = up.bit_length()
        h = sm.upstream
        h.counts[BUCKET_HIGH[b] if up > BUCKET_CUT[b] else BUCKET_LOW[b]] += 1
        h.total += up
    sm.outcomes[outcome] += 1


DEFAULT_STOP_MS = 1_000  # a 429/418 without Retry-After: hold the service this long
# How often the venue's usage headers are read while its windows have room: traffic the
# sidecar does not see goes uncounted for at most this long.
USAGE_EVERY_S = 0.02


def _venue_said_stop(service: ServiceRuntime, raw: bytes, now_us: int) -> None:
    """The venue answered 429 or 418 (or its own code for it): nothing more goes to it
    until its Retry-After has passed, so no request can extend a ban (Binance escalates
    418 bans up to 3 days). Then one probe goes out (``Limiter.admit``)."""
    wait_ms = DEFAULT_STOP_MS
    for name, value in ParsedResponse(raw).headers:
        if name.lower() == b"retry-after":
            # An HTTP-date is not parsed: the default holds rather than a guess.
            with contextlib.suppress(ValueError):
                wait_ms = max(int(value.strip()) * 1000, DEFAULT_STOP_MS)
    service.limiter.block(now_us, wait_ms * 1000)


def _limiter_now(service: ServiceRuntime, now: float) -> int:
    """The limiter's clock: the venue's time in µs (our clock plus the measured offset),
    so windows align with the venue's own counters."""
    return int(now * 1_000_000) + service.clock_offset_ms * 1000


def _release_parked(service: ServiceRuntime, clock: Callable[[], float]) -> None:
    """The service's park timer: admit waiting requests in arrival order while the budget
    has room, refuse those whose wait ran out, and sleep until the next one may fit."""
    service.park_timer = None
    now = clock()
    now_us = _limiter_now(service, now)
    # Taken out before anything runs: answering one request can start its connection's
    # next pipelined one, which parks (in a fresh queue) behind those still waiting.
    waiting, service.parked = service.parked, deque()
    keep: deque[tuple[ClientConnection, _Request]] = deque()
    soonest = 0
    for conn, req in waiting:
        if conn.current is not req or conn.transport is None:
            continue  # the engine went away
        wait = service.limiter.admit(now_us, req.weight, req.orders, conn.share(service))
        if wait == 0:
            req.probe = service.limiter.probing
            conn._sign_and_submit(req, service, now, perf_counter_ns() if req.t0 else 0)
        elif wait < 0 or now_us + wait > req.deadline_us:
            conn._finish_local(_over_budget(wait), RATE_LIMITED)
        else:
            keep.append((conn, req))
            soonest = wait if not soonest or wait < soonest else soonest
    keep.extend(service.parked)
    service.parked = keep
    if keep and service.park_timer is None:
        service.park_timer = asyncio.get_running_loop().call_later(
            soonest / 1e6, _release_parked, service, clock
        )


def _over_budget(wait: int) -> RateLimited:
    if wait > 0:
        return RateLimited("over this service's rate limit", wait // 1000 + 1)
    return RateLimited("costs more than the budget", 60_000)


class _LocalError:
    """A parse-level failure queued in order; the connection closes after answering it."""

    __slots__ = ("error",)

    def __init__(self, error: ProxyError) -> None:
        self.error = error


TOKEN_HEADER = b"x-authproxy-token"


@dataclass(frozen=True, slots=True)
class Client:
    """An engine known by its token: its name (for logs) and the services it may use."""

    name: str
    services: frozenset[str] | None  # None: all


def peer_allowed(
    sock: socket.socket, uids: frozenset[int] | None, gids: frozenset[int] | None
) -> bool:
    """On a unix socket, whether the peer's uid or gid (SO_PEERCRED) is allowed. With
    neither set, every peer that can open the socket (mode 0660) is."""
    if uids is None and gids is None:
        return True
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    return (uids is not None and uid in uids) or (gids is not None and gid in gids)


class Router:
    """Maps a route (``/binance``) to its service. Built once; swapped whole on reload."""

    __slots__ = (
        "allow_gids",
        "allow_uids",
        "body_timeout",
        "clients",
        "clock",
        "connections",
        "draining",
        "header_timeout",
        "live",
        "max_body",
        "max_connections",
        "metrics",
        "on_fallback",
        "routes",
        "sweeper",
    )

    def __init__(
        self,
        services: Mapping[str, ServiceRuntime],
        *,
        max_body: int,
        clock: Callable[[], float] = time.time,
        on_fallback: Callable[[str, str, str], None] | None = None,
        metrics: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT_S,
        body_timeout: float = BODY_TIMEOUT_S,
        allow_uids: frozenset[int] | None = None,
        allow_gids: frozenset[int] | None = None,
        clients: Mapping[bytes, Client] | None = None,
    ) -> None:
        self.routes: dict[bytes, ServiceRuntime] = {s.route: s for s in services.values()}
        self.max_body = max_body
        self.clock = clock
        self.on_fallback = on_fallback or (lambda service, used, other: None)
        # Observe per-request metrics (each ServiceRuntime.metrics holds its children).
        self.metrics = metrics
        self.connections = 0  # open engine connections
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        # who may call: unix-socket peers by uid/gid, and (when set) a token per request
        self.allow_uids = allow_uids
        self.allow_gids = allow_gids
        self.clients = clients
        # Every open connection, for the sweep that ends slow requests; the sweep runs
        # only while a connection is open (no timer on an idle sidecar, none per request).
        self.live: set[ClientConnection] = set()
        self.sweeper: asyncio.TimerHandle | None = None
        self.draining = False  # handing over: every answer closes its connection

    def drain(self) -> None:
        """Stop keeping connections: each one closes after its current answer (with
        ``Connection: close``), so an engine's next request opens a new connection (to
        the successor, which shares the listening socket). Idle connections are left to
        ``close_idle``: closing one now could cross a request the engine is sending."""
        self.draining = True

    def close_idle(self) -> int:
        """Close the connections with nothing in flight or arriving; return how many."""
        closed = 0
        for conn in list(self.live):
            if conn.current is None and not conn.pending and not conn.in_message:
                conn._close()
                closed += 1
        return closed

    def track(self, conn: ClientConnection) -> None:
        self.live.add(conn)
        if self.sweeper is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # driven by hand, outside a loop (tests, benchmarks): they sweep
            self.sweeper = loop.call_later(SWEEP_EVERY_S, self.sweep)

    def sweep(self) -> None:
        """End requests that have been arriving for too long: a connection seen in the
        middle of the same request at two sweeps has been at it for SWEEP_EVERY_S more."""
        self.sweeper = None
        for conn in list(self.live):
            conn.check_slow(self)
        if self.live:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # driven by hand
            self.sweeper = loop.call_later(SWEEP_EVERY_S, self.sweep)


class ClientConnection(asyncio.Protocol):
    """One engine connection. All methods run on the loop and never block."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[_Request | _LocalError] = deque()
        self.current: _Request | None = None
        self.processing = False
        self.reading = True
        self.broken = False  # a framing error: ignore further bytes, close after answering
        self.eof = False
        self._url = b""
        self._headers: list[bytes] = []  # encoded lines to forward
        self._n_headers = 0
        self._named: set[bytes] | None = None  # extra hop-by-hop names from Connection
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        self._token = b""
        self.shares: dict[ServiceRuntime, Share] = {}  # this engine's use of each budget
        # slow-request sweep: requests begun, and at the last sweep which one was arriving
        self.in_message = False
        self.begun = 0
        self.seen_begun = -1
        self.slow_sweeps = 0

    def share(self, service: ServiceRuntime) -> Share:
        share = self.shares.get(service)
        if share is None:
            share = self.shares[service] = Share()
        return share

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        router = self.router
        router.connections += 1
        if router.connections > router.max_connections:
            self.broken = True
            self._write_error(TooManyConnections("connection limit reached"), keep_alive=False)
            return
        sock = transport.get_extra_info("socket")
        if (
            sock is not None
            and sock.family == socket.AF_UNIX
            and not peer_allowed(sock, router.allow_uids, router.allow_gids)
        ):
            self.broken = True
            self._write_error(Forbidden("this user may not use the sidecar"), keep_alive=False)
            return
        router.track(self)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadRequest("protocol upgrades are not supported"))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, ProxyError) else BadRequest("malformed HTTP"))
        except httptools.HttpParserError:
            self._fail(BadRequest("malformed HTTP request"))

    def eof_received(self) -> bool | None:
        # The engine half-closed: answer what it already sent, then close.
        self.eof = True
        if self.current is None and not self.pending:
            return None  # nothing owed: let the transport close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.connections -= 1
        self.router.live.discard(self)
        self.transport = None
        self.pending.clear()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._token = b""
        self.in_message = True
        self.begun += 1
        self._url = b""
        self._headers = []
        self._n_headers = 0
        self._named = None
        self._header_bytes = 0
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise HeadersTooLarge("request line and headers are too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Headers are filtered and encoded for the venue as they arrive: one pass, no
        # second loop at dispatch time.
        self._n_headers += 1
        self._header_bytes += len(name) + len(value)
        if self._n_headers > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            raise HeadersTooLarge("request line and headers are too large")
        lname = name.lower()
        if lname not in REQUEST_DROP:
            self._headers.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise BadRequest("invalid Content-Length") from None
            if declared > self.router.max_body:
                raise BodyTooLarge(f"body larger than {self.router.max_body} bytes")
        elif lname == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")} - PLAIN_CONNECTION
            if tokens:
                self._named = (self._named or set()) | tokens
        elif lname == TOKEN_HEADER:
            self._token = value

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.router.max_body:
            raise BodyTooLarge(f"body larger than {self.router.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.parser.should_upgrade():
            # CONNECT, or Connection: upgrade: llhttp completes the message and then stops;
            # it must not be signed and sent on the way out.
            raise BadRequest("protocol upgrades are not supported")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        lines = self._headers
        if self._named:
            # Headers named in Connection are hop-by-hop for this message (RFC 9110 7.6.1).
            named = self._named
            lines = [ln for ln in lines if ln.split(b":", 1)[0].lower() not in named]
        req = _Request(
            self.parser.get_method(),
            self._url,
            b"".join(lines),
            body,
            self.parser.should_keep_alive(),
        )
        if self.router.clients is not None:
            req.client = self.router.clients.get(self._token)
        if self.router.metrics:
            req.t0 = perf_counter_ns()
        if self.current is None and not self.pending and not self.processing:
            # The common case, one request at a time: no queue round trip.
            self.current = req
            # Dispatched at once: its arrival time doubles as the start of signing (the
            # routing in between is part of what the signing histogram then counts).
            self._dispatch(req, req.t0)
            return
        self.pending.append(req)
        if len(self.pending) >= MAX_PIPELINED and self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()
        if not self.processing and self.current is None:
            self._process()

    def check_slow(self, router: Router) -> None:
        """Called by the sweep: answer 408 and close if one request has been arriving for
        longer than the header timeout (no body byte yet) or the body timeout."""
        if not self.in_message or self.broken or self.transport is None:
            self.seen_begun = -1
            return
        if self.seen_begun != self.begun:
            self.seen_begun, self.slow_sweeps = self.begun, 0
            return
        self.slow_sweeps += 1
        limit = router.body_timeout if self._body_len else router.header_timeout
        if self.slow_sweeps * SWEEP_EVERY_S >= limit:
            self.in_message = False
            phase = "body" if self._body_len else "request head"
            self._fail(RequestTimeout(f"the {phase} did not arrive within {limit:g} s"))

    # request handling
    def _fail(self, error: ProxyError) -> None:
        self.broken = True
        self.pending.append(_LocalError(error))
        if self.current is None and not self.processing:
            self._process()

    def _process(self) -> None:
        self.processing = True
        try:
            while self.current is None and self.pending and self.transport is not None:
                item = self.pending.popleft()
                if isinstance(item, _LocalError):
                    self._write_error(item.error, keep_alive=False)
                    continue
                self.current = item
                self._dispatch(item)
            if self.eof and self.current is None and not self.pending:
                self._close()
            elif not self.reading and len(self.pending) < MAX_PIPELINED // 2 and self.transport:
                self.reading = True
                self.transport.resume_reading()
        finally:
            self.processing = False

    def _dispatch(self, req: _Request, t_start: int = 0) -> None:
        router = self.router
        try:
            # /route/rest?query -> route, rest, query (inline: this runs per request)
            url = req.url
            if not url.startswith(b"/"):
                raise BadRequest("request target must be an absolute path")
            path, _, query = url.partition(b"?")
            if query and query.find(b"#") >= 0:  # not `in`: see proxy.http11
                query = query.partition(b"#")[0]
            cut = path.find(b"/", 1)
            if cut < 0:
                route, path = path, b"/"
            else:
                route, path = path[:cut], path[cut:]
            service = router.routes.get(route)
            if service is None:
                raise UnknownRoute(f"no service is routed at {route.decode('latin-1')}")
            req.service = service
            req.path, req.query = path, query
            if router.clients is not None:
                client = req.client
                if client is None:
                    raise Unauthorized("a known X-Authproxy-Token is required")
                if client.services is not None and service.name not in client.services:
                    raise Forbidden(f"client {client.name} may not use service {service.name}")
            access = service.access
            if access is not None and not access.allows(req.method, path):
                raise Forbidden(
                    f"{req.method.decode('latin-1')} {path.decode('latin-1')} is not allowed"
                    f" for service {service.name}"
                )
        except ProxyError as exc:
            self._finish_local(exc)
            return
        t_sign = (t_start or perf_counter_ns()) if router.metrics else 0
        now = router.clock()
        # The budget, in the venue's units, before anything is signed (proxy.ratelimit).
        cost = service.costs.cost(req.method, path)
        req.weight = weight = cost.weight if cost.by_query is None else cost.by_query(query)
        req.orders = cost.orders
        now_us = int(now * 1_000_000) + service.clock_offset_ms * 1000  # _limiter_now, inlined
        share = self.shares.get(service) or self.share(service)
        wait = (
            service.limiter.admit(now_us, weight, cost.orders, share) if not service.parked else 1
        )
        if wait:
            if 0 < wait <= service.wait_us or (service.parked and wait > 0):
                self._park(req, service, now_us)
            else:
                self._finish_local(_over_budget(wait), RATE_LIMITED)
            return
        req.probe = service.limiter.probing
        self._sign_and_submit(req, service, now, t_sign)

    def _park(self, req: _Request, service: ServiceRuntime, now_us: int) -> None:
        """on_limit.wait_ms: wait in the service's queue (behind those already waiting)."""
        req.deadline_us = now_us + service.wait_us
        service.parked.append((self, req))
        if service.park_timer is None:
            loop = asyncio.get_running_loop()
            service.park_timer = loop.call_later(0, _release_parked, service, self.router.clock)

    def _sign_and_submit(
        self, req: _Request, service: ServiceRuntime, now: float, t_sign: int
    ) -> None:
        path, query = req.path, req.query
        try:
            signer = service.signer_for(now)
            data = service.prepare_with(signer, req.method, path, query, req.headers, req.body, now)
        except ProxyError as exc:
            if req.probe:
                service.limiter.probe_lost()
            self._finish_local(exc)
            return
        if t_sign:
            req.t_up = t = perf_counter_ns()
        req.signer = signer
        req.overlap = service.keys is not None and service.keys.overlap
        pool = service.pool
        assert isinstance(pool, UpstreamPool)
        pool.submit(Exchange(self, data, req.method))
        # Counted once the request is on its way: the venue's answer does not wait for it.
        sm = service.metrics
        if t_sign and sm is not None:
            t -= t_sign
            b = t.bit_length()  # proxy.metrics.bucket_index, inlined
            h = sm.signing
            h.counts[BUCKET_HIGH[b] if t > BUCKET_CUT[b] else BUCKET_LOW[b]] += 1
            h.total += t

    def _fall_back(self, req: _Request, status: int, raw: bytes, passthrough: bool) -> bool:
        """Re-sign once with the other live key when the venue refused this key.

        Only on a definitive *key not accepted* answer (the venue's classifier), only once
        per request, and only while an overlap window gives another live key. Returns
        whether the request went out again. A success is not even read unless the venue
        refuses keys with a 2xx status (Bybit, Kraken, OKX, Deribit): an overlap lasts a
        day, and every answer passes here during it.
        """
        service, used = req.service, req.signer
        if req.fell_back or service is None or used is None or service.keys is None:
            return False
        if status < 300 and not service.key_refusal_in_2xx:
            return False
        # A passthrough answer is Content-Length framed: its body is what follows the head.
        body = raw[raw.find(b"\r\n\r\n") + 4 :] if passthrough else ParsedResponse(raw).body
        if service.venue.classify(status, body) is not Rejection.KEY_REJECTED:
            return False
        now = self.router.clock()
        other = service.keys.fallback_for(used, now)
        if other is None:
            return False
        try:
            data = service.prepare_with(
                other, req.method, req.path, req.query, req.headers, req.body, now
            )
        except ProxyError:
            return False
        req.fell_back = True
        req.signer = other
        if req.t_up:
            req.t_up = perf_counter_ns()
        service.fallbacks += 1
        self.router.on_fallback(service.name, used.key_id, other.key_id)
        pool = service.pool
        assert isinstance(pool, UpstreamPool)
        pool.submit(Exchange(self, data, req.method))
        return True

    # ResponseSink
    def upstream_response(self, status: int, raw: bytes, passthrough: bool) -> None:
        req = self.current
        transport = self.transport
        if req is None or transport is None:
            return
        if req.t_up:
            req.up_ns += perf_counter_ns() - req.t_up
        if self.router.draining:
            req.keep_alive = False  # answered with Connection: close: the engine reconnects
        # Only while two keys are live can a refused key be retried; some venues (Bybit,
        # Kraken) refuse keys with HTTP 200 and the verdict in the body, so the status
        # alone cannot rule it out.
        if req.overlap and self._fall_back(req, status, raw, passthrough):
            return
        self.current = None
        # The engine's answer first; what the answer tells about the venue's limits only
        # matters to the requests after it (none is dispatched before _after).
        if passthrough and req.keep_alive and req.method != b"HEAD":
            # The venue's bytes as received: no header is parsed or re-encoded.
            transport.write(raw)
        else:
            transport.write(reframed(raw, status, req.keep_alive, req.method == b"HEAD"))
        service = req.service
        if service is not None:
            if status in {429, 418} or (
                status >= 400
                and service.venue.classify(status, ParsedResponse(raw).body)
                in {Rejection.RATE_LIMITED, Rejection.BANNED}
            ):
                _venue_said_stop(service, raw, _limiter_now(service, self.router.clock()))
            else:
                if service.reads_usage:
                    now = self.router.clock()
                    # The venue's counters, read every USAGE_EVERY_S and on every answer
                    # once a window is nearly full (a read costs a fifth of the hot path).
                    if now >= service.usage_due or service.limiter.near_limit():
                        service.usage_due = now + USAGE_EVERY_S
                        observe_usage(
                            service.costs,
                            service.limiter,
                            raw,
                            _limiter_now(service, now),
                            int(now * 1000) + service.clock_offset_ms,
                        )
                if req.probe:
                    service.limiter.probe_answered(_limiter_now(service, self.router.clock()))
            req.probe = False
        if req.t0:
            _observe(req, VENUE_ERROR if status >= 400 else OK)
        self._after(req)

    def upstream_failed(self, error: ProxyError) -> None:
        req = self.current
        if req is not None and req.probe and req.service is not None:
            req.probe = False
            req.service.limiter.probe_lost()
        if req is not None and req.t_up:
            req.up_ns += perf_counter_ns() - req.t_up
        self._finish_local(error, UPSTREAM_FAILED)

    def _finish_local(self, error: ProxyError, outcome: int = REJECTED) -> None:
        req = self.current
        if req is None or self.transport is None:
            return
        self.current = None
        if self.router.draining:
            req.keep_alive = False
        self._write_error(error, keep_alive=req.keep_alive)
        if outcome == RATE_LIMITED and req.service is not None and req.service.metrics:
            req.service.metrics.rate_limited += 1
        if req.t0:
            _observe(req, outcome)
        self._after(req)

    def _after(self, req: _Request) -> None:
        if not req.keep_alive:
            self._close()
        elif not self.processing and (self.pending or self.eof or not self.reading):
            self._process()

    def _write_error(self, error: ProxyError, *, keep_alive: bool) -> None:
        if self.transport is None:
            return
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if isinstance(error, RateLimited):
            extra = ((b"Retry-After", b"%d" % -(-error.retry_after_ms // 1000)),)
        self.transport.write(
            error_response(
                error.status, error.code, error.message, keep_alive=keep_alive, extra_headers=extra
            )
        )
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.pending.clear()
