"""The firm's own scheme for service-to-service calls: ``HFT-AUTH-V1``.

The definition lives in ``docs/internal-auth.md`` (this module and the simulator's
verifier in ``proxy/simulator/internal.py`` are two independent readings of it):

- Key ids are ``hft_<32 lowercase hex>`` (``keycache.record.new_key_id``); keys are
  HMAC-SHA256 secrets, used as their UTF-8 bytes.
- Five headers: ``X-Auth-Key-Id``, ``X-Auth-Timestamp`` (epoch ms, decimal),
  ``X-Auth-Nonce`` (128 random bits, 32 lowercase hex), ``X-Auth-Content-SHA256``
  (lowercase hex SHA-256 of the body as sent, empty body included) and
  ``X-Auth-Signature`` = lowercase hex HMAC-SHA256(secret, canonical string).
- The canonical string is seven fields joined by ``"\\n"``: ``HFT-AUTH-V1``, METHOD, path,
  query (the raw bytes after the first ``?``, empty when none), timestamp, nonce, body
  hash. No field may contain ``"\\n"``, so the split is unambiguous.

The verifier's pure core lives here too (``verify``, ``NonceCache``), next to the signer,
so both build the canonical string with the same function (``canonical``); the ingress
listener (``proxy/ingress.py``) is its I/O shell.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from binascii import hexlify
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from keycache.ring import LiveKey
from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.signers.base import KeySigner, Rejection, SignerContext, TimeEndpoint, json_field

VERSION = b"HFT-AUTH-V1"
HEADER_KEY_ID = "X-Auth-Key-Id"
HEADER_TIMESTAMP = "X-Auth-Timestamp"
HEADER_NONCE = "X-Auth-Nonce"
HEADER_CONTENT_SHA256 = "X-Auth-Content-SHA256"
HEADER_SIGNATURE = "X-Auth-Signature"
NONCE_BYTES = 16  # 128 bits: a collision within the replay window is never a concern
KEY_ID_PATTERN = re.compile(r"hft_[0-9a-f]{32}")

#: The scheme's five headers, as this signer spells them.
HEADER_NAMES = (
    HEADER_KEY_ID,
    HEADER_TIMESTAMP,
    HEADER_NONCE,
    HEADER_CONTENT_SHA256,
    HEADER_SIGNATURE,
)

_CREDENTIAL_HEADERS = frozenset(h.lower().encode("ascii") for h in HEADER_NAMES)

# Everything after the key-id line, built once: only the four values vary per request.
_LINES = b"%s: %%s\r\n%s: %%s\r\n%s: %%s\r\n%s: %%s\r\n" % tuple(
    h.encode("ascii")
    for h in (HEADER_TIMESTAMP, HEADER_NONCE, HEADER_CONTENT_SHA256, HEADER_SIGNATURE)
)


class _InternalSigner:
    """Signs with one internal key; the keyed HMAC and the key-id line are built once."""

    __slots__ = ("_keyed", "_nonce", "_prefix", "key_id")

    def __init__(self, key: LiveKey, nonce_source: Callable[[int], bytes]) -> None:
        self.key_id = key.meta.key_id
        self._nonce = nonce_source
        if key.meta.algorithm != "hmac-sha256":
            raise SigningError(f"internal keys are hmac-sha256, not {key.meta.algorithm}")
        if KEY_ID_PATTERN.fullmatch(self.key_id) is None:
            # The verifier refuses any other shape; failing here names the bad record.
            raise SigningError(f"internal key id {self.key_id!r} is not hft_<32 hex>")
        import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

        # Keyed once; each request copies the keyed state (cheaper than re-keying).
        self._keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")
        # The key id is validated hex above: no control character can reach the header.
        self._prefix = b"%s: %s\r\n" % (HEADER_KEY_ID.encode(), self.key_id.encode("ascii"))

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        # The separator must not occur inside a field, or bytes could move between fields.
        # prepare() already refuses controls in the target; this guards direct callers.
        if method.find(b"\n") >= 0 or path.find(b"\n") >= 0 or query.find(b"\n") >= 0:
            raise SigningError("a newline in the method, path or query cannot be signed")
        timestamp = b"%d" % now_ms
        nonce = hexlify(self._nonce(NONCE_BYTES))
        content = hexlify(hashlib.sha256(body).digest())
        h = self._keyed.copy()
        h.update(canonical(method, path, query, timestamp, nonce, content))
        headers = self._prefix + _LINES % (timestamp, nonce, content, hexlify(h.digest()))
        return (path + b"?" + query if query else path), headers, body


# The refusal codes of docs/internal-auth.md ("Refusals"). Only the body decides: our own
# services always send these bodies, so an unknown body (say, from a load balancer in
# between) is not a definitive "key not accepted" and must not trigger the key fallback.
_CODES: dict[str, Rejection] = {
    "unknown_key": Rejection.KEY_REJECTED,
    "revoked_key": Rejection.KEY_REJECTED,
    "bad_signature": Rejection.BAD_SIGNATURE,
    "stale_timestamp": Rejection.CLOCK_OR_NONCE,
    "replayed_nonce": Rejection.CLOCK_OR_NONCE,
    "rate_limited": Rejection.RATE_LIMITED,
}
_STATUSES: dict[int, Rejection] = {
    429: Rejection.RATE_LIMITED,
}


class InternalVenue:
    """Our own services; no server-time endpoint (the window is ±30 s of NTP time).

    ``nonce_source(n)`` returns ``n`` random bytes: ``os.urandom`` unless a test pins it
    to reproduce the worked examples of docs/internal-auth.md.
    """

    name = "internal"
    credential_headers = _CREDENTIAL_HEADERS
    time_endpoint: TimeEndpoint | None = None

    def __init__(self, nonce_source: Callable[[int], bytes] = os.urandom) -> None:
        self._nonce_source = nonce_source

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _InternalSigner(key, self._nonce_source)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        if 200 <= status < 300:
            return None
        code = json_field(body, "error", "code")
        if isinstance(code, str) and code in _CODES:
            return _CODES[code]
        return _STATUSES.get(status, Rejection.OTHER)


INTERNAL = InternalVenue()

# --- verification: the ingress's pure core ------------------------------------------------
#
# docs/internal-auth.md "Verification", steps 1-6. ``verify`` is a plain function over the
# received bytes and the verifier's key table, with the clock passed in; ``NonceCache`` is
# the one piece of state (step 6). It shares ``canonical`` with the signer above, so the
# two can never disagree about the bytes that are signed.

#: Step 3: ±30 s around the verifier's clock (NTP-disciplined hosts, no time endpoint).
WINDOW_MS = 30_000
#: Step 6: nonces remembered at most (~100 bytes each: ~10 MB); past that the oldest go
#: and the replay floor rises, so dropping one never re-opens a replay.
NONCE_CAPACITY = 100_000
#: The five headers, lowercase, in the order ``verify`` takes their values.
AUTH_HEADERS: tuple[bytes, ...] = tuple(
    h.lower().encode("ascii")
    for h in (
        HEADER_KEY_ID,
        HEADER_TIMESTAMP,
        HEADER_NONCE,
        HEADER_CONTENT_SHA256,
        HEADER_SIGNATURE,
    )
)
#: Index of each auth header in the tuple ``verify`` takes.
AUTH_INDEX: dict[bytes, int] = {name: i for i, name in enumerate(AUTH_HEADERS)}
#: The value the listener records for a header sent more than once.
REPEATED = b"\x00repeated"

_KEY_ID_BYTES = re.compile(rb"hft_[0-9a-f]{32}")
_TIMESTAMP_BYTES = re.compile(rb"[1-9][0-9]{0,15}")  # no sign, no leading zero: one spelling
_NONCE_BYTES = re.compile(rb"[0-9a-f]{32}")
_HEX64_BYTES = re.compile(rb"[0-9a-f]{64}")
_FORMATS = (_KEY_ID_BYTES, _TIMESTAMP_BYTES, _NONCE_BYTES, _HEX64_BYTES, _HEX64_BYTES)
_FORMAT_TEXT = (
    "hft_ followed by 32 lowercase hex digits",
    "epoch milliseconds, decimal, no sign or leading zero",
    "32 lowercase hex digits",
    "64 lowercase hex digits",
    "64 lowercase hex digits",
)
_NAMES = (HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_CONTENT_SHA256, HEADER_SIGNATURE)


def canonical(
    method: bytes, path: bytes, query: bytes, timestamp: bytes, nonce: bytes, content: bytes
) -> bytes:
    """The canonical string of docs/internal-auth.md: seven fields joined by ``"\\n"``.

    Shared by the signer and the verifier. The caller guarantees that no field holds a
    line feed (the signer checks; the verifier's header formats and the HTTP parser
    exclude it).
    """
    return b"\n".join((VERSION, method, path, query, timestamp, nonce, content))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A verification failure as the ingress answers it (``proxy.http11.error_response``)."""

    status: int
    code: str
    message: str


