"""BitMEX REST request signing.

Source: https://www.bitmex.com/app/apiKeysUsage ("API Keys Usage", with the three worked
examples reproduced in tests/fixtures/published_vectors.json):
- ``api-key``: the API key id.
- ``api-expires``: a UNIX timestamp in *seconds* after which the request is no longer
  valid (replay protection). We send ``ceil((now_ms + recv_window_ms) / 1000)``: the
  service's ``recv_window_ms`` (default 5000) is the window, rounded up to whole seconds.
- ``api-signature``: lowercase hex HMAC-SHA256(secret, ``verb + path + expires + data``)
  where ``path`` is the URL path *with* its query string exactly as sent
  (``/api/v1/instrument?filter=%7B...``) and ``data`` the raw body (JSON or form), empty
  when there is none.
BitMEX keys are HMAC-SHA256 only.

Errors: ``{"error": {"message": "...", "name": "HTTPError"}}`` with the HTTP status
(401 "Invalid API Key." / "Signature not valid.", 400 "This request has expired -
`expires` is in the past. Current time: ...", 403 "This key is disabled.", 429 on the
rate limiter, https://www.bitmex.com/app/restAPI#Limits).
"""

from __future__ import annotations

from binascii import hexlify
from typing import Any

from keycache.ring import LiveKey
from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.signers.base import (
    KeySigner,
    Rejection,
    SignerContext,
    TimeEndpoint,
    header_line,
    json_field,
)


class _BitmexSigner:
    """Signs with one BitMEX key; the keyed HMAC and key header are made once."""

    __slots__ = ("_header", "_keyed", "_window_ms", "key_id")

    def __init__(self, key: LiveKey, recv_window_ms: int) -> None:
        self.key_id = key.meta.key_id
        if key.meta.algorithm != "hmac-sha256":
            raise SigningError(f"bitmex keys are hmac-sha256, not {key.meta.algorithm}")
        import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

        self._keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")
        self._header = header_line("api-key", self.key_id)
        self._window_ms = recv_window_ms

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        target = path + b"?" + query if query else path
        expires = b"%d" % ((now_ms + self._window_ms + 999) // 1000)
        h = self._keyed.copy()
        h.update(method + target + expires + body)
        lines = self._header + b"api-expires: %s\r\napi-signature: %s\r\n" % (
            expires,
            hexlify(h.digest()),
        )
        return target, lines, body


# error.message texts as BitMEX sends them; prefixes where BitMEX appends details.
_MESSAGES: dict[str, Rejection] = {
    "Invalid API Key.": Rejection.KEY_REJECTED,
    "This key is disabled.": Rejection.KEY_REJECTED,
    "Signature not valid.": Rejection.BAD_SIGNATURE,
}
_MESSAGE_PREFIXES: tuple[tuple[str, Rejection], ...] = (
    ("This request has expired", Rejection.CLOCK_OR_NONCE),  # "... Current time: 1518064260"
    ("Rate limit exceeded", Rejection.RATE_LIMITED),  # "..., retry in 1 seconds."
)
_STATUSES: dict[int, Rejection] = {
    429: Rejection.RATE_LIMITED,
    401: Rejection.KEY_REJECTED,
    # An IP that keeps hitting the limiter is banned (restAPI#Limits); the known 403 texts
    # ("This key is disabled.", "Access Denied") are matched by message first.
    403: Rejection.BANNED,
}


class BitmexVenue:
    """BitMEX (www.bitmex.com, ``/api/v1``). No documented server-time endpoint."""

    name = "bitmex"
    credential_headers = frozenset({b"api-key", b"api-expires", b"api-signature"})
    time_endpoint: TimeEndpoint | None = None

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _BitmexSigner(key, service.recv_window_ms)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        if 200 <= status < 300:
            return None
        message = json_field(body, "error", "message")
        if isinstance(message, str):
            if message in _MESSAGES:
                return _MESSAGES[message]
            for prefix, kind in _MESSAGE_PREFIXES:
                if message.startswith(prefix):
                    return kind
            if message in ("Access Denied", "Account is restricted"):
                return Rejection.OTHER  # a permission, not a ban
        return _STATUSES.get(status, Rejection.OTHER)


BITMEX = BitmexVenue()
