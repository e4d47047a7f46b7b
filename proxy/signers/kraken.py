"""Kraken spot REST request signing.

Source: https://docs.kraken.com/api/docs/guides/spot-rest-auth (the same text on
https://docs.kraken.com/exchange/guides/rest/authentication):
- ``API-Key`` header: the public API key.
- ``API-Sign`` header: base64 of HMAC-SHA512, keyed with the *base64-decoded* secret, of
  ``URI path + SHA256(nonce + POST data)``; the URI path is the part starting ``/0/private``.
- ``nonce``: a POST parameter, "always increasing, unsigned 64-bit integer". Kraken's
  examples put it first (``nonce=1616492376594&ordertype=limit&...``); so do we, after
  removing any nonce the engine sent. The nonce is the millisecond clock made strictly
  increasing per key, with a high-water mark persisted under ``SignerContext.state_dir``
  so a restart never repeats one (see ``proxy.signers.nonce`` for the block reservation).
- Request payloads are form-encoded (``application/x-www-form-urlencoded``,
  https://docs.kraken.com/rest/); the engine sends that content type with its body.

Errors (https://docs.kraken.com/api/docs/guides/spot-errors and
https://support.kraken.com/hc/en-us/articles/360001491786-API-error-messages): Kraken
answers HTTP 200 with ``{"error": ["EAPI:Invalid key"], "result": {}}``; entries start with
``E`` (error) or ``W`` (warning) and may carry extra ``:detail`` parts.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from keycache.ring import LiveKey
from keycache.securemem import wipe_bytearray
from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.signers.base import (
    KeySigner,
    Rejection,
    SignerContext,
    TimeEndpoint,
    header_line,
    json_field,
    strip_params,
)
from proxy.signers.nonce import NonceSource, nonce_source

_CREDENTIAL_PARAMS = frozenset({b"nonce"})

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUES = bytes(_B64_ALPHABET.index(c) if c in _B64_ALPHABET else 0xFF for c in range(256))


def decode_secret(secret: memoryview) -> bytearray:
    """Kraken's secret (standard base64 text) decoded into a fresh bytearray to wipe.

    Decoded here, byte by byte, rather than with ``base64.b64decode``: that returns an
    immutable ``bytes`` copy of the raw secret that could never be wiped. Raises
    SigningError (naming no secret byte) if the text is not canonical base64.
    """
    n = len(secret)
    if n == 0 or n % 4:
        raise SigningError("kraken secret_key is not base64 (length is not a multiple of 4)")
    pad = 2 if secret[n - 2] == 0x3D else 1 if secret[n - 1] == 0x3D else 0
    if pad == 2 and secret[n - 1] != 0x3D:
        raise SigningError("kraken secret_key is not base64 (bad padding)")
    out = bytearray(n // 4 * 3 - pad)
    o = 0
    for i in range(0, n, 4):
        acc = 0
        for j in range(4):
            c = secret[i + j]
            if c == 0x3D and i + j >= n - pad:
                v = 0
            else:
                v = _B64_VALUES[c]
                if v == 0xFF:
                    wipe_bytearray(out)
                    raise SigningError("kraken secret_key is not base64 (bad character)")
            acc = (acc << 6) | v
        for shift in (16, 8, 0):
            if o < len(out):
                out[o] = (acc >> shift) & 0xFF
                o += 1
    return out


class _KrakenSigner:
    """Signs with one Kraken key; the keyed HMAC and nonce source are made once."""

    __slots__ = ("_header", "_keyed", "_nonces", "key_id")

    def __init__(self, key: LiveKey, context: SignerContext) -> None:
        self.key_id = key.meta.key_id
        if key.meta.algorithm != "hmac-sha512":
            raise SigningError(
                f"kraken signs with HMAC-SHA512: key {self.key_id} must be hmac-sha512, "
                f"not {key.meta.algorithm}"
            )
        import _hashlib  # the C HMAC: takes a buffer key, keeps its own copy

        raw = decode_secret(key.secret)
        try:
            self._keyed: Any = _hashlib.hmac_new(raw, digestmod="sha512")
        finally:
            wipe_bytearray(raw)
        self._header = header_line("API-Key", self.key_id)
        self._nonces: NonceSource = nonce_source("kraken", self.key_id, context.state_dir)

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        if query.find(b"nonce=") >= 0:  # not `in`: see proxy.http11
            query = strip_params(query, _CREDENTIAL_PARAMS)
        if body.find(b"nonce=") >= 0:
            body = strip_params(body, _CREDENTIAL_PARAMS)
        nonce = b"%d" % self._nonces.next(now_ms)
        body = b"nonce=%s&%s" % (nonce, body) if body else b"nonce=" + nonce
        h = self._keyed.copy()
        h.update(path + hashlib.sha256(nonce + body).digest())
        lines = self._header + b"API-Sign: %s\r\n" % base64.b64encode(h.digest())
        return (path + b"?" + query if query else path), lines, body


# The documented error strings (guides/spot-errors, support article 360001491786).
_ERRORS: dict[str, Rejection] = {
    "EAPI:Invalid key": Rejection.KEY_REJECTED,  # unknown, deleted or revoked key
    "EAPI:Invalid signature": Rejection.BAD_SIGNATURE,
    "EAPI:Invalid nonce": Rejection.CLOCK_OR_NONCE,  # not above the last accepted nonce
    "EAPI:Rate limit exceeded": Rejection.RATE_LIMITED,  # the API call counter
    "EOrder:Rate limit exceeded": Rejection.RATE_LIMITED,  # the add/cancel order counter
    "EGeneral:Too many requests": Rejection.RATE_LIMITED,
    "EGeneral:Temporary lockout": Rejection.BANNED,  # "typically ... approximately 15 minutes"
}
_STATUSES: dict[int, Rejection] = {
    429: Rejection.RATE_LIMITED,
}


def _classify_entries(errors: list[Any]) -> Rejection | None:
    """The kind of the first error entry; None if there are only warnings."""
    kinds = []
    for entry in errors:
        if not isinstance(entry, str) or not entry.startswith("E"):
            continue  # "W..." entries are warnings on a successful call
        # "EGeneral:Internal error:<code>" and friends: match on severity+category:message.
        head = ":".join(entry.split(":", 2)[:2])
        kinds.append(_ERRORS.get(entry) or _ERRORS.get(head) or Rejection.OTHER)
    if not kinds:
        return None
    known = [k for k in kinds if k is not Rejection.OTHER]
    return known[0] if known else Rejection.OTHER


def server_time(body: bytes) -> float:
    """``GET /0/public/Time``'s ``result.unixtime`` in ms (the endpoint is not registered
    as the venue's time endpoint: see ``KrakenVenue``)."""
    value = json_field(body, "result", "unixtime")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("no result.unixtime in the response")
    return float(value * 1000)  # Kraken's clock has one-second resolution here


