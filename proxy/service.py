"""A service at run time: its compiled config, its signers and its upstream pool.

``ServiceRuntime.prepare`` is the pure heart of the hot path: from the engine's request
pieces to the exact bytes sent to the venue. ``authproxy sign`` calls the same function.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keycache.ring import KeyRing, LiveKey
from proxy.access import Access
from proxy.config import ServiceConfig
from proxy.errors import BadRequest, NoUsableKey
from proxy.http11 import build_request, drop_set, forwardable_headers, normalize_target_part
from proxy.metrics import ServiceMetrics
from proxy.ratelimit import limiter_for
from proxy.signers import VENUES, KeySigner, SignerContext, Venue
from proxy.venue_limits import limits_for

# Headers an engine may send that never reach a venue: hop-by-hop and framing headers,
# the sidecar's own, and every venue's credential headers (the sidecar sets those).
REQUEST_DROP = drop_set(frozenset().union(*(v.credential_headers for v in VENUES.values())))


def encode_request_headers(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A header list as the forwardable lines ``prepare`` takes (for the CLI and tests)."""
    return forwardable_headers(headers, REQUEST_DROP)


@dataclass(frozen=True, slots=True)
class _Slot:
    """A live key's signer and the epoch seconds between which it may sign."""

    signer: KeySigner
    version: int
    activates: float
    expires: float


class KeySet:
    """The signers of one service's live keys, built once per key ring.

    A rotation builds a new KeySet and swaps one reference. ``signer_for`` is O(1) in the
    common case: the choice is cached until the next activation or expiry boundary.
    """

    __slots__ = ("_cached", "_until", "overlap", "ring", "slots")

    def __init__(
        self,
        ring: KeyRing,
        venue: Venue,
        service: ServiceConfig,
        context: SignerContext | None = None,
    ) -> None:
        self.ring = ring
        ctx = context or SignerContext()
        self.slots: tuple[_Slot, ...] = tuple(
            _Slot(
                venue.signer(key, service, ctx),
                key.version,
                key.meta.activates_at.timestamp() if key.meta.activates_at else 0.0,
                key.meta.expires_at.timestamp(),
            )
            for key in ring.keys
        )
        self._cached: _Slot | None = None
        self._until = -1.0
        # Two keys live: a key the venue refuses may be retried with the other one.
        self.overlap = len(self.slots) > 1

    def signer_for(self, now: float) -> KeySigner:
        """The newest key whose activation has passed and that has not expired."""
        if now < self._until and self._cached is not None:
            return self._cached.signer
        chosen: _Slot | None = None
        for slot in reversed(self.slots):
            if slot.activates <= now < slot.expires:
                chosen = slot
                break
        if chosen is None:
            self._cached, self._until = None, -1.0
            raise NoUsableKey("no live key for this service (expired, revoked or not active yet)")
        boundaries = [s.activates for s in self.slots if s.activates > now]
        self._cached = chosen
        self._until = min([chosen.expires, *boundaries])
        return chosen.signer

    def fallback_for(self, used: KeySigner, now: float) -> KeySigner | None:
        """Another usable key's signer (newest first), or None outside an overlap window."""
        for slot in reversed(self.slots):
            if slot.signer is not used and slot.activates <= now < slot.expires:
                return slot.signer
        return None

    def live_keys(self) -> tuple[LiveKey, ...]:
        return self.ring.keys


class ServiceRuntime:
    """Everything the hot path needs for one service, precomputed at start-up."""

    __slots__ = (
        "access",
        "clock_offset_ms",
        "config",
        "costs",
        "fallbacks",
        "host_line",
        "key_refusal_in_2xx",
        "keys",
        "limiter",
        "metrics",
        "name",
        "park_timer",
        "parked",
        "pool",
        "reads_usage",
        "route",
        "usage_due",
        "venue",
        "venue_drop",
        "wait_us",
    )

    def __init__(self, config: ServiceConfig, keys: KeySet | None) -> None:
        self.config = config
        self.name = config.name
        self.route = config.route.encode("ascii")
        self.venue: Venue = VENUES[config.venue]
        # Engine headers a venue's signer replaces (Gemini sets its own Content-Type).
        self.venue_drop: frozenset[bytes] = getattr(self.venue, "replaces_headers", frozenset())
        # Whether a 2xx answer can still be "key not accepted" (its body decides).
        self.key_refusal_in_2xx: bool = getattr(self.venue, "key_refusal_in_2xx", False)
        self.host_line = b"Host: %s\r\n" % config.host_header.encode("idna")
        # What engines may call (proxy.access); set by the runtime from the config and the
        # key type's permissions. None: no check (tools that sign one request, tests).
        self.access: Access | None = None
        self.keys = keys
        self.pool: object | None = None  # the UpstreamPool, attached by the runtime
        # venue clock minus ours, from proxy.clock; added to every timestamp we sign
        self.clock_offset_ms = 0
        rates = config.rate_limit
        # What the venue counts (its windows, each endpoint's weight, its usage headers).
        self.costs = limits_for(config.venue)
        self.reads_usage = self.costs.reads_headers
        self.usage_due = 0.0  # when the venue's usage headers are next read (proxy.server)
        # The service's budget, shared by every engine connection (proxy.ratelimit).
        self.limiter = limiter_for(
            rates.requests_per_second if rates else None,
            rates.requests_per_minute if rates else None,
            self.costs.windows,
        )
        # on_limit.wait_ms: requests over the budget wait here, in arrival order, for up
        # to wait_us (proxy.server parks them; one timer per service releases them).
        self.wait_us = config.on_limit_wait_ms * 1000
        self.parked: deque[Any] = deque()
        self.park_timer: asyncio.TimerHandle | None = None
        self.fallbacks = 0  # requests re-signed with the other key of an overlap pair
        # proxy.metrics.ServiceMetrics, bound at start-up when metrics are on
        self.metrics: ServiceMetrics | None = None

    def prepare(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        headers: bytes,
        body: bytes,
        now: float | None = None,
    ) -> bytes:
        """The exact request bytes to send to the venue. Raises BadRequest, NoUsableKey.

        ``path`` is the venue path (the route prefix removed), ``query`` the raw query,
        ``headers`` the engine's end-to-end header lines, already filtered through
        ``REQUEST_DROP`` (``encode_request_headers`` does that for a header list).
        """
        if now is None:
            now = time.time()
        return self.prepare_with(self.signer_for(now), method, path, query, headers, body, now)

    def signer_for(self, now: float) -> KeySigner:
        """The signer of the key that signs now. Raises NoUsableKey."""
        keys = self.keys
        if keys is None:
            raise NoUsableKey(f"no key loaded for service {self.name}")
        return keys.signer_for(now)

    def prepare_with(
        self,
        signer: KeySigner,
        method: bytes,
        path: bytes,
        query: bytes,
        headers: bytes,
        body: bytes,
        now: float,
    ) -> bytes:
        """``prepare`` with a given key's signer (the fallback path re-signs with another)."""
        norm_path = normalize_target_part(path)
        norm_query = normalize_target_part(query)
        if norm_path is None or norm_query is None:
            raise BadRequest("control characters or spaces in the request target")
        target, credentials, body = signer.sign(
            method, norm_path, norm_query, body, int(now * 1000) + self.clock_offset_ms
        )
        if self.venue_drop and headers:
            drop = self.venue_drop
            headers = b"".join(
                line + b"\r\n"
                for line in headers.split(b"\r\n")
                if line and line.split(b":", 1)[0].strip().lower() not in drop
            )
        return build_request(method, target, self.host_line, headers, credentials, body)
