"""OKX v5 REST request signing.

Source: https://www.okx.com/docs-v5/en/#overview-rest-authentication-making-requests and
the same text on https://www.okx.com/web3/build/docs/waas/rest-authentication:
- ``OK-ACCESS-SIGN`` is the Base64 of HMAC-SHA256(secret, ``timestamp + method +
  requestPath + body``); ``method`` upper case; ``requestPath`` includes the query string
  of a GET ("the request parameter is counted as requestPath, not body"); ``body`` is the
  raw request body, omitted when there is none.
- ``OK-ACCESS-TIMESTAMP`` is the same ISO-8601 UTC time with milliseconds
  (``2020-12-08T09:08:57.715Z``); OKX refuses it 30 s away from its clock (50102).
- ``OK-ACCESS-KEY`` is the API key, ``OK-ACCESS-PASSPHRASE`` the passphrase chosen when the
  key was created (the key record's ``passphrase``).
OKX keys are HMAC only.
"""

from __future__ import annotations

import base64
import time
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


class _OkxSigner:
    """Signs with one OKX key; the per-key state is built once in ``__init__``."""

    __slots__ = ("_fixed_headers", "_keyed", "_second", "_second_prefix", "key_id")

    def __init__(self, key: LiveKey) -> None:
        self.key_id = key.meta.key_id
        if key.meta.algorithm != "hmac-sha256":
            raise SigningError(f"okx keys are hmac-sha256, not {key.meta.algorithm}")
        if key.passphrase is None:
            raise SigningError(f"key {self.key_id}: okx needs the key record's passphrase")
        import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

        self._keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")
        # The passphrase travels in clear in every request, so every request buffer holds
        # it anyway; one header line built here is one long-lived copy instead of a fresh
        # transient one per request.
        self._fixed_headers = header_line("OK-ACCESS-KEY", self.key_id) + header_line(
            "OK-ACCESS-PASSPHRASE", bytes(key.passphrase)
        )
        # strftime costs more than the HMAC: cache the formatted second.
        self._second = -1
        self._second_prefix = b""

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        seconds, millis = divmod(now_ms, 1000)
        if seconds != self._second:
            self._second_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds)).encode()
            self._second = seconds
        timestamp = b"%s%03dZ" % (self._second_prefix, millis)
        target = b"%s?%s" % (path, query) if query else path
        h = self._keyed.copy()
        h.update(timestamp + method + target + body)
        headers = b"%sOK-ACCESS-SIGN: %s\r\nOK-ACCESS-TIMESTAMP: %s\r\n" % (
            self._fixed_headers,
            base64.b64encode(h.digest()),
            timestamp,
        )
        return target, headers, body


# Error codes and HTTP statuses from https://www.okx.com/docs-v5/en/#error-code-rest-api-public
# ("Public" block, 50000-50199). OKX answers ``{"msg": ..., "code": "<string>"}``.
_CODES: dict[str, Rejection] = {
    "50100": Rejection.KEY_REJECTED,  # API frozen, please contact customer service.
    "50101": Rejection.KEY_REJECTED,  # APIKey does not match current environment.
    "50103": Rejection.KEY_REJECTED,  # Request header "OK-ACCESS-KEY" cannot be empty.
    "50104": Rejection.KEY_REJECTED,  # Request header "OK-ACCESS-PASSPHRASE" cannot be empty.
    "50105": Rejection.KEY_REJECTED,  # Request header "OK-ACCESS-PASSPHRASE" incorrect.
    "50110": Rejection.KEY_REJECTED,  # Your IP {param0} is not included in your API key's IP ...
    "50111": Rejection.KEY_REJECTED,  # Invalid OK-ACCESS-KEY.
    "50119": Rejection.KEY_REJECTED,  # API key doesn't exist.
    "50106": Rejection.BAD_SIGNATURE,  # Request header "OK-ACCESS-SIGN" cannot be empty.
    "50113": Rejection.BAD_SIGNATURE,  # Invalid signature.
    "50102": Rejection.CLOCK_OR_NONCE,  # Timestamp request expired.
    "50107": Rejection.CLOCK_OR_NONCE,  # Request header "OK-ACCESS-TIMESTAMP" cannot be empty.
    "50112": Rejection.CLOCK_OR_NONCE,  # Invalid OK-ACCESS-TIMESTAMP.
    "50011": Rejection.RATE_LIMITED,  # Rate limit reached. (HTTP 429)
    "50061": Rejection.RATE_LIMITED,  # Sub-account rate limit reached.
}
_STATUSES: dict[int, Rejection] = {
    429: Rejection.RATE_LIMITED,
    401: Rejection.KEY_REJECTED,
}


def _server_time(body: bytes) -> float:
    """``GET /api/v5/public/time`` → ``{"code":"0","msg":"","data":[{"ts":"1597026383085"}]}``."""
    data = json_field(body, "data")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        ts = data[0].get("ts")
        if isinstance(ts, str) and ts.isdigit():
            return float(ts)
    raise ValueError("no data[0].ts in the response")


class OkxVenue:
    """OKX v5 (spot, margin, swaps, futures, options share one signing scheme)."""

    # Refuses a key with a 2xx status and the verdict in the body (proxy.server reads
    # the body of a success only for such venues, during an overlap).
    key_refusal_in_2xx = True
    name = "okx"
    credential_headers = frozenset(
        {b"ok-access-key", b"ok-access-sign", b"ok-access-timestamp", b"ok-access-passphrase"}
    )
    time_endpoint: TimeEndpoint | None = TimeEndpoint(b"/api/v5/public/time", _server_time)

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _OkxSigner(key)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        if 200 <= status < 300 and body.startswith(b'{"code":"0"'):
            return None  # the common success, decided without parsing
        code = json_field(body, "code")
        if isinstance(code, int):
            code = str(code)
        if 200 <= status < 300 and code in (None, "0"):
            return None
        if isinstance(code, str) and code in _CODES:
            return _CODES[code]
        if 200 <= status < 300:
            return Rejection.OTHER  # OKX reports business refusals (code "1", 51xxx) as 200
        return _STATUSES.get(status, Rejection.OTHER)


OKX = OkxVenue()