def _malformed(i: int, repeated: bool) -> Refusal:
    if repeated:
        return Refusal(400, "malformed_auth", f"{_NAMES[i]} must be sent exactly once")
    return Refusal(400, "malformed_auth", f"{_NAMES[i]} must be {_FORMAT_TEXT[i]}")


_MISSING = tuple(Refusal(400, "malformed_auth", f"{n} is missing") for n in _NAMES)
_REPEATED = tuple(_malformed(i, True) for i in range(len(_NAMES)))
_BAD_FORMAT = tuple(_malformed(i, False) for i in range(len(_NAMES)))
UNKNOWN_KEY = Refusal(401, "unknown_key", "no such key id")
KEY_NOT_LIVE = Refusal(401, "unknown_key", "this key id is no longer live")
REVOKED_KEY = Refusal(401, "revoked_key", "this key was revoked")
STALE_TIMESTAMP = Refusal(401, "stale_timestamp", "timestamp outside the accepted window")
BELOW_FLOOR = Refusal(
    401, "stale_timestamp", "timestamp at or below the replay floor; send a fresh request"
)
BAD_CONTENT_HASH = Refusal(401, "bad_signature", "X-Auth-Content-SHA256 does not match the body")
BAD_SIGNATURE = Refusal(401, "bad_signature", "signature does not match")
REPLAYED_NONCE = Refusal(401, "replayed_nonce", "this nonce was already used with this key")
#: Every code ``verify`` and the nonce check answer (stable: metrics and docs use them).
REFUSAL_CODES = (
    "malformed_auth",
    "unknown_key",
    "revoked_key",
    "stale_timestamp",
    "bad_signature",
    "replayed_nonce",
)


