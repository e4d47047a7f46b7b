"""Gemini REST request signing.

Source: https://docs.gemini.com/rest-api/#private-api-invocation (now
https://developer.gemini.com/authentication/api-key), whose worked example is reproduced
in tests/fixtures/published_vectors.json:
- The request's parameters travel in a JSON *payload*: the engine's JSON object body plus
  ``request`` (the endpoint path, e.g. ``"/v1/order/new"``) and ``nonce``.
- ``X-GEMINI-PAYLOAD`` is the base64 of that JSON; ``X-GEMINI-SIGNATURE`` the lowercase hex
  HMAC-SHA384(secret, base64 payload); ``X-GEMINI-APIKEY`` the key. The docs' headers also
  carry ``Content-Type: text/plain``, ``Content-Length: 0`` and ``Cache-Control:
  no-cache``: the HTTP body is empty (``Content-Length: 0`` is the framing the sidecar
  adds to every POST).
- ``nonce``: "a number that will never be repeated and must increase between requests ...
  We recommend using a timestamp at millisecond or higher precision", so the millisecond
  clock made strictly increasing per key (``proxy.signers.nonce``; persisted like
  Kraken's when a state directory is configured). Keys provisioned with "Uses a time based
  nonce" want *seconds* within 30 s instead and are not supported here.

The payload is built without re-encoding the engine's JSON: ``{"request":...,"nonce":N,``
then the engine's members as it wrote them. Only when the engine itself sent ``request``
or ``nonce`` are its members re-spliced, each value's text kept byte for byte.

Errors: ``{"result": "error", "reason": "InvalidSignature", "message": "..."}`` with HTTP
400 (auth), 429 (rate limit), https://docs.gemini.com/rest-api/#error-codes.
"""

from __future__ import annotations

import base64
import json
import re
from binascii import hexlify
from typing import Any

from keycache.ring import LiveKey
from proxy.config import ServiceConfig
from proxy.errors import BadRequest, SigningError
from proxy.signers.base import (
    KeySigner,
    Rejection,
    SignerContext,
    TimeEndpoint,
    header_line,
    json_field,
)
from proxy.signers.nonce import NonceSource, nonce_source

_RESERVED = frozenset({"request", "nonce"})  # the signer's own payload members
_JSON_WS = b" \t\r\n"
_WS = re.compile(r"[ \t\r\n]*")


def _skip_ws(text: str, i: int) -> int:
    match = _WS.match(text, i)
    return match.end() if match else i


_DECODER = json.JSONDecoder()