# Kraken's clock: ``GET /0/public/Time`` answers in whole seconds. Kraken checks no
# timestamp, only that each nonce exceeds the last, so a venue offset buys nothing; measured
# at one-second resolution it would put our nonces up to a second behind the wall clock
# and make them jump at every resync. So no time endpoint is registered (no clock sync).
TIME_ENDPOINT = TimeEndpoint(b"/0/public/Time", server_time)


class KrakenVenue:
    """Kraken spot REST (api.kraken.com, ``/0/private/...``)."""

    # Refuses a key with a 2xx status and the verdict in the body (proxy.server reads
    # the body of a success only for such venues, during an overlap).
    key_refusal_in_2xx = True
    name = "kraken"
    credential_headers = frozenset({b"api-key", b"api-sign"})
    time_endpoint: TimeEndpoint | None = None

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _KrakenSigner(key, context)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        """Kraken refuses with HTTP 200 and a non-empty ``error`` list: the body decides."""
        if 200 <= status < 300 and b'"error":[]' in body:
            return None  # the common case, decided without parsing
        errors = json_field(body, "error")
        if isinstance(errors, list):
            kind = _classify_entries(errors)
            if kind is not None:
                return kind
            if 200 <= status < 300:
                return None
        elif 200 <= status < 300:
            return None
        return _STATUSES.get(status, Rejection.OTHER)


KRAKEN = KrakenVenue()
