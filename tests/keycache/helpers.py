"""Constants and builders shared by the keycache tests (test keys made at test time)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keycache.record import make_record

T0 = datetime(2026, 11, 28, tzinfo=UTC)

RecordFactory = Callable[..., dict[str, object]]


def pkcs8(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def hmac_record(
    *,
    key_id: str | None = None,
    secret_key: str | None = None,
    created_at: datetime = T0,
    expires_at: datetime | None = None,
    permissions: Sequence[str] = ("trade", "read"),
    activates_at: datetime | None = None,
    passphrase: str | None = None,
    algorithm: str = "hmac-sha256",
) -> dict[str, object]:
    """A valid HMAC key record with a fresh random secret unless one is given."""
    return make_record(
        key_id if key_id is not None else "hft_" + secrets.token_hex(16),
        secret_key if secret_key is not None else secrets.token_urlsafe(32),
        algorithm=algorithm,
        created_at=created_at,
        expires_at=expires_at if expires_at is not None else created_at + timedelta(days=90),
        permissions=permissions,
        activates_at=activates_at,
        passphrase=passphrase,
    )
