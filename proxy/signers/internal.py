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
"""

from __future__ import annotations

import hashlib
import os
import re
from binascii import hexlify
from collections.abc import Callable
from typing import Any

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

_CREDENTIAL_HEADERS = frozenset(
    h.lower().encode("ascii")
    for h in (
        HEADER_KEY_ID,
        HEADER_TIMESTAMP,
        HEADER_NONCE,
        HEADER_CONTENT_SHA256,
        HEADER_SIGNATURE,
    )
)

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
        if b"\n" in method or b"\n" in path or b"\n" in query:
            raise SigningError("a newline in the method, path or query cannot be signed")
        timestamp = b"%d" % now_ms
        nonce = hexlify(self._nonce(NONCE_BYTES))
        content = hexlify(hashlib.sha256(body).digest())
        h = self._keyed.copy()
        h.update(b"\n".join((VERSION, method, path, query, timestamp, nonce, content)))
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