class VerifyKey:
    """One live key of one caller, as a verifier holds it: the HMAC keyed once.

    ``expires_ms`` is the key's ``expires_at`` in epoch ms. The keyed HMAC state is in
    OpenSSL's memory, as the signer's is; the secret itself is never held here and never
    in ``repr``.
    """

    __slots__ = ("_keyed", "caller", "expires_ms", "key_id", "key_id_bytes", "version")

    def __init__(self, caller: str, key: LiveKey) -> None:
        if key.meta.algorithm != "hmac-sha256":
            raise SigningError(f"internal keys are hmac-sha256, not {key.meta.algorithm}")
        self.caller = caller
        self.key_id = key.meta.key_id
        # As it arrives on the wire and keys the table: encoded once, not per request.
        self.key_id_bytes = self.key_id.encode("ascii", "replace")
        self.version = key.version
        self.expires_ms = int(key.meta.expires_at.timestamp() * 1000)
        import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

        self._keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")

    def mac(self, data: bytes) -> bytes:
        """Lowercase hex HMAC-SHA256 of ``data`` under this key."""
        h = self._keyed.copy()
        h.update(data)
        return hexlify(h.digest())

    def __repr__(self) -> str:
        return f"VerifyKey(caller={self.caller!r}, key_id={self.key_id!r})"


