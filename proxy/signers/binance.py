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

from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from keycache.ring import LiveKey
from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.signers.base import KeySigner, has_param, header_line, percent_b64, strip_params

_CREDENTIAL_PARAMS = frozenset({b"signature", b"timestamp"})


class _BinanceSigner:
    """Signs with one Binance key; the per-key state is built once in ``__init__``."""

    __slots__ = ("_header", "_recv_window", "_sign_payload", "key_id")

    def __init__(self, key: LiveKey, recv_window_ms: int) -> None:
        self.key_id = key.meta.key_id
        self._header = header_line("X-MBX-APIKEY", self.key_id)
        self._recv_window = b"recvWindow=%d&" % recv_window_ms
        algorithm = key.meta.algorithm
        if algorithm == "hmac-sha256":
            import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

            ctx: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")

            def sign_hmac(payload: bytes) -> bytes:
                h = ctx.copy()
                h.update(payload)
                return h.hexdigest().encode("ascii")  # type: ignore[no-any-return]

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
        query = strip_params(query, _CREDENTIAL_PARAMS)
        body = strip_params(body, _CREDENTIAL_PARAMS)
        window = (
            b""
            if has_param(query, b"recvWindow") or has_param(body, b"recvWindow")
            else (self._recv_window)
        )
        params = b"%stimestamp=%d" % (window, now_ms)
        if body:
            body = b"%s&%s" % (body, params)
            body = b"%s&signature=%s" % (body, self._sign_payload(query + body))
        else:
            query = b"%s&%s" % (query, params) if query else params
            query = b"%s&signature=%s" % (query, self._sign_payload(query))
        return path + b"?" + query, self._header, body


def _load_private(key: LiveKey, kind: type[Any]) -> Any:
    try:
        private = serialization.load_pem_private_key(key.secret, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"key {key.meta.key_id}: secret_key is not a usable PEM") from exc
    if not isinstance(private, kind):
        raise SigningError(f"key {key.meta.key_id}: PEM is not a {key.meta.algorithm} key")
    return private


class BinanceVenue:
    """Binance spot; ``binance_usdm`` signs the same way on the futures hosts."""

    credential_headers = frozenset({b"x-mbx-apikey"})

    def __init__(self, name: str) -> None:
        self.name = name

    def signer(self, key: LiveKey, service: ServiceConfig) -> KeySigner:
        return _BinanceSigner(key, service.recv_window_ms)


BINANCE = BinanceVenue("binance")
BINANCE_USDM = BinanceVenue("binance_usdm")
