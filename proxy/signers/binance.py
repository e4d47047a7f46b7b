"""Binance spot (and USD-M futures) request signing.

Source: https://developers.binance.com/docs/binance-spot-api-docs/rest-api/request-security
- ``totalParams`` is the query string concatenated with the request body (no separator).
- HMAC-SHA256 keys: the signature is the lowercase hex HMAC of totalParams.
- Ed25519 and RSA (PKCS#1 v1.5, SHA-256) keys: the signature is base64, percent-encoded
  where it is placed in a query string or form body.
- ``timestamp`` (ms) is mandatory; ``recvWindow`` optional (default 5000, max 60000).
- ``signature`` must be the last parameter: we append it to the body when there is one
  (Binance's own mixed query+body example puts it there), else to the query.
- The API key travels in ``X-MBX-APIKEY``.
"""

from __future__ import annotations

from binascii import hexlify
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from keycache.ring import LiveKey
from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.signers.base import (
    KeySigner,
    Rejection,
    SignerContext,
    TimeEndpoint,
    has_param,
    header_line,
    json_field,
    load_private_key,
    percent_b64,
    strip_params,
)

_CREDENTIAL_PARAMS = frozenset({b"signature", b"timestamp"})


class _BinanceSigner:
    """Signs with one Binance key; the per-key state is built once in ``__init__``."""

    __slots__ = ("_header", "_params_rw", "_sign_payload", "key_id")

    def __init__(self, key: LiveKey, recv_window_ms: int) -> None:
        self.key_id = key.meta.key_id
        self._header = header_line("X-MBX-APIKEY", self.key_id)
        self._params_rw = b"recvWindow=%d&timestamp=" % recv_window_ms
        algorithm = key.meta.algorithm
        if algorithm == "hmac-sha256":
            import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

            # Keyed once; each request copies the keyed state (cheaper than re-keying).
            keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")

            def sign_hmac(payload: bytes) -> bytes:
                h = keyed.copy()
                h.update(payload)
                return hexlify(h.digest())

            self._sign_payload = sign_hmac
        elif algorithm == "ed25519":
            private = _load_private(key, ed25519.Ed25519PrivateKey)
            self._sign_payload = lambda payload: percent_b64(private.sign(payload))
        elif algorithm == "rsa-pkcs1-sha256":
            rsa_key = _load_private(key, rsa.RSAPrivateKey)
            pad, sha = padding.PKCS1v15(), hashes.SHA256()
            self._sign_payload = lambda payload: percent_b64(rsa_key.sign(payload, pad, sha))
        else:
            raise SigningError(
                f"binance keys are hmac-sha256, ed25519 or rsa-pkcs1-sha256, not {algorithm}"
            )

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        # Substring tests run in C; the exact, slower checks only when one hits. find(),
        # not `in` (proxy.http11: `in` on bytes costs twice as much).
        if query.find(b"signature=") >= 0 or query.find(b"timestamp=") >= 0:
            query = strip_params(query, _CREDENTIAL_PARAMS)
        if body and (body.find(b"signature=") >= 0 or body.find(b"timestamp=") >= 0):
            body = strip_params(body, _CREDENTIAL_PARAMS)
        if (query.find(b"recvWindow=") >= 0 or (body and body.find(b"recvWindow=") >= 0)) and (
            has_param(query, b"recvWindow") or has_param(body, b"recvWindow")
        ):
            params = b"timestamp=%d" % now_ms
        else:
            params = self._params_rw + b"%d" % now_ms
        if body:
            body = b"%s&%s" % (body, params)
            body = b"%s&signature=%s" % (body, self._sign_payload(query + body))
            return path + b"?" + query if query else path, self._header, body
        query = b"%s&%s" % (query, params) if query else params
        return b"%s?%s&signature=%s" % (path, query, self._sign_payload(query)), self._header, body


def _load_private(key: LiveKey, kind: type[Any]) -> Any:
    private = load_private_key(key)
    if not isinstance(private, kind):
        raise SigningError(f"key {key.meta.key_id}: PEM is not a {key.meta.algorithm} key")
    return private


# Error codes from https://developers.binance.com/docs/binance-spot-api-docs/errors
_CODES: dict[int, Rejection] = {
    -2014: Rejection.KEY_REJECTED,  # API-key format invalid.
    -2015: Rejection.KEY_REJECTED,  # Invalid API-key, IP, or permissions for action.
    -1022: Rejection.BAD_SIGNATURE,  # Signature for this request is not valid.
    -1021: Rejection.CLOCK_OR_NONCE,  # Timestamp for this request is outside of the recvWindow.
    -1003: Rejection.RATE_LIMITED,  # Too many requests; current limit is %s requests per minute.
    -1015: Rejection.RATE_LIMITED,  # Too many new orders.
}
_STATUSES: dict[int, Rejection] = {
    418: Rejection.BANNED,  # IP auto-banned for continuing to send requests after a 429
    429: Rejection.RATE_LIMITED,
    401: Rejection.KEY_REJECTED,
}


def _server_time(body: bytes) -> float:
    value = json_field(body, "serverTime")
    if not isinstance(value, int):
        raise ValueError("no serverTime in the response")
    return float(value)


class BinanceVenue:
    """Binance spot; ``binance_usdm`` signs the same way on the futures hosts."""

    credential_headers = frozenset({b"x-mbx-apikey"})

    def __init__(self, name: str, time_path: bytes) -> None:
        self.name = name
        self.time_endpoint: TimeEndpoint | None = TimeEndpoint(time_path, _server_time)

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _BinanceSigner(key, service.recv_window_ms)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        if 200 <= status < 300:
            return None
        if status == 418:
            return Rejection.BANNED  # the ban outranks the -1003 the body repeats
        code = json_field(body, "code")
        if isinstance(code, int) and code in _CODES:
            return _CODES[code]
        return _STATUSES.get(status, Rejection.OTHER)


BINANCE = BinanceVenue("binance", b"/api/v3/time")
BINANCE_USDM = BinanceVenue("binance_usdm", b"/fapi/v1/time")