class Verified(NamedTuple):
    """Steps 1-5 passed. The nonce is not claimed yet (:meth:`NonceCache.claim`).

    A named tuple, not a frozen dataclass: one is made per accepted request, and a frozen
    dataclass's ``__init__`` costs a microsecond (measured, ``loadtests/verify.py``)."""

    key: VerifyKey
    timestamp: int
    nonce: bytes


# ``Verified(...)`` runs the named tuple's Python ``__new__`` (a frame entered from C);
# ``tuple.__new__`` builds the same object in C alone (measured, ``loadtests/verify.py``).
_new_verified = tuple.__new__


def collect_auth(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes | None]:
    """The five auth header values in ``AUTH_HEADERS`` order from a header list: None
    when absent, ``REPEATED`` when sent more than once. (The listener does the same as
    the parser hands it headers; this is for tests and tools.)"""
    values: list[bytes | None] = [None] * len(AUTH_HEADERS)
    for name, value in headers:
        i = AUTH_INDEX.get(name.lower())
        if i is not None:
            values[i] = value if values[i] is None else REPEATED
    return values


def verify(
    method: bytes,
    target: bytes,
    auth: Sequence[bytes | None],
    body: bytes,
    *,
    keys: Mapping[bytes, VerifyKey],
    revoked: Container[bytes],
    now_ms: int,
    window_ms: int = WINDOW_MS,
    floor_ms: int = -1,
) -> Verified | Refusal:
    """Steps 1-5 of docs/internal-auth.md "Verification", first failure wins. Pure.

    ``target`` is the request target exactly as received (path, then the raw query after
    the first ``?``); ``auth`` the five header values in ``AUTH_HEADERS`` order (None:
    absent, ``REPEATED``: sent twice); ``keys`` maps a key id to the live key of an
    accepted caller; ``revoked`` holds key ids revoked while live; ``floor_ms`` is the
    nonce cache's replay floor. Never raises on any input.
    """
    # 1. headers present once, each in its one spelling. The common case is checked in a
    # few C-level operations (measured: five regex matches cost a third of a signature);
    # the first failing header is then named by the per-header patterns.
    key_id, raw_ts, nonce, content, signature = auth
    key = keys.get(key_id) if key_id is not None else None
    if (
        key is None  # a table key id is well-formed by construction; others are checked
        or raw_ts is None
        or nonce is None
        or content is None
        or signature is None
        or len(nonce) != 32
        or len(content) != 64
        or len(signature) != 64
        or not raw_ts.isdigit()
        or raw_ts[0] == 48  # b"0": one instant has one spelling
        or len(raw_ts) > 16
        or (nonce + content + signature).translate(None, b"0123456789abcdef")
    ):
        for i, fmt in enumerate(_FORMATS):
            value = auth[i]
            if value is None:
                return _MISSING[i]
            if value is REPEATED:
                return _REPEATED[i]
            if fmt.fullmatch(value) is None:
                return _BAD_FORMAT[i]
    assert key_id is not None and raw_ts is not None and nonce is not None
    assert content is not None and signature is not None
    # 2. a live key of an accepted caller
    if key is None:
        return REVOKED_KEY if key_id in revoked else UNKNOWN_KEY
    if now_ms >= key.expires_ms:
        return KEY_NOT_LIVE
    # 3. time: inside the window and above the replay floor, whatever the signature
    timestamp = int(raw_ts)
    if abs(now_ms - timestamp) > window_ms:
        return STALE_TIMESTAMP
    if timestamp <= floor_ms:
        return BELOW_FLOOR
    # 4. the body as received hashes to the signed hash (both public values: a plain
    # compare leaks nothing an attacker does not already hold)
    if hexlify(hashlib.sha256(body).digest()) != content:
        return BAD_CONTENT_HASH
    # 5. the signature over the canonical string rebuilt from what was received, compared
    # in constant time (the expected value is what an attacker must not learn byte by byte)
    # (``VerifyKey.mac`` inlined: one call less per request.)
    path, _, query = target.partition(b"?")
    h = key._keyed.copy()
    h.update(canonical(method, path, query, raw_ts, nonce, content))
    if not hmac.compare_digest(hexlify(h.digest()), signature):
        return BAD_SIGNATURE
    return _new_verified(Verified, (key, timestamp, nonce))


