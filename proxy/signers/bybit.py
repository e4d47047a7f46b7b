"""Bybit v5 REST request signing.

Source: https://bybit-exchange.github.io/docs/v5/guide ("Authentication", "Create A
Request"):
- the signed string is ``timestamp + api_key + recv_window + queryString`` for a GET and
  ``timestamp + api_key + recv_window + raw_request_body`` for a POST (v5 has no other
  methods; anything that is not a POST signs its query, as ccxt's bybit does);
- system-generated (HMAC) keys: the signature is the lowercase hex HMAC-SHA256;
  self-generated RSA keys: the Base64 of RSASSA-PKCS1-v1_5 with SHA-256;
- headers ``X-BAPI-API-KEY``, ``X-BAPI-TIMESTAMP`` (ms), ``X-BAPI-RECV-WINDOW`` (ms,
  default 5000), ``X-BAPI-SIGN``; Bybit accepts a request iff
  ``server_time - recv_window <= timestamp < server_time + 1000``.
"""

from __future__ import annotations

import base64
from binascii import hexlify
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

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
    load_private_key,
)


class _BybitSigner:
    """Signs with one Bybit key; the per-key state is built once in ``__init__``."""

    __slots__ = ("_fixed_headers", "_sign_payload", "_suffix", "key_id")

    def __init__(self, key: LiveKey, recv_window_ms: int) -> None:
        self.key_id = key.meta.key_id
        window = b"%d" % recv_window_ms
        # Signed after the timestamp: api_key + recv_window (both fixed per key).
        self._suffix = self.key_id.encode("ascii") + window
        self._fixed_headers = header_line("X-BAPI-API-KEY", self.key_id) + header_line(
            "X-BAPI-RECV-WINDOW", window
        )
        algorithm = key.meta.algorithm
        if algorithm == "hmac-sha256":
            import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

            keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")

            def sign_hmac(payload: bytes) -> bytes:
                h = keyed.copy()
                h.update(payload)
                return hexlify(h.digest())

            self._sign_payload = sign_hmac
        elif algorithm == "rsa-pkcs1-sha256":
            private = load_private_key(key)
            if not isinstance(private, rsa.RSAPrivateKey):
                raise SigningError(f"key {self.key_id}: PEM is not an RSA key")
            pad, sha = padding.PKCS1v15(), hashes.SHA256()
            self._sign_payload = lambda payload: base64.b64encode(private.sign(payload, pad, sha))
        else:
            raise SigningError(f"bybit keys are hmac-sha256 or rsa-pkcs1-sha256, not {algorithm}")

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        timestamp = b"%d" % now_ms
        signed = body if method == b"POST" else query
        signature = self._sign_payload(timestamp + self._suffix + signed)
        headers = b"%sX-BAPI-TIMESTAMP: %s\r\nX-BAPI-SIGN: %s\r\n" % (
            self._fixed_headers,
            timestamp,
            signature,
        )
        return (b"%s?%s" % (path, query) if query else path), headers, body


# retCodes from https://bybit-exchange.github.io/docs/v5/error ("UMA & UTA & Futures of
# Classic Account"); Bybit answers most of them with HTTP 200 and
# ``{"retCode": ..., "retMsg": ..., "result": {}, "retExtInfo": {}, "time": ...}``.
_CODES: dict[int, Rejection] = {
    10003: Rejection.KEY_REJECTED,  # API key is invalid.
    10005: Rejection.KEY_REJECTED,  # Permission denied, please check your API key permissions.
    10007: Rejection.KEY_REJECTED,  # User authentication failed.
    10010: Rejection.KEY_REJECTED,  # Unmatched IP, please check your API key's bound IP addresses.
    10004: Rejection.BAD_SIGNATURE,  # Error sign, please check your signature generation algorithm.
    10002: Rejection.CLOCK_OR_NONCE,  # The request time exceeds the time window range.
    10006: Rejection.RATE_LIMITED,  # Too many visits. Exceeded the API Rate Limit.
    10018: Rejection.RATE_LIMITED,  # Exceeded the IP Rate Limit.
    10008: Rejection.BANNED,  # Common banned, please check your account mode
    10009: Rejection.BANNED,  # IP has been banned.
}
# HTTP codes from the same page: 401 "Need to use the correct key to access"; 403 "IP rate
# limit breached" -- https://bybit-exchange.github.io/docs/v5/rate-limit: "If you receive
# an HTTP 403 (Access Denied) response, your IP has been either temporarily or permanently
# banned" (usually 30 minutes).
_STATUSES: dict[int, Rejection] = {
    401: Rejection.KEY_REJECTED,
    403: Rejection.BANNED,
    429: Rejection.RATE_LIMITED,
}


def _server_time(body: bytes) -> float:
    """``GET /v5/market/time`` → ``{"retCode":0,...,"result":{"timeSecond":"1688639403",
    "timeNano":"1688639403423213947"},...,"time":1688639403423}``: the nanosecond field,
    in milliseconds (``time`` is the envelope's, stamped later)."""
    nano = json_field(body, "result", "timeNano")
    if isinstance(nano, str) and nano.isdigit():
        return int(nano) / 1_000_000
    envelope = json_field(body, "time")
    if isinstance(envelope, int):
        return float(envelope)
    raise ValueError("no result.timeNano nor time in the response")


class BybitVenue:
    """Bybit v5 unified API (spot, linear, inverse, option share one signing scheme)."""

    # Refuses a key with a 2xx status and the verdict in the body (proxy.server reads
    # the body of a success only for such venues, during an overlap).
    key_refusal_in_2xx = True
    name = "bybit"
    credential_headers = frozenset(
        {
            b"x-bapi-api-key",
            b"x-bapi-timestamp",
            b"x-bapi-recv-window",
            b"x-bapi-sign",
            b"x-bapi-sign-type",
        }
    )
    time_endpoint: TimeEndpoint | None = TimeEndpoint(b"/v5/market/time", _server_time)

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _BybitSigner(key, service.recv_window_ms)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        if 200 <= status < 300 and body.startswith(b'{"retCode":0,'):
            return None  # the common success, decided without parsing
        code = json_field(body, "retCode")
        if isinstance(code, int) and not isinstance(code, bool):
            if code == 0 and 200 <= status < 300:
                return None
            if code in _CODES:
                return _CODES[code]
            if 200 <= status < 300:
                return Rejection.OTHER  # order refusals (110xxx, 170xxx) come as HTTP 200
        if 200 <= status < 300:
            return None
        return _STATUSES.get(status, Rejection.OTHER)


BYBIT = BybitVenue()
