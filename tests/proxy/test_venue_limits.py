"""What each venue counts: endpoint costs and the usage headers that correct the budget."""

from __future__ import annotations

from proxy.ratelimit import ORDERS, WEIGHT, limiter_for
from proxy.venue_limits import BINANCE, BINANCE_USDM, BITMEX, BYBIT, NONE, limits_for, observe

SECOND = 1_000_000
MINUTE = 60 * SECOND


def _head(*headers: str) -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\n{lines}Content-Length: 2\r\n\r\n{{}}".encode()


def test_binance_costs_follow_the_endpoint_and_its_parameters() -> None:
    order = BINANCE.cost(b"POST", b"/api/v3/order")
    assert (order.weight, order.orders) == (1, 1)
    assert BINANCE.cost(b"GET", b"/api/v3/account").weight == 20
    assert BINANCE.cost(b"GET", b"/api/v3/order").orders == 0
    open_orders = BINANCE.cost(b"GET", b"/api/v3/openOrders")
    assert open_orders.by_query is not None
    assert open_orders.by_query(b"symbol=BTCUSDT&timestamp=1") == 6
    assert open_orders.by_query(b"timestamp=1") == 80
    depth = BINANCE.cost(b"GET", b"/api/v3/depth").by_query
    assert depth is not None
    assert [depth(b"symbol=X&limit=%d" % n) for n in (5, 500, 1000, 5000)] == [5, 25, 50, 250]
    unknown = BINANCE.cost(b"GET", b"/api/v3/somethingNew")
    assert (unknown.weight, unknown.orders) == (1, 0)
    futures = BINANCE_USDM.cost(b"POST", b"/fapi/v1/order")
    assert (futures.weight, futures.orders) == (0, 1)  # "0 on IP rate limit"
    assert limits_for("okx") is NONE and NONE.cost(b"POST", b"/api/v5/trade/order").weight == 1


def test_binance_usage_headers_raise_the_local_counts() -> None:
    lim = limiter_for(None, None, BINANCE.windows)
    now = 10 * MINUTE + 5 * SECOND
    raw = _head(
        "x-mbx-used-weight: 5900", "x-mbx-used-weight-1m: 5900", "X-MBX-ORDER-COUNT-10S: 99"
    )
    observe(BINANCE, lim, raw, now, now // 1000)
    weight = next(w for w in lim.windows if w.unit == WEIGHT)
    orders_10s = next(w for w in lim.windows if w.unit == ORDERS and w.width_us == 10 * SECOND)
    assert (weight.used, orders_10s.used) == (5900, 99)
    assert lim.admit(now + 1, weight=100, orders=1) == 0  # exactly to both limits
    assert lim.admit(now + 2, weight=1, orders=0) > 0  # the weight window is full
    # A body that merely mentions the header name changes nothing.
    lim2 = limiter_for(None, None, BINANCE.windows)
    observe(BINANCE, lim2, b"HTTP/1.1 200 OK\r\n\r\nx-mbx-used-weight-1m: 6000", now, 0)
    assert all(w.used == 0 for w in lim2.windows)


def test_bybit_and_bitmex_none_left_means_none_until_the_reset() -> None:
    lim = limiter_for(100, None)
    now, venue_ms = 50 * SECOND, 1_700_000_000_000
    observe(BYBIT, lim, _head("X-Bapi-Limit: 10", "X-Bapi-Limit-Status: 3"), now, venue_ms)
    assert lim.blocked_until_us == 0  # some left: nothing to do
    raw = _head("X-Bapi-Limit-Status: 0", f"X-Bapi-Limit-Reset-Timestamp: {venue_ms + 700}")
    observe(BYBIT, lim, raw, now, venue_ms)
    assert lim.admit(now + 1) == 700_000 - 1
    lim = limiter_for(100, None)
    reset_s = venue_ms // 1000 + 30
    raw = _head(
        "x-ratelimit-limit: 120", "x-ratelimit-remaining: 0", f"x-ratelimit-reset: {reset_s}"
    )
    observe(BITMEX, lim, raw, now, venue_ms)
    assert lim.blocked_until_us == now + (reset_s * 1000 - venue_ms) * 1000
    lim = limiter_for(100, None)
    observe(BITMEX, lim, _head("x-ratelimit-remaining: 7", "x-ratelimit-remaining-1s: 0"), now, 0)
    assert lim.blocked_until_us == now + SECOND
