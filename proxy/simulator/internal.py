"""An internal service of the firm, verifying ``HFT-AUTH-V1`` as its ingress would.

Written from ``docs/internal-auth.md`` alone, independently of the sidecar's signer
(``proxy/signers/internal.py``), so it can serve as that signer's oracle: it imports
nothing from ``proxy`` outside this package, nor ``keycache``.

The core is :func:`verify_internal`, a synchronous function over bytes, plus the
:class:`NonceCache` (bounded by time and count) and a fixed-window per-key rate limit.
:class:`InternalVenue` adapts aiohttp requests to them and answers a small JSON service:

- ``/internal/v1/echo`` (any method): what was received, with the body parsed as JSON;
- ``GET /internal/v1/positions``: a fixed book of positions for the key's account.

Keys document entries: ``{"api_key": "hft_<32 hex>", "algorithm": "hmac-sha256",
"secret": "...", "account"?: str, "rate_limit_per_minute"?: int}``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from aiohttp import web

from proxy.simulator.base import Clock, Commit, KeySetError, compact_json, note_of

VENUE_NAME = "internal"
ALGORITHM = "hmac-sha256"
VERSION_TAG = b"HFT-AUTH-V1"

KEY_ID_HEADER = "X-Auth-Key-Id"
TIMESTAMP_HEADER = "X-Auth-Timestamp"
NONCE_HEADER = "X-Auth-Nonce"
CONTENT_HEADER = "X-Auth-Content-SHA256"
SIGNATURE_HEADER = "X-Auth-Signature"
AUTH_HEADERS = (KEY_ID_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, CONTENT_HEADER, SIGNATURE_HEADER)

# docs/internal-auth.md "Verification": ±30 s around the service's clock.
WINDOW_MS = 30_000
# Nonces remembered at most (about 3 MB); past that the oldest go and the floor rises.
NONCE_CAPACITY = 100_000
RATE_WINDOW_MS = 60_000

_KEY_ID_RE = re.compile(r"hft_[0-9a-f]{32}")
_TIMESTAMP_RE = re.compile(r"[1-9][0-9]{0,15}")  # no sign, no leading zero: one spelling
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- refusals


@dataclass(frozen=True, slots=True)
class InternalError:
    """A refusal as the service sends it: status and ``{"error": {"code", "message"}}``."""

    status: int
    code: str
    message: str

    def body(self) -> dict[str, object]:
        """The JSON body of the refusal."""
        return {"error": {"code": self.code, "message": self.message}}


def _malformed(message: str) -> InternalError:
    return InternalError(400, "malformed_auth", message)


ERR_UNKNOWN_KEY = InternalError(401, "unknown_key", "no such key id")
ERR_REVOKED_KEY = InternalError(401, "revoked_key", "this key was revoked")
ERR_STALE = InternalError(401, "stale_timestamp", "timestamp outside the ±30 s window")
ERR_BELOW_FLOOR = InternalError(
    401, "stale_timestamp", "timestamp at or below the replay floor; send a fresh request"
)
ERR_CONTENT = InternalError(401, "bad_signature", "X-Auth-Content-SHA256 does not match the body")
ERR_SIGNATURE = InternalError(401, "bad_signature", "signature does not match")
ERR_REPLAYED = InternalError(401, "replayed_nonce", "this nonce was already used with this key")


def err_rate_limited(limit: int) -> InternalError:
    """429 for a key over its per-minute budget."""
    return InternalError(429, "rate_limited", f"more than {limit} requests per minute")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class InternalKey:
    """One caller key as the service holds it."""

    api_key: str
    secret: bytes = field(repr=False)
    account: str = "main"
    rate_limit_per_minute: int | None = None
    algorithm: ClassVar[str] = ALGORITHM


def parse_internal_keys(entries: object, path: str = VENUE_NAME) -> dict[str, InternalKey]:
    """Validate this venue's list in a keys document; raise KeySetError naming the field."""
    if not isinstance(entries, list):
        raise KeySetError(path, "must be a list of key objects")
    keys: dict[str, InternalKey] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise KeySetError(where, "must be an object")
        api_key = entry.get("api_key")
        if not isinstance(api_key, str) or _KEY_ID_RE.fullmatch(api_key) is None:
            raise KeySetError(f"{where}.api_key", "must be hft_ followed by 32 lowercase hex")
        if api_key in keys:
            raise KeySetError(f"{where}.api_key", "duplicate api_key")
        if entry.get("algorithm") != ALGORITHM:
            raise KeySetError(f"{where}.algorithm", f"must be {ALGORITHM}")
        secret = entry.get("secret")
        if not isinstance(secret, str) or not secret:
            raise KeySetError(f"{where}.secret", "must be a non-empty string")
        account = entry.get("account", "main")
        if not isinstance(account, str) or not account:
            raise KeySetError(f"{where}.account", "must be a non-empty string")
        limit = entry.get("rate_limit_per_minute")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise KeySetError(f"{where}.rate_limit_per_minute", "must be an integer")
        if isinstance(limit, int) and limit < 1:
            raise KeySetError(f"{where}.rate_limit_per_minute", "must be at least 1")
        keys[api_key] = InternalKey(api_key, secret.encode("utf-8"), account, limit)
    return keys


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class InternalAccepted:
    """A request whose headers, key, time, body hash and signature all verified.

    The nonce is not claimed yet: the caller does that (:meth:`NonceCache.claim`).
    """

    key: InternalKey
    timestamp: int
    nonce: str