class NonceCache:
    """Step 6: (key id, nonce) pairs accepted within the window, bounded by count.

    An entry lives ``2 * window_ms`` from its acceptance, which covers its timestamp
    leaving the window (the timestamp was within ``window_ms`` of the acceptance). When
    ``capacity`` is reached the oldest entry goes and ``floor_ms`` rises to its timestamp:
    ``verify`` then refuses anything at or below the floor as stale, so an evicted nonce
    can never be replayed. Synchronous; O(1) amortized; on the loop.

    A TTL cache with one TTL for every entry: a dict for membership and a FIFO of
    (expiry, entry, timestamp) in insertion order, which is expiry order. Not
    ``cachetools.TTLCache``: measured on the benchmark machine, its insert costs
    6.6 µs against 0.4 µs for this (``loadtests/verify.py``), more than a whole
    signature, and the verification path must cost no more than the signing path. A
    wall clock stepping back only keeps entries longer (safe).
    """

    __slots__ = ("_capacity", "_fifo", "_seen", "_ttl", "floor_ms")

    def __init__(self, window_ms: int = WINDOW_MS, capacity: int = NONCE_CAPACITY) -> None:
        if capacity < 1 or window_ms < 1:
            raise ValueError("window_ms and capacity must be positive")
        self._ttl = 2 * window_ms + 1
        self._capacity = capacity
        self._seen: dict[bytes, None] = {}
        self._fifo: deque[tuple[int, bytes, int]] = deque()
        self.floor_ms = -1  # requests at or below this timestamp are refused (BELOW_FLOOR)

    def __len__(self) -> int:
        return len(self._seen)

    def claim(self, key_id: bytes, nonce: bytes, timestamp: int, now_ms: int) -> bool:
        """Record the pair; False if it is already recorded (a replay)."""
        entry = key_id + nonce
        seen = self._seen
        fifo = self._fifo
        while fifo and fifo[0][0] <= now_ms:  # expired: outside the window by now
            del seen[fifo.popleft()[1]]
        if entry in seen:
            return False
        if len(seen) >= self._capacity:
            _, old, old_ts = fifo.popleft()
            del seen[old]
            self.floor_ms = max(self.floor_ms, old_ts)
        seen[entry] = None
        fifo.append((now_ms + self._ttl, entry, timestamp))
        return True


# --- the rotation protocol ------------------------------------------------------------------

#: A new internal key signs only this many key-store poll intervals after it was written,
#: so every verifier polling at that interval holds it before its first signature arrives
#: (docs/ingress.md "Zero refusals during a rotation").
ACTIVATION_LEAD_POLLS = 2


def activation_time(written: datetime, poll_interval_ms: int | None) -> datetime:
    """The ``activates_at`` for an internal key written at ``written`` (aware): at least
    ``ACTIVATION_LEAD_POLLS`` poll intervals later, rounded up to the whole second (key
    records carry seconds). ``poll_interval_ms`` None (the file store, read at start):
    ``written`` itself, rounded up. Pure."""
    lead = timedelta(milliseconds=ACTIVATION_LEAD_POLLS * (poll_interval_ms or 0))
    at = written + lead
    if at.microsecond:
        at = at.replace(microsecond=0) + timedelta(seconds=1)
    return at
