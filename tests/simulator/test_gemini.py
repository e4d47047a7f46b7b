"""The Gemini simulator: payload verification (pure and over HTTP), orders, rate limit.

Requests are signed here with hmac/hashlib following Gemini's docs, independently.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.simulator import make_app
from proxy.simulator.gemini import (
    GeminiAccepted,
    GeminiError,
    GeminiVenue,
    parse_gemini_keys,
    verify_gemini,
)
from tests.simulator.support import NOW_MS, FakeClock

Client = TestClient[web.Request, web.Application]

API_KEY = "account-gemini-sim-0001"
SECRET = "gemini-sim-secret-0123456789"
DOC_KEY = "account-doc"
DOC_SECRET = "1234abcd"
DOC_PAYLOAD_B64 = "ewogICAgInJlcXVlc3QiOiAiL3YxL29yZGVyL3N0YXR1cyIsCiAgICAibm9uY2UiOiAxMjM0NTYsCgogICAgIm9yZGVyX2lkIjogMTg4MzQKfQo="
DOC_SIGNATURE = "337cc8b4ea692cfe65b4a85fcc9f042b2e3f702ac956fd098d600ab15705775017beae402be773ceee10719ff70d710f"


def keys_doc() -> dict[str, list[dict[str, str]]]:
    return {
        "gemini": [
            {"api_key": API_KEY, "algorithm": "hmac-sha384", "secret": SECRET},
            {"api_key": DOC_KEY, "algorithm": "hmac-sha384", "secret": DOC_SECRET},
        ]
    }


KEYS = parse_gemini_keys(keys_doc()["gemini"])


def gemini_headers(payload: dict[str, Any] | bytes, secret: str = SECRET) -> dict[str, str]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    b64 = base64.b64encode(raw)
    return {
        "x-gemini-apikey": API_KEY,
        "x-gemini-payload": b64.decode(),
        "x-gemini-signature": hmac.new(secret.encode(), b64, hashlib.sha384).hexdigest(),
    }


def verify(
    headers: dict[str, str], path: str = "/v1/order/new", last: int = 0
) -> GeminiAccepted | GeminiError:
    return verify_gemini(headers=headers, path=path, keys=KEYS, last_nonces={API_KEY: last})


def reason(result: GeminiAccepted | GeminiError) -> str:
    return result.reason if isinstance(result, GeminiError) else "ok"


def test_published_example_verifies() -> None:
    headers = {
        "x-gemini-apikey": DOC_KEY,
        "x-gemini-payload": DOC_PAYLOAD_B64,
        "x-gemini-signature": DOC_SIGNATURE,
    }
    result = verify(headers, "/v1/order/status")
    assert isinstance(result, GeminiAccepted)
    assert result.nonce == 123456 and result.payload["order_id"] == 18834


def test_each_rejection() -> None:
    payload = {"request": "/v1/order/new", "nonce": NOW_MS, "symbol": "btcusd"}
    good = gemini_headers(payload)
    assert reason(verify(good)) == "ok"
    assert reason(verify({**good, "x-gemini-apikey": ""})) == "MissingApikeyHeader"
    assert reason(verify({**good, "x-gemini-apikey": "account-x"})) == "InvalidApiKey"
    assert reason(verify({k: v for k, v in good.items() if k != "x-gemini-payload"})) == (
        "MissingPayloadHeader"
    )
    assert reason(verify({k: v for k, v in good.items() if k != "x-gemini-signature"})) == (
        "MissingSignatureHeader"
    )
    assert reason(verify(gemini_headers(payload, secret="wrong"))) == "InvalidSignature"
    tampered = gemini_headers({**payload, "symbol": "ethusd"})
    assert reason(verify({**good, "x-gemini-payload": tampered["x-gemini-payload"]})) == (
        "InvalidSignature"
    )
    assert reason(verify(gemini_headers(b"not json"))) == "InvalidJson"
    assert reason(verify(good, path="/v1/order/cancel")) == "EndpointMismatch"
    stale = verify(good, last=NOW_MS)
    assert isinstance(stale, GeminiError) and stale.reason == "InvalidNonce"
    assert (
        stale.message
        == f"Nonce '{NOW_MS}' has not increased since your last call to the Gemini API."
    )
    assert reason(verify(gemini_headers({**payload, "nonce": "x"}))) == "InvalidNonce"
    assert reason(verify(gemini_headers({**payload, "nonce": str(NOW_MS)}))) == "ok"  # ccxt's form


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    return await aiohttp_client(make_app(keys_doc(), clock=clock))  # type: ignore[no-any-return]


class Nonces:
    value = NOW_MS

    def __call__(self) -> int:
        Nonces.value += 1
        return Nonces.value


nonce = Nonces()


async def private(
    client: Client, path: str, params: dict[str, Any] | None = None, **kw: Any
) -> tuple[int, Any]:
    payload = {"request": path, "nonce": kw.pop("nonce", None) or nonce(), **(params or {})}
    headers = {"Content-Type": "text/plain", **gemini_headers(payload, **kw)}
    async with client.post(path, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


ORDER = {
    "symbol": "btcusd",
    "amount": "0.5",
    "price": "30000.00",
    "side": "buy",
    "type": "exchange limit",
    "client_order_id": "sim-1",
    "options": ["maker-or-cancel"],
}


async def test_order_lifecycle(client: Client) -> None:
    status, order = await private(client, "/v1/order/new", ORDER)
    assert status == 200, order
    assert order["is_live"] is True and order["client_order_id"] == "sim-1"
    assert order["original_amount"] == "0.5" and order["options"] == ["maker-or-cancel"]
    _, live = await private(client, "/v1/orders")
    assert [o["order_id"] for o in live] == [order["order_id"]]
    _, cancelled = await private(client, "/v1/order/cancel", {"order_id": int(order["order_id"])})
    assert cancelled["is_cancelled"] is True and cancelled["is_live"] is False
    assert (await private(client, "/v1/orders"))[1] == []
    status, body = await private(client, "/v1/order/status", {"order_id": 1})
    assert (status, body["reason"]) == (404, "OrderNotFound")
    status, body = await private(client, "/v1/order/new", {**ORDER, "symbol": "nope"})
    assert (status, body["reason"]) == (400, "InvalidSymbol")


async def test_rejections_over_http(client: Client) -> None:
    status, body = await private(client, "/v1/orders", secret="wrong")
    assert (status, body["result"], body["reason"]) == (400, "error", "InvalidSignature")
    assert (await private(client, "/v1/orders"))[0] == 200
    status, body = await private(client, "/v1/orders", nonce=NOW_MS - 1)
    assert (status, body["reason"]) == (400, "InvalidNonce")
    await client.delete(f"/__sim/keys/{API_KEY}")
    status, body = await private(client, "/v1/orders")
    assert (status, body["reason"]) == (400, "InvalidApiKey")


async def test_rate_limit(aiohttp_client: Any, clock: FakeClock) -> None:
    venue = GeminiVenue(clock=clock, keys=KEYS, rate_limit_per_minute=2)
    app = web.Application()
    app.router.add_routes(venue.routes())
    client: Client = await aiohttp_client(app)
    results = [await private(client, "/v1/orders") for _ in range(3)]
    assert [s for s, _ in results] == [200, 200, 429]
    assert results[2][1] == {
        "result": "error",
        "reason": "RateLimit",
        "message": "Requests were made too frequently",
    }


@settings(max_examples=200, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["x-gemini-apikey", "x-gemini-payload", "x-gemini-signature"]),
        st.sampled_from([API_KEY, "e30=", "é"]) | st.text(max_size=40),
    ),
    payload=st.none() | st.binary(max_size=60),
)
def test_verifier_never_raises_on_junk(headers: dict[str, str], payload: bytes | None) -> None:
    if payload is not None:  # a correctly signed payload of arbitrary bytes
        headers = {**headers, **gemini_headers(payload)}
    result = verify(headers)
    assert isinstance(result, (GeminiAccepted, GeminiError))
