"""Coinbase Advanced Trade (``/api/v3/brokerage``) request signing, two schemes.

**CDP keys** (``es256``: an EC P-256 key; ``ed25519``): a fresh JWT per request in
``Authorization: Bearer <jwt>``, built as the official SDK builds it -- coinbase-advanced-py
``jwt_generator.build_jwt`` and the Python sample of
https://docs.cdp.coinbase.com/get-started/authentication/jwt-authentication:

- header ``{"alg": "ES256" | "EdDSA", "kid": <key name>, "nonce": <random hex>,
  "typ": "JWT"}`` (PyJWT writes header keys sorted; so do we);
- claims ``{"sub": <key name>, "iss": "cdp", "nbf": now, "exp": now + 120,
  "uri": "<METHOD> <host><path>"}``, seconds; ``host`` is the upstream's Host
  (``api.coinbase.com``), ``path`` excludes the query string;
- ES256 signatures are JOSE ``r || s`` (32 + 32 bytes, RFC 7518 section 3.4), not DER.

The CDP SDK (``cdp-sdk``, ``generate_jwt``) writes ``uris: [uri]`` and ``iat`` instead;
Coinbase accepts either, and one claim set for both algorithms keeps one code path.
Ed25519 keys are held as PKCS#8 PEM like every asymmetric key here (DESIGN.md), not as
the base64 seed||public blob the CDP portal shows.

**Legacy keys** (``hmac-sha256``): https://docs.cloud.coinbase.com/advanced-trade-api/docs/rest-api-auth-legacy
-- ``CB-ACCESS-KEY``, ``CB-ACCESS-TIMESTAMP`` (Unix seconds, +/-30 s), ``CB-ACCESS-SIGN`` =
lowercase hex HMAC-SHA256(secret, ``timestamp + METHOD + requestPath + body``) where
``requestPath`` is "the full path (minus the base URL and query parameters)".
"""

from __future__ import annotations

import base64
import json
import os
from binascii import hexlify
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

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

JWT_LIFETIME_S = 120  # "Your JWT expires after 2 minutes" (the SDK's exp = nbf + 120)
NONCE_BYTES = 32  # secrets.token_hex()'s default, as coinbase-advanced-py sends it
_P256_COORDINATE_BYTES = 32


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class _CoinbaseJwtSigner:
    """Signs with one CDP key (ES256 or EdDSA); a new JWT per request."""

    __slots__ = ("_claims_head", "_header_head", "_host", "_sign_input", "key_id")

    def __init__(self, key: LiveKey, host: str) -> None:
        self.key_id = key.meta.key_id
        algorithm = key.meta.algorithm
        private = load_private_key(key)
        kid = json.dumps(self.key_id).encode()  # JSON string literal, escaped once
        if algorithm == "es256":
            if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
                private.curve, ec.SECP256R1
            ):
                raise SigningError(f"key {self.key_id}: PEM is not a P-256 EC key")
            alg = b"ES256"
            ecdsa = ec.ECDSA(hashes.SHA256())

            def sign_es256(data: bytes) -> bytes:
                r, s = decode_dss_signature(private.sign(data, ecdsa))
                return r.to_bytes(_P256_COORDINATE_BYTES, "big") + s.to_bytes(
                    _P256_COORDINATE_BYTES, "big"
                )

            self._sign_input: Callable[[bytes], bytes] = sign_es256
        elif algorithm == "ed25519":
            if not isinstance(private, ed25519.Ed25519PrivateKey):
                raise SigningError(f"key {self.key_id}: PEM is not an Ed25519 key")
            alg = b"EdDSA"
            self._sign_input = private.sign
        else:  # pragma: no cover - CoinbaseVenue.signer dispatches on the algorithm
            raise SigningError(f"coinbase JWT keys are es256 or ed25519, not {algorithm}")
        self._header_head = b'{"alg":"%s","kid":%s,"nonce":"' % (alg, kid)
        self._claims_head = b'{"sub":%s,"iss":"cdp","nbf":' % kid
        self._host = host.encode("idna")

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        now = now_ms // 1000
        header = b'%s%s","typ":"JWT"}' % (self._header_head, hexlify(os.urandom(NONCE_BYTES)))
        uri = b"%s %s%s" % (method, self._host, path)
        # Never in a sane target; escaped rather than refused. find(), not `in`: proxy.http11
        if uri.find(b'"') >= 0 or uri.find(b"\\") >= 0:
            uri = json.dumps(uri.decode("latin-1"))[1:-1].encode("latin-1")
        claims = b'%s%d,"exp":%d,"uri":"%s"}' % (
            self._claims_head,
            now,
            now + JWT_LIFETIME_S,
            uri,
        )
        signing_input = _b64url(header) + b"." + _b64url(claims)
        token = signing_input + b"." + _b64url(self._sign_input(signing_input))
        target = b"%s?%s" % (path, query) if query else path
        return target, b"Authorization: Bearer %s\r\n" % token, body


