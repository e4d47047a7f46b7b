"""The OKX simulator: verify_okx (pure) and the routes over in-process HTTP.

Requests are signed here with hmac/base64 from OKX's documented formula, never with the
sidecar's signer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.simulator import make_app
from proxy.simulator.base import KeySetError
from proxy.simulator.okx import OkxError, OkxKey, parse_okx_keys, parse_timestamp, verify_okx
from tests.simulator.support import NOW_MS, FakeClock

API_KEY = "okx-sim-key-0001"
SECRET = "okx-sim-secret-0123456789"
PASSPHRASE = "sim pass 1!"
KEYS_DOC = {
    "okx": [
        {"api_key": API_KEY, "algorithm": "hmac-sha256", "secret": SECRET, "passphrase": PASSPHRASE}
    ]
}
KEYS = parse_okx_keys(KEYS_DOC["okx"])

Client = TestClient[web.Request, web.Application]


def iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    )


def okx_headers(
    method: str,
    request_path: str,
    body: str = "",
    *,
    ts_ms: int = NOW_MS,
    api_key: str = API_KEY,
    secret: str = SECRET,
    passphrase: str = PASSPHRASE,
) -> dict[str, str]:
    ts = iso(ts_ms)
    sign = base64.b64encode(
        hmac.new(
            secret.encode(), (ts + method + request_path + body).encode(), hashlib.sha256
        ).digest()
    ).decode()
    return {
        "OK-ACCESS-KEY": api_key,
        "OK-ACCESS-SIGN": sign,
        "OK-ACCESS-TIMESTAMP": ts,
        "OK-ACCESS-PASSPHRASE": passphrase,
    }


def verify(
    method: str, path: str, body: str, headers: dict[str, str], now: int = NOW_MS
) -> OkxKey | OkxError:
    return verify_okx(
        method=method.encode(),
        request_path=path.encode(),
        body=body.encode(),
        headers={k: v.encode() for k, v in headers.items()},
        keys=KEYS,
        now_ms=now,
    )


def code(result: OkxKey | OkxError) -> str:
    return result.code if isinstance(result, OkxError) else "ok"


def test_timestamp_parser_is_strict() -> None:
    assert parse_timestamp(b"2020-12-08T09:08:57.715Z") == 1607418537715
    assert parse_timestamp(b"1970-01-01T00:00:00.000Z") == 0
    for bad in (
        b"2020-12-08T09:08:57Z",
        b"2020-12-08T09:08:57.715",
        b"1607418537715",
        b"2020-13-08T09:08:57.715Z",
    ):
        assert parse_timestamp(bad) is None


def test_accepts_get_with_query_and_post_with_body() -> None:
    path = "/api/v5/trade/order?instId=BTC-USDT&ordId=1"
    assert code(verify("GET", path, "", okx_headers("GET", path))) == "ok"
    body = '{"instId":"BTC-USDT","tdMode":"cash","side":"buy","ordType":"limit","px":"1","sz":"1"}'
    assert (
        code(
            verify(
                "POST",
                "/api/v5/trade/order",
                body,
                okx_headers("POST", "/api/v5/trade/order", body),
            )
        )
        == "ok"
    )


def test_each_rejection() -> None:
    path = "/api/v5/trade/orders-pending"
    good = okx_headers("GET", path)
    assert code(verify("GET", path, "", good | {"OK-ACCESS-KEY": "unknown"})) == "50111"
    assert (
        code(verify("GET", path, "", {k: v for k, v in good.items() if k != "OK-ACCESS-KEY"}))
        == "50103"
    )
    assert (
        code(verify("GET", path, "", {k: v for k, v in good.items() if k != "OK-ACCESS-SIGN"}))
        == "50106"
    )
    assert (
        code(verify("GET", path, "", {k: v for k, v in good.items() if k != "OK-ACCESS-TIMESTAMP"}))
        == "50107"
    )
    assert (
        code(
            verify("GET", path, "", {k: v for k, v in good.items() if k != "OK-ACCESS-PASSPHRASE"})
        )
        == "50104"
    )
    assert code(verify("GET", path, "", good | {"OK-ACCESS-PASSPHRASE": "wrong"})) == "50105"
    assert code(verify("GET", path, "", good | {"OK-ACCESS-TIMESTAMP": str(NOW_MS)})) == "50112"
    # The query is part of requestPath: signing the path alone does not verify.
    assert code(verify("GET", path + "?instId=BTC-USDT", "", good)) == "50113"
    assert code(verify("POST", path, "", good)) == "50113"  # method is signed
    assert code(verify("GET", path, "", okx_headers("GET", path, secret="other"))) == "50113"
    # 30 s either way, stale wins over a bad signature.
    assert code(verify("GET", path, "", okx_headers("GET", path, ts_ms=NOW_MS - 30_000))) == "ok"
    assert code(verify("GET", path, "", okx_headers("GET", path, ts_ms=NOW_MS - 30_001))) == "50102"
    assert code(verify("GET", path, "", okx_headers("GET", path, ts_ms=NOW_MS + 30_001))) == "50102"
    stale_forged = okx_headers("GET", path, ts_ms=NOW_MS - 60_000, secret="other")
    assert code(verify("GET", path, "", stale_forged)) == "50102"


def test_key_documents_are_validated() -> None:
    with pytest.raises(KeySetError, match=r"okx\[0\]\.passphrase"):
        parse_okx_keys([{"api_key": "k", "algorithm": "hmac-sha256", "secret": "s"}])
    with pytest.raises(KeySetError, match=r"okx\[0\]\.algorithm"):
        parse_okx_keys([{"api_key": "k", "algorithm": "ed25519", "secret": "s", "passphrase": "p"}])
    with pytest.raises(KeySetError, match="duplicate"):
        parse_okx_keys([KEYS_DOC["okx"][0], KEYS_DOC["okx"][0]])
    assert "sim-secret" not in repr(KEYS[API_KEY]) and "sim pass" not in repr(KEYS[API_KEY])


# --------------------------------------------------------------------------- routes


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    factory: Callable[[web.Application], Awaitable[Client]] = aiohttp_client
    return await factory(make_app(KEYS_DOC, clock=clock))


async def call(
    client: Client,
    method: str,
    path: str,
    body: object = None,
    *,
    headers: dict[str, str] | None = None,
    ts_ms: int = NOW_MS,
) -> tuple[int, Any]:
    raw = "" if body is None else json.dumps(body, separators=(",", ":"))
    signed = okx_headers(method, path, raw, ts_ms=ts_ms) if headers is None else headers
    url = URL(
        str(client.make_url(path.partition("?")[0]))
        + ("?" + path.partition("?")[2] if "?" in path else ""),
        encoded=True,
    )
    async with client.session.request(
        method,
        url,
        data=raw.encode() or None,
        headers=signed | {"Content-Type": "application/json"},
    ) as resp:
        return resp.status, json.loads(await resp.read())


ORDER = {
    "instId": "BTC-USDT",
    "tdMode": "cash",
    "clOrdId": "sim1",
    "side": "buy",
    "ordType": "limit",
    "px": "30000",
    "sz": "0.01",
}


async def test_place_query_cancel_round_trip(client: Client) -> None:
    status, placed = await call(client, "POST", "/api/v5/trade/order", ORDER)
    assert status == 200 and placed["code"] == "0", placed
    (item,) = placed["data"]
    assert item["sCode"] == "0" and item["clOrdId"] == "sim1" and item["ordId"].isdigit()

    status, details = await call(
        client, "GET", f"/api/v5/trade/order?instId=BTC-USDT&ordId={item['ordId']}"
    )
    assert status == 200 and details["data"][0]["state"] == "live"
    status, pending = await call(client, "GET", "/api/v5/trade/orders-pending?instId=BTC-USDT")
    assert [o["ordId"] for o in pending["data"]] == [item["ordId"]]

    status, cancelled = await call(
        client, "POST", "/api/v5/trade/cancel-order", {"instId": "BTC-USDT", "ordId": item["ordId"]}
    )
    assert status == 200 and cancelled["code"] == "0" and cancelled["data"][0]["sCode"] == "0"
    status, again = await call(
        client, "POST", "/api/v5/trade/cancel-order", {"instId": "BTC-USDT", "ordId": item["ordId"]}
    )
    assert (status, again["code"], again["data"][0]["sCode"]) == (200, "1", "51400")


async def test_order_refusals_are_okx_shaped(client: Client) -> None:
    status, body = await call(
        client, "POST", "/api/v5/trade/order", {k: v for k, v in ORDER.items() if k != "sz"}
    )
    assert (status, body["code"]) == (400, "50014")
    status, body = await call(client, "POST", "/api/v5/trade/order", ORDER | {"px": "-1"})
    assert (status, body["code"], body["data"][0]["sCode"]) == (200, "1", "51000")
    status, body = await call(client, "GET", "/api/v5/trade/order?instId=BTC-USDT&ordId=404")
    assert (status, body["code"]) == (200, "51603")


async def test_auth_refusals_over_http(client: Client, clock: FakeClock) -> None:
    path = "/api/v5/trade/orders-pending"
    status, body = await call(client, "GET", path, headers=okx_headers("GET", path, api_key="nope"))
    assert (status, body) == (401, {"msg": "Invalid OK-ACCESS-KEY.", "code": "50111"})
    status, body = await call(client, "GET", path, headers=okx_headers("GET", path, secret="x"))
    assert (status, body["code"]) == (401, "50113")
    clock.now = NOW_MS + 31_000
    status, body = await call(client, "GET", path)
    assert (status, body["code"]) == (401, "50102")


async def test_order_rate_limit_is_429_50011(client: Client) -> None:
    for n in range(60):
        status, body = await call(
            client, "POST", "/api/v5/trade/order", ORDER | {"clOrdId": f"r{n}"}
        )
        assert status == 200, body
    status, body = await call(client, "POST", "/api/v5/trade/order", ORDER | {"clOrdId": "r60"})
    assert (status, body["code"]) == (429, "50011")


async def test_revoked_key_and_time_endpoint(client: Client) -> None:
    async with client.delete(f"/__sim/keys/{API_KEY}") as resp:
        assert resp.status == 200
    status, body = await call(client, "GET", "/api/v5/trade/orders-pending")
    assert (status, body["code"]) == (401, "50111")
    async with client.get("/api/v5/public/time") as resp:
        assert await resp.json() == {"code": "0", "msg": "", "data": [{"ts": str(NOW_MS)}]}
    async with client.get("/__sim/log") as resp:
        verdicts = [
            e["verdict"]
            for e in (await resp.json())["entries"]
            if e["path"].startswith("/api/v5/trade")
        ]
    assert verdicts == [50111]