def _respliced_members(body: bytes) -> bytes:
    """The members of the engine's JSON object minus ``request``/``nonce``, comma-joined,
    each key and value as the engine wrote it. Raises BadRequest if it is not an object."""
    try:
        text = body.decode("utf-8")
        kept: list[str] = []
        i = _skip_ws(text, 0)
        if text[i : i + 1] != "{":
            raise ValueError("not an object")
        i = _skip_ws(text, i + 1)
        if text[i : i + 1] == "}":
            end = i + 1
        else:
            while True:
                if text[i : i + 1] != '"':
                    raise ValueError("expected a member name")
                name, name_end = _DECODER.raw_decode(text, i)
                raw_name = text[i:name_end]
                i = _skip_ws(text, name_end)
                if text[i : i + 1] != ":":
                    raise ValueError("expected ':'")
                i = _skip_ws(text, i + 1)
                _, value_end = _DECODER.raw_decode(text, i)
                if name not in _RESERVED:
                    kept.append(raw_name + ":" + text[i:value_end])
                i = _skip_ws(text, value_end)
                sep = text[i : i + 1]
                if sep == "}":
                    end = i + 1
                    break
                if sep != ",":
                    raise ValueError("expected ',' or '}'")
                i = _skip_ws(text, i + 1)
        if text[end:].strip(" \t\r\n"):
            raise ValueError("data after the object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"gemini: the request body must be a JSON object ({exc})") from exc
    return ",".join(kept).encode("utf-8")


def engine_members(body: bytes) -> bytes:
    """The engine body's members to append to the payload (no braces, maybe empty)."""
    stripped = body.strip(_JSON_WS)
    if not stripped:
        return b""
    if b'"request"' in stripped or b'"nonce"' in stripped:
        return _respliced_members(stripped)
    if not (stripped.startswith(b"{") and stripped.endswith(b"}")):
        raise BadRequest("gemini: the request body must be a JSON object")
    return stripped[1:-1].strip(_JSON_WS)


def _json_string(raw: bytes) -> bytes:
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class _GeminiSigner:
    """Signs with one Gemini key; the keyed HMAC, fixed headers and nonces are made once."""

    __slots__ = ("_fixed", "_keyed", "_nonces", "key_id")

    def __init__(self, key: LiveKey, context: SignerContext) -> None:
        self.key_id = key.meta.key_id
        if key.meta.algorithm != "hmac-sha384":
            raise SigningError(
                f"gemini signs with HMAC-SHA384: key {self.key_id} must be hmac-sha384, "
                f"not {key.meta.algorithm}"
            )
        import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

        self._keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha384")
        self._fixed = (
            header_line("Content-Type", "text/plain")
            + header_line("Cache-Control", "no-cache")
            + header_line("X-GEMINI-APIKEY", self.key_id)
        )
        self._nonces: NonceSource = nonce_source("gemini", self.key_id, context.state_dir)

    @staticmethod
    def payload(path: bytes, members: bytes, nonce: int) -> bytes:
        """The JSON payload for ``path`` with the engine's members (``engine_members``)."""
        head = b'{"request":%s,"nonce":%d' % (_json_string(path), nonce)
        return head + (b"," + members + b"}" if members else b"}")

    def sign_payload(self, payload: bytes) -> tuple[bytes, bytes]:
        """(base64 payload, hex signature) for the payload bytes as given."""
        encoded = base64.b64encode(payload)
        h = self._keyed.copy()
        h.update(encoded)
        return encoded, hexlify(h.digest())

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        members = engine_members(body)  # validated before a nonce is spent
        payload = self.payload(path, members, self._nonces.next(now_ms))
        encoded, signature = self.sign_payload(payload)
        lines = self._fixed + b"X-GEMINI-PAYLOAD: %s\r\nX-GEMINI-SIGNATURE: %s\r\n" % (
            encoded,
            signature,
        )
        return (path + b"?" + query if query else path), lines, b""


# The documented error reasons (rest-api/#error-codes; the same list ccxt maps).
_REASONS: dict[str, Rejection] = {
    "InvalidApiKey": Rejection.KEY_REJECTED,  # unknown or revoked key
    "MissingApikeyHeader": Rejection.KEY_REJECTED,
    "InvalidSignature": Rejection.BAD_SIGNATURE,
    "MissingSignatureHeader": Rejection.BAD_SIGNATURE,
    "MissingPayloadHeader": Rejection.BAD_SIGNATURE,
    "InvalidNonce": Rejection.CLOCK_OR_NONCE,  # not greater than the last, or missing
    "RateLimit": Rejection.RATE_LIMITED,  # "Requests were made too frequently"
}
_STATUSES: dict[int, Rejection] = {
    429: Rejection.RATE_LIMITED,
}


class GeminiVenue:
    """Gemini (api.gemini.com, ``/v1/...``). No documented server-time endpoint."""

    name = "gemini"
    credential_headers = frozenset({b"x-gemini-apikey", b"x-gemini-payload", b"x-gemini-signature"})
    # The signer sends its own Content-Type and Cache-Control; the engine's would repeat them.
    replaces_headers = frozenset({b"content-type", b"cache-control"})
    time_endpoint: TimeEndpoint | None = None

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _GeminiSigner(key, context)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        if 200 <= status < 300:
            return None
        reason = json_field(body, "reason")
        if isinstance(reason, str) and reason in _REASONS:
            return _REASONS[reason]
        return _STATUSES.get(status, Rejection.OTHER)


GEMINI = GeminiVenue()