class _CoinbaseLegacySigner:
    """Signs with one legacy Coinbase API key (HMAC-SHA256, hex)."""

    __slots__ = ("_key_header", "_keyed", "key_id")

    def __init__(self, key: LiveKey) -> None:
        self.key_id = key.meta.key_id
        self._key_header = header_line("CB-ACCESS-KEY", self.key_id)
        import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

        self._keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        timestamp = b"%d" % (now_ms // 1000)
        h = self._keyed.copy()
        h.update(timestamp + method + path + body)
        headers = b"%sCB-ACCESS-SIGN: %s\r\nCB-ACCESS-TIMESTAMP: %s\r\n" % (
            self._key_header,
            hexlify(h.digest()),
            timestamp,
        )
        return (b"%s?%s" % (path, query) if query else path), headers, body


# Coinbase's API gateway answers an authentication failure -- unknown or revoked key, bad
# signature, expired JWT -- with the same ``401`` and a bare ``Unauthorized`` body, nothing
# to tell them apart (coinbase-advanced-py issues #56, #132; ccxt #26300). We classify it
# KEY_REJECTED: a 401 is most often the key (revoked, or not yet known to Coinbase during a
# rotation), where re-signing once with the other key of the overlap pair is exactly the
# cure; when it was a signature or clock problem instead, that one retry gets a 401 too and
# the engine sees it -- a bounded cost, against never recovering from a revoked key.
# The one authentication failure Coinbase does name is a legacy key's stale timestamp:
# ``{"errors":[{"id":"authentication_error","message":"request timestamp expired"}]}``.
#
# Error ids: the ``error`` field of the Advanced Trade JSON error body
# (``{"error": ..., "error_details": ..., "message": ...}``) and the ``errors[].id`` of the
# Coinbase App (v2) error body, https://docs.cdp.coinbase.com/coinbase-app/docs/api-errors
# (ccxt's coinbase.py maps the same ids).
_ERROR_IDS: dict[str, Rejection] = {
    "authentication_error": Rejection.KEY_REJECTED,  # 401 Invalid auth (generic)
    "unauthorized": Rejection.KEY_REJECTED,  # 401 Not authorized to perform this operation
    "UNAUTHENTICATED": Rejection.KEY_REJECTED,  # 401 (gRPC status name)
    "invalid_token": Rejection.KEY_REJECTED,  # 401
    "revoked_token": Rejection.KEY_REJECTED,  # 401
    "expired_token": Rejection.KEY_REJECTED,  # 401
    "rate_limit_exceeded": Rejection.RATE_LIMITED,  # 429 Rate limit exceeded
    "resource_exhausted": Rejection.RATE_LIMITED,  # 429 Resource has been exhausted
    "RESOURCE_EXHAUSTED": Rejection.RATE_LIMITED,  # 429 (gRPC status name)
}
_STALE_TIMESTAMP = b"request timestamp expired"
_STATUSES: dict[int, Rejection] = {
    401: Rejection.KEY_REJECTED,
    429: Rejection.RATE_LIMITED,  # sometimes an HTML page, not JSON: the status decides
}


def _server_time(body: bytes) -> float:
    """``GET /api/v3/brokerage/time`` → ``{"iso": "...", "epochSeconds": "1731...",
    "epochMillis": "1731..."}`` (strings)."""
    millis = json_field(body, "epochMillis")
    if isinstance(millis, str) and millis.isdigit():
        return float(millis)
    if isinstance(millis, int):
        return float(millis)
    raise ValueError("no epochMillis in the response")


class CoinbaseVenue:
    """Coinbase Advanced Trade: CDP keys sign a JWT, legacy keys an HMAC."""

    name = "coinbase"
    credential_headers = frozenset(
        {b"authorization", b"cb-access-key", b"cb-access-sign", b"cb-access-timestamp"}
    )
    time_endpoint: TimeEndpoint | None = TimeEndpoint(b"/api/v3/brokerage/time", _server_time)

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        algorithm = key.meta.algorithm
        if algorithm in ("es256", "ed25519"):
            return _CoinbaseJwtSigner(key, service.host_header)
        if algorithm == "hmac-sha256":
            return _CoinbaseLegacySigner(key)
        raise SigningError(f"coinbase keys are es256, ed25519 or hmac-sha256, not {algorithm}")

    def classify(self, status: int, body: bytes) -> Rejection | None:
        if 200 <= status < 300:
            # Create-order refusals come as 200 with "success": false.
            return Rejection.OTHER if b'"success":false' in body else None
        if _STALE_TIMESTAMP in body:
            return Rejection.CLOCK_OR_NONCE
        error = json_field(body, "error")
        if not isinstance(error, str):
            errors = json_field(body, "errors")
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                error = errors[0].get("id")
        if isinstance(error, str) and error in _ERROR_IDS:
            return _ERROR_IDS[error]
        return _STATUSES.get(status, Rejection.OTHER)


COINBASE = CoinbaseVenue()
