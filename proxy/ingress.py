"""The ingress: a listener in front of a local internal service that verifies HFT-AUTH-V1.

The I/O shell around ``proxy.signers.internal.verify`` and ``NonceCache`` (the pure core,
next to the signer). One ``IngressConnection`` per caller connection (asyncio Protocol,
httptools parser, as ``proxy.server``); requests are answered in order. A request is:

1. parsed; the five ``X-Auth-*`` headers are collected (never forwarded), and any
   ``X-Authproxy-*`` header the caller sent is dropped (only the ingress sets those);
2. verified (docs/internal-auth.md "Verification"): refused with the JSON error of
   DESIGN.md, 401 (``unknown_key``, ``revoked_key``, ``stale_timestamp``,
   ``bad_signature``, ``replayed_nonce``) or 400 (``malformed_auth``), counted in
   ``IngressMetrics`` and audited (``AUTH_REFUSED``: key id as presented, never a secret);
3. forwarded, the request target and body exactly as verified, to the protected service
   over plain HTTP keep-alive on loopback (``LocalPool``), with ``X-Authproxy-Caller`` and
   ``X-Authproxy-Caller-Key-Id`` naming the verified caller.

The key table (``KeyTable``) is swapped whole when the key watcher publishes a caller's
ring (``proxy.runtime``): lookups on the loop are one dict access, lock-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from time import perf_counter_ns
from typing import Final, NamedTuple, cast

import httptools

from keycache.ring import KeyRing, previous_stays_live
from proxy.audit import AuditLog, event
from proxy.config import IngressConfig
from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.http11 import (
    HOP_BY_HOP,
    PLAIN_CONNECTION,
    SIDECAR_HEADERS,
    build_request,
    error_response,
)
from proxy.metrics import I_BAD_REQUEST, I_OK, I_REFUSED, I_UPSTREAM_FAILED, IngressMetrics
from proxy.signers.internal import (
    AUTH_INDEX,
    HEADER_NAMES,
    KEY_ID_PATTERN,
    REFUSAL_CODES,
    REPEATED,
    REPLAYED_NONCE,
    NonceCache,
    Refusal,
    Verified,
    VerifyKey,
    verify,
)
from proxy.upstream import is_passthrough, reframed

__all__ = [
    "CALLER_HEADER",
    "CALLER_KEY_HEADER",
    "REFUSAL_CODES",
    "Ingress",
    "IngressConnection",
    "KeyTable",
    "LocalPool",
    "RefusalAudit",
]

#: What the protected service learns: the verified caller (a service name, as in the key
#: store) and the key id that signed. Set by the ingress only; a caller's own are dropped.
CALLER_HEADER: Final = b"X-Authproxy-Caller"
CALLER_KEY_HEADER: Final = b"X-Authproxy-Caller-Key-Id"
#: The whole X-Authproxy- namespace belongs to the sidecar: never taken from a caller.
_OWN_PREFIX: Final = b"x-authproxy-"
_DROP: Final = HOP_BY_HOP | SIDECAR_HEADERS
_WWW_AUTHENTICATE: Final = ((b"WWW-Authenticate", b"HFT-AUTH-V1"),)

MAX_HEADERS: Final = 100  # as the engine listener (proxy.server): bounds per-request memory
MAX_HEADER_BYTES: Final = 32 * 1024
MAX_PIPELINED: Final = 64  # requests queued per connection before we stop reading
#: Key ids remembered as revoked, per ingress: a bound, so a long life of rotations (or a
#: store full of deletions) cannot grow memory; the oldest are forgotten first and then
#: answer ``unknown_key``, which refuses all the same.
MAX_REVOKED_REMEMBERED: Final = 4096
#: Refusal audit entries are written in batches from a thread, this often.
AUDIT_FLUSH_S: Final = 0.25
#: Entries held for one batch at most; beyond it refusals are aggregated per (caller key
#: id, code) into one entry with a ``count``, so a flood is still accounted for in full
#: without unbounded memory or one write per junk request.
AUDIT_MAX_PENDING: Final = 10_000
SWEEP_INTERVAL_S: Final = 0.01  # timeout resolution for calls to the protected service

# What on_header does with a header, by name: a credential's slot in ``_Request.auth``
# (0-4, ``AUTH_INDEX``) or one of these.
_N_AUTH: Final = len(AUTH_INDEX)
_FORWARD: Final = _N_AUTH  # an end-to-end header: forwarded as received
_LENGTH: Final = _N_AUTH + 1  # Content-Length: checked against max_body_bytes, not forwarded
_CONNECTION: Final = _N_AUTH + 2  # Connection: its tokens name more headers to drop
_DROPPED: Final = _N_AUTH + 3  # hop-by-hop, the sidecar's own or X-Authproxy-*: dropped


def _kind(name: bytes) -> int:
    """What on_header does with a header called ``name`` (any case). Pure."""
    lname = name.lower()
    slot = AUTH_INDEX.get(lname)
    if slot is not None:
        return slot
    if lname == b"content-length":
        return _LENGTH
    if lname == b"connection":
        return _CONNECTION
    if lname in _DROP or lname.startswith(_OWN_PREFIX):
        return _DROPPED
    return _FORWARD


#: Names on_header has classified, as spelled on the wire: one dict lookup per header
#: instead of a lower() and two or three lookups (the header names a caller sends repeat
#: on every request). Seeded with the spellings our signer and common clients use; a new
#: spelling is added when first seen, up to a bound (a caller cannot grow it, and a long
#: name is never kept), after which it is classified each time. Only ever holds
#: ``_kind(name)``: a pure function of the name, so any entry is as good as recomputing.
_KINDS: Final[dict[bytes, int]] = {}
MAX_KNOWN_NAMES: Final = 1024
MAX_KNOWN_NAME_LEN: Final = 64
for _name in (
    *(h.encode("ascii") for h in HEADER_NAMES),
    *AUTH_INDEX,
    *_DROP,
    b"Host",
    b"Content-Length",
    b"Connection",
    b"Content-Type",
    b"Accept",
    b"Accept-Encoding",
    b"User-Agent",
    b"content-type",
    b"accept",
    b"accept-encoding",
    b"user-agent",
):
    _KINDS[_name] = _kind(_name)
del _name
_KNOWN_KIND: Final = _KINDS.get


def _learn_kind(name: bytes) -> int:
    """``_kind(name)``, remembered in ``_KINDS`` within its bounds. On the loop."""
    kind = _kind(name)
    if len(_KINDS) < MAX_KNOWN_NAMES and len(name) <= MAX_KNOWN_NAME_LEN:
        _KINDS[name] = kind
    return kind


# -- the key table: which keys verify, swapped whole on a rotation ------------------------


class KeyTable:
    """The live verification keys of one ingress's accepted callers, and the key ids it
    saw revoked. ``keys`` and ``revoked`` are read on the loop per request; ``update``
    replaces ``keys`` with one assignment. Every method runs on the loop and is cheap
    (keying an HMAC per live key: two per caller during an overlap)."""

    __slots__ = ("_by_caller", "_overlap", "accept", "keys", "revoked")

    def __init__(self, accept: Sequence[str], overlap: timedelta) -> None:
        self.accept = frozenset(accept)
        self._overlap = overlap
        self._by_caller: dict[str, dict[bytes, VerifyKey]] = {}
        self.keys: dict[bytes, VerifyKey] = {}
        self.revoked: OrderedDict[bytes, None] = OrderedDict()

    def update(self, caller: str, ring: KeyRing, now: datetime) -> list[str]:
        """Take ``caller``'s new ring (the watcher's or the key file's). Every key of the
        ring verifies, including a newest one not yet activated for signing: verifiers
        hold a new key before any caller signs with it (docs/ingress.md). Returns the
        key ids it now counts as revoked (dropped before their time)."""
        if caller not in self.accept:
            return []
        old = self._by_caller.get(caller, {})
        fresh: dict[bytes, VerifyKey] = {}
        for key in ring.keys:
            kid = key.key_id.encode("ascii", "replace")
            if key.meta.algorithm != "hmac-sha256" or KEY_ID_PATTERN.fullmatch(key.key_id) is None:
                continue  # not an internal key (a staged or venue key): never verifies
            held = old.get(kid)
            fresh[kid] = (
                held if held is not None and held.version == key.version else VerifyKey(caller, key)
            )
        newly_revoked = []
        newest = ring.keys[-1] if ring.keys else None
        for kid, vk in old.items():
            if kid in fresh:
                continue
            # Dropped by time alone: expired, or the overlap window closed behind a newer
            # version. Anything else (deleted, destroyed, revoked) is a revocation.
            expired = now.timestamp() * 1000 >= vk.expires_ms
            superseded = (
                newest is not None
                and newest.version > vk.version
                and not previous_stays_live(newest.meta, now, self._overlap)
            )
            if not (expired or superseded):
                self.mark_revoked(kid)
                newly_revoked.append(vk.key_id)
        for kid in fresh:
            self.revoked.pop(kid, None)  # a key id back in the store verifies again
        self._by_caller[caller] = fresh
        table: dict[bytes, VerifyKey] = {}
        for keys in self._by_caller.values():
            table.update(keys)
        self.keys = table
        return newly_revoked

    def mark_revoked(self, key_id: bytes) -> None:
        """Remember ``key_id`` as revoked (bounded; oldest forgotten first)."""
        self.revoked[key_id] = None
        self.revoked.move_to_end(key_id)
        while len(self.revoked) > MAX_REVOKED_REMEMBERED:
            self.revoked.popitem(last=False)

    def caller_key_ids(self, caller: str) -> list[str]:
        return [vk.key_id for vk in self._by_caller.get(caller, {}).values()]


# -- the refusal audit: batched, written from a thread ------------------------------------


class RefusalAudit:
    """Audits every refusal as ``AUTH_REFUSED`` without blocking the loop.

    ``refused`` (on the loop) builds the entry; ``run`` writes what accumulated every
    ``AUDIT_FLUSH_S`` in a worker thread; ``flush`` writes the rest (at drain). A write
    that fails is reported once through ``on_error`` and the entries are dropped (the
    metric still counts them). ``log`` None: nothing is written (no destination).
    """

    def __init__(
        self,
        log: AuditLog | None,
        on_error: Callable[[str], None] = lambda _m: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.log = log
        self._on_error = on_error
        self._clock = clock
        self.pending: list[dict[str, object]] = []
        self.overflow: dict[tuple[str, str | None, str], int] = {}
        self._failed = False

    def refused(
        self, ingress: str, key_id: str | None, code: str, caller: str | None, method: bytes
    ) -> None:
        if self.log is None:
            return
        if len(self.pending) < AUDIT_MAX_PENDING:
            detail: dict[str, object] = {"code": code, "method": method.decode("latin-1")}
            if caller is not None:
                detail["caller"] = caller
            self.pending.append(
                event(
                    "AUTH_REFUSED",
                    ingress,
                    key_id,
                    "failure",
                    actor="ingress",
                    now=self._clock(),
                    detail=detail,
                )
            )
        else:
            slot = (ingress, key_id, code)
            self.overflow[slot] = self.overflow.get(slot, 0) + 1

    def _take(self) -> list[dict[str, object]]:
        entries, self.pending = self.pending, []
        now = self._clock()
        for (ingress, key_id, code), count in self.overflow.items():
            entries.append(
                event(
                    "AUTH_REFUSED",
                    ingress,
                    key_id,
                    "failure",
                    actor="ingress",
                    now=now,
                    detail={"code": code, "count": count, "aggregated": True},
                )
            )
        self.overflow = {}
        return entries

    def _write(self, entries: list[dict[str, object]]) -> None:
        assert self.log is not None
        try:
            self.log.write(entries)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                self._on_error(f"{type(exc).__name__}: {exc.strerror}")

    async def flush(self) -> None:
        """Write what is pending, in a worker thread."""
        if self.log is None or not (self.pending or self.overflow):
            return
        await asyncio.to_thread(self._write, self._take())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_FLUSH_S)
            await self.flush()


# -- the local upstream: plain HTTP keep-alive to the protected service -------------------


class _Exchange:
    """One verified request on its way to the protected service. Completes once."""

    __slots__ = ("data", "deadline", "done", "head", "sink")

    def __init__(self, sink: IngressConnection, data: bytes, head: bool) -> None:
        self.sink = sink
        self.data = data
        self.head = head
        self.deadline = 0.0
        self.done = False

    def complete(self, status: int, raw: bytes, passthrough: bool) -> None:
        if not self.done:
            self.done = True
            self.sink.upstream_response(status, raw, passthrough)

    def fail(self, error: ProxyError) -> None:
        if not self.done:
            self.done = True
            self.sink.upstream_failed(error)


class LocalConnection(asyncio.Protocol):
    """One keep-alive connection to the protected service; one exchange at a time.
    The response's bytes are kept as received; httptools finds where it ends."""

    def __init__(self, pool: LocalPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.raw: list[bytes] = []
        self.status = 0
        self.interim = False
        self.body_len = 0
        self.keep_alive = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.abort()  # bytes nobody asked for: the framing cannot be trusted
            return
        self.raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.exchange = None
            self.abort()
            ex.fail(UpstreamUnavailable("the protected service sent a malformed response"))
            return
        if self.status:
            self._deliver(ex)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        self.exchange = None
        self.pool.lost(self)
        if ex is not None:
            # Never resent: the nonce is spent, and the call may have had its effect.
            ex.fail(UpstreamUnavailable("the protected service closed the connection"))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is not None and ex.head:
            self.on_message_complete()  # a HEAD response has no body

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)

    def on_message_complete(self) -> None:
        if self.status:
            return
        status = self.parser.get_status_code()
        if status < 200:
            self.interim = True
            self.body_len = 0
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.status = status

    def _deliver(self, ex: _Exchange) -> None:
        raw = self.raw[0] if len(self.raw) == 1 else b"".join(self.raw)
        keep = self.keep_alive and not ex.head and not self.closed
        passthrough = (
            keep and not self.interim and is_passthrough(raw, raw.find(b"\r\n\r\n"), self.body_len)
        )
        status = self.status
        self.raw, self.body_len, self.status, self.interim = [], 0, 0, False
        self.exchange = None
        # Handed back first, as proxy.upstream's: a pipelined next request finds it idle.
        if keep:
            self.pool.release(self)
        else:
            self.abort()
        ex.complete(status, raw, passthrough)

    def send(self, ex: _Exchange) -> None:
        assert self.transport is not None
        self.exchange = ex
        self.transport.write(ex.data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class LocalPool:
    """Keep-alive connections to the protected service on loopback, opened on demand
    (at most ``max_size``), reused in LIFO order. Runs on the loop; never blocks."""

    def __init__(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        *,
        timeout_s: float,
        max_size: int,
    ) -> None:
        self.host, self.port, self.loop = host, port, loop
        self.timeout_s = timeout_s
        self.max_size = max_size
        self.idle: list[LocalConnection] = []
        self.busy: set[LocalConnection] = set()
        self.waiters: deque[_Exchange] = deque()
        self.connecting = 0
        self.closing = False
        self.last_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy)

    def submit(self, ex: _Exchange) -> None:
        ex.deadline = self.loop.time() + self.timeout_s
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                self.busy.add(conn)
                conn.send(ex)
                return
        self.waiters.append(ex)
        if self.size + self.connecting < self.max_size and self.connecting < len(self.waiters):
            self.connecting += 1
            task = self.loop.create_task(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def release(self, conn: LocalConnection) -> None:
        while self.waiters:
            ex = self.waiters.popleft()
            if not ex.done:
                conn.send(ex)
                return
        self.busy.discard(conn)
        if self.closing:
            conn.abort()
        else:
            self.idle.append(conn)

    def lost(self, conn: LocalConnection) -> None:
        self.busy.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    async def _connect(self) -> None:
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(lambda: LocalConnection(self), self.host, self.port),
                self.timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.size == 0 and self.connecting <= 1:
                # Nothing to wait for: answer at once rather than at the timeout.
                while self.waiters:
                    self.waiters.popleft().fail(
                        UpstreamUnavailable("the protected service is not reachable")
                    )
            return
        finally:
            self.connecting -= 1
        assert isinstance(proto, LocalConnection)
        if self.closing:
            proto.abort()
            return
        self.busy.add(proto)
        self.release(proto)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self.busy):
            ex = conn.exchange
            if ex is not None and ex.deadline <= now:
                ex.fail(UpstreamTimeout("the protected service did not answer in time"))
                conn.exchange = None
                conn.abort()  # a late answer must not be read as the next request's
        expired = [w for w in self.waiters if w.deadline <= now]
        for ex in expired:
            self.waiters.remove(ex)
            ex.fail(UpstreamTimeout("no connection to the protected service in time"))
        if (self.busy or self.waiters) and not self.closing:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    @property
    def in_flight(self) -> bool:
        return bool(self.busy or self.waiters)

    def close(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for conn in [*self.idle, *self.busy]:
            conn.abort()
        self.idle.clear()
        while self.waiters:
            self.waiters.popleft().fail(UpstreamUnavailable("the sidecar is shutting down"))


# -- one ingress listener -----------------------------------------------------------------


class Ingress:
    """Everything one ingress listener's connections share, built once at start-up.

    ``clock`` returns epoch seconds (a seam for tests); ``on_unknown_key`` is called (at
    most once per ``refresh_interval_s``) when a well-formed but unknown key id arrives,
    so the runtime can read the key store at once rather than at its next poll.
    """

    __slots__ = (
        "_last_refresh",
        "audit",
        "caller_lines",
        "clock",
        "config",
        "connections",
        "host_line",
        "metrics",
        "name",
        "nonces",
        "on_unknown_key",
        "pool",
        "refresh_interval_s",
        "table",
        "timing",
        "window_ms",
    )

    def __init__(
        self,
        config: IngressConfig,
        table: KeyTable,
        pool: LocalPool,
        metrics: IngressMetrics,
        audit: RefusalAudit,
        *,
        clock: Callable[[], float] = time.time,
        on_unknown_key: Callable[[], None] | None = None,
        refresh_interval_s: float = 1.0,
        timing: bool = True,
    ) -> None:
        self.config = config
        self.name = config.service
        self.table = table
        self.pool = pool
        self.metrics = metrics
        self.audit = audit
        self.clock = clock
        self.nonces = NonceCache(config.max_skew_ms, config.nonce_capacity)
        self.window_ms = config.max_skew_ms
        host = config.upstream_host
        netloc = f"[{host}]" if ":" in host else host
        self.host_line = b"Host: %s:%d\r\n" % (netloc.encode("ascii"), config.upstream_port)
        # Identity headers per key id, built on first use (a key lives for weeks).
        self.caller_lines: dict[bytes, bytes] = {}
        self.on_unknown_key = on_unknown_key
        self.refresh_interval_s = refresh_interval_s
        self._last_refresh = -1e18
        self.connections = 0
        self.timing = timing  # observe the verification histogram

    def check(
        self, method: bytes, target: bytes, auth: Sequence[bytes | None], body: bytes
    ) -> Verified | Refusal:
        """Verify one request (steps 1-6), counting and auditing a refusal. On the loop."""
        t0 = perf_counter_ns() if self.timing else 0
        now_ms = int(self.clock() * 1000)
        table = self.table
        nonces = self.nonces
        verdict = verify(
            method,
            target,
            auth,
            body,
            keys=table.keys,
            revoked=table.revoked,
            now_ms=now_ms,
            window_ms=self.window_ms,
            floor_ms=nonces.floor_ms,
        )
        # auth[0] is the verified key id's bytes (it matched a table key).
        if type(verdict) is Verified and not nonces.claim(
            auth[0],  # type: ignore[arg-type]
            verdict.nonce,
            verdict.timestamp,
            now_ms,
        ):
            verdict = REPLAYED_NONCE
        if t0:
            self.metrics.verify.observe(perf_counter_ns() - t0)
        if type(verdict) is not Verified:
            assert isinstance(verdict, Refusal)
            self._refused(verdict, method, auth)
        return verdict

    def _refused(self, refusal: Refusal, method: bytes, auth: Sequence[bytes | None]) -> None:
        m = self.metrics
        m.outcomes[I_REFUSED] += 1
        m.refusals[refusal.code] = m.refusals.get(refusal.code, 0) + 1
        raw = auth[0]
        # Only a well-formed key id is recorded: whatever else a caller put in the header
        # (possibly a secret pasted by mistake) never reaches the audit log.
        key_id = None
        if (
            raw is not None
            and raw is not REPEATED
            and KEY_ID_PATTERN.fullmatch(raw.decode("latin-1"))
        ):
            key_id = raw.decode("ascii")
        caller = None
        if key_id is not None:
            vk = self.table.keys.get(raw)  # type: ignore[arg-type]  # raw is bytes here
            caller = vk.caller if vk is not None else None
        self.audit.refused(self.name, key_id, refusal.code, caller, method)
        if refusal.code == "unknown_key" and key_id is not None and self.on_unknown_key:
            now = time.monotonic()
            if now - self._last_refresh >= self.refresh_interval_s:
                self._last_refresh = now
                self.on_unknown_key()

    def identity(self, key: VerifyKey) -> bytes:
        kid = key.key_id_bytes
        lines = self.caller_lines.get(kid)
        if lines is None:
            if len(self.caller_lines) > MAX_REVOKED_REMEMBERED:
                self.caller_lines.clear()
            # Caller names are validated config names and key ids hft_<hex>: no control
            # character can reach a header.
            lines = b"%s: %s\r\n%s: %s\r\n" % (
                CALLER_HEADER,
                key.caller.encode("ascii"),
                CALLER_KEY_HEADER,
                kid,
            )
            self.caller_lines[kid] = lines
        return lines


class _Request(NamedTuple):
    """One parsed request. Immutable; built with ``_new_request(_Request, (...))``: a
    class with an ``__init__`` (or a named tuple's own ``__new__``) costs a Python frame
    entered from C per request (measured, ``loadtests/verify.py``)."""

    method: bytes
    target: bytes
    headers: bytes  # the forwarded lines, b"Name: value\r\n" each
    auth: list[bytes | None]  # the five credentials in AUTH_INDEX order
    body: bytes
    keep_alive: bool


_new_request = tuple.__new__


class IngressConnection(asyncio.Protocol):
    """One caller connection. All methods run on the loop and never block."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.max_body = ingress.config.max_body_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[_Request | ProxyError] = deque()
        self.current: _Request | None = None
        self.processing = False
        self.reading = True
        self.broken = False
        self.eof = False
        self._url = b""
        self._headers: list[bytes] = []
        self._auth: list[bytes | None] = [None] * _N_AUTH
        self._named: set[bytes] | None = None
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.ingress.connections += 1
        sock = transport.get_extra_info("socket")
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
        self.eof = True
        if self.current is None and not self.pending:
            return None
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ingress.connections -= 1
        self.transport = None
        self.pending.clear()

    # httptools callbacks
    # No on_message_begin (a callback per request saved): on_message_complete resets the
    # per-message state; a message that fails to parse ends the connection anyway.

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise HeadersTooLarge("request line and headers are too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Per header, so kept short: the five credentials go to fixed slots (a repeat
        # overwrites, so they cannot grow memory); only forwarded lines count toward
        # MAX_HEADERS; every byte counts toward MAX_HEADER_BYTES (4 for ": " and CRLF).
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise HeadersTooLarge("request line and headers are too large")
        kind = _KNOWN_KIND(name)
        if kind is None:
            kind = _learn_kind(name)
        if kind < _FORWARD:
            # The credentials are checked here and never forwarded.
            auth = self._auth
            auth[kind] = value if auth[kind] is None else REPEATED
        elif kind == _FORWARD:
            headers = self._headers
            if len(headers) >= MAX_HEADERS:
                raise HeadersTooLarge("too many headers")
            headers.append(b"%s: %s\r\n" % (name, value))
        elif kind == _LENGTH:
            try:
                declared = int(value)
            except ValueError:
                raise BadRequest("invalid Content-Length") from None
            if declared > self.max_body:
                raise BodyTooLarge(f"body larger than {self.max_body} bytes")
        elif kind == _CONNECTION:
            tokens = {t.strip().lower() for t in value.split(b",")} - PLAIN_CONNECTION
            if tokens:
                self._named = (self._named or set()) | tokens

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.max_body:
            raise BodyTooLarge(f"body larger than {self.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        lines = self._headers
        if self._named:
            named = self._named
            lines = [ln for ln in lines if ln.split(b":", 1)[0].lower() not in named]
        parser = self.parser
        req = _new_request(
            _Request,
            (
                parser.get_method(),
                self._url,
                b"".join(lines),
                self._auth,
                body,
                parser.should_keep_alive(),
            ),
        )
        self._url = b""
        self._headers = []
        self._auth = [None] * _N_AUTH
        self._named = None
        self._header_bytes = 0
        self._body = []
        self._body_len = 0
        if self.current is None and not self.pending and not self.processing:
            self._dispatch(req)  # the common case, one request at a time: no queue
            return
        self.pending.append(req)
        if len(self.pending) >= MAX_PIPELINED and self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()
        if not self.processing and self.current is None:
            self._process()

    # handling
    def _fail(self, error: ProxyError) -> None:
        self.broken = True
        self.pending.append(error)
        if self.current is None and not self.processing:
            self._process()

    def _process(self) -> None:
        self.processing = True
        try:
            while self.current is None and self.pending and self.transport is not None:
                item = self.pending.popleft()
                if isinstance(item, ProxyError):
                    self.ingress.metrics.outcomes[I_BAD_REQUEST] += 1
                    self._write_error(item.status, item.code, item.message, keep_alive=False)
                    continue
                self._dispatch(item)
            if self.eof and self.current is None and not self.pending:
                self._close()
            elif not self.reading and len(self.pending) < MAX_PIPELINED // 2 and self.transport:
                self.reading = True
                self.transport.resume_reading()
        finally:
            self.processing = False

    def _dispatch(self, req: _Request) -> None:
        ingress = self.ingress
        if not req.target.startswith(b"/"):
            ingress.metrics.outcomes[I_BAD_REQUEST] += 1
            self._write_error(
                400, "bad_request", "request target must be an absolute path", keep_alive=False
            )
            return
        verdict = ingress.check(req.method, req.target, req.auth, req.body)
        if type(verdict) is not Verified:
            assert isinstance(verdict, Refusal)
            extra = _WWW_AUTHENTICATE if verdict.status == 401 else ()
            self._write_error(
                verdict.status,
                verdict.code,
                verdict.message,
                keep_alive=req.keep_alive,
                extra=extra,
            )
            if not req.keep_alive:
                self._close()
            return
        assert isinstance(verdict, Verified)
        # Exactly the bytes that were verified: method, target and body as received.
        data = build_request(
            req.method,
            req.target,
            ingress.host_line,
            req.headers,
            ingress.identity(verdict.key),
            req.body,
        )
        self.current = req
        ingress.pool.submit(_Exchange(self, data, req.method == b"HEAD"))

    # the protected service's answer (LocalPool callbacks)
    def upstream_response(self, status: int, raw: bytes, passthrough: bool) -> None:
        req = self.current
        self.current = None
        transport = self.transport
        if req is None or transport is None:
            return
        self.ingress.metrics.outcomes[I_OK] += 1
        if passthrough and req.keep_alive:
            transport.write(raw)
        else:
            transport.write(reframed(raw, status, req.keep_alive, req.method == b"HEAD"))
        self._after(req)

    def upstream_failed(self, error: ProxyError) -> None:
        req = self.current
        self.current = None
        if req is None or self.transport is None:
            return
        self.ingress.metrics.outcomes[I_UPSTREAM_FAILED] += 1
        self._write_error(error.status, error.code, error.message, keep_alive=req.keep_alive)
        self._after(req)

    def _after(self, req: _Request) -> None:
        if not req.keep_alive:
            self._close()
        elif not self.processing and (self.pending or self.eof or not self.reading):
            self._process()

    def _write_error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        keep_alive: bool,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        if self.transport is None:
            return
        self.transport.write(
            error_response(status, code, message, keep_alive=keep_alive, extra_headers=extra)
        )
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.pending.clear()


def build_tables(
    ingress: Sequence[IngressConfig],
    rings: Mapping[str, KeyRing],
    overlap: timedelta,
    now: datetime,
) -> dict[str, KeyTable]:
    """One KeyTable per ingress, filled from the callers' rings held at start-up."""
    tables: dict[str, KeyTable] = {}
    for cfg in ingress:
        table = KeyTable(cfg.accept, overlap)
        for caller in cfg.accept:
            ring = rings.get(caller)
            if ring is not None:
                table.update(caller, ring, now)
        tables[cfg.service] = table
    return tables
