"""Deribit API v2 request signing over HTTP ("Deribit signature credentials").

Source: https://docs.deribit.com/#authentication (section "Deribit Signature
Credentials", and the shell example there):
- ``Authorization: deri-hmac-sha256 id=ClientId,ts=Timestamp,sig=Signature,nonce=Nonce``
- ``Timestamp`` in milliseconds, "valid for 60 seconds since generation".
- ``Nonce``: "single usage, user generated initialization vector": 16 random hex digits.
- ``Signature = HEX_STRING(HMAC-SHA256(ClientSecret, StringToSign))`` with
  ``StringToSign = Timestamp + "\\n" + Nonce + "\\n" + RequestData`` and
  ``RequestData = UPPERCASE(HTTP_METHOD) + "\\n" + URI + "\\n" + RequestBody + "\\n"``;
  ``URI`` is the path with its query (``/api/v2/private/get_account_summary?currency=BTC``).
Field order in the header is the one ccxt sends (id, ts, sig, nonce).

Errors are JSON-RPC: ``{"jsonrpc": "2.0", "error": {"code": 13004, "message":
"invalid_credentials"}, ...}`` (https://docs.deribit.com/#rpc-error-codes).
"""

from __future__ import annotations

import os
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

NONCE_BYTES = 8  # 64 random bits: never repeats within a 60-second timestamp window


class _DeribitSigner:
    """Signs with one Deribit client id; the keyed HMAC and header prefix are made once."""

    __slots__ = ("_keyed", "_prefix", "key_id")

    def __init__(self, key: LiveKey) -> None:
        self.key_id = key.meta.key_id
        if key.meta.algorithm != "hmac-sha256":
            raise SigningError(f"deribit keys are hmac-sha256, not {key.meta.algorithm}")
        if any(c in self.key_id for c in ", ="):
            # the id sits inside a comma-separated Authorization value
            raise SigningError(f"deribit client id {self.key_id!r} contains ',', '=' or ' '")
        import _hashlib  # the C HMAC: takes a memoryview key, no bytes copy

        self._keyed: Any = _hashlib.hmac_new(key.secret, digestmod="sha256")
        line = header_line("Authorization", f"deri-hmac-sha256 id={self.key_id},ts=")
        self._prefix = line[:-2]  # without CRLF: ts, sig and nonce follow per request

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        target = path + b"?" + query if query else path
        ts = b"%d" % now_ms
        nonce = hexlify(os.urandom(NONCE_BYTES))
        h = self._keyed.copy()
        h.update(b"%s\n%s\n%s\n%s\n%s\n" % (ts, nonce, method.upper(), target, body))
        line = b"%s%s,sig=%s,nonce=%s\r\n" % (self._prefix, ts, hexlify(h.digest()), nonce)
        return target, line, body


# JSON-RPC error codes (https://docs.deribit.com/#rpc-error-codes).
_CODES: dict[int, Rejection] = {
    13004: Rejection.KEY_REJECTED,  # invalid_credentials: "Invalid credentials have been used."
    10000: Rejection.BAD_SIGNATURE,  # authorization_required: "invalid or absent signature etc."
    # unauthorized: "Wrong or expired authorization token or bad signature." The code alone
    # cannot tell a stale timestamp from a bad signature; ``data.reason`` refines it below.
    13009: Rejection.BAD_SIGNATURE,
    10028: Rejection.RATE_LIMITED,  # too_many_requests
    10047: Rejection.RATE_LIMITED,  # matching_engine_queue_full
    10066: Rejection.RATE_LIMITED,  # too_many_concurrent_requests
    13002: Rejection.BANNED,  # account_blocked: "Account is blocked by admin."
    12005: Rejection.BANNED,  # country_is_banned
}
_STATUSES: dict[int, Rejection] = {
    429: Rejection.RATE_LIMITED,
}


def _server_time(body: bytes) -> float:
    value = json_field(body, "result")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("no integer result in the response")
    return float(value)


class DeribitVenue:
    """Deribit (www.deribit.com, ``/api/v2/private/...``)."""

    # Refuses a key with a 2xx status and the verdict in the body (proxy.server reads
    # the body of a success only for such venues, during an overlap).
    key_refusal_in_2xx = True
    name = "deribit"
    credential_headers = frozenset({b"authorization"})
    time_endpoint: TimeEndpoint | None = TimeEndpoint(b"/api/v2/public/get_time", _server_time)

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        return _DeribitSigner(key)

    def classify(self, status: int, body: bytes) -> Rejection | None:
        """JSON-RPC errors may come with any status (even 200): the body decides."""
        if 200 <= status < 300 and b'"error"' not in body:
            return None
        error = json_field(body, "error")
        if not isinstance(error, dict):
            return None if 200 <= status < 300 else _STATUSES.get(status, Rejection.OTHER)
        code = error.get("code")
        if isinstance(code, int) and code in _CODES:
            kind = _CODES[code]
            if code == 13009:
                data = error.get("data")
                reason = data.get("reason") if isinstance(data, dict) else None
                if isinstance(reason, str) and ("timestamp" in reason or "expired" in reason):
                    return Rejection.CLOCK_OR_NONCE
            return kind
        return _STATUSES.get(status, Rejection.OTHER)


DERIBIT = DeribitVenue()
