"""Independent request signing for the simulator's tests.

Signatures are computed here with hashlib/hmac and cryptography directly, following
Binance's documentation, never with the sidecar's signers nor the simulator's own code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from dataclasses import dataclass
from functools import cache
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from multidict import CIMultiDictProxy
from yarl import URL

FORM = "application/x-www-form-urlencoded"
NOW_MS = 1_764_000_000_000  # a fixed "now" for the fake clock

# Binance's published HMAC example (request-security page / rest-api.md).
DOC_API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
DOC_PAYLOAD = (
    "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
    "&recvWindow=5000&timestamp=1499827319559"
)
DOC_SIGNATURE = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
DOC_TIMESTAMP = 1499827319559
# Example 3 of the same page: query and body concatenated with no "&" between them.
DOC_MIXED_QUERY = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC"
DOC_MIXED_BODY = "quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
DOC_MIXED_SIGNATURE = "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"

HMAC_API_KEY = "simtest-hmac-0001"
HMAC_SECRET = "simtest-hmac-secret-0123456789abcdef"
ED25519_API_KEY = "simtest-ed25519-0001"
RSA_API_KEY = "simtest-rsa-0001"


@dataclass(frozen=True)
class SigningKeys:
    """Private halves the tests sign with; the simulator only gets the public halves."""

    ed25519: ed25519.Ed25519PrivateKey
    rsa: rsa.RSAPrivateKey


@cache
def signing_keys() -> SigningKeys:
    """Made once per test session (RSA generation is the slow part)."""
    return SigningKeys(
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def public_pem(private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def keys_document() -> dict[str, list[dict[str, str]]]:
    """What the venue knows: the HMAC secret, and public keys for Ed25519 and RSA."""
    keys = signing_keys()
    return {
        "binance": [
            {"api_key": HMAC_API_KEY, "algorithm": "hmac-sha256", "secret": HMAC_SECRET},
            {"api_key": DOC_API_KEY, "algorithm": "hmac-sha256", "secret": DOC_SECRET},
            {
                "api_key": ED25519_API_KEY,
                "algorithm": "ed25519",
                "public_key": public_pem(keys.ed25519),
            },
            {
                "api_key": RSA_API_KEY,
                "algorithm": "rsa-pkcs1-sha256",
                "public_key": public_pem(keys.rsa),
            },
        ]
    }


def sign_hmac(payload: bytes, secret: str = HMAC_SECRET) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def sign_ed25519(payload: bytes) -> str:
    raw = signing_keys().ed25519.sign(payload)
    return urllib.parse.quote(base64.b64encode(raw).decode(), safe="")


def sign_rsa(payload: bytes) -> str:
    raw = signing_keys().rsa.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return urllib.parse.quote(base64.b64encode(raw).decode(), safe="")


SIGNERS = {
    HMAC_API_KEY: sign_hmac,
    ED25519_API_KEY: sign_ed25519,
    RSA_API_KEY: sign_rsa,
}


def signed(params: str, api_key: str = HMAC_API_KEY) -> str:
    """``params`` with ``&signature=...`` appended, signed with ``api_key``'s scheme."""
    return f"{params}&signature={SIGNERS[api_key](params.encode())}"


class FakeClock:
    """The simulator's clock seam: tests set ``now`` (ms)."""

    def __init__(self, now: int = NOW_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]


async def read_reply(resp: ClientResponse) -> Reply:
    raw = await resp.read()
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    return Reply(resp.status, body, resp.headers)


async def send(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    *,
    query: str = "",
    body: str | bytes = b"",
    api_key: str | None = HMAC_API_KEY,
    content_type: str | None = FORM,
    headers: dict[str, str] | None = None,
) -> Reply:
    """Send exactly ``query`` and ``body`` (no client-side re-encoding of the URL)."""
    url = URL(f"{client.make_url(path)}" + (f"?{query}" if query else ""), encoded=True)
    all_headers = dict(headers or {})
    if api_key is not None:
        all_headers["X-MBX-APIKEY"] = api_key
    data = body.encode() if isinstance(body, str) else body
    if data and content_type is not None:
        all_headers["Content-Type"] = content_type
    async with client.session.request(method, url, data=data or None, headers=all_headers) as resp:
        return await read_reply(resp)
