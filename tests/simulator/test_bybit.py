"""The Bybit simulator: verify_bybit (pure), rate-limit headers and the routes.

Requests are signed here from Bybit's documented plain text with hmac and cryptography,
never with the sidecar's signer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from yarl import URL

from proxy.simulator import make_app
from proxy.simulator.base import KeySetError
from proxy.simulator.bybit import BybitError, RollingLimiter, parse_bybit_keys, verify_bybit
from tests.simulator.support import NOW_MS, FakeClock

HMAC_KEY = "bybit-sim-hmac-0001"
SECRET = "bybit-sim-secret-0123456789"
RSA_KEY = "bybit-sim-rsa-0001"

Client = TestClient[web.Request, web.Application]


@cache
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def keys_doc() -> dict[str, list[dict[str, str]]]:
    public = (
        rsa_private()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return {
        "bybit": [
            {"api_key": HMAC_KEY, "algorithm": "hmac-sha256", "secret": SECRET},
            {"api_key": RSA_KEY, "algorithm": "rsa-pkcs1-sha256", "public_key": public},
        ]
    }


def bybit_headers(
    signed: str,
    *,
    api_key: str = HMAC_KEY,
    ts: int = NOW_MS,
    window: int = 5000,
    secret: str = SECRET,
) -> dict[str, str]:
    plain = f"{ts}{api_key}{window}{signed}".encode()
    if api_key == RSA_KEY:
        sign = base64.b64encode(
            rsa_private().sign(plain, padding.PKCS1v15(), hashes.SHA256())
        ).decode()
    else:
        sign = hmac.new(secret.encode(), plain, hashlib.sha256).hexdigest()
    return {
        "X-BAPI-API-KEY": api_key,
        "X-BAPI-TIMESTAMP": str(ts),
        "X-BAPI-RECV-WINDOW": str(window),
        "X-BAPI-SIGN": sign,
    }


def verify(
    method: str, query: str, body: str, headers: dict[str, str], now: int = NOW_MS
) -> int | str:
    result = verify_bybit(
        method=method.encode(),
        query=query.encode(),
        body=body.encode(),
        headers={k: v.encode() for k, v in headers.items()},
        keys=parse_bybit_keys(keys_doc()["bybit"]),
        now_ms=now,
    )
    return result.code if isinstance(result, BybitError) else "ok"


@pytest.mark.parametrize("api_key", [HMAC_KEY, RSA_KEY])
def test_accepts_documented_plain_texts(api_key: str) -> None:
    query = "category=option&symbol=BTC-29JUL22-25000-C"
    assert verify("GET", query, "", bybit_headers(query, api_key=api_key)) == "ok"
    body = '{\n"category": "option"\n}'
    assert verify("POST", "", body, bybit_headers(body, api_key=api_key)) == "ok"


def test_hex_case_is_not_significant_for_hmac() -> None:
    headers = bybit_headers("category=spot")
    headers["X-BAPI-SIGN"] = headers["X-BAPI-SIGN"].upper()
    assert verify("GET", "category=spot", "", headers) == "ok"


def test_each_rejection() -> None:
    q = "category=spot&symbol=BTCUSDT"
    assert verify("GET", q, "", bybit_headers(q) | {"X-BAPI-API-KEY": "nope"}) == 10003
    assert (
        verify("GET", q, "", {k: v for k, v in bybit_headers(q).items() if k != "X-BAPI-API-KEY"})
        == 10003
    )
    assert verify("GET", q, "", bybit_headers(q, secret="other")) == 10004
    assert verify("GET", q + "&x=1", "", bybit_headers(q)) == 10004
    assert verify("POST", q, '{"a":1}', bybit_headers(q)) == 10004  # POST signs the body
    assert (
        verify("GET", q, "", bybit_headers(q, api_key=RSA_KEY) | {"X-BAPI-SIGN": "bm90IGEgc2ln"})
        == 10004
    )
    # server_time - recv_window <= timestamp < server_time + 1000
    assert verify("GET", q, "", bybit_headers(q, ts=NOW_MS - 5000)) == "ok"
    assert verify("GET", q, "", bybit_headers(q, ts=NOW_MS - 5001)) == 10002
    assert verify("GET", q, "", bybit_headers(q, ts=NOW_MS + 999)) == "ok"
    assert verify("GET", q, "", bybit_headers(q, ts=NOW_MS + 1000)) == 10002
    assert verify("GET", q, "", bybit_headers(q, ts=NOW_MS - 15_000, window=20_000)) == "ok"
    no_window = {
        k: v for k, v in bybit_headers(q, ts=NOW_MS - 4000).items() if k != "X-BAPI-RECV-WINDOW"
    }
    assert verify("GET", q, "", no_window) == 10004  # an unsent window is not in the plain text
    unsent = {
        k: v for k, v in bybit_headers(q, ts=NOW_MS - 4000).items() if k != "X-BAPI-RECV-WINDOW"
    }
    unsent["X-BAPI-SIGN"] = hmac.new(
        SECRET.encode(), f"{NOW_MS - 4000}{HMAC_KEY}{q}".encode(), hashlib.sha256
    ).hexdigest()
    assert verify("GET", q, "", unsent) == "ok"  # and the default window is 5000
    unsent["X-BAPI-TIMESTAMP"] = str(NOW_MS - 5001)
    assert verify("GET", q, "", unsent) == 10002


def test_key_documents_are_validated() -> None:
    with pytest.raises(KeySetError, match=r"bybit\[0\]\.algorithm"):
        parse_bybit_keys([{"api_key": "k", "algorithm": "ed25519", "public_key": "x"}])
    with pytest.raises(KeySetError, match=r"bybit\[0\]\.public_key"):
        parse_bybit_keys([{"api_key": "k", "algorithm": "rsa-pkcs1-sha256", "public_key": "junk"}])
    with pytest.raises(KeySetError, match=r"bybit\[0\]\.secret"):
        parse_bybit_keys([{"api_key": "k", "algorithm": "hmac-sha256"}])


def test_rolling_limiter() -> None:
    limiter = RollingLimiter(1000)
    assert [limiter.take("k", "/e", 2, t)[0] for t in (0, 10, 20)] == [True, True, False]
    assert limiter.take("k", "/e", 2, 20) == (False, 0, 1000)
    assert limiter.take("k", "/e", 2, 1000) == (True, 0, 1000)
    assert limiter.take("other", "/e", 2, 20)[0]


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
    api_key: str = HMAC_KEY,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    raw = "" if body is None else json.dumps(body, separators=(",", ":"))
    base, _, query = path.partition("?")
    signed = (
        bybit_headers(raw if method == "POST" else query, api_key=api_key)
        if headers is None
        else headers
    )
    url = URL(str(client.make_url(base)) + (f"?{query}" if query else ""), encoded=True)
    async with client.session.request(
        method,
        url,
        data=raw.encode() or None,
        headers=signed | {"Content-Type": "application/json"},
    ) as resp:
        return resp.status, json.loads(await resp.read()), resp.headers


ORDER = {
    "category": "spot",
    "symbol": "BTCUSDT",
    "side": "Buy",
    "orderType": "Limit",
    "qty": "0.1",
    "price": "30000",
    "orderLinkId": "sim-1",
}


@pytest.mark.parametrize("api_key", [HMAC_KEY, RSA_KEY])
async def test_create_read_cancel_round_trip(client: Client, api_key: str) -> None:
    status, body, headers = await call(client, "POST", "/v5/order/create", ORDER, api_key=api_key)
    assert status == 200 and body["retCode"] == 0 and body["retMsg"] == "OK", body
    assert body["result"]["orderLinkId"] == "sim-1" and body["time"] == NOW_MS
    assert (headers["X-Bapi-Limit"], headers["X-Bapi-Limit-Status"]) == ("20", "19")
    assert headers["X-Bapi-Limit-Reset-Timestamp"] == str(NOW_MS)
    order_id = body["result"]["orderId"]

    status, body, _ = await call(
        client,
        "GET",
        f"/v5/order/realtime?category=spot&symbol=BTCUSDT&orderId={order_id}",
        api_key=api_key,
    )
    assert body["retCode"] == 0 and body["result"]["list"][0]["orderStatus"] == "New"

    cancel = {"category": "spot", "symbol": "BTCUSDT", "orderId": order_id}
    status, body, _ = await call(client, "POST", "/v5/order/cancel", cancel, api_key=api_key)
    assert body["retCode"] == 0 and body["result"] == {"orderId": order_id, "orderLinkId": "sim-1"}
    status, body, _ = await call(client, "POST", "/v5/order/cancel", cancel, api_key=api_key)
    assert (status, body["retCode"]) == (200, 110001)


async def test_auth_refusals_are_http_200_envelopes(client: Client, clock: FakeClock) -> None:
    status, body, _ = await call(
        client,
        "GET",
        "/v5/order/realtime?category=spot",
        headers=bybit_headers("category=spot", api_key="nope"),
    )
    assert (status, body["retCode"], body["retMsg"]) == (200, 10003, "API key is invalid.")
    assert body["result"] == {} and body["retExtInfo"] == {}
    status, body, _ = await call(
        client, "GET", "/v5/order/realtime?category=spot", headers=bybit_headers("category=linear")
    )
    assert (status, body["retCode"]) == (200, 10004)
    assert body["retMsg"].startswith("error sign! origin_string[")
    clock.now = NOW_MS + 10_000
    status, body, _ = await call(client, "GET", "/v5/order/realtime?category=spot")
    assert (status, body["retCode"]) == (200, 10002)
    assert f"server_timestamp[{NOW_MS + 10_000}]" in body["retMsg"]


async def test_rate_limit_is_10006_with_headers(client: Client) -> None:
    for n in range(20):
        status, body, headers = await call(
            client, "POST", "/v5/order/create", ORDER | {"orderLinkId": f"r{n}"}
        )
        assert body["retCode"] == 0, body
    assert headers["X-Bapi-Limit-Status"] == "0"
    status, body, headers = await call(
        client, "POST", "/v5/order/create", ORDER | {"orderLinkId": "r20"}
    )
    assert (status, body["retCode"]) == (200, 10006)
    assert headers["X-Bapi-Limit-Status"] == "0"
    assert headers["X-Bapi-Limit-Reset-Timestamp"] == str(NOW_MS + 1000)


async def test_params_errors_and_duplicate_link_id(client: Client) -> None:
    status, body, _ = await call(
        client, "POST", "/v5/order/create", {k: v for k, v in ORDER.items() if k != "qty"}
    )
    assert (status, body["retCode"]) == (200, 10001)
    await call(client, "POST", "/v5/order/create", ORDER)
    _, body, _ = await call(client, "POST", "/v5/order/create", ORDER)
    assert body["retCode"] == 110072


async def test_time_endpoint_and_revocation(client: Client) -> None:
    async with client.get("/v5/market/time") as resp:
        body = await resp.json()
    assert body["result"] == {
        "timeSecond": str(NOW_MS // 1000),
        "timeNano": str(NOW_MS * 1_000_000),
    }
    async with client.delete(f"/__sim/keys/{HMAC_KEY}") as resp:
        assert resp.status == 200
    _, body, _ = await call(client, "GET", "/v5/order/realtime?category=spot")
    assert body["retCode"] == 10003