def _one_header(headers: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = headers.get(name, ())
    return values[0] if len(values) == 1 else None


def verify_internal(
    *,
    method: bytes,
    path: bytes,
    query: bytes,
    headers: Mapping[str, Sequence[str]],
    body: bytes,
    keys: Mapping[str, InternalKey],
    revoked: frozenset[str] | set[str],
    now_ms: int,
    floor_ms: int = -1,
) -> InternalAccepted | InternalError:
    """Steps 1-5 of docs/internal-auth.md "Verification"; pure, never raises.

    ``path`` and ``query`` are the request-target bytes before and after the first ``?``
    exactly as received; ``headers`` maps each auth header name to all its values;
    ``floor_ms`` is the nonce cache's replay floor.
    """
    values: dict[str, str] = {}
    for name in AUTH_HEADERS:
        value = _one_header(headers, name)
        if value is None:
            return _malformed(f"{name} must be sent exactly once")
        values[name] = value
    key_id = values[KEY_ID_HEADER]
    raw_ts = values[TIMESTAMP_HEADER]
    nonce = values[NONCE_HEADER]
    content = values[CONTENT_HEADER]
    signature = values[SIGNATURE_HEADER]
    if _KEY_ID_RE.fullmatch(key_id) is None:
        return _malformed(f"{KEY_ID_HEADER} must be hft_ followed by 32 lowercase hex")
    if _TIMESTAMP_RE.fullmatch(raw_ts) is None:
        return _malformed(f"{TIMESTAMP_HEADER} must be epoch milliseconds, no leading zero")
    if _NONCE_RE.fullmatch(nonce) is None:
        return _malformed(f"{NONCE_HEADER} must be 32 lowercase hex digits")
    if _HEX64_RE.fullmatch(content) is None:
        return _malformed(f"{CONTENT_HEADER} must be 64 lowercase hex digits")
    if _HEX64_RE.fullmatch(signature) is None:
        return _malformed(f"{SIGNATURE_HEADER} must be 64 lowercase hex digits")

    key = keys.get(key_id)
    if key is None:
        return ERR_REVOKED_KEY if key_id in revoked else ERR_UNKNOWN_KEY

    timestamp = int(raw_ts)
    if abs(now_ms - timestamp) > WINDOW_MS:
        return ERR_STALE
    if timestamp <= floor_ms:
        return ERR_BELOW_FLOOR

    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), content):
        return ERR_CONTENT
    if b"\n" in method or b"\n" in path or b"\n" in query:
        return ERR_SIGNATURE  # cannot happen over HTTP/1.1; never sign an ambiguous string
    canonical = b"\n".join(
        (VERSION_TAG, method, path, query, raw_ts.encode(), nonce.encode(), content.encode())
    )
    expected = hmac.new(key.secret, canonical, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return ERR_SIGNATURE
    return InternalAccepted(key=key, timestamp=timestamp, nonce=nonce)


class NonceCache:
    """(key id, nonce) pairs accepted within the window, bounded by ``capacity``.

    Entries leave when their timestamp drops below ``now - window_ms`` (the time check
    refuses those anyway). When full, the oldest-timestamp entry is dropped and
    :attr:`floor_ms` rises to its timestamp: requests at or below the floor are refused
    as stale, so dropping an entry never re-opens a replay. Loop thread only.
    """

    __slots__ = ("_capacity", "_heap", "_seen", "_window_ms", "floor_ms")

    def __init__(self, *, window_ms: int = WINDOW_MS, capacity: int = NONCE_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._window_ms = window_ms
        self._capacity = capacity
        self._seen: set[tuple[str, str]] = set()
        self._heap: list[tuple[int, str, str]] = []
        self.floor_ms = -1

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self._window_ms
        heap = self._heap
        while heap and heap[0][0] < horizon:
            _, key_id, nonce = heapq.heappop(heap)
            self._seen.discard((key_id, nonce))

    def claim(self, key_id: str, nonce: str, timestamp: int, now_ms: int) -> InternalError | None:
        """Record the pair; None if it is new, else the refusal to send."""
        self._expire(now_ms)
        entry = (key_id, nonce)
        if entry in self._seen:
            return ERR_REPLAYED
        if timestamp <= self.floor_ms:
            return ERR_BELOW_FLOOR
        if len(self._seen) >= self._capacity:
            oldest, old_key, old_nonce = heapq.heappop(self._heap)
            self._seen.discard((old_key, old_nonce))
            self.floor_ms = max(self.floor_ms, oldest)
            if timestamp <= self.floor_ms:
                return ERR_BELOW_FLOOR
        self._seen.add(entry)
        heapq.heappush(self._heap, (timestamp, key_id, nonce))
        return None


class RateCounter:
    """Requests per key in fixed windows aligned to ``window_ms``. Loop thread only."""

    __slots__ = ("_counts", "_window_ms")

    def __init__(self, window_ms: int = RATE_WINDOW_MS) -> None:
        self._window_ms = window_ms
        self._counts: dict[str, tuple[int, int]] = {}

    def add(self, key: str, now_ms: int) -> tuple[int, int]:
        """Count one request; return (the window's total, ms until the window ends)."""
        window = now_ms // self._window_ms
        current, total = self._counts.get(key, (window, 0))
        total = total + 1 if current == window else 1
        self._counts[key] = (window, total)
        return total, (window + 1) * self._window_ms - now_ms


# --------------------------------------------------------------------------- the service


def _target_bytes(request: web.Request) -> tuple[bytes, bytes]:
    """Path and query exactly as on the request line (aiohttp decodes with surrogateescape)."""
    raw = request.raw_path.encode("utf-8", "surrogateescape")
    path, _, query = raw.partition(b"?")
    return path, query


_POSITIONS: Sequence[tuple[str, str, str]] = (
    ("BTCUSDT", "0.50000000", "65000.00"),
    ("ETHUSDT", "-3.00000000", "3500.00"),
)


class InternalVenue:
    """Routes and state of the simulated internal service. Loop thread only."""

    name = VENUE_NAME

    def __init__(self, *, clock: Clock, nonce_capacity: int = NONCE_CAPACITY) -> None:
        self._clock = clock
        self._keys: Mapping[str, InternalKey] = {}
        self._revoked: frozenset[str] = frozenset()
        self.nonces = NonceCache(capacity=nonce_capacity)
        self._rates = RateCounter()

    # ----- key management (Venue protocol)

    def prepare_keys(self, entries: object, path: str) -> Commit:
        """Validate ``entries``; the returned function swaps them in."""
        keys = parse_internal_keys(entries, path)

        def commit() -> None:
            self._keys = keys
            self._revoked = self._revoked - keys.keys()  # re-registering un-revokes

        return commit

    def revoke_key(self, api_key: str) -> bool:
        """Drop ``api_key`` at once and remember it was revoked; True if it was known."""
        if api_key not in self._keys:
            return False
        self._keys = {k: v for k, v in self._keys.items() if k != api_key}
        self._revoked = self._revoked | {api_key}
        return True

    def api_keys(self) -> list[str]:
        """The accepted key ids."""
        return sorted(self._keys)

    def routes(self) -> Sequence[web.RouteDef]:
        """The internal service's routes."""
        return [
            web.route("*", "/internal/v1/echo", self._authenticated(self._echo)),
            web.get(
                "/internal/v1/positions",
                self._authenticated(self._positions),
                allow_head=False,
            ),
        ]

    # ----- adapters

    @staticmethod
    def _json(
        payload: object, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            text=compact_json(payload),
            status=status,
            content_type="application/json",
            headers=headers,
        )

    def _refuse(
        self, request: web.Request, error: InternalError, extra: Mapping[str, str] | None = None
    ) -> web.Response:
        note_of(request).verdict = error.code
        headers = dict(extra or {})
        if error.status == 401:
            headers["WWW-Authenticate"] = "HFT-AUTH-V1"
        return self._json(error.body(), error.status, headers)

    def _authenticated(
        self, action: Callable[[web.Request, InternalAccepted, bytes, int], web.Response]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            key_id = request.headers.get(KEY_ID_HEADER)
            note.api_key = key_id
            note.algorithm = ALGORITHM if key_id in self._keys else None
            body = await request.read()
            path, query = _target_bytes(request)
            now = self._clock()
            verdict = verify_internal(
                method=request.method.encode("ascii"),
                path=path,
                query=query,
                headers={name: request.headers.getall(name, []) for name in AUTH_HEADERS},
                body=body,
                keys=self._keys,
                revoked=self._revoked,
                now_ms=now,
                floor_ms=self.nonces.floor_ms,
            )
            if isinstance(verdict, InternalError):
                return self._refuse(request, verdict)
            replay = self.nonces.claim(verdict.key.api_key, verdict.nonce, verdict.timestamp, now)
            if replay is not None:
                return self._refuse(request, replay)
            limit = verdict.key.rate_limit_per_minute
            if limit is not None:
                count, remaining_ms = self._rates.add(verdict.key.api_key, now)
                if count > limit:
                    retry = str(max(1, -(-remaining_ms // 1000)))
                    return self._refuse(request, err_rate_limited(limit), {"Retry-After": retry})
            return action(request, verdict, body, now)

        return handle

    # ----- endpoints

    def _echo(
        self, request: web.Request, accepted: InternalAccepted, body: bytes, now: int
    ) -> web.Response:
        parsed: object = None
        if body:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                error = InternalError(400, "bad_json", "the body is not JSON")
                return self._refuse(request, error)
        path, query = _target_bytes(request)
        return self._json(
            {
                "key_id": accepted.key.api_key,
                "account": accepted.key.account,
                "method": request.method,
                "path": path.decode("ascii", "replace"),
                "query": query.decode("ascii", "replace"),
                "timestamp": accepted.timestamp,
                "nonce": accepted.nonce,
                "body": parsed,
                "received_at": now,
            }
        )

    def _positions(
        self, request: web.Request, accepted: InternalAccepted, body: bytes, now: int
    ) -> web.Response:
        return self._json(
            {
                "account": accepted.key.account,
                "as_of": now,
                "positions": [
                    {"symbol": s, "quantity": q, "entry_price": p} for s, q, p in _POSITIONS
                ],
            }
        )


__all__ = [
    "AUTH_HEADERS",
    "WINDOW_MS",
    "InternalAccepted",
    "InternalError",
    "InternalKey",
    "InternalVenue",
    "NonceCache",
    "RateCounter",
    "parse_internal_keys",
    "verify_internal",
]
