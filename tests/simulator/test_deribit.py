"""The Deribit simulator: header-signature verification (pure and over HTTP), JSON-RPC
orders by GET and POST, the credit rate limit.

Requests are signed here with hmac/hashlib following docs.deribit.com, independently.
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
from proxy.simulator.deribit import (
    DeribitError,
    DeribitVenue,
    parse_authorization,
    parse_deribit_keys,
    verify_deribit,
)
from proxy.simulator.hmackeys import SharedSecretKey
from tests.simulator.support import NOW_MS, FakeClock

Client = TestClient[web.Request, web.Application]

CLIENT_ID = "deribit-sim-0001"
SECRET = "deribit-sim-secret-0123456789"


def keys_doc() -> dict[str, list[dict[str, str]]]:
    return {"deribit": [{"api_key": CLIENT_ID, "algorithm": "hmac-sha256", "secret": SECRET}]}


KEYS = parse_deribit_keys(keys_doc()["deribit"])


def authorization(
    method: str,
    uri: str,
    body: str = "",
    *,
    ts: int = NOW_MS,
    nonce: str = "abcd1234",
    secret: str = SECRET,
    client_id: str = CLIENT_ID,
    sep: str = ",",
) -> str:
    data = f"{ts}\n{nonce}\n{method.upper()}\n{uri}\n{body}\n"
    sig = hmac.new(secret.encode(), data.encode(), hashlib.sha256).hexdigest()
    return f"deri-hmac-sha256 id={client_id}{sep}ts={ts}{sep}sig={sig}{sep}nonce={nonce}"


def verify(auth: str | None, method: str, uri: str, body: str = "", now: int = NOW_MS) -> Any:
    return verify_deribit(
        authorization=auth,
        method=method.encode(),
        uri=uri.encode(),
        body=body.encode(),
        keys=KEYS,
        now_ms=now,
    )


def test_header_parsing() -> None:
    assert parse_authorization("deri-hmac-sha256 id=a, ts=1, sig=s, nonce=n") == {
        "id": "a",
        "ts": "1",
        "sig": "s",
        "nonce": "n",
    }  # the docs' own spacing
    assert parse_authorization("Basic abc") is None
    assert parse_authorization("deri-hmac-sha256 id=a,ts=1") is None
    assert parse_authorization(None) is None


def test_each_rejection() -> None:
    uri = "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&amount=10"
    good = authorization("GET", uri)
    assert isinstance(verify(good, "GET", uri), SharedSecretKey)
    assert isinstance(verify(authorization("GET", uri, sep=", "), "GET", uri), SharedSecretKey)
    assert verify(None, "GET", uri) == DeribitError(13009, "unauthorized", "invalid_token")
    assert verify(authorization("GET", uri, client_id="x"), "GET", uri) == DeribitError(
        13004, "invalid_credentials"
    )
    bad_sig = DeribitError(13009, "unauthorized", "invalid_signature")
    assert verify(authorization("GET", uri, secret="wrong"), "GET", uri) == bad_sig
    assert verify(good, "GET", uri.replace("10", "20")) == bad_sig
    assert verify(good, "POST", uri) == bad_sig
    assert verify(good, "GET", uri, body="{}") == bad_sig
    expired = DeribitError(13009, "unauthorized", "timestamp_expired")
    assert verify(good, "GET", uri, now=NOW_MS + 60_001) == expired
    assert verify(good, "GET", uri, now=NOW_MS - 60_001) == expired
    assert isinstance(verify(good, "GET", uri, now=NOW_MS + 60_000), SharedSecretKey)


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    return await aiohttp_client(make_app(keys_doc(), clock=clock))  # type: ignore[no-any-return]


async def call(
    client: Client, method: str, target: str, body: str = "", **kw: Any
) -> tuple[int, Any]:
    headers = {"Authorization": authorization(method, target, body, **kw)}
    if body:
        headers["Content-Type"] = "application/json"
    url = URL(str(client.make_url("")).rstrip("/") + target, encoded=True)
    async with client.session.request(
        method, url, data=body.encode() or None, headers=headers
    ) as r:
        return r.status, json.loads(await r.read())


BUY = (
    "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=30000&label=sim-1"
)


async def test_order_lifecycle_by_get_and_post(client: Client) -> None:
    status, body = await call(client, "GET", BUY)
    assert status == 200, body
    assert body["jsonrpc"] == "2.0" and body["testnet"] is True and "usIn" in body
    order = body["result"]["order"]
    assert order["order_state"] == "open" and order["label"] == "sim-1" and order["amount"] == 10.0
    rpc = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 42,
            "method": "private/sell",
            "params": {
                "instrument_name": "BTC-PERPETUAL",
                "amount": 5,
                "type": "limit",
                "price": 31000,
            },
        }
    )
    status, body = await call(client, "POST", "/api/v2/private/sell", rpc)
    assert status == 200 and body["id"] == 42 and body["result"]["order"]["direction"] == "sell"
    status, body = await call(
        client, "GET", "/api/v2/private/get_open_orders_by_instrument?instrument_name=BTC-PERPETUAL"
    )
    assert len(body["result"]) == 2
    status, body = await call(client, "GET", f"/api/v2/private/cancel?order_id={order['order_id']}")
    assert body["result"]["order_state"] == "cancelled"
    status, body = await call(client, "GET", f"/api/v2/private/cancel?order_id={order['order_id']}")
    assert (status, body["error"]) == (400, {"message": "order_not_found", "code": 10004})


async def test_rejections_over_http(client: Client, clock: FakeClock) -> None:
    status, body = await call(client, "GET", BUY, secret="wrong")
    assert status == 400
    assert body["error"] == {
        "message": "unauthorized",
        "code": 13009,
        "data": {"reason": "invalid_signature"},
    }
    clock.now += 61_000
    status, body = await call(client, "GET", BUY, ts=NOW_MS)
    assert body["error"]["data"]["reason"] == "timestamp_expired"
    await client.delete(f"/__sim/keys/{CLIENT_ID}")
    status, body = await call(client, "GET", BUY, ts=clock.now)
    assert (status, body["error"]) == (400, {"message": "invalid_credentials", "code": 13004})
    log = await (await client.get("/__sim/log")).json()
    assert [e["verdict"] for e in log["entries"]] == [13009, 13009, 13004]


async def test_get_time(client: Client, clock: FakeClock) -> None:
    body = await (await client.get("/api/v2/public/get_time")).json()
    assert body["result"] == NOW_MS and body["jsonrpc"] == "2.0"


async def test_credit_rate_limit(aiohttp_client: Any, clock: FakeClock) -> None:
    venue = DeribitVenue(clock=clock, keys=KEYS, credits_max=1000, credits_per_s=500)
    app = web.Application()
    app.router.add_routes(venue.routes())
    client: Client = await aiohttp_client(app)
    statuses = [(await call(client, "GET", BUY))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    _, body = await call(client, "GET", BUY)
    assert body["error"] == {"message": "too_many_requests", "code": 10028}
    clock.now += 1000
    assert (await call(client, "GET", BUY, ts=clock.now))[0] == 200


@settings(max_examples=200, deadline=None)
@given(
    auth=st.none()
    | st.text(max_size=80)
    | st.builds(
        lambda ts, nonce: authorization("GET", "/x", ts=ts, nonce=nonce),
        st.integers(min_value=0, max_value=2 * NOW_MS),
        # no lone surrogates: a header value is encoded to UTF-8 by the test helper
        st.text(
            st.characters(blacklist_characters=",\r\n", blacklist_categories=("Cs",)),
            max_size=10,
        ),
    ),
    uri=st.binary(max_size=30),
    body=st.binary(max_size=30),
)
def test_verifier_never_raises_on_junk(auth: str | None, uri: bytes, body: bytes) -> None:
    result = verify_deribit(
        authorization=auth, method=b"GET", uri=uri, body=body, keys=KEYS, now_ms=NOW_MS
    )
    assert isinstance(result, (SharedSecretKey, DeribitError))
