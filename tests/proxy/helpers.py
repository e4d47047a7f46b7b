"""Test key material and rings, made at test time."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from keycache.record import make_record
from keycache.ring import KeyRing, build_ring

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
PERMS = ["read_market_data", "place_orders", "cancel_orders", "read_account_info"]


def pem_of(private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> str:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def record(key_id: str, secret: str, algorithm: str = "hmac-sha256") -> dict[str, object]:
    return make_record(
        key_id,
        secret,
        algorithm=algorithm,
        created_at=NOW - timedelta(days=1),
        expires_at=NOW + timedelta(days=30),
        permissions=PERMS,
    )


def ring_of(service: str, *records: dict[str, object], now: datetime = NOW) -> KeyRing:
    return build_ring(
        service, list(enumerate(records, start=1)), now=now, overlap=timedelta(hours=24)
    )


def random_hmac_secret() -> str:
    return secrets.token_urlsafe(48)
