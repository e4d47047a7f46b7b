"""What each venue counts: its own limit windows, the cost of each endpoint, and the
response headers that say how much of a window is used or left.

Pure data and pure functions, compiled once per service (``proxy.service``); the hot path
does two dict lookups per request (``VenueLimits.cost``) and, on venues that send usage
headers, one scan of the response head (``observe``).

Sources (the venues' rate-limit pages, current at the time of writing):

- Binance spot: REQUEST_WEIGHT 6000 per minute per IP (``X-MBX-USED-WEIGHT-1M``), ORDERS
  100 per 10 s and 200 000 per day per account (``X-MBX-ORDER-COUNT-10S`` / ``-1D``);
  weights from each endpoint's page (POST /api/v3/order 1, GET /api/v3/order 4,
  GET /api/v3/openOrders 6 with a symbol and 80 without, GET /api/v3/account 20,
  GET /api/v3/depth 5..250 by ``limit`` ...). 429 and 418 carry ``Retry-After`` (seconds).
- Binance USDⓈ-M futures: 2400 weight per minute per IP; orders 300 per 10 s and 1200 per
  minute per account (``X-MBX-ORDER-COUNT-10S`` / ``-1M``); a new order weighs 0 on the IP
  limit and 1 on the order limits.
- Bybit v5: per UID and endpoint, ``X-Bapi-Limit-Status`` (requests left in the window)
  and ``X-Bapi-Limit-Reset-Timestamp`` (ms): none left means none until that time.
- BitMEX: ``x-ratelimit-remaining`` with ``x-ratelimit-reset`` (epoch seconds) for the
  per-minute limit, ``x-ratelimit-remaining-1s`` for the per-second order limit.
- OKX, Coinbase, Kraken, Gemini, Deribit document no usage headers for their REST APIs;
  they are held to the policy's budget and stopped by their 429s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from proxy.ratelimit import ORDERS, WEIGHT, Limiter

SECOND_MS = 1_000
MINUTE_MS = 60_000
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Cost:
    """An endpoint's cost: its weight (fixed, or computed from the raw query) and the
    orders it places."""

    weight: int = 1
    orders: int = 0
    by_query: Callable[[bytes], int] | None = None


@dataclass(frozen=True, slots=True)
class Used:
    """A header giving the units used in the venue's current window."""

    name: bytes  # b"\r\n<lowercase name>:" as it appears in a lowercased head
    unit: int
    width_ms: int


@dataclass(frozen=True, slots=True)
class Left:
    """A header giving what is left; at 0 nothing more until ``reset`` (or ``wait_ms``)."""

    name: bytes
    reset: bytes | None = None  # header with the reset time, epoch in ``reset_unit_ms``
    reset_unit_ms: int = 1
    wait_ms: int = SECOND_MS  # without a reset header (or an unreadable one)


DEFAULT_COST = Cost()


@dataclass(frozen=True, slots=True)
class VenueLimits:
    windows: tuple[tuple[int, int, int], ...] = ()  # (unit, width_ms, limit)
    costs: Mapping[bytes, Mapping[bytes, Cost]] | None = None  # path -> method -> Cost
    used: tuple[Used, ...] = ()
    left: tuple[Left, ...] = ()
    marker: bytes = b""  # every usage header starts with it: one scan rules the rest out
    # header name (lowercase, no CRLF) -> what it says; built from used and left
    by_name: Mapping[bytes, Used | Left] = field(default_factory=dict)

    # the marker as venues spell it: lowercase (HTTP/2 style), upper, canonical
    markers: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        headers: tuple[Used | Left, ...] = (*self.used, *self.left)
        names = {h.name[2:-1]: h for h in headers}
        object.__setattr__(self, "by_name", names)
        m = self.marker.decode("ascii").removeprefix("\r\n")
        canonical = "-".join(p[:1].upper() + p[1:] for p in m.split("-"))
        spellings = dict.fromkeys(("\r\n" + x).encode() for x in (m, m.upper(), canonical))
        object.__setattr__(self, "markers", tuple(spellings) if m else ())

    def cost(self, method: bytes, path: bytes) -> Cost:
        costs = self.costs
        if costs is None:
            return DEFAULT_COST
        by_method = costs.get(path)
        if by_method is None:
            return DEFAULT_COST
        return by_method.get(method, DEFAULT_COST)

    @property
    def reads_headers(self) -> bool:
        return bool(self.used or self.left)


