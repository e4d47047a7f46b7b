"""Which endpoints a service may call: venue maps, permissions, allow-lists."""

from __future__ import annotations

import pytest

from proxy.access import VENUE_ENDPOINTS, access_for, compile_pattern
from proxy.signers import VENUES

EXCHANGE = ["read_market_data", "place_orders", "cancel_orders", "read_account_info"]


def test_every_venue_has_a_map_with_the_endpoints_that_move_funds() -> None:
    assert set(VENUE_ENDPOINTS) == set(VENUES)
    for venue, endpoints in VENUE_ENDPOINTS.items():
        if venue != "internal":
            assert any(e.permission in {"withdraw", "transfer"} for e in endpoints), venue


def test_the_key_types_permissions_decide_the_mapped_endpoints() -> None:
    access = access_for("binance", EXCHANGE)
    assert access.allows(b"POST", b"/api/v3/order")
    assert access.allows(b"DELETE", b"/api/v3/openOrders")
    assert access.allows(b"GET", b"/api/v3/ticker/price")
    assert not access.allows(b"GET", b"/api/v3/somethingElse")  # not in the map
    assert not access.allows(b"PUT", b"/api/v3/order")  # mapped path, other method
    read_only = access_for("binance", ["read_market_data"])
    assert read_only.allows(b"GET", b"/api/v3/depth")
    assert not read_only.allows(b"POST", b"/api/v3/order")
    assert not read_only.allows(b"GET", b"/api/v3/account")


def test_withdrawals_need_both_the_allow_list_and_the_permission() -> None:
    path = b"/sapi/v1/capital/withdraw/apply"
    assert not access_for("binance", EXCHANGE).allows(b"POST", path)
    assert not access_for("binance", EXCHANGE, ["POST /sapi/**"]).allows(b"POST", path)
    assert not access_for("binance", [*EXCHANGE, "withdraw"]).allows(b"POST", path)
    both = access_for("binance", [*EXCHANGE, "withdraw"], ["POST /sapi/v1/capital/**"])
    assert both.allows(b"POST", path)
    assert not access_for("okx", EXCHANGE, ["* /**"]).allows(b"POST", b"/api/v5/asset/transfer")


def test_allow_list_patterns() -> None:
    access = access_for("binance", [], ["GET /api/v3/klines", "GET|POST /x/*/y", "* /__sim/**"])
    assert access.allows(b"GET", b"/api/v3/klines")
    assert not access.allows(b"POST", b"/api/v3/klines")
    assert access.allows(b"POST", b"/x/abc/y") and not access.allows(b"POST", b"/x/a/b/y")
    assert access.allows(b"DELETE", b"/__sim/status/deep")
    assert not access.allows(b"GET", b"/api/v3/klinesX")  # whole path, not a prefix
    with pytest.raises(ValueError, match="METHOD /path"):
        compile_pattern("/no/method")


def test_broker_vocabulary_and_internal_services() -> None:
    broker = access_for("okx", ["read_positions", "submit_orders"])
    assert broker.allows(b"POST", b"/api/v5/trade/order")
    assert broker.allows(b"GET", b"/api/v5/account/positions")
    assert not broker.allows(b"GET", b"/api/v5/market/ticker")
    internal = access_for("internal", ["service_to_service_auth"])
    assert internal.allows(b"POST", b"/risk/check")


def test_the_decision_cache_is_bounded() -> None:
    access = access_for("coinbase", EXCHANGE)
    for i in range(10_000):
        assert access.allows(b"GET", b"/api/v3/brokerage/orders/historical/%d" % i)
    assert access._size <= 4096


def test_the_listener_refuses_with_403_before_signing() -> None:
    import asyncio
    import json

    from tests.proxy.listener_harness import Listener

    loop = asyncio.new_event_loop()
    try:
        listener = Listener(loop)
        listener.service.access = access_for("binance", EXCHANGE)
        conn, transport = listener.connect()
        conn.data_received(
            b"POST /binance/sapi/v1/capital/withdraw/apply?coin=BTC HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 0\r\n\r\n"
            b"GET /binance/api/v3/unlisted HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /binance/api/v3/order?symbol=BTCUSDT HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        (sent,) = listener.answer_all()  # only the order reached the venue
        assert sent.startswith(b"POST /api/v3/order?symbol=BTCUSDT")
        answers = b"".join(transport.written).split(b"HTTP/1.1 ")[1:]
        assert [a[:3] for a in answers] == [b"403", b"403", b"200"]
        assert json.loads(answers[0].partition(b"\r\n\r\n")[2])["error"]["code"] == "forbidden"
    finally:
        loop.close()


MOVES_AND_UNLISTED = {
    "binance": (b"POST /sapi/v1/capital/withdraw/apply", b"GET /sapi/v1/account/status"),
    "binance_usdm": (b"POST /sapi/v1/futures/transfer", b"GET /fapi/v1/leverageBracket"),
    "okx": (b"POST /api/v5/asset/withdrawal", b"GET /api/v5/users/subaccount/list"),
    "bybit": (b"POST /v5/asset/withdraw/create", b"GET /v5/user/query-api"),
    "coinbase": (b"POST /v2/accounts/a1/transactions", b"GET /api/v3/brokerage/payment_methods"),
    "kraken": (b"POST /0/private/Withdraw", b"POST /0/private/DepositMethods"),
    "bitmex": (b"POST /api/v1/user/requestWithdrawal", b"GET /api/v1/user/affiliateStatus"),
    "gemini": (b"POST /v1/withdraw/btc", b"POST /v1/heartbeat"),
    "deribit": (b"GET /api/v2/private/withdraw", b"GET /api/v2/private/get_subaccounts"),
}


class _NeverSubmit:
    def submit(self, exchange: object) -> None:
        raise AssertionError("a refused request reached the upstream pool")


@pytest.mark.parametrize("venue", sorted(MOVES_AND_UNLISTED))
def test_every_venue_refuses_withdrawals_and_unlisted_endpoints_before_signing(
    venue: str,
) -> None:
    import asyncio

    from loadtests.hotpath import FakeTransport
    from proxy.config import ServiceConfig
    from proxy.server import ClientConnection, Router
    from proxy.service import ServiceRuntime

    cfg = ServiceConfig(
        name=venue,
        venue=venue,
        key_type="exchange_api",
        upstream="https://127.0.0.1:9443",
        route="/v",
        ca_file=None,
        timeout_ms=2000,
        recv_window_ms=5000,
        pool_size=1,
    )
    service = ServiceRuntime(cfg, None)  # no key at all: a refusal never gets that far
    service.access = access_for(venue, EXCHANGE)
    service.pool = _NeverSubmit()
    loop = asyncio.new_event_loop()
    try:
        conn = ClientConnection(Router({venue: service}, max_body=4096))
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        for line in MOVES_AND_UNLISTED[venue]:
            method, _, path = line.partition(b" ")
            transport.written.clear()
            conn.data_received(
                method + b" /v" + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            )
            out = b"".join(transport.written)
            assert out.startswith(b"HTTP/1.1 403 "), (line, out[:120])
            assert b'"code":"forbidden"' in out.replace(b" ", b"")
    finally:
        loop.close()
