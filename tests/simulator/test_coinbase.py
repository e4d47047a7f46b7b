"""The Coinbase simulator: JWT and legacy-key verification (pure) and the routes.

JWTs are built here the way the CDP SDK and coinbase-advanced-py build them (cryptography
directly, JSON with default separators, ES256 as r||s), legacy signatures with hmac --
never with the sidecar's signer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from yarl import URL

from proxy.simulator import make_app
from proxy.simulator.base import KeySetError
from proxy.simulator.coinbase import (
    ERR_STALE_LEGACY,
    Accepted,
    CoinbaseError,
    parse_coinbase_keys,
    verify_jwt,
    verify_legacy,
)
from tests.simulator.support import NOW_MS, FakeClock

EC_KEY = "organizations/9a7c-sim/apiKeys/41d2-sim-es256"
ED_KEY = "2b5e0c1d-7f3a-4d9e-8b6c-0a1b2c3d4e5f"  # newer CDP key ids are bare UUIDs
LEGACY_KEY = "LegacySimKey01"
LEGACY_SECRET = "legacy-sim-secret-0123456789"
HOST = "api.coinbase.com"

Client = TestClient[web.Request, web.Application]


@cache
def privates() -> tuple[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]:
    return ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()


def public_pem(private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def keys_doc() -> dict[str, list[dict[str, str]]]:
    ec_private, ed_private = privates()
    return {
        "coinbase": [
            {"api_key": EC_KEY, "algorithm": "es256", "public_key": public_pem(ec_private)},
            {"api_key": ED_KEY, "algorithm": "ed25519", "public_key": public_pem(ed_private)},
            {"api_key": LEGACY_KEY, "algorithm": "hmac-sha256", "secret": LEGACY_SECRET},
        ]
    }


KEYS = parse_coinbase_keys(keys_doc()["coinbase"])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(
    uri: str | None,
    *,
    kid: str = EC_KEY,
    now_s: int = NOW_MS // 1000,
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    der: bool = False,
) -> str:
    ec_private, ed_private = privates()
    alg = "EdDSA" if kid == ED_KEY else "ES256"
    head = {"alg": alg, "kid": kid, "nonce": secrets.token_hex(), "typ": "JWT"} | (header or {})
    body: dict[str, Any] = {"sub": kid, "iss": "cdp", "nbf": now_s, "exp": now_s + 120}
    if uri is not None:
        body["uri"] = uri
    body |= claims or {}
    signing_input = (
        f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(body).encode())}".encode()
    )
    if kid == ED_KEY:
        signature = ed_private.sign(signing_input)
    else:
        signature = ec_private.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        if not der:
            r, s = decode_dss_signature(signature)
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode()}.{b64url(signature)}"


def jwt_reason(
    token: str, method: str = "POST", path: str = "/api/v3/brokerage/orders", now: int = NOW_MS
) -> str:
    result = verify_jwt(
        token=token.encode(), method=method, host=HOST, path=path, keys=KEYS, now_ms=now
    )
    return "ok" if isinstance(result, Accepted) else result.reason


URI = "POST api.coinbase.com/api/v3/brokerage/orders"


@pytest.mark.parametrize("kid", [EC_KEY, ED_KEY])
def test_jwt_accepted_with_uri_or_uris(kid: str) -> None:
    assert jwt_reason(make_jwt(URI, kid=kid)) == "ok"
    assert (
        jwt_reason(make_jwt(None, kid=kid, claims={"uris": [URI], "aud": ["cdp_service"]})) == "ok"
    )
    assert jwt_reason(make_jwt(URI, kid=kid, claims={"iss": "coinbase-cloud"})) == "ok"


def test_jwt_rejections() -> None:
    assert jwt_reason(make_jwt(URI, kid="organizations/x/apiKeys/unknown")) == "unknown_key"
    assert jwt_reason(make_jwt(URI, kid=LEGACY_KEY)) == "unknown_key"  # not a CDP key
    assert jwt_reason(make_jwt(URI, der=True)) == "bad_signature"  # DER is not JWS ES256
    assert jwt_reason(make_jwt(URI, header={"alg": "EdDSA"})) == "wrong_alg"
    assert jwt_reason(make_jwt(URI, header={"nonce": ""})) == "no_nonce"
    assert jwt_reason(make_jwt(URI, claims={"sub": ED_KEY})) == "sub_mismatch"
    assert jwt_reason(make_jwt(URI, claims={"iss": "someone"})) == "bad_issuer"
    assert jwt_reason(make_jwt(URI), method="GET") == "uri_mismatch"
    assert jwt_reason(make_jwt(URI), path="/api/v3/brokerage/orders/batch_cancel") == "uri_mismatch"
    assert (
        jwt_reason(make_jwt("POST api.coinbase.com/api/v3/brokerage/orders?x=1")) == "uri_mismatch"
    )
    assert jwt_reason(make_jwt("POST other.host/api/v3/brokerage/orders")) == "uri_mismatch"
    # nbf <= now < exp
    assert jwt_reason(make_jwt(URI, now_s=NOW_MS // 1000 - 119)) == "ok"
    assert jwt_reason(make_jwt(URI, now_s=NOW_MS // 1000 - 120)) == "expired"
    assert jwt_reason(make_jwt(URI, now_s=NOW_MS // 1000 + 1)) == "expired"
    token = make_jwt(URI)
    head, claims, sig = token.split(".")
    forged = b64url(
        json.dumps({"sub": EC_KEY, "iss": "cdp", "nbf": 0, "exp": 2**40, "uri": URI}).encode()
    )
    assert jwt_reason(f"{head}.{forged}.{sig}") == "bad_signature"
    for junk in ("", "a.b", "a.b.c.d", f"{head}.{claims}.%%%", f"{head}!.{claims}.{sig}"):
        assert jwt_reason(junk) == "malformed_jwt"


def legacy(
    method: str,
    path: str,
    body: str,
    *,
    ts: int = NOW_MS // 1000,
    secret: str = LEGACY_SECRET,
    key: str = LEGACY_KEY,
) -> Accepted | CoinbaseError:
    sign = hmac.new(
        secret.encode(), f"{ts}{method}{path}{body}".encode(), hashlib.sha256
    ).hexdigest()
    return verify_legacy(
        api_key=key.encode(),
        signature=sign.encode(),
        timestamp=str(ts).encode(),
        method=method.encode(),
        path=path.encode(),
        body=body.encode(),
        keys=KEYS,
        now_ms=NOW_MS,
    )


def test_legacy_verification() -> None:
    assert isinstance(legacy("POST", "/api/v3/brokerage/orders", '{"a":1}'), Accepted)
    assert isinstance(legacy("GET", "/api/v3/brokerage/orders/historical/x", ""), Accepted)
    assert legacy("POST", "/api/v3/brokerage/orders", "", key="nope").reason == "unknown_key"  # type: ignore[union-attr]
    assert legacy("POST", "/api/v3/brokerage/orders", "", key=EC_KEY).reason == "unknown_key"  # type: ignore[union-attr]
    assert legacy("POST", "/x", "", secret="other").reason == "bad_signature"  # type: ignore[union-attr]
    assert isinstance(legacy("POST", "/x", "", ts=NOW_MS // 1000 - 30), Accepted)
    assert legacy("POST", "/x", "", ts=NOW_MS // 1000 - 31) is ERR_STALE_LEGACY
    assert legacy("POST", "/x", "", ts=NOW_MS // 1000 + 31) is ERR_STALE_LEGACY
    upper = verify_legacy(
        api_key=LEGACY_KEY.encode(),
        signature=hmac.new(
            LEGACY_SECRET.encode(), f"{NOW_MS // 1000}POST/x".encode(), hashlib.sha256
        )
        .hexdigest()
        .upper()
        .encode(),
        timestamp=str(NOW_MS // 1000).encode(),
        method=b"POST",
        path=b"/x",
        body=b"",
        keys=KEYS,
        now_ms=NOW_MS,
    )
    assert isinstance(upper, CoinbaseError) and upper.status == 401  # "must be in lowercase"


def test_key_documents_are_validated() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(KeySetError, match=r"coinbase\[0\]\.public_key"):
        parse_coinbase_keys(
            [{"api_key": "k", "algorithm": "es256", "public_key": public_pem(p384)}]
        )
    with pytest.raises(KeySetError, match=r"coinbase\[0\]\.public_key"):
        parse_coinbase_keys(
            [{"api_key": "k", "algorithm": "ed25519", "public_key": public_pem(privates()[0])}]
        )
    with pytest.raises(KeySetError, match=r"coinbase\[0\]\.algorithm"):
        parse_coinbase_keys([{"api_key": "k", "algorithm": "rsa-pkcs1-sha256", "public_key": "x"}])


# --------------------------------------------------------------------------- routes


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    factory: Callable[[web.Application], Awaitable[Client]] = aiohttp_client
    return await factory(make_app(keys_doc(), clock=clock))


async def call(
    client: Client,
    method: str,
    path: str,
    body: object = None,
    *,
    kid: str = EC_KEY,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    raw = "" if body is None else json.dumps(body)
    base, _, query = path.partition("?")
    host = client.make_url("/").host + f":{client.make_url('/').port}"
    if headers is None:
        headers = {"Authorization": f"Bearer {make_jwt(f'{method} {host}{base}', kid=kid)}"}
    url = URL(str(client.make_url(base)) + (f"?{query}" if query else ""), encoded=True)
    async with client.session.request(
        method,
        url,
        data=raw.encode() or None,
        headers=headers | {"Content-Type": "application/json"},
    ) as resp:
        return resp.status, await resp.read()


ORDER = {
    "client_order_id": "sim-cb-1",
    "product_id": "BTC-USD",
    "side": "BUY",
    "order_configuration": {
        "limit_limit_gtc": {"base_size": "0.001", "limit_price": "30000", "post_only": False}
    },
}


@pytest.mark.parametrize("kid", [EC_KEY, ED_KEY])
async def test_create_get_cancel_round_trip(client: Client, kid: str) -> None:
    status, raw = await call(client, "POST", "/api/v3/brokerage/orders", ORDER, kid=kid)
    body = json.loads(raw)
    assert status == 200 and body["success"] is True, body
    order_id = body["success_response"]["order_id"]
    assert body["success_response"]["client_order_id"] == "sim-cb-1"

    status, raw = await call(
        client, "GET", f"/api/v3/brokerage/orders/historical/{order_id}?x=1", kid=kid
    )
    assert status == 200 and json.loads(raw)["order"]["status"] == "OPEN"

    status, raw = await call(
        client,
        "POST",
        "/api/v3/brokerage/orders/batch_cancel",
        {"order_ids": [order_id, "nope"]},
        kid=kid,
    )
    results = json.loads(raw)["results"]
    assert [r["success"] for r in results] == [True, False]
    status, raw = await call(client, "GET", "/api/v3/brokerage/orders/historical/nope", kid=kid)
    assert status == 404 and json.loads(raw)["error"] == "NOT_FOUND"


async def test_legacy_key_over_http(client: Client) -> None:
    raw = json.dumps(ORDER)
    ts = str(NOW_MS // 1000)
    sign = hmac.new(
        LEGACY_SECRET.encode(), f"{ts}POST/api/v3/brokerage/orders{raw}".encode(), hashlib.sha256
    ).hexdigest()
    headers = {"CB-ACCESS-KEY": LEGACY_KEY, "CB-ACCESS-SIGN": sign, "CB-ACCESS-TIMESTAMP": ts}
    status, body = await call(client, "POST", "/api/v3/brokerage/orders", ORDER, headers=headers)
    assert status == 200 and json.loads(body)["success"] is True


async def test_refusals_are_bare_401s(client: Client, clock: FakeClock) -> None:
    status, body = await call(client, "POST", "/api/v3/brokerage/orders", ORDER, headers={})
    assert (status, body) == (401, b"Unauthorized\n")
    wrong_uri = {
        "Authorization": f"Bearer {make_jwt('POST api.coinbase.com/api/v3/brokerage/orders')}"
    }
    status, body = await call(client, "POST", "/api/v3/brokerage/orders", ORDER, headers=wrong_uri)
    assert (status, body) == (401, b"Unauthorized\n")  # the Host was 127.0.0.1:port
    clock.now = NOW_MS + 120_000  # the venue's clock is 2 minutes past the JWT's nbf
    status, body = await call(client, "POST", "/api/v3/brokerage/orders", ORDER)
    assert (status, body) == (401, b"Unauthorized\n")
    async with client.get("/__sim/log") as resp:
        reasons = [e["verdict"] for e in (await resp.json())["entries"] if e["status"] == 401]
    assert reasons == ["no_credentials", "uri_mismatch", "expired"]


async def test_create_order_refusals(client: Client) -> None:
    status, raw = await call(client, "POST", "/api/v3/brokerage/orders", ORDER | {"side": "HOLD"})
    body = json.loads(raw)
    assert (
        status == 200
        and body["success"] is False
        and body["error_response"]["error"] == "INVALID_SIDE"
    )
    status, raw = await call(client, "POST", "/api/v3/brokerage/orders", {"product_id": "BTC-USD"})
    assert status == 400 and json.loads(raw)["error"] == "INVALID_ARGUMENT"


async def test_time_endpoint_and_revocation(client: Client) -> None:
    async with client.get("/api/v3/brokerage/time") as resp:
        body = await resp.json()
    assert body["epochMillis"] == str(NOW_MS) and body["epochSeconds"] == str(NOW_MS // 1000)
    assert body["iso"].endswith("Z")
    async with client.delete(f"/__sim/keys/{ED_KEY}") as resp:
        assert resp.status == 200
    status, body = await call(client, "POST", "/api/v3/brokerage/orders", ORDER, kid=ED_KEY)
    assert (status, body) == (401, b"Unauthorized\n")
