"""Binance routes over in-process HTTP: verification, orders, weights, key control."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.simulator import make_app
from tests.simulator.support import (
    DOC_API_KEY,
    DOC_MIXED_BODY,
    DOC_MIXED_QUERY,
    DOC_MIXED_SIGNATURE,
    DOC_PAYLOAD,
    DOC_SIGNATURE,
    DOC_TIMESTAMP,
    ED25519_API_KEY,
    HMAC_API_KEY,
    NOW_MS,
    RSA_API_KEY,
    FakeClock,
    Reply,
    keys_document,
    send,
    sign_hmac,
    signed,
)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]

LIMIT = "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.5&price=30000"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    factory: ClientFactory = aiohttp_client
    return await factory(make_app(keys_document(), clock=clock))


def ts(extra: str = "") -> str:
    return f"{extra}&timestamp={NOW_MS}" if extra else f"timestamp={NOW_MS}"


async def new_order(client: Client, params: str = LIMIT, api_key: str = HMAC_API_KEY) -> Reply:
    return await send(
        client, "POST", "/api/v3/order", body=signed(ts(params), api_key), api_key=api_key
    )


# ----- acceptance per key type


@pytest.mark.parametrize("api_key", [HMAC_API_KEY, ED25519_API_KEY, RSA_API_KEY])
async def test_order_signed_with_each_key_type_is_accepted(client: Client, api_key: str) -> None:
    reply = await new_order(client, LIMIT + "&newClientOrderId=mine-1", api_key)
    assert reply.status == 200, reply.body
    body = reply.body
    assert body["symbol"] == "BTCUSDT"
    assert body["clientOrderId"] == "mine-1"
    assert body["status"] == "NEW"
    assert body["price"] == "30000.00000000"
    assert body["origQty"] == "0.50000000"
    assert body["transactTime"] == NOW_MS
    assert body["orderListId"] == -1
    assert body["fills"] == []


@pytest.mark.parametrize("api_key", [HMAC_API_KEY, ED25519_API_KEY, RSA_API_KEY])
async def test_get_account_signed_in_query_is_accepted(client: Client, api_key: str) -> None:
    reply = await send(
        client, "GET", "/api/v3/account", query=signed(ts(), api_key), api_key=api_key
    )
    assert reply.status == 200, reply.body
    assert reply.body["accountType"] == "SPOT"
    assert {b["asset"] for b in reply.body["balances"]} >= {"BTC", "USDT"}


async def test_published_vector_over_http(client: Client, clock: FakeClock) -> None:
    clock.now = DOC_TIMESTAMP
    reply = await send(
        client,
        "POST",
        "/api/v3/order",
        body=f"{DOC_PAYLOAD}&signature={DOC_SIGNATURE}",
        api_key=DOC_API_KEY,
    )
    assert reply.status == 200, reply.body
    assert reply.body["symbol"] == "LTCBTC"


async def test_published_mixed_query_and_body_with_signature_in_body(
    client: Client, clock: FakeClock
) -> None:
    clock.now = DOC_TIMESTAMP
    reply = await send(
        client,
        "POST",
        "/api/v3/order",
        query=DOC_MIXED_QUERY,
        body=f"{DOC_MIXED_BODY}&signature={DOC_MIXED_SIGNATURE}",
        api_key=DOC_API_KEY,
    )
    assert reply.status == 200, reply.body
    assert reply.body["timeInForce"] == "GTC"


# ----- rejections


async def test_unknown_key_is_401_2015(client: Client) -> None:
    reply = await send(
        client, "POST", "/api/v3/order", body=signed(ts(LIMIT)), api_key="who-is-this"
    )
    assert (reply.status, reply.body) == (
        401,
        {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
    )


async def test_missing_key_header_is_401_2014(client: Client) -> None:
    reply = await send(client, "POST", "/api/v3/order", body=signed(ts(LIMIT)), api_key=None)
    assert (reply.status, reply.body) == (401, {"code": -2014, "msg": "API-key format invalid."})


async def test_tampered_body_is_1022(client: Client) -> None:
    body = signed(ts(LIMIT)).replace("quantity=0.5", "quantity=5")
    reply = await send(client, "POST", "/api/v3/order", body=body)
    assert (reply.status, reply.body) == (
        400,
        {"code": -1022, "msg": "Signature for this request is not valid."},
    )


async def test_stale_and_ahead_timestamps_are_1021(client: Client, clock: FakeClock) -> None:
    body = signed(ts(LIMIT))
    clock.now = NOW_MS + 5001
    stale = await send(client, "POST", "/api/v3/order", body=body)
    assert (stale.status, stale.body) == (
        400,
        {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."},
    )
    clock.now = NOW_MS - 1000
    ahead = await send(client, "POST", "/api/v3/order", body=body)
    assert (ahead.status, ahead.body) == (
        400,
        {"code": -1021, "msg": "Timestamp for this request was 1000ms ahead of the server's time."},
    )


async def test_duplicate_parameter_is_1101(client: Client) -> None:
    reply = await send(client, "POST", "/api/v3/order", body=signed(ts(LIMIT + "&price=1")))
    assert (reply.status, reply.body) == (
        400,
        {"code": -1101, "msg": "Duplicate values for a parameter detected."},
    )


async def test_body_that_is_not_a_form_is_not_read(client: Client) -> None:
    """Binance reads parameters from a form body only: a JSON-typed body carries none."""
    reply = await send(
        client, "POST", "/api/v3/order", body=signed(ts(LIMIT)), content_type="application/json"
    )
    assert reply.body["code"] == -1102
    assert "'signature'" in reply.body["msg"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            "side=BUY&type=LIMIT",
            "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
        ),
        (
            "symbol=BTCUSDT&type=LIMIT",
            "Mandatory parameter 'side' was not sent, was empty/null, or malformed.",
        ),
        (
            "symbol=BTCUSDT&side=BUY",
            "Mandatory parameter 'type' was not sent, was empty/null, or malformed.",
        ),
        (
            "symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=1",
            "Mandatory parameter 'timeInForce' was not sent, was empty/null, or malformed.",
        ),
        (
            "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&price=1",
            "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed.",
        ),
        (
            "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1",
            "Mandatory parameter 'price' was not sent, was empty/null, or malformed.",
        ),
        (
            "symbol=BTCUSDT&side=BUY&type=MARKET",
            "Param 'quantity' or 'quoteOrderQty' must be sent, but both were empty/null!",
        ),
    ],
)
async def test_missing_order_parameter_is_1102_naming_it(
    client: Client, params: str, message: str
) -> None:
    reply = await new_order(client, params)
    assert (reply.status, reply.body) == (400, {"code": -1102, "msg": message})


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ("symbol=NOPE&side=BUY&type=MARKET&quantity=1", -1121),
        ("symbol=BTCUSDT&side=UP&type=MARKET&quantity=1", -1117),
        ("symbol=BTCUSDT&side=BUY&type=OCO&quantity=1", -1116),
        ("symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=XYZ&quantity=1&price=1", -1115),
        ("symbol=BTCUSDT&side=BUY&type=MARKET&quantity=1e3", -1100),
        ("symbol=BTCUSDT&side=BUY&type=MARKET&quantity=0", -1013),
        ("symbol=BTCUSDT&side=BUY&type=MARKET&quantity=1&timeInForce=GTC", -1106),
        ("symbol=BTCUSDT&side=BUY&type=MARKET&quantity=1&newClientOrderId=bad%20id", -1100),
    ],
)
async def test_invalid_order_parameters(client: Client, params: str, code: int) -> None:
    reply = await new_order(client, params)
    assert reply.status == 400
    assert reply.body["code"] == code


# ----- order lifecycle


async def test_limit_order_rests_lists_and_cancels(client: Client) -> None:
    placed = await new_order(client, LIMIT + "&newClientOrderId=rest-1")
    order_id = placed.body["orderId"]

    listed = await send(client, "GET", "/api/v3/openOrders", query=signed(ts("symbol=BTCUSDT")))
    assert listed.status == 200
    assert [o["orderId"] for o in listed.body] == [order_id]
    assert listed.body[0]["clientOrderId"] == "rest-1"

    account = await send(client, "GET", "/api/v3/account", query=signed(ts()))
    usdt = next(b for b in account.body["balances"] if b["asset"] == "USDT")
    assert usdt["locked"] == "15000.00000000"

    cancel = await send(
        client,
        "DELETE",
        "/api/v3/order",
        body=signed(ts("symbol=BTCUSDT&origClientOrderId=rest-1&newClientOrderId=cxl-1")),
    )
    assert cancel.status == 200, cancel.body
    assert cancel.body["status"] == "CANCELED"
    assert cancel.body["origClientOrderId"] == "rest-1"
    assert cancel.body["clientOrderId"] == "cxl-1"
    assert cancel.body["orderId"] == order_id

    again = await send(
        client, "DELETE", "/api/v3/order", query=signed(ts(f"symbol=BTCUSDT&orderId={order_id}"))
    )
    assert (again.status, again.body) == (400, {"code": -2011, "msg": "Unknown order sent."})

    queried = await send(
        client, "GET", "/api/v3/order", query=signed(ts(f"symbol=BTCUSDT&orderId={order_id}"))
    )
    assert queried.body["status"] == "CANCELED"

    empty = await send(client, "GET", "/api/v3/openOrders", query=signed(ts()))
    assert empty.body == []


async def test_order_ids_increase_and_client_ids_are_generated(client: Client) -> None:
    first = await new_order(client)
    second = await new_order(client)
    assert second.body["orderId"] > first.body["orderId"]
    assert len(first.body["clientOrderId"]) == 22
    assert first.body["clientOrderId"] != second.body["clientOrderId"]


async def test_duplicate_open_client_order_id_is_2010(client: Client) -> None:
    await new_order(client, LIMIT + "&newClientOrderId=dup")
    reply = await new_order(client, LIMIT + "&newClientOrderId=dup")
    assert (reply.status, reply.body) == (400, {"code": -2010, "msg": "Duplicate order sent."})


async def test_market_order_fills(client: Client) -> None:
    reply = await new_order(client, "symbol=ETHUSDT&side=SELL&type=MARKET&quantity=2")
    assert reply.status == 200, reply.body
    assert reply.body["status"] == "FILLED"
    assert reply.body["executedQty"] == "2.00000000"
    assert reply.body["cummulativeQuoteQty"] == "7000.00000000"
    assert len(reply.body["fills"]) == 1


async def test_ack_response_type(client: Client) -> None:
    reply = await new_order(client, LIMIT + "&newOrderRespType=ACK")
    assert set(reply.body) == {"symbol", "orderId", "orderListId", "clientOrderId", "transactTime"}


async def test_unknown_order_cancel_and_query(client: Client) -> None:
    cancel = await send(
        client, "DELETE", "/api/v3/order", body=signed(ts("symbol=BTCUSDT&orderId=999999"))
    )
    assert cancel.body == {"code": -2011, "msg": "Unknown order sent."}
    query = await send(
        client, "GET", "/api/v3/order", query=signed(ts("symbol=BTCUSDT&orderId=999999"))
    )
    assert query.body == {"code": -2013, "msg": "Order does not exist."}
    neither = await send(client, "DELETE", "/api/v3/order", body=signed(ts("symbol=BTCUSDT")))
    assert neither.body["code"] == -1102


async def test_keys_of_one_account_see_the_same_orders(client: Client) -> None:
    placed = await new_order(client, LIMIT, HMAC_API_KEY)
    cancel = await send(
        client,
        "DELETE",
        "/api/v3/order",
        body=signed(ts(f"symbol=BTCUSDT&orderId={placed.body['orderId']}"), ED25519_API_KEY),
        api_key=ED25519_API_KEY,
    )
    assert cancel.status == 200, cancel.body


async def test_test_order_validates_but_books_nothing(client: Client) -> None:
    reply = await send(client, "POST", "/api/v3/order/test", body=signed(ts(LIMIT)))
    assert (reply.status, reply.body) == (200, {})
    assert "X-MBX-ORDER-COUNT-10S" not in reply.headers
    bad = await send(client, "POST", "/api/v3/order/test", body=signed(ts("symbol=BTCUSDT")))
    assert bad.body["code"] == -1102
    listed = await send(client, "GET", "/api/v3/openOrders", query=signed(ts()))
    assert listed.body == []


# ----- headers


async def test_used_weight_header_counts_per_minute(client: Client, clock: FakeClock) -> None:
    async def weight(method: str, path: str, query: str = "") -> int:
        reply = await send(client, method, path, query=query)
        return int(reply.headers["X-MBX-USED-WEIGHT-1M"])

    clock.now = 60_000 * (NOW_MS // 60_000)  # start of a minute
    assert await weight("GET", "/api/v3/ping") == 1
    assert await weight("GET", "/api/v3/time") == 2
    assert await weight("GET", "/api/v3/account", signed(f"timestamp={clock.now}")) == 22
    assert (
        await weight("GET", "/api/v3/openOrders", signed(f"symbol=BTCUSDT&timestamp={clock.now}"))
        == 28
    )
    assert await weight("GET", "/api/v3/openOrders", signed(f"timestamp={clock.now}")) == 108
    # Rejected requests count too.
    assert await weight("GET", "/api/v3/account", "timestamp=1") == 128
    clock.now += 60_000
    assert await weight("GET", "/api/v3/ping") == 1


async def test_order_count_headers_on_new_orders(client: Client) -> None:
    first = await new_order(client)
    second = await new_order(client)
    assert first.headers["X-MBX-ORDER-COUNT-10S"] == "1"
    assert second.headers["X-MBX-ORDER-COUNT-10S"] == "2"
    assert second.headers["X-MBX-ORDER-COUNT-1D"] == "2"


# ----- unsigned endpoints


async def test_unsigned_endpoints(client: Client, clock: FakeClock) -> None:
    assert (await send(client, "GET", "/api/v3/ping", api_key=None)).body == {}
    assert (await send(client, "GET", "/api/v3/time", api_key=None)).body == {"serverTime": NOW_MS}
    info = await send(client, "GET", "/api/v3/exchangeInfo", api_key=None)
    assert info.body["timezone"] == "UTC"
    assert "BTCUSDT" in {s["symbol"] for s in info.body["symbols"]}
    one = await send(client, "GET", "/api/v3/exchangeInfo", query="symbol=LTCBTC", api_key=None)
    assert [s["symbol"] for s in one.body["symbols"]] == ["LTCBTC"]
    assert int(one.headers["X-MBX-USED-WEIGHT-1M"]) > 0


async def test_unknown_path_is_404(client: Client) -> None:
    reply = await send(client, "GET", "/api/v3/nothing-here")
    assert reply.status == 404


# ----- key control


async def test_keys_can_be_replaced_and_revoked_at_runtime(client: Client) -> None:
    assert (await new_order(client)).status == 200
    new_doc = {"binance": [{"api_key": "rotated-1", "algorithm": "hmac-sha256", "secret": "fresh"}]}
    replaced = await send(
        client, "POST", "/__sim/keys", body=json.dumps(new_doc), content_type="application/json"
    )
    assert replaced.status == 200
    assert replaced.body["keys"]["binance"] == ["rotated-1"]  # other venues: unchanged

    old = await new_order(client)
    assert old.body["code"] == -2015
    body = ts(LIMIT)
    fresh = await send(
        client,
        "POST",
        "/api/v3/order",
        body=f"{body}&signature={sign_hmac(body.encode(), 'fresh')}",
        api_key="rotated-1",
    )
    assert fresh.status == 200, fresh.body

    revoked = await send(client, "DELETE", "/__sim/keys/rotated-1")
    assert revoked.body == {"revoked": "rotated-1", "venues": ["binance"]}
    gone = await send(
        client,
        "POST",
        "/api/v3/order",
        body=f"{body}&signature={sign_hmac(body.encode(), 'fresh')}",
        api_key="rotated-1",
    )
    assert gone.body["code"] == -2015
    assert (await send(client, "DELETE", "/__sim/keys/rotated-1")).status == 404


async def test_bad_key_document_changes_nothing(client: Client) -> None:
    bad = {"binance": [{"api_key": "x", "algorithm": "ed25519", "public_key": "junk"}]}
    reply = await send(
        client, "POST", "/__sim/keys", body=json.dumps(bad), content_type="application/json"
    )
    assert reply.status == 400
    assert reply.body["error"]["code"] == "bad_key_set"
    assert "binance[0].public_key" in reply.body["error"]["message"]
    unknown = await send(
        client,
        "POST",
        "/__sim/keys",
        body=json.dumps({"no_such_venue": []}),
        content_type="application/json",
    )
    assert unknown.status == 400
    not_json = await send(client, "POST", "/__sim/keys", body="{", content_type="application/json")
    assert not_json.body["error"]["code"] == "bad_json"
    assert (await new_order(client)).status == 200
