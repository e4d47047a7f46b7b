"""Fixtures for the keycache tests: freshly generated test keys, never committed."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.keycache.helpers import RecordFactory, hmac_record, pkcs8


@pytest.fixture(scope="session")
def pems() -> dict[str, str]:
    """One PKCS#8 PEM per key type, generated once per session (RSA is slow)."""
    return {
        "ed25519": pkcs8(ed25519.Ed25519PrivateKey.generate()),
        "rsa": pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "p256": pkcs8(ec.generate_private_key(ec.SECP256R1())),
        "p384": pkcs8(ec.generate_private_key(ec.SECP384R1())),
    }


@pytest.fixture
def make_hmac_record() -> RecordFactory:
    """Build a valid HMAC record; keyword arguments override the defaults."""
    return hmac_record
