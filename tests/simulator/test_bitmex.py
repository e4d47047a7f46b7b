"""The BitMEX simulator: verification (pure and over HTTP), orders, rate-limit headers.

Requests are signed here with hmac/hashlib following apiKeysUsage, independently.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.simulator import make_app
from proxy.simulator.bitmex import BitmexError, BitmexVenue, parse_bitmex_keys, verify_bitmex
from proxy.simulator.hmackeys import SharedSecretKey
from tests.simulator.support import NOW_MS, FakeClock

Client = TestClient[web.Request, web.Application]

DOC_KEY = "LAqUlngMIQkIUjXMUreyu3qn"
DOC_SECRET = "chNOOS4KvNXR_Xq4k4c9qsfoKWvnDecLATCRlcBwyKDYnWgO"
API_KEY = "bitmex-sim-key-0001"
SECRET = "bitmex-sim-secret-0123456789"
NOW_S = NOW_MS // 1000


def keys_doc() -> dict[str, list[dict[str, str]]]:
    return {
        "bitmex": [
            {"api_key": API_KEY, "algorithm": "hmac-sha256", "secret": SECRET},
            {"api_key": DOC_KEY, "algorithm": "hmac-sha256", "secret": DOC_SECRET},
        ]
    }


KEYS = parse_bitmex_keys(keys_doc()["bitmex"])


def signature(verb: str, target: str, expires: int, data: str, secret: str = SECRET) -> str:
    message = f"{verb}{target}{expires}{data}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def headers_for(
    verb: str, target: str, data: str = "", *, expires: int = NOW_S + 5, secret: str = SECRET
) -> dict[str, str]:
    return {
        "api-key": API_KEY,
        "api-expires": str(expires),
        "api-signature": signature(verb, target, expires, data, secret),
    }


def verify(
    verb: str, target: str, data: str, headers: dict[str, str], now_ms: int = NOW_MS
) -> SharedSecretKey | BitmexError:
    return verify_bitmex(
        headers=headers,
        verb=verb.encode(),
        target=target.encode(),
        body=data.encode(),
        keys=KEYS,
        now_ms=now_ms,
    )


def test_published_examples_verify() -> None:
    examples = [
        (
            "GET",
            "/api/v1/instrument",
            1518064236,
            "",
            "c7682d435d0cfe87c16098df34ef2eb5a549d4c5a3c2b1f0f77b8af73423bf00",
        ),
        (
            "GET",
            "/api/v1/instrument?filter=%7B%22symbol%22%3A+%22XBTM15%22%7D",
            1518064237,
            "",
            "e2f422547eecb5b3cb29ade2127e21b858b235b386bfa45e1c1756eb3383919f",
        ),
        (
            "POST",
            "/api/v1/order",
            1518064238,
            '{"symbol":"XBTM15","price":219.0,"clOrdID":"mm_bitmex_1a/oemUeQ4CAJZgP3fjHsA","orderQty":98}',
            "1749cd2ccae4aa49048ae09f0b95110cee706e0944e6a14ad0b3a8cb45bd336b",
        ),
    ]
    for verb, target, expires, data, sig in examples:
        headers = {"api-key": DOC_KEY, "api-expires": str(expires), "api-signature": sig}
        result = verify(verb, target, data, headers, now_ms=1518064230_000)
        assert isinstance(result, SharedSecretKey) and result.api_key == DOC_KEY


def test_each_rejection() -> None:
    target, data = "/api/v1/order", '{"symbol":"XBTUSD","orderQty":1,"price":100}'
    good = headers_for("POST", target, data)
    assert isinstance(verify("POST", target, data, good), SharedSecretKey)
    assert verify("POST", target, data, {**good, "api-key": "x"}).message == "Invalid API Key."  # type: ignore[union-attr]
    assert verify("POST", target, data, {k: v for k, v in good.items() if k != "api-key"}) == (
        BitmexError(401, "Invalid API Key.")
    )
    tampered = verify("POST", target, data.replace("1,", "9,"), good)
    assert tampered == BitmexError(401, "Signature not valid.")
    assert verify("PUT", target, data, good) == BitmexError(401, "Signature not valid.")
    stale = headers_for("POST", target, data, expires=NOW_S - 1)
    assert verify("POST", target, data, stale) == BitmexError(
        400, f"This request has expired - `expires` is in the past. Current time: {NOW_S}"
    )
    # expires == now is still valid ("after which the request is no longer valid")
    assert isinstance(
        verify("POST", target, data, headers_for("POST", target, data, expires=NOW_S)),
        SharedSecretKey,
    )


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    return await aiohttp_client(make_app(keys_doc(), clock=clock))  # type: ignore[no-any-return]


async def call(
    client: Client,
    verb: str,
    target: str,
    data: str = "",
    *,
    expires: int = NOW_S + 5,
    secret: str = SECRET,
    content_type: str = "application/json",
) -> tuple[int, Any, Any]:
    headers = headers_for(verb, target, data, expires=expires, secret=secret)
    if data:
        headers["Content-Type"] = content_type
    url = URL(str(client.make_url("")).rstrip("/") + target, encoded=True)
    async with client.session.request(verb, url, data=data.encode() or None, headers=headers) as r:
        return r.status, json.loads(await r.read()), r.headers


ORDER = '{"symbol":"XBTUSD","side":"Buy","orderQty":100,"price":30000,"ordType":"Limit","clOrdID":"c-1"}'


async def test_order_lifecycle(client: Client) -> None:
    status, order, headers = await call(client, "POST", "/api/v1/order", ORDER)
    assert status == 200, order
    assert order["ordStatus"] == "New" and order["clOrdID"] == "c-1" and order["leavesQty"] == 100
    assert headers["x-ratelimit-limit"] == "120" and headers["x-ratelimit-remaining"] == "119"
    assert int(headers["x-ratelimit-reset"]) >= NOW_S

    target = "/api/v1/order?filter=%7B%22open%22%3A+true%7D&symbol=XBTUSD"
    status, orders, _ = await call(client, "GET", target)
    assert status == 200 and [o["orderID"] for o in orders] == [order["orderID"]]

    status, cancelled, _ = await call(
        client,
        "DELETE",
        "/api/v1/order",
        f"orderID={order['orderID']}",
        content_type="application/x-www-form-urlencoded",
    )
    assert status == 200 and cancelled[0]["ordStatus"] == "Canceled"
    _, orders, _ = await call(client, "GET", target)
    assert orders == []
    status, body, _ = await call(client, "POST", "/api/v1/order", ORDER)
    assert (status, body["error"]["message"]) == (400, "Duplicate clOrdID")


async def test_rejections_over_http(client: Client) -> None:
    status, body, _ = await call(client, "POST", "/api/v1/order", ORDER, secret="wrong")
    assert (status, body) == (
        401,
        {"error": {"message": "Signature not valid.", "name": "HTTPError"}},
    )
    status, body, _ = await call(client, "POST", "/api/v1/order", ORDER, expires=NOW_S - 10)
    assert status == 400 and body["error"]["message"].startswith("This request has expired")
    await client.delete(f"/__sim/keys/{API_KEY}")
    status, body, _ = await call(client, "POST", "/api/v1/order", ORDER)
    assert (status, body["error"]["message"]) == (401, "Invalid API Key.")
    log = await (await client.get("/__sim/log")).json()
    assert [e["verdict"] for e in log["entries"]][-1] == "Invalid API Key."


async def test_rate_limit_429_with_retry_after(aiohttp_client: Any, clock: FakeClock) -> None:
    venue = BitmexVenue(clock=clock, keys=KEYS, rate_limit_per_minute=2)
    app = web.Application()
    app.router.add_routes(venue.routes())
    client: Client = await aiohttp_client(app)
    statuses = [(await call(client, "GET", "/api/v1/order"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, body, headers = await call(client, "GET", "/api/v1/order")
    assert status == 429 and body["error"]["name"] == "RateLimitError"
    assert body["error"]["message"].startswith("Rate limit exceeded, retry in")
    assert int(headers["Retry-After"]) >= 1 and headers["x-ratelimit-remaining"] == "0"
    clock.now += 30_000  # two per minute: one token back after 30 s
    assert (await call(client, "GET", "/api/v1/order", expires=NOW_S + 60))[0] == 200


@settings(max_examples=200, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["api-key", "api-expires", "api-signature"]),
        st.sampled_from([API_KEY, str(NOW_S + 5), "é", ""]) | st.text(max_size=20),
    ),
    target=st.binary(max_size=30),
    body=st.binary(max_size=50),
)
def test_verifier_never_raises_on_junk(headers: dict[str, str], target: bytes, body: bytes) -> None:
    result = verify_bitmex(
        headers=headers, verb=b"POST", target=target, body=body, keys=KEYS, now_ms=NOW_MS
    )
    assert isinstance(result, (SharedSecretKey, BitmexError))