def header_int(low_head: bytes, name: bytes) -> int | None:
    """The integer value of header ``name`` (as in ``Used.name``) in a lowercased head."""
    at = low_head.find(name)
    if at < 0:
        return None
    start = at + len(name)
    end = low_head.find(b"\r\n", start)
    try:
        return int(low_head[start : end if end >= 0 else len(low_head)])
    except ValueError:
        return None


def observe(limits: VenueLimits, limiter: Limiter, raw: bytes, now_us: int, venue_ms: int) -> None:
    """Correct ``limiter`` from a response's usage headers. ``now_us`` is the limiter's
    clock, ``venue_ms`` the venue's (for its reset timestamps).

    Per response, no copy of the head: the marker is looked for in each spelling venues
    use (``x-mbx-``, ``X-MBX-``, ``X-Mbx-``), and only a found header's name is lowercased.
    (A name in any other mix of cases is not seen.)"""
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        head_end = len(raw)
    by_name = limits.by_name
    block_ms = 0
    for marker in limits.markers:
        at = raw.find(marker, 0, head_end)
        while at >= 0:
            colon = raw.find(b":", at, head_end)
            if colon < 0:
                break
            end = raw.find(b"\r\n", colon, head_end)
            if end < 0:
                end = head_end
            header = by_name.get(raw[at + 2 : colon].lower())
            if header is not None:
                try:
                    value = int(raw[colon + 1 : end])
                except ValueError:
                    value = -1
                if value < 0:
                    pass
                elif isinstance(header, Used):
                    limiter.observe_used(now_us, header.unit, header.width_ms * 1000, value)
                elif value == 0:  # a Left header: none left
                    wait_ms = header.wait_ms
                    if header.reset is not None:
                        reset = header_int(raw[:head_end].lower(), header.reset)
                        if reset is not None:
                            wait_ms = max(reset * header.reset_unit_ms - venue_ms, 0)
                    block_ms = max(block_ms, wait_ms)
            at = raw.find(marker, end, head_end)
    if block_ms:
        limiter.block(now_us, block_ms * 1000)


def _query_int(query: bytes, name: bytes, default: int) -> int:
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return default
    return default


def _has_param(query: bytes, name: bytes) -> bool:
    return any(pair.partition(b"=")[0] == name for pair in query.split(b"&"))


def _binance_depth(query: bytes) -> int:
    limit = _query_int(query, b"limit", 100)
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


def _binance_open_orders(query: bytes) -> int:
    return 6 if _has_param(query, b"symbol") else 80


def _binance_ticker(query: bytes) -> int:  # /ticker/price and /ticker/bookTicker
    return 2 if _has_param(query, b"symbol") else 4


def _binance_24hr(query: bytes) -> int:
    return 2 if _has_param(query, b"symbol") else 80


def _usdm_depth(query: bytes) -> int:
    limit = _query_int(query, b"limit", 500)
    return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20


def _usdm_open_orders(query: bytes) -> int:
    return 1 if _has_param(query, b"symbol") else 40


def _table(rows: Mapping[str, Mapping[str, Cost]]) -> Mapping[bytes, Mapping[bytes, Cost]]:
    return {
        path.encode(): {m.encode(): c for m, c in by_method.items()}
        for path, by_method in rows.items()
    }


_ORDER = Cost(1, 1)

