"""The interface every venue's signer implements, and helpers they share.

A ``Venue`` is stateless and registered by name; ``Venue.signer(key, service)`` builds a
``KeySigner`` for one live key, precomputing what does not change per request (the HMAC
context keyed once, the private-key object, the encoded key-id header). A ``KeySigner``
lives exactly as long as its key is live and is dropped with the key ring.
"""

from __future__ import annotations

import base64
from typing import Protocol

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


class Venue(Protocol):
    name: str
    # Lowercase header names only the sidecar may set: dropped from the engine's request.
    credential_headers: frozenset[bytes]

    def signer(self, key: LiveKey, service: ServiceConfig) -> KeySigner:
        """Build the signer for ``key``; SigningError if the venue cannot use its algorithm."""
        ...


def strip_params(data: bytes, names: frozenset[bytes]) -> bytes:
    """Remove ``name=value`` pairs named in ``names`` from a form/query string."""
    if not data:
        return data
    parts = data.split(b"&")
    kept = [p for p in parts if p.partition(b"=")[0] not in names]
    return data if len(kept) == len(parts) else b"&".join(kept)


def has_param(data: bytes, name: bytes) -> bool:
    """Whether a form/query string carries ``name=`` (at a parameter boundary)."""
    return data.startswith(name + b"=") or (b"&" + name + b"=") in data


def percent_b64(sig: bytes) -> bytes:
    """Base64 then percent-encode the three base64 bytes not allowed in a query value."""
    return base64.b64encode(sig).replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


def header_line(name: str, value: str | bytes) -> bytes:
    """One header line; refuses CR/LF/NUL so key material can never split headers."""
    raw = value.encode("ascii") if isinstance(value, str) else value
    if any(c in raw for c in (b"\r", b"\n", b"\0")):
        raise SigningError(f"{name}: value contains a control character")
    return b"%s: %s\r\n" % (name.encode("ascii"), raw)
