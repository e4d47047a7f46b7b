"""What the HMAC-only venue simulators (Kraken, BitMEX, Gemini, Deribit) share.

Imports nothing from ``proxy`` outside this package, nor ``keycache``: the simulator stays
an independent oracle for the sidecar's signers.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import secrets
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.simulator.base import KeySetError, compact_json

DEFAULT_ACCOUNT = "main"


@dataclass(frozen=True, slots=True)
class SharedSecretKey:
    """An HMAC API key as the venue holds it: the id, the raw secret bytes, its account."""

    api_key: str
    secret: bytes = field(repr=False)
    algorithm: str
    account: str = DEFAULT_ACCOUNT


def _text(entry: Mapping[str, object], name: str, where: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise KeySetError(f"{where}.{name}", "must be a non-empty string")
    return value


def decode_base64_secret(text: str) -> bytes:
    """Kraken's secrets are standard base64; raises ValueError if not."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not base64") from exc


def parse_shared_secret_keys(
    entries: object,
    path: str,
    algorithm: str,
    decode: Callable[[str], bytes] = lambda s: s.encode("utf-8"),
) -> dict[str, SharedSecretKey]:
    """Validate a keys-document list ``[{"api_key", "algorithm", "secret", "account"?}]``.

    Every key must use ``algorithm`` (the venue's scheme fixes it); ``decode`` turns the
    secret text into the HMAC key bytes. Raises KeySetError naming the first bad field.
    """
    if not isinstance(entries, list):
        raise KeySetError(path, "must be a list of key objects")
    keys: dict[str, SharedSecretKey] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise KeySetError(where, "must be an object")
        api_key = _text(entry, "api_key", where)
        if api_key in keys:
            raise KeySetError(f"{where}.api_key", "duplicate api_key")
        if entry.get("algorithm") != algorithm:
            raise KeySetError(f"{where}.algorithm", f"must be {algorithm}")
        try:
            secret = decode(_text(entry, "secret", where))
        except ValueError as exc:
            raise KeySetError(f"{where}.secret", str(exc)) from exc
        account = entry.get("account", DEFAULT_ACCOUNT)
        if not isinstance(account, str) or not account:
            raise KeySetError(f"{where}.account", "must be a non-empty string")
        keys[api_key] = SharedSecretKey(api_key, secret, algorithm, account)
    return keys


class TokenBucket:
    """A per-id token bucket (capacity, refill per second) on the simulator's ms clock."""

    __slots__ = ("_capacity", "_refill_per_ms", "_state")

    def __init__(self, capacity: float, refill_per_s: float) -> None:
        self._capacity = capacity
        self._refill_per_ms = refill_per_s / 1000
        self._state: dict[str, tuple[float, int]] = {}

    def take(self, ident: str, now_ms: int, cost: float = 1.0) -> tuple[bool, float]:
        """Spend ``cost`` if available; return (allowed, tokens left afterwards)."""
        tokens, at = self._state.get(ident, (self._capacity, now_ms))
        tokens = min(self._capacity, tokens + max(0, now_ms - at) * self._refill_per_ms)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._state[ident] = (tokens, now_ms)
        return allowed, tokens

    def ms_until(self, ident: str, cost: float = 1.0) -> int:
        """How long until ``cost`` tokens are available again (after a refused take)."""
        tokens, _ = self._state.get(ident, (self._capacity, 0))
        missing = max(0.0, cost - tokens)
        return int(missing / self._refill_per_ms) + 1 if missing else 0


_ids = itertools.count(1)


def next_id() -> int:
    """A process-wide increasing integer for order ids."""
    return next(_ids)


def random_token(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Compact JSON, as the venues send it."""
    return web.Response(
        text=compact_json(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def raw_target(request: web.Request) -> bytes:
    """The request target exactly as received (aiohttp decodes it with surrogateescape)."""
    return request.raw_path.encode("utf-8", "surrogateescape")


def form_params(raw: bytes) -> dict[str, str] | None:
    """Decode a form/query string (last value wins); None if it is not UTF-8."""
    try:
        pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    return dict(pairs)