BINANCE = VenueLimits(
    windows=((WEIGHT, MINUTE_MS, 6000), (ORDERS, 10 * SECOND_MS, 100), (ORDERS, DAY_MS, 200_000)),
    costs=_table(
        {
            "/api/v3/ping": {"GET": Cost(1)},
            "/api/v3/time": {"GET": Cost(1)},
            "/api/v3/exchangeInfo": {"GET": Cost(20)},
            "/api/v3/depth": {"GET": Cost(by_query=_binance_depth)},
            "/api/v3/trades": {"GET": Cost(25)},
            "/api/v3/historicalTrades": {"GET": Cost(25)},
            "/api/v3/aggTrades": {"GET": Cost(4)},
            "/api/v3/klines": {"GET": Cost(2)},
            "/api/v3/avgPrice": {"GET": Cost(2)},
            "/api/v3/ticker/24hr": {"GET": Cost(by_query=_binance_24hr)},
            "/api/v3/ticker/price": {"GET": Cost(by_query=_binance_ticker)},
            "/api/v3/ticker/bookTicker": {"GET": Cost(by_query=_binance_ticker)},
            "/api/v3/order": {"POST": _ORDER, "GET": Cost(4), "DELETE": Cost(1)},
            "/api/v3/order/test": {"POST": Cost(1)},
            "/api/v3/order/cancelReplace": {"POST": _ORDER},
            "/api/v3/orderList/oco": {"POST": Cost(1, 2)},
            "/api/v3/sor/order": {"POST": _ORDER},
            "/api/v3/openOrders": {
                "GET": Cost(by_query=_binance_open_orders),
                "DELETE": Cost(1),
            },
            "/api/v3/allOrders": {"GET": Cost(20)},
            "/api/v3/account": {"GET": Cost(20)},
            "/api/v3/myTrades": {"GET": Cost(20)},
            "/api/v3/rateLimit/order": {"GET": Cost(40)},
        }
    ),
    used=(
        Used(b"\r\nx-mbx-used-weight-1m:", WEIGHT, MINUTE_MS),
        Used(b"\r\nx-mbx-order-count-10s:", ORDERS, 10 * SECOND_MS),
        Used(b"\r\nx-mbx-order-count-1d:", ORDERS, DAY_MS),
    ),
    marker=b"\r\nx-mbx-",
)

BINANCE_USDM = VenueLimits(
    windows=((WEIGHT, MINUTE_MS, 2400), (ORDERS, 10 * SECOND_MS, 300), (ORDERS, MINUTE_MS, 1200)),
    costs=_table(
        {
            "/fapi/v1/ping": {"GET": Cost(1)},
            "/fapi/v1/time": {"GET": Cost(1)},
            "/fapi/v1/exchangeInfo": {"GET": Cost(1)},
            "/fapi/v1/depth": {"GET": Cost(by_query=_usdm_depth)},
            "/fapi/v1/order": {"POST": Cost(0, 1), "GET": Cost(1), "DELETE": Cost(1)},
            "/fapi/v1/batchOrders": {"POST": Cost(5, 5), "DELETE": Cost(1)},
            "/fapi/v1/openOrders": {"GET": Cost(by_query=_usdm_open_orders)},
            "/fapi/v1/allOpenOrders": {"DELETE": Cost(1)},
            "/fapi/v1/allOrders": {"GET": Cost(5)},
            "/fapi/v1/userTrades": {"GET": Cost(5)},
            "/fapi/v2/account": {"GET": Cost(5)},
            "/fapi/v3/account": {"GET": Cost(5)},
            "/fapi/v2/balance": {"GET": Cost(5)},
            "/fapi/v3/balance": {"GET": Cost(5)},
            "/fapi/v2/positionRisk": {"GET": Cost(5)},
            "/fapi/v3/positionRisk": {"GET": Cost(5)},
        }
    ),
    used=(
        Used(b"\r\nx-mbx-used-weight-1m:", WEIGHT, MINUTE_MS),
        Used(b"\r\nx-mbx-order-count-10s:", ORDERS, 10 * SECOND_MS),
        Used(b"\r\nx-mbx-order-count-1m:", ORDERS, MINUTE_MS),
    ),
    marker=b"\r\nx-mbx-",
)

BYBIT = VenueLimits(
    left=(Left(b"\r\nx-bapi-limit-status:", b"\r\nx-bapi-limit-reset-timestamp:", 1),),
    marker=b"\r\nx-bapi-limit",
)

BITMEX = VenueLimits(
    left=(
        Left(b"\r\nx-ratelimit-remaining:", b"\r\nx-ratelimit-reset:", 1000),
        Left(b"\r\nx-ratelimit-remaining-1s:", None, wait_ms=SECOND_MS),
    ),
    marker=b"\r\nx-ratelimit-",
)

NONE = VenueLimits()

VENUE_LIMITS: Mapping[str, VenueLimits] = {
    "binance": BINANCE,
    "binance_usdm": BINANCE_USDM,
    "bybit": BYBIT,
    "bitmex": BITMEX,
}


def limits_for(venue: str) -> VenueLimits:
    return VENUE_LIMITS.get(venue, NONE)
