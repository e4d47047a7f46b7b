"""What a service may call: each venue's endpoints by permission class, the service's
allow-list, and the key type's permissions. Pure: compiled once per service; the hot path
asks ``Access.allows(method, path)`` (a cached dict lookup after the first time).

The rule, in order:

1. Withdrawal and transfer endpoints are refused unless the allow-list names them AND the
   key type has their permission (``withdraw``, ``transfer``): either alone is not enough.
2. Any other endpoint the allow-list names (``services.<name>.allow``, ``"METHOD /path"``
   with ``*`` for one path segment, ``**`` for the rest, ``GET|POST`` for several
   methods, ``*`` for any) is allowed.
3. Otherwise an endpoint of the venue's map is allowed when its permission class is one
   of the key type's permissions (``api_key_policy.key_types.<type>.permissions``).
4. Anything else is refused (403, never signed).

The maps list each venue's documented REST endpoints for market data, orders, cancels,
account reads, withdrawals and transfers; an endpoint a firm needs beyond them goes in the
allow-list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

READ_MARKET_DATA = "read_market_data"
PLACE_ORDERS = "place_orders"
CANCEL_ORDERS = "cancel_orders"
READ_ACCOUNT_INFO = "read_account_info"
WITHDRAW = "withdraw"
TRANSFER = "transfer"
SERVICE_AUTH = "service_to_service_auth"
MOVES_FUNDS = frozenset({WITHDRAW, TRANSFER})

# The policy's other vocabularies, as the classes they grant (broker keys).
ALIASES: Mapping[str, frozenset[str]] = {
    "submit_orders": frozenset({PLACE_ORDERS, CANCEL_ORDERS}),
    "read_positions": frozenset({READ_ACCOUNT_INFO}),
    "read_executions": frozenset({READ_ACCOUNT_INFO}),
}

CACHE_SIZE = 4096  # decisions kept per service; paths with ids vary, so it is bounded


def compile_pattern(pattern: str) -> tuple[frozenset[bytes] | None, re.Pattern[bytes]]:
    """``"POST /api/v3/order"``, ``"GET /api/v5/market/*"``, ``"* /__sim/**"`` ->
    (methods or None for any, a regex over the path). Raises ValueError."""
    method, sep, path = pattern.strip().partition(" ")
    path = path.strip()
    if not sep or not method or not path.startswith("/"):
        raise ValueError(f"{pattern!r}: must be 'METHOD /path' (METHOD may be *)")
    methods = None if method == "*" else frozenset(m.encode() for m in method.upper().split("|"))
    parts = []
    for segment in path.split("/"):
        if segment == "**":
            parts.append(".*")
        else:
            parts.append("[^/]*".join(re.escape(p) for p in segment.split("*")))
    return methods, re.compile("/".join(parts).encode() + b"\\Z")


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: bytes
    path: re.Pattern[bytes]
    permission: str


def _endpoints(rows: Iterable[tuple[str, str]]) -> tuple[Endpoint, ...]:
    out: list[Endpoint] = []
    for pattern, permission in rows:
        methods, path = compile_pattern(pattern)
        assert methods is not None
        out.extend(Endpoint(m, path, permission) for m in methods)
    return tuple(out)


def _rows(permission: str, *patterns: str) -> list[tuple[str, str]]:
    return [(p, permission) for p in patterns]


VENUE_ENDPOINTS: Mapping[str, tuple[Endpoint, ...]] = {
    "binance": _endpoints(
        _rows(
            READ_MARKET_DATA,
            "GET /api/v3/ping",
            "GET /api/v3/time",
            "GET /api/v3/exchangeInfo",
            "GET /api/v3/depth",
            "GET /api/v3/trades",
            "GET /api/v3/historicalTrades",
            "GET /api/v3/aggTrades",
            "GET /api/v3/klines",
            "GET /api/v3/uiKlines",
            "GET /api/v3/avgPrice",
            "GET /api/v3/ticker/**",
            "GET /api/v3/ticker",
        )
        + _rows(
            PLACE_ORDERS,
            "POST /api/v3/order",
            "POST /api/v3/order/test",
            "POST /api/v3/order/cancelReplace",
            "POST /api/v3/orderList/*",
            "POST /api/v3/sor/order",
            "POST /api/v3/sor/order/test",
        )
        + _rows(
            CANCEL_ORDERS,
            "DELETE /api/v3/order",
            "DELETE /api/v3/openOrders",
            "DELETE /api/v3/orderList",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "GET /api/v3/account",
            "GET /api/v3/order",
            "GET /api/v3/openOrders",
            "GET /api/v3/allOrders",
            "GET /api/v3/myTrades",
            "GET /api/v3/rateLimit/order",
            "GET /api/v3/myPreventedMatches",
            "GET /api/v3/orderList",
            "GET /api/v3/allOrderList",
            "GET /api/v3/openOrderList",
        )
        + _rows(WITHDRAW, "POST /sapi/v1/capital/withdraw/apply")
        + _rows(
            TRANSFER,
            "POST /sapi/v1/asset/transfer",
            "POST /sapi/v1/futures/transfer",
            "POST /sapi/v1/margin/transfer",
            "POST /sapi/v1/sub-account/**",
        )
    ),
    "binance_usdm": _endpoints(
        _rows(
            READ_MARKET_DATA,
            "GET /fapi/v1/ping",
            "GET /fapi/v1/time",
            "GET /fapi/v1/exchangeInfo",
            "GET /fapi/v1/depth",
            "GET /fapi/v1/trades",
            "GET /fapi/v1/klines",
            "GET /fapi/v1/premiumIndex",
            "GET /fapi/v1/fundingRate",
            "GET /fapi/v1/ticker/**",
            "GET /fapi/v2/ticker/**",
        )
        + _rows(
            PLACE_ORDERS, "POST /fapi/v1/order", "POST /fapi/v1/batchOrders", "PUT /fapi/v1/order"
        )
        + _rows(
            CANCEL_ORDERS,
            "DELETE /fapi/v1/order",
            "DELETE /fapi/v1/batchOrders",
            "DELETE /fapi/v1/allOpenOrders",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "GET /fapi/v1/order",
            "GET /fapi/v1/openOrders",
            "GET /fapi/v1/allOrders",
            "GET /fapi/v1/userTrades",
            "GET /fapi/v2/account",
            "GET /fapi/v3/account",
            "GET /fapi/v2/balance",
            "GET /fapi/v3/balance",
            "GET /fapi/v2/positionRisk",
            "GET /fapi/v3/positionRisk",
        )
        + _rows(TRANSFER, "POST /sapi/v1/futures/transfer", "POST /sapi/v1/asset/transfer")
    ),
    "okx": _endpoints(
        _rows(READ_MARKET_DATA, "GET /api/v5/market/**", "GET /api/v5/public/**")
        + _rows(
            PLACE_ORDERS,
            "POST /api/v5/trade/order",
            "POST /api/v5/trade/batch-orders",
            "POST /api/v5/trade/amend-order",
        )
        + _rows(
            CANCEL_ORDERS,
            "POST /api/v5/trade/cancel-order",
            "POST /api/v5/trade/cancel-batch-orders",
            "POST /api/v5/trade/mass-cancel",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "GET /api/v5/account/**",
            "GET /api/v5/trade/order",
            "GET /api/v5/trade/orders-pending",
            "GET /api/v5/trade/orders-history",
            "GET /api/v5/trade/fills",
        )
        + _rows(WITHDRAW, "POST /api/v5/asset/withdrawal")
        + _rows(TRANSFER, "POST /api/v5/asset/transfer")
    ),
    "bybit": _endpoints(
        _rows(READ_MARKET_DATA, "GET /v5/market/**")
        + _rows(
            PLACE_ORDERS,
            "POST /v5/order/create",
            "POST /v5/order/amend",
            "POST /v5/order/create-batch",
        )
        + _rows(
            CANCEL_ORDERS,
            "POST /v5/order/cancel",
            "POST /v5/order/cancel-all",
            "POST /v5/order/cancel-batch",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "GET /v5/order/realtime",
            "GET /v5/order/history",
            "GET /v5/execution/list",
            "GET /v5/position/list",
            "GET /v5/account/**",
        )
        + _rows(WITHDRAW, "POST /v5/asset/withdraw/create")
        + _rows(
            TRANSFER,
            "POST /v5/asset/transfer/inter-transfer",
            "POST /v5/asset/transfer/universal-transfer",
        )
    ),
    "coinbase": _endpoints(
        _rows(
            READ_MARKET_DATA,
            "GET /api/v3/brokerage/market/**",
            "GET /api/v3/brokerage/products",
            "GET /api/v3/brokerage/products/**",
            "GET /api/v3/brokerage/best_bid_ask",
            "GET /api/v3/brokerage/product_book",
        )
        + _rows(
            PLACE_ORDERS,
            "POST /api/v3/brokerage/orders",
            "POST /api/v3/brokerage/orders/edit",
            "POST /api/v3/brokerage/orders/preview",
        )
        + _rows(CANCEL_ORDERS, "POST /api/v3/brokerage/orders/batch_cancel")
        + _rows(
            READ_ACCOUNT_INFO,
            "GET /api/v3/brokerage/orders/historical/**",
            "GET /api/v3/brokerage/accounts",
            "GET /api/v3/brokerage/accounts/*",
            "GET /api/v3/brokerage/transaction_summary",
        )
        + _rows(
            WITHDRAW, "POST /v2/accounts/*/transactions", "POST /api/v3/brokerage/withdrawals/**"
        )
        + _rows(TRANSFER, "POST /api/v3/brokerage/portfolios/move_funds")
    ),
    "kraken": _endpoints(
        _rows(READ_MARKET_DATA, "GET /0/public/*", "POST /0/public/*")
        + _rows(
            PLACE_ORDERS,
            "POST /0/private/AddOrder",
            "POST /0/private/AddOrderBatch",
            "POST /0/private/EditOrder",
            "POST /0/private/AmendOrder",
        )
        + _rows(
            CANCEL_ORDERS,
            "POST /0/private/CancelOrder",
            "POST /0/private/CancelAll",
            "POST /0/private/CancelAllOrdersAfter",
            "POST /0/private/CancelOrderBatch",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "POST /0/private/Balance",
            "POST /0/private/BalanceEx",
            "POST /0/private/TradeBalance",
            "POST /0/private/OpenOrders",
            "POST /0/private/ClosedOrders",
            "POST /0/private/QueryOrders",
            "POST /0/private/TradesHistory",
            "POST /0/private/OpenPositions",
            "POST /0/private/GetWebSocketsToken",
        )
        + _rows(WITHDRAW, "POST /0/private/Withdraw", "POST /0/private/WithdrawCancel")
        + _rows(TRANSFER, "POST /0/private/WalletTransfer", "POST /0/private/AccountTransfer")
    ),
    "bitmex": _endpoints(
        _rows(
            READ_MARKET_DATA,
            "GET /api/v1/instrument",
            "GET /api/v1/instrument/**",
            "GET /api/v1/orderBook/L2",
            "GET /api/v1/trade",
            "GET /api/v1/trade/bucketed",
            "GET /api/v1/quote",
        )
        + _rows(PLACE_ORDERS, "POST /api/v1/order", "PUT /api/v1/order")
        + _rows(
            CANCEL_ORDERS,
            "DELETE /api/v1/order",
            "DELETE /api/v1/order/all",
            "POST /api/v1/order/cancelAllAfter",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "GET /api/v1/order",
            "GET /api/v1/execution",
            "GET /api/v1/execution/tradeHistory",
            "GET /api/v1/position",
            "GET /api/v1/user/wallet",
            "GET /api/v1/user/margin",
        )
        + _rows(WITHDRAW, "POST /api/v1/user/requestWithdrawal")
        + _rows(TRANSFER, "POST /api/v1/user/walletTransfer")
    ),
    "gemini": _endpoints(
        _rows(
            READ_MARKET_DATA,
            "GET /v1/pubticker/*",
            "GET /v1/book/*",
            "GET /v1/trades/*",
            "GET /v1/symbols",
            "GET /v2/ticker/*",
        )
        + _rows(PLACE_ORDERS, "POST /v1/order/new")
        + _rows(
            CANCEL_ORDERS,
            "POST /v1/order/cancel",
            "POST /v1/order/cancel/all",
            "POST /v1/order/cancel/session",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "POST /v1/order/status",
            "POST /v1/orders",
            "POST /v1/mytrades",
            "POST /v1/balances",
            "POST /v1/notionalvolume",
        )
        + _rows(WITHDRAW, "POST /v1/withdraw/**")
        + _rows(TRANSFER, "POST /v1/account/transfer/**")
    ),
    "deribit": _endpoints(
        _rows(READ_MARKET_DATA, "GET /api/v2/public/*", "POST /api/v2/public/*")
        + _rows(
            PLACE_ORDERS,
            "GET|POST /api/v2/private/buy",
            "GET|POST /api/v2/private/sell",
            "GET|POST /api/v2/private/edit",
        )
        + _rows(
            CANCEL_ORDERS,
            "GET|POST /api/v2/private/cancel",
            "GET|POST /api/v2/private/cancel_all",
            "GET|POST /api/v2/private/cancel_all_by_currency",
            "GET|POST /api/v2/private/cancel_all_by_instrument",
        )
        + _rows(
            READ_ACCOUNT_INFO,
            "GET|POST /api/v2/private/get_account_summary",
            "GET|POST /api/v2/private/get_positions",
            "GET|POST /api/v2/private/get_open_orders_by_currency",
            "GET|POST /api/v2/private/get_open_orders_by_instrument",
            "GET|POST /api/v2/private/get_order_state",
            "GET|POST /api/v2/private/get_user_trades_by_currency",
        )
        + _rows(WITHDRAW, "GET|POST /api/v2/private/withdraw")
        + _rows(
            TRANSFER,
            "GET|POST /api/v2/private/submit_transfer_to_subaccount",
            "GET|POST /api/v2/private/submit_transfer_to_user",
        )
    ),
    # Our own services: every endpoint is service-to-service; the allow-list narrows it.
    "internal": _endpoints(_rows(SERVICE_AUTH, "GET|POST|PUT|DELETE|PATCH /**")),
}


@dataclass(slots=True)
class Access:
    """One service's decision table. ``allows`` is called per request."""

    endpoints: tuple[Endpoint, ...]
    permissions: frozenset[str]
    allow: tuple[tuple[frozenset[bytes] | None, re.Pattern[bytes]], ...] = ()
    _cache: dict[bytes, dict[bytes, bool]] = field(default_factory=dict, repr=False)
    _size: int = field(default=0, repr=False)

    def allows(self, method: bytes, path: bytes) -> bool:
        by_method = self._cache.get(path)
        if by_method is not None:
            known = by_method.get(method)
            if known is not None:
                return known
        verdict = self._decide(method, path)
        if self._size >= CACHE_SIZE:
            self._cache.clear()
            self._size = 0
        self._cache.setdefault(path, {})[method] = verdict
        self._size += 1
        return verdict

    def permission_of(self, method: bytes, path: bytes) -> str | None:
        for e in self.endpoints:
            if e.method == method and e.path.match(path):
                return e.permission
        return None

    def _decide(self, method: bytes, path: bytes) -> bool:
        permission = self.permission_of(method, path)
        if permission in MOVES_FUNDS:
            # Moving funds out needs the permission itself; an allow-list line is not enough.
            return permission in self.permissions and self._listed(method, path)
        if self._listed(method, path):
            return True
        return permission is not None and permission in self.permissions

    def _listed(self, method: bytes, path: bytes) -> bool:
        return any(
            (methods is None or method in methods) and pattern.match(path)
            for methods, pattern in self.allow
        )


def access_for(venue: str, permissions: Sequence[str], allow: Sequence[str] = ()) -> Access:
    """Compile a service's access table. Raises ValueError for a bad allow-list line."""
    granted: set[str] = set()
    for p in permissions:
        granted.add(p)
        granted |= ALIASES.get(p, frozenset())
    return Access(
        VENUE_ENDPOINTS.get(venue, ()),
        frozenset(granted),
        tuple(compile_pattern(line) for line in allow),
    )
