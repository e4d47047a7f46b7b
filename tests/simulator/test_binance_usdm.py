"""USD-M futures routes over in-process HTTP: verification, orders, headers, errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.simulator import make_app
from tests.simulator.support import (
    ED25519_API_KEY,
    HMAC_API_KEY,
    HMAC_SECRET,
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

LIMIT = "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.010&price=30000"
SPOT_ONLY = "spot-only-key"


def futures_keys() -> dict[str, Any]:
    spot = keys_document()["binance"]
    return {
        "binance_usdm": spot,
        "binance": [{"api_key": SPOT_ONLY, "algorithm": "hmac-sha256", "secret": HMAC_SECRET}],
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    factory: ClientFactory = aiohttp_client
    return await factory(make_app(futures_keys(), clock=clock))


def ts(params: str = "", when: int = NOW_MS) -> str:
    return f"{params}&timestamp={when}" if params else f"timestamp={when}"


async def order(client: Client, params: str = LIMIT, api_key: str = HMAC_API_KEY) -> Reply:
    return await send(
        client, "POST", "/fapi/v1/order", body=signed(ts(params), api_key), api_key=api_key
    )


async def signed_get(
    client: Client, path: str, params: str = "", api_key: str = HMAC_API_KEY
) -> Reply:
    return await send(client, "GET", path, query=signed(ts(params), api_key), api_key=api_key)


def code(reply: Reply) -> tuple[int, int]:
    return reply.status, reply.body["code"]


# ----- acceptance and shapes


@pytest.mark.parametrize("api_key", [HMAC_API_KEY, ED25519_API_KEY, RSA_API_KEY])
async def test_limit_order_signed_with_each_key_type(client: Client, api_key: str) -> None:
    reply = await order(client, LIMIT + "&newClientOrderId=fut-1", api_key)
    assert reply.status == 200, reply.body
    body = reply.body
    assert body["clientOrderId"] == "fut-1"
    assert (body["status"], body["type"], body["origType"]) == ("NEW", "LIMIT", "LIMIT")
    assert (body["price"], body["origQty"], body["avgPrice"]) == ("30000.00", "0.010", "0.00")
    assert (body["cumQty"], body["executedQty"], body["cumQuote"]) == ("0.000", "0.000", "0.00000")
    assert (body["positionSide"], body["reduceOnly"], body["closePosition"]) == (
        "BOTH",
        False,
        False,
    )
    assert body["updateTime"] == NOW_MS
    assert isinstance(body["orderId"], int)
    assert reply.headers["X-MBX-USED-WEIGHT-1M"] == "0"  # new orders weigh 0 on the IP limit
    assert reply.headers["X-MBX-ORDER-COUNT-10S"] == "1"
    assert reply.headers["X-MBX-ORDER-COUNT-1M"] == "1"


async def test_order_counts_and_weight_headers_accumulate(client: Client) -> None:
    for n in range(1, 4):
        reply = await order(client, LIMIT + f"&newClientOrderId=c{n}")
        assert reply.headers["X-MBX-ORDER-COUNT-1M"] == str(n)
    reply = await signed_get(client, "/fapi/v2/account")
    assert reply.status == 200
    assert reply.headers["X-MBX-USED-WEIGHT-1M"] == "5"
    assert "X-MBX-ORDER-COUNT-1M" not in reply.headers


async def test_market_order_fills_and_shows_in_positions(client: Client) -> None:
    ack = await order(
        client, "symbol=BTCUSDT&side=BUY&type=MARKET&quantity=0.005&newClientOrderId=m1"
    )
    assert ack.status == 200, ack.body
    assert (ack.body["status"], ack.body["executedQty"]) == ("NEW", "0.000")  # ACK: as accepted
    result = await order(
        client,
        "symbol=BTCUSDT&side=BUY&type=MARKET&quantity=0.005&newOrderRespType=RESULT",
    )
    assert (result.body["status"], result.body["avgPrice"]) == ("FILLED", "65000.00")
    assert result.body["cumQuote"] == "325.00000"
    queried = await signed_get(client, "/fapi/v1/order", "symbol=BTCUSDT&origClientOrderId=m1")
    assert queried.body["status"] == "FILLED"
    assert queried.body["time"] == NOW_MS
    account = await signed_get(client, "/fapi/v3/account")
    assert account.status == 200, account.body
    (position,) = account.body["positions"]
    assert (position["symbol"], position["positionAmt"]) == ("BTCUSDT", "0.010")
    assert account.body["assets"][0]["asset"] == "USDT"


async def test_cancel_then_cancel_again(client: Client) -> None:
    placed = await order(client, LIMIT + "&newClientOrderId=to-cancel")
    order_id = placed.body["orderId"]
    cancel = await send(
        client,
        "DELETE",
        "/fapi/v1/order",
        query=signed(ts(f"symbol=BTCUSDT&orderId={order_id}")),
    )
    assert cancel.status == 200, cancel.body
    assert (cancel.body["status"], cancel.body["orderId"]) == ("CANCELED", order_id)
    again = await send(
        client,
        "DELETE",
        "/fapi/v1/order",
        query=signed(ts(f"symbol=BTCUSDT&orderId={order_id}")),
    )
    assert again.body == {"code": -2011, "msg": "Unknown order sent."}
    missing = await signed_get(client, "/fapi/v1/order", "symbol=BTCUSDT&orderId=1")
    assert missing.body == {"code": -2013, "msg": "Order does not exist."}


async def test_account_v2_lists_every_contract(client: Client) -> None:
    reply = await signed_get(client, "/fapi/v2/account")
    assert reply.status == 200
    assert reply.body["canTrade"] is True
    assert {p["symbol"] for p in reply.body["positions"]} == {"BTCUSDT", "ETHUSDT", "BNBUSDT"}
    assert reply.body["availableBalance"] == "10000.00000000"


async def test_time_and_ping(client: Client, clock: FakeClock) -> None:
    clock.now = NOW_MS + 1234
    reply = await send(client, "GET", "/fapi/v1/time", api_key=None)
    assert reply.body == {"serverTime": NOW_MS + 1234}
    assert reply.headers["X-MBX-USED-WEIGHT-1M"] == "1"
    assert (await send(client, "GET", "/fapi/v1/ping", api_key=None)).body == {}


async def test_published_futures_example_is_accepted(aiohttp_client: Any) -> None:
    from tests.proxy.test_binance_usdm_signer import (
        DOC_API_KEY,
        DOC_PARAMS,
        DOC_SECRET,
        DOC_SIGNATURE,
        DOC_TIMESTAMP,
    )

    keys = {
        "binance_usdm": [{"api_key": DOC_API_KEY, "algorithm": "hmac-sha256", "secret": DOC_SECRET}]
    }
    client: Client = await aiohttp_client(make_app(keys, clock=FakeClock(DOC_TIMESTAMP)))
    query = f"{DOC_PARAMS}&timestamp={DOC_TIMESTAMP}&signature={DOC_SIGNATURE}"
    reply = await send(client, "POST", "/fapi/v1/order", query=query, api_key=DOC_API_KEY)
    assert reply.status == 200, reply.body
    assert reply.body["origQty"] == "1.000"


# ----- rejections


async def test_unknown_key_names_the_request_ip(client: Client) -> None:
    reply = await order(client, api_key=HMAC_API_KEY)  # warm up: accepted
    assert reply.status == 200
    reply = await send(
        client, "POST", "/fapi/v1/order", body=signed(ts(LIMIT)), api_key="nobody-knows-me"
    )
    assert reply.status == 401
    assert reply.body == {
        "code": -2015,
        "msg": "Invalid API-key, IP, or permissions for action, request ip: 127.0.0.1",
    }


async def test_spot_key_is_not_a_futures_key(client: Client) -> None:
    reply = await send(
        client,
        "POST",
        "/fapi/v1/order",
        body=f"{ts(LIMIT)}&signature={sign_hmac(ts(LIMIT).encode())}",
        api_key=SPOT_ONLY,
    )
    assert code(reply) == (401, -2015)


async def test_revoked_key(client: Client) -> None:
    async with client.delete(f"/__sim/keys/{ED25519_API_KEY}") as resp:
        assert resp.status == 200
    assert code(await order(client, api_key=ED25519_API_KEY)) == (401, -2015)


async def test_missing_key_header(client: Client) -> None:
    reply = await send(client, "POST", "/fapi/v1/order", body=signed(ts(LIMIT)), api_key=None)
    assert reply.body == {"code": -2014, "msg": "API-key format invalid."}


async def test_bad_signature(client: Client) -> None:
    body = signed(ts(LIMIT)).replace("quantity=0.010", "quantity=0.020")
    reply = await send(client, "POST", "/fapi/v1/order", body=body)
    assert reply.body == {"code": -1022, "msg": "Signature for this request is not valid."}
    assert reply.status == 400
    assert "X-MBX-ORDER-COUNT-1M" not in reply.headers


@pytest.mark.parametrize(
    ("when", "msg"),
    [
        (NOW_MS - 5001, "Timestamp for this request is outside of the recvWindow."),
        (NOW_MS + 1000, "Timestamp for this request was 1000ms ahead of the server's time."),
    ],
)
async def test_stale_or_early_timestamp(client: Client, when: int, msg: str) -> None:
    reply = await send(client, "POST", "/fapi/v1/order", body=signed(ts(LIMIT, when)))
    assert reply.status == 400
    assert reply.body == {"code": -1021, "msg": msg}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (LIMIT.replace("price=30000", "price=30000.05"), -4014),
        (LIMIT.replace("price=30000", "price=30000.001"), -1111),
        (LIMIT.replace("quantity=0.010", "quantity=0.0105"), -1111),
        (
            LIMIT.replace("symbol=BTCUSDT", "symbol=BNBUSDT")
            .replace("price=30000", "price=600.005")
            .replace("quantity=0.010", "quantity=0.01"),
            -4014,  # three decimals are allowed, but the tick is 0.010
        ),
        (LIMIT.replace("quantity=0.010", "quantity=0.001"), -4164),
        (LIMIT + "&positionSide=LONG", -4061),
        (LIMIT.replace("symbol=BTCUSDT", "symbol=NOPE"), -1121),
        (LIMIT.replace("timeInForce=GTC", "timeInForce=DAY"), -1115),
        (LIMIT.replace("type=LIMIT", "type=STOP"), -1116),
        (LIMIT + "&newClientOrderId=bad%20id", -4015),
        (LIMIT + "&newOrderRespType=FULL", -1136),
        (LIMIT + "&reduceOnly=maybe", -4062),
        ("symbol=BTCUSDT&side=BUY&type=MARKET&quantity=1&price=1", -1106),
    ],
)
async def test_futures_parameter_errors(client: Client, params: str, expected: int) -> None:
    reply = await order(client, params)
    assert code(reply) == (400, expected), reply.body


async def test_duplicate_client_order_id_while_open(client: Client) -> None:
    assert (await order(client, LIMIT + "&newClientOrderId=dup")).status == 200
    assert code(await order(client, LIMIT + "&newClientOrderId=dup")) == (400, -4116)


async def test_reduce_only_is_exempt_from_min_notional(client: Client) -> None:
    reply = await order(
        client, LIMIT.replace("quantity=0.010", "quantity=0.001") + "&reduceOnly=true"
    )
    assert reply.status == 200, reply.body
    assert reply.body["reduceOnly"] is True


async def test_log_notes_futures_verdicts(client: Client) -> None:
    await order(client)
    await send(client, "POST", "/fapi/v1/order", body=signed(ts(LIMIT)), api_key="nobody")
    async with client.get("/__sim/log") as resp:
        entries = (await resp.json())["entries"]
    assert [(e["path"], e["verdict"]) for e in entries] == [
        ("/fapi/v1/order", "ok"),
        ("/fapi/v1/order", -2015),
    ]
