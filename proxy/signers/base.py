"""The interface every venue's signer implements, and helpers they share.

A ``Venue`` is stateless and registered by name; ``Venue.signer(key, service)`` builds a
``KeySigner`` for one live key, precomputing what does not change per request (the HMAC
context keyed once, the private-key object, the encoded key-id header). A ``KeySigner``
lives exactly as long as its key is live and is dropped with the key ring.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from keycache.ring import LiveKey
from proxy.config import ServiceConfig
from proxy.errors import SigningError


class KeySigner(Protocol):
    """Signs requests with one key. ``sign`` is synchronous and may run on the loop."""

    key_id: str

    def sign(
        self, method: bytes, path: bytes, query: bytes, body: bytes, now_ms: int
    ) -> tuple[bytes, bytes, bytes]:
        """Return ``(target, credential_header_lines, body)`` exactly as to be sent.

        ``path`` is the venue path (route prefix removed), ``query`` the raw query string
        without ``?``, ``body`` the raw body; credentials the engine put in the query or
        body are removed first. ``target`` is ``path[?query]``; the header lines are
        ``b"Name: value\\r\\n"``. The signature covers exactly the returned bytes.
        Raises SigningError.
        """
        ...


class Rejection(enum.Enum):
    """What a venue's refusal means, which decides what the sidecar may do about it.

    Only ``KEY_REJECTED`` may be answered by re-signing with the other key of an overlap
    pair; everything else goes back to the engine as the venue sent it.
    """

    KEY_REJECTED = "key_rejected"  # the venue does not accept this key (unknown, revoked)
    BAD_SIGNATURE = "bad_signature"  # the key is known but the signature does not verify
    CLOCK_OR_NONCE = "clock_or_nonce"  # timestamp outside the window, nonce not increasing
    RATE_LIMITED = "rate_limited"  # slow down (429 and the venue's own codes)
    BANNED = "banned"  # stop: IP or key banned for a while (Binance 418)
    OTHER = "other"  # any other refusal (bad parameters, insufficient balance, ...)


@dataclass(frozen=True, slots=True)
class TimeEndpoint:
    """The venue's public server-time endpoint, for measuring our clock's offset."""

    path: bytes  # GET this path on the service's upstream
    parse: Callable[[bytes], float]  # response body -> venue time, epoch milliseconds


@dataclass(frozen=True, slots=True)
class SignerContext:
    """What a signer may need beyond its key: where to keep state across restarts."""

    state_dir: Path | None = None  # e.g. Kraken's nonce high-water mark; None = in memory


class Venue(Protocol):
    name: str
    # Lowercase header names only the sidecar may set: dropped from the engine's request.
    credential_headers: frozenset[bytes]
    time_endpoint: TimeEndpoint | None

    def signer(self, key: LiveKey, service: ServiceConfig, context: SignerContext) -> KeySigner:
        """Build the signer for ``key``; SigningError if the venue cannot use its algorithm."""
        ...

    def classify(self, status: int, body: bytes) -> Rejection | None:
        """What a response means: None for a success, else the kind of refusal.

        Table-driven from the venue's documented error bodies: the body decides first,
        the HTTP status only when the body says nothing known. Pure and cheap: it runs on
        the loop for every non-2xx answer.
        """
        ...


def load_private_key(key: LiveKey) -> Any:
    """The private-key object of a PEM key, loaded from its DER in the ring's locked
    buffer (``LiveKey.der``): parsing DER from our buffer leaves no decoded copy of the
    key in freed memory, as parsing the PEM would. The object lives as long as the signer
    that holds it, i.e. as long as the key is live; OpenSSL clears it when it is freed.
    Raises SigningError (naming the key id, never key bytes)."""
    try:
        if key.der is not None:
            return serialization.load_der_private_key(key.der, password=None)
        # A LiveKey built without a DER view (tests build some by hand).
        return serialization.load_pem_private_key(key.secret, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningError(f"key {key.meta.key_id}: secret_key is not a usable PEM") from None


def json_field(body: bytes, *path: str) -> Any:
    """``body`` parsed as JSON, then indexed by ``path``; None when anything is missing."""
    try:
        value: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def strip_params(data: bytes, names: frozenset[bytes]) -> bytes:
    """Remove ``name=value`` pairs named in ``names`` from a form/query string."""
    if not data:
        return data
    for name in names:
        if data.find(name + b"=") >= 0:  # not `in`: see proxy.http11
            break
    else:
        return data  # the common case: nothing to strip, decided in C
    parts = data.split(b"&")
    kept = [p for p in parts if p.partition(b"=")[0] not in names]
    return data if len(kept) == len(parts) else b"&".join(kept)


def has_param(data: bytes, name: bytes) -> bool:
    """Whether a form/query string carries ``name=`` (at a parameter boundary)."""
    return data.startswith(name + b"=") or data.find(b"&" + name + b"=") >= 0


def percent_b64(sig: bytes) -> bytes:
    """Base64 then percent-encode the three base64 bytes not allowed in a query value."""
    return base64.b64encode(sig).replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


def header_line(name: str, value: str | bytes) -> bytes:
    """One header line; refuses CR/LF/NUL so key material can never split headers."""
    raw = value.encode("ascii") if isinstance(value, str) else value
    if any(c in raw for c in (b"\r", b"\n", b"\0")):
        raise SigningError(f"{name}: value contains a control character")
    return b"%s: %s\r\n" % (name.encode("ascii"), raw)
