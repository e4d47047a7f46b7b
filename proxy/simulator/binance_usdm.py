"""Binance USDⓈ-M futures REST (``/fapi``) as the venue verifies it.

USD-M futures sign exactly as spot does (same ``X-MBX-APIKEY`` header, ``totalParams`` =
query string concatenated with the form body, HMAC-SHA256 hex or Ed25519/RSA base64,
``timestamp`` + ``recvWindow`` with the same timing rule), so the request check reuses
:func:`proxy.simulator.binance.verify_binance`, itself written from Binance's public
documentation and independent of the sidecar. What differs, and lives here:

- hosts, paths and weights: ``/fapi/v1/order`` (POST: weight 0 on the IP limit, 1 on the
  10 s and 1 min order limits; DELETE, GET: 1), ``/fapi/v2/account`` and
  ``/fapi/v3/account`` (5), ``/fapi/v1/time`` and ``/fapi/v1/ping`` (1);
- headers: ``X-MBX-USED-WEIGHT-1M`` on every answer, ``X-MBX-ORDER-COUNT-10S`` and
  ``X-MBX-ORDER-COUNT-1M`` on accepted orders ("Rejected/unsuccessful orders are not
  guaranteed to have X-MBX-ORDER-COUNT-** headers");
- the futures error texts (``-2015`` names the request IP on fapi), and futures order
  shapes (``cumQty``, ``cumQuote``, ``avgPrice``, ``positionSide``, ...).

Sources, as read for this module:
https://developers.binance.com/docs/derivatives/usds-margined-futures/general-info
(SIGNED endpoint security, timing security, limits and headers),
.../usds-margined-futures/error-code, .../trade/rest-api/New-Order, .../Cancel-Order,
.../Query-Order, .../account/rest-api/Account-Information-V2 and -V3,
.../market-data/rest-api/Check-Server-Time.

Simplifications, on purpose: one-way position mode (``positionSide`` BOTH only), LIMIT and
MARKET orders only, one USDT wallet with fixed mark prices, MARKET orders fill at once.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Context, Decimal, InvalidOperation

from aiohttp import web

from proxy.simulator.base import Clock, SwappedKeys, compact_json, note_of
from proxy.simulator.binance import (
    API_KEY_HEADER,
    CLIENT_ORDER_ID_RANGE,
    DECIMAL_RANGE,
    ERR_BAD_ORDER_TYPE,
    ERR_BAD_SIDE,
    ERR_BAD_SYMBOL,
    ERR_BAD_TIME_IN_FORCE,
    ERR_ILLEGAL_CHARS,
    ERR_NO_SUCH_ORDER,
    ERR_UNKNOWN_ORDER,
    FORM_CONTENT_TYPE,
    BinanceAccepted,
    BinanceError,
    BinanceKey,
    BinanceReject,
    FixedWindowCounter,
    err_either,
    err_illegal,
    err_mandatory,
    err_not_required,
    parse_binance_keys,
    raw_query,
    split_params,
    verify_binance,
)

VENUE_NAME = "binance_usdm"
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
ORDER_COUNT_10S_HEADER = "X-MBX-ORDER-COUNT-10S"
ORDER_COUNT_1M_HEADER = "X-MBX-ORDER-COUNT-1M"

WEIGHT_WINDOW_MS = 60_000
ORDER_WINDOW_10S_MS = 10_000
ORDER_WINDOW_1M_MS = 60_000

WEIGHT_PING = 1
WEIGHT_TIME = 1
WEIGHT_NEW_ORDER = 0  # "0 on IP rate limit(x-mbx-used-weight-1m)"
WEIGHT_CANCEL_ORDER = 1
WEIGHT_QUERY_ORDER = 1
WEIGHT_ACCOUNT = 5

MAX_CLOSED_ORDERS_PER_ACCOUNT = 50_000  # bounds memory in long runs; open orders stay
WALLET_BALANCE = Decimal("10000.00000000")  # USDT per simulated account
LEVERAGE = 20

_DECIMAL_RE = re.compile(DECIMAL_RANGE)
_LONG_RE = re.compile(r"^[0-9]{1,20}$")
_CLIENT_ORDER_ID_RE = re.compile(CLIENT_ORDER_ID_RANGE)
_DEC = Context(prec=60)
_ZERO = Decimal(0)
_CLIENT_ID_ALPHABET = string.ascii_letters + string.digits

# --------------------------------------------------------------------------- errors


def err_api_key_rejected(ip: str) -> BinanceError:
    """-2015 as fapi words it: the request's IP is part of the message."""
    return BinanceError(
        401, -2015, f"Invalid API-key, IP, or permissions for action, request ip: {ip}"
    )


ERR_PRECISION = BinanceError(400, -1111, "Precision is over the maximum defined for this asset.")
ERR_BAD_RESP_TYPE = BinanceError(400, -1136, "Invalid newOrderRespType.")
ERR_PRICE_LT_ZERO = BinanceError(400, -4001, "Price less than 0.")
ERR_QTY_LT_ZERO = BinanceError(400, -4003, "Quantity less than zero.")
ERR_TICK_SIZE = BinanceError(400, -4014, "Price not increased by tick size.")
ERR_CLIENT_ORDER_ID = BinanceError(400, -4015, "Client order id is not valid.")
ERR_STEP_SIZE = BinanceError(400, -4023, "Qty not increased by step size.")
ERR_POSITION_SIDE = BinanceError(400, -4061, "Order's position side does not match user's setting.")
ERR_REDUCE_ONLY = BinanceError(400, -4062, "Invalid or improper reduceOnly value.")
ERR_DUPLICATE_CLIENT_ID = BinanceError(400, -4116, "ClientOrderId is duplicated.")


def err_min_notional(minimum: Decimal) -> BinanceError:
    """-4164 for an order below the symbol's minimum notional (unless reduce-only)."""
    return BinanceError(
        400,
        -4164,
        f"Order's notional must be no smaller than {minimum} (unless you choose reduce only).",
    )


# --------------------------------------------------------------------------- market


@dataclass(frozen=True, slots=True)
class Contract:
    """A perpetual contract: its filters and the (fixed) mark price MARKET orders fill at."""

    symbol: str
    tick_size: Decimal
    step_size: Decimal
    price_precision: int
    quantity_precision: int
    min_notional: Decimal
    mark_price: Decimal

    def price(self, value: Decimal) -> str:
        return _fixed(value, self.price_precision)

    def qty(self, value: Decimal) -> str:
        return _fixed(value, self.quantity_precision)


def _fixed(value: Decimal, places: int) -> str:
    quantum = Decimal(1).scaleb(-places)
    return f"{value.quantize(quantum, rounding=ROUND_DOWN, context=_DEC):f}"


# Filters as GET /fapi/v1/exchangeInfo lists them for these perpetuals.
CONTRACTS: Mapping[str, Contract] = {
    c.symbol: c
    for c in (
        Contract("BTCUSDT", Decimal("0.10"), Decimal("0.001"), 2, 3, Decimal(100), Decimal(65000)),
        Contract("ETHUSDT", Decimal("0.01"), Decimal("0.001"), 2, 3, Decimal(20), Decimal(3500)),
        Contract("BNBUSDT", Decimal("0.010"), Decimal("0.01"), 3, 2, Decimal(5), Decimal(600)),
    )
}
QUOTE_PRECISION = 5  # cumQuote is rendered with five decimals, e.g. "0.00000"


@dataclass(slots=True)
class FuturesOrder:
    """One order in the simulated book (mutable: status changes on fill or cancel)."""

    contract: Contract
    order_id: int
    client_order_id: str
    side: str
    type: str
    time_in_force: str
    price: Decimal
    orig_qty: Decimal
    executed_qty: Decimal
    avg_price: Decimal
    reduce_only: bool
    status: str
    time: int
    update_time: int

    @property
    def is_open(self) -> bool:
        return self.status in {"NEW", "PARTIALLY_FILLED"}

    def as_json(self) -> dict[str, object]:
        """The order shape shared by new, cancel and query (docs' response examples)."""
        c = self.contract
        return {
            "avgPrice": c.price(self.avg_price),
            "clientOrderId": self.client_order_id,
            "cumQuote": _fixed(_DEC.multiply(self.executed_qty, self.avg_price), QUOTE_PRECISION),
            "executedQty": c.qty(self.executed_qty),
            "orderId": self.order_id,
            "origQty": c.qty(self.orig_qty),
            "origType": self.type,
            "price": c.price(self.price),
            "reduceOnly": self.reduce_only,
            "side": self.side,
            "positionSide": "BOTH",
            "status": self.status,
            "stopPrice": c.price(_ZERO),
            "closePosition": False,
            "symbol": c.symbol,
            "timeInForce": self.time_in_force,
            "type": self.type,
            "updateTime": self.update_time,
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "goodTillDate": 0,
        }

    def placed_json(self) -> dict[str, object]:
        """POST/DELETE answers also carry ``cumQty``."""
        return {"cumQty": self.contract.qty(self.executed_qty), **self.as_json()}

    def query_json(self) -> dict[str, object]:
        """GET /fapi/v1/order also carries the order's creation ``time``."""
        return {**self.as_json(), "time": self.time}


@dataclass(slots=True)
class Position:
    amount: Decimal = _ZERO
    entry_price: Decimal = _ZERO
    update_time: int = 0


@dataclass(slots=True)
class FuturesAccount:
    """The orders and positions of one venue account; several API keys may share it."""

    name: str
    orders: dict[int, FuturesOrder] = field(default_factory=dict)
    closed: list[int] = field(default_factory=list)
    positions: dict[str, Position] = field(default_factory=dict)
    update_time: int = 0

    def find(self, symbol: str, order_id: int | None, client_id: str | None) -> FuturesOrder | None:
        if order_id is not None:
            order = self.orders.get(order_id)
            return order if order is not None and order.contract.symbol == symbol else None
        found = [
            o
            for o in self.orders.values()
            if o.contract.symbol == symbol and o.client_order_id == client_id
        ]
        open_ones = [o for o in found if o.is_open]
        if open_ones:
            return open_ones[-1]
        return found[-1] if found else None

    def close(self, order: FuturesOrder) -> None:
        self.closed.append(order.order_id)
        if len(self.closed) > MAX_CLOSED_ORDERS_PER_ACCOUNT:
            drop = self.closed[: len(self.closed) - MAX_CLOSED_ORDERS_PER_ACCOUNT]
            del self.closed[: len(drop)]
            for order_id in drop:
                self.orders.pop(order_id, None)

    def fill(self, order: FuturesOrder, now: int) -> None:
        """Apply a MARKET fill to the one-way position of the order's symbol."""
        pos = self.positions.setdefault(order.contract.symbol, Position())
        signed = order.executed_qty if order.side == "BUY" else -order.executed_qty
        new_amount = pos.amount + signed
        if pos.amount == 0 or (pos.amount > 0) == (signed > 0):
            total = abs(pos.amount) + abs(signed)
            pos.entry_price = _DEC.divide(
                abs(pos.amount) * pos.entry_price + abs(signed) * order.avg_price, total
            )
        elif new_amount == 0:
            pos.entry_price = _ZERO
        elif (new_amount > 0) != (pos.amount > 0):
            pos.entry_price = order.avg_price  # flipped through zero
        pos.amount = new_amount
        pos.update_time = now
        self.update_time = now


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class NewFuturesOrder:
    """A validated POST /fapi/v1/order."""

    contract: Contract
    side: str
    type: str
    time_in_force: str
    quantity: Decimal
    price: Decimal
    reduce_only: bool
    client_order_id: str | None
    response_type: str


def _contract(params: Mapping[str, str]) -> Contract:
    raw = params.get("symbol", "")
    if not raw:
        raise BinanceReject(err_mandatory("symbol"))
    contract = CONTRACTS.get(raw)
    if contract is None:
        raise BinanceReject(ERR_BAD_SYMBOL)
    return contract


def _decimal(params: Mapping[str, str], name: str) -> Decimal | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not _DECIMAL_RE.match(raw):
        raise BinanceReject(err_illegal(name, DECIMAL_RANGE))
    return Decimal(raw)


def _on_grid(value: Decimal, step: Decimal, places: int, grid_error: BinanceError) -> None:
    exponent = value.normalize(_DEC).as_tuple().exponent
    if isinstance(exponent, int) and -exponent > places:
        raise BinanceReject(ERR_PRECISION)
    try:
        off_grid = _DEC.remainder(value, step) != 0
    except InvalidOperation:  # pragma: no cover - values are bounded by the regex
        off_grid = True
    if off_grid:
        raise BinanceReject(grid_error)


def parse_new_futures_order(params: Mapping[str, str]) -> NewFuturesOrder:
    """Validate new-order parameters (LIMIT, MARKET); raise BinanceReject. Pure."""
    contract = _contract(params)
    side = params.get("side", "")
    if not side:
        raise BinanceReject(err_mandatory("side"))
    if side not in {"BUY", "SELL"}:
        raise BinanceReject(ERR_BAD_SIDE)
    position_side = params.get("positionSide", "BOTH")
    if position_side != "BOTH":
        raise BinanceReject(ERR_POSITION_SIDE)  # the simulated account is in one-way mode
    order_type = params.get("type", "")
    if not order_type:
        raise BinanceReject(err_mandatory("type"))
    if order_type not in {"LIMIT", "MARKET"}:
        raise BinanceReject(ERR_BAD_ORDER_TYPE)
    reduce_raw = params.get("reduceOnly", "false")
    if reduce_raw not in {"true", "false"}:
        raise BinanceReject(ERR_REDUCE_ONLY)
    quantity = _decimal(params, "quantity")
    if quantity is None:
        raise BinanceReject(err_mandatory("quantity"))
    price = _decimal(params, "price")
    time_in_force = params.get("timeInForce", "")
    if order_type == "LIMIT":
        if not time_in_force:
            raise BinanceReject(err_mandatory("timeInForce"))
        if time_in_force not in {"GTC", "IOC", "FOK", "GTX"}:
            raise BinanceReject(ERR_BAD_TIME_IN_FORCE)
        if price is None:
            raise BinanceReject(err_mandatory("price"))
        if price <= 0:
            raise BinanceReject(ERR_PRICE_LT_ZERO)
        _on_grid(price, contract.tick_size, contract.price_precision, ERR_TICK_SIZE)
    else:
        if price is not None:
            raise BinanceReject(err_not_required("price"))
        if time_in_force:
            raise BinanceReject(err_not_required("timeInForce"))
        price = contract.mark_price
        time_in_force = "GTC"
    if quantity <= 0:
        raise BinanceReject(ERR_QTY_LT_ZERO)
    _on_grid(quantity, contract.step_size, contract.quantity_precision, ERR_STEP_SIZE)
    reduce_only = reduce_raw == "true"
    if not reduce_only and _DEC.multiply(quantity, price) < contract.min_notional:
        raise BinanceReject(err_min_notional(contract.min_notional))
    client_order_id = params.get("newClientOrderId") or None
    if client_order_id is not None and not _CLIENT_ORDER_ID_RE.match(client_order_id):
        raise BinanceReject(ERR_CLIENT_ORDER_ID)
    response_type = params.get("newOrderRespType") or "ACK"
    if response_type not in {"ACK", "RESULT"}:
        raise BinanceReject(ERR_BAD_RESP_TYPE)
    return NewFuturesOrder(
        contract=contract,
        side=side,
        type=order_type,
        time_in_force=time_in_force,
        quantity=quantity,
        price=price,
        reduce_only=reduce_only,
        client_order_id=client_order_id,
        response_type=response_type,
    )


# --------------------------------------------------------------------------- the venue


@dataclass(frozen=True, slots=True)
class _Signed:
    weight: int
    action: Callable[[BinanceAccepted, int], object]
    counts_order: bool = False


class BinanceUsdmVenue(SwappedKeys[BinanceKey]):
    """Routes and state of the simulated USD-M futures venue. Loop thread only."""

    name = VENUE_NAME

    def __init__(self, *, clock: Clock, keys: Mapping[str, BinanceKey] | None = None) -> None:
        self._clock = clock
        self._keys: Mapping[str, BinanceKey] = dict(keys or {})
        self._weights = FixedWindowCounter(WEIGHT_WINDOW_MS)
        self._orders_10s = FixedWindowCounter(ORDER_WINDOW_10S_MS)
        self._orders_1m = FixedWindowCounter(ORDER_WINDOW_1M_MS)
        self._accounts: dict[str, FuturesAccount] = {}
        self._next_order_id = 4_000_000_001  # fapi order ids are large

    # ----- key management (Venue protocol)

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, BinanceKey]:
        return parse_binance_keys(entries, path)

    def routes(self) -> Sequence[web.RouteDef]:
        """The USD-M routes the simulator serves."""
        signed = self._signed_handler
        return [
            web.get("/fapi/v1/ping", self._ping),
            web.get("/fapi/v1/time", self._time),
            web.post(
                "/fapi/v1/order",
                signed(_Signed(WEIGHT_NEW_ORDER, self._new_order, counts_order=True)),
            ),
            web.delete("/fapi/v1/order", signed(_Signed(WEIGHT_CANCEL_ORDER, self._cancel))),
            web.get(
                "/fapi/v1/order",
                signed(_Signed(WEIGHT_QUERY_ORDER, self._query)),
                allow_head=False,
            ),
            web.get(
                "/fapi/v2/account",
                signed(_Signed(WEIGHT_ACCOUNT, self._account_v2)),
                allow_head=False,
            ),
            web.get(
                "/fapi/v3/account",
                signed(_Signed(WEIGHT_ACCOUNT, self._account_v3)),
                allow_head=False,
            ),
        ]

    # ----- adapters

    @staticmethod
    def _json(payload: object, headers: Mapping[str, str], status: int = 200) -> web.Response:
        return web.Response(
            text=compact_json(payload),
            status=status,
            content_type="application/json",
            headers=headers,
        )

    def _error(
        self, request: web.Request, error: BinanceError, headers: Mapping[str, str]
    ) -> web.Response:
        note_of(request).verdict = error.code
        return self._json(error.body(), headers, error.status)

    def _start(self, request: web.Request, weight: int) -> dict[str, str]:
        note = note_of(request)
        api_key = request.headers.get(API_KEY_HEADER)
        note.api_key = api_key
        key = self._keys.get(api_key) if api_key else None
        note.algorithm = key.algorithm if key is not None else None
        used = self._weights.add(request.remote or "unknown", self._clock(), weight)
        return {USED_WEIGHT_HEADER: str(used)}

    def _signed_handler(
        self, endpoint: _Signed
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.Response:
            headers = self._start(request, endpoint.weight)
            body = b""
            if request.method != "GET" and request.content_type == FORM_CONTENT_TYPE:
                body = await request.read()
            now = self._clock()
            verdict = verify_binance(
                api_key=request.headers.get(API_KEY_HEADER),
                query=raw_query(request),
                body=body,
                keys=self._keys,
                now_ms=now,
            )
            if isinstance(verdict, BinanceError):
                if verdict.code == -2015:
                    verdict = err_api_key_rejected(request.remote or "127.0.0.1")
                return self._error(request, verdict, headers)
            try:
                payload = endpoint.action(verdict, now)
            except BinanceReject as exc:
                return self._error(request, exc.error, headers)
            if endpoint.counts_order:
                account = verdict.key.account
                headers[ORDER_COUNT_10S_HEADER] = str(self._orders_10s.add(account, now, 1))
                headers[ORDER_COUNT_1M_HEADER] = str(self._orders_1m.add(account, now, 1))
            return self._json(payload, headers)

        return handle

    # ----- unsigned endpoints

    async def _ping(self, request: web.Request) -> web.Response:
        headers = self._start(request, WEIGHT_PING)
        parsed = split_params(raw_query(request))
        if isinstance(parsed, BinanceError):
            return self._error(request, parsed, headers)
        return self._json({}, headers)

    async def _time(self, request: web.Request) -> web.Response:
        headers = self._start(request, WEIGHT_TIME)
        parsed = split_params(raw_query(request))
        if isinstance(parsed, BinanceError):
            return self._error(request, parsed, headers)
        return self._json({"serverTime": self._clock()}, headers)

    # ----- signed actions (synchronous; raise BinanceReject)

    def _account_of(self, accepted: BinanceAccepted) -> FuturesAccount:
        name = accepted.key.account
        account = self._accounts.get(name)
        if account is None:
            account = self._accounts[name] = FuturesAccount(name)
        return account

    def _new_order(self, accepted: BinanceAccepted, now: int) -> object:
        request = parse_new_futures_order(accepted.params)
        account = self._account_of(accepted)
        symbol = request.contract.symbol
        if request.client_order_id is not None:
            existing = account.find(symbol, None, request.client_order_id)
            if existing is not None and existing.is_open:
                raise BinanceReject(ERR_DUPLICATE_CLIENT_ID)
        order = FuturesOrder(
            contract=request.contract,
            order_id=self._next_order_id,
            client_order_id=request.client_order_id or _generated_client_order_id(),
            side=request.side,
            type=request.type,
            time_in_force=request.time_in_force,
            price=_ZERO if request.type == "MARKET" else request.price,
            orig_qty=request.quantity,
            executed_qty=_ZERO,
            avg_price=_ZERO,
            reduce_only=request.reduce_only,
            status="NEW",
            time=now,
            update_time=now,
        )
        self._next_order_id += 1
        account.orders[order.order_id] = order
        acked = order.placed_json()  # ACK: the state as accepted, before any fill
        if request.type == "MARKET":
            order.executed_qty = request.quantity
            order.avg_price = request.contract.mark_price
            order.status = "FILLED"
            account.fill(order, now)
            account.close(order)
        return order.placed_json() if request.response_type == "RESULT" else acked

    def _lookup(self, accepted: BinanceAccepted) -> tuple[FuturesAccount, FuturesOrder | None]:
        params = accepted.params
        contract = _contract(params)
        raw_id = params.get("orderId") or None
        if raw_id is not None and not _LONG_RE.match(raw_id):
            raise BinanceReject(ERR_ILLEGAL_CHARS)
        client_id = params.get("origClientOrderId") or None
        if raw_id is None and client_id is None:
            raise BinanceReject(err_either("orderId", "origClientOrderId"))
        account = self._account_of(accepted)
        order_id = int(raw_id) if raw_id is not None else None
        return account, account.find(contract.symbol, order_id, client_id)

    def _query(self, accepted: BinanceAccepted, now: int) -> object:
        _, order = self._lookup(accepted)
        if order is None:
            raise BinanceReject(ERR_NO_SUCH_ORDER)
        return order.query_json()

    def _cancel(self, accepted: BinanceAccepted, now: int) -> object:
        account, order = self._lookup(accepted)
        if order is None or not order.is_open:
            raise BinanceReject(ERR_UNKNOWN_ORDER)
        order.status = "CANCELED"
        order.update_time = now
        account.close(order)
        return order.placed_json()

    def _account_v2(self, accepted: BinanceAccepted, now: int) -> object:
        return account_json(self._account_of(accepted), now, version=2)

    def _account_v3(self, accepted: BinanceAccepted, now: int) -> object:
        return account_json(self._account_of(accepted), now, version=3)


def _generated_client_order_id() -> str:
    """An id shaped like the venue's (22 alphanumerics)."""
    return "".join(secrets.choice(_CLIENT_ID_ALPHABET) for _ in range(22))


def _money(value: Decimal) -> str:
    return _fixed(value, 8)


def account_json(account: FuturesAccount, now: int, *, version: int) -> dict[str, object]:
    """GET /fapi/v2/account or /fapi/v3/account (single-asset mode, one USDT wallet)."""
    open_margin = _ZERO
    for order in account.orders.values():
        if order.is_open:
            notional = _DEC.multiply(order.orig_qty - order.executed_qty, order.price)
            open_margin += _DEC.divide(notional, Decimal(LEVERAGE))
    positions: list[dict[str, object]] = []
    position_margin = _ZERO
    unrealized_total = _ZERO
    symbols = sorted(
        CONTRACTS if version == 2 else {s for s, p in account.positions.items() if p.amount}
    )
    for symbol in symbols:
        contract = CONTRACTS[symbol]
        pos = account.positions.get(symbol, Position())
        notional = _DEC.multiply(pos.amount, contract.mark_price)
        unrealized = _DEC.multiply(pos.amount, contract.mark_price - pos.entry_price)
        initial = _DEC.divide(abs(notional), Decimal(LEVERAGE))
        position_margin += initial
        unrealized_total += unrealized
        entry: dict[str, object] = {
            "symbol": symbol,
            "positionSide": "BOTH",
            "positionAmt": contract.qty(pos.amount),
            "unrealizedProfit": _money(unrealized),
            "isolatedMargin": "0",
            "notional": _money(notional),
            "isolatedWallet": "0",
            "initialMargin": _money(initial),
            "maintMargin": _money(_DEC.multiply(abs(notional), Decimal("0.004"))),
            "updateTime": pos.update_time,
        }
        if version == 2:
            entry.update(
                {
                    "positionInitialMargin": _money(initial),
                    "openOrderInitialMargin": "0",
                    "leverage": str(LEVERAGE),
                    "isolated": False,
                    "entryPrice": contract.price(pos.entry_price),
                    "breakEvenPrice": "0.0",
                    "maxNotional": "2000000",
                    "bidNotional": "0",
                    "askNotional": "0",
                }
            )
        positions.append(entry)
    margin_balance = WALLET_BALANCE + unrealized_total
    available = max(margin_balance - position_margin - open_margin, _ZERO)
    totals = {
        "totalInitialMargin": _money(position_margin + open_margin),
        "totalMaintMargin": "0.00000000",
        "totalWalletBalance": _money(WALLET_BALANCE),
        "totalUnrealizedProfit": _money(unrealized_total),
        "totalMarginBalance": _money(margin_balance),
        "totalPositionInitialMargin": _money(position_margin),
        "totalOpenOrderInitialMargin": _money(open_margin),
        "totalCrossWalletBalance": _money(WALLET_BALANCE),
        "totalCrossUnPnl": _money(unrealized_total),
        "availableBalance": _money(available),
        "maxWithdrawAmount": _money(available),
    }
    asset = {
        "asset": "USDT",
        "walletBalance": _money(WALLET_BALANCE),
        "unrealizedProfit": _money(unrealized_total),
        "marginBalance": _money(margin_balance),
        "maintMargin": "0.00000000",
        "initialMargin": _money(position_margin + open_margin),
        "positionInitialMargin": _money(position_margin),
        "openOrderInitialMargin": _money(open_margin),
        "crossWalletBalance": _money(WALLET_BALANCE),
        "crossUnPnl": _money(unrealized_total),
        "availableBalance": _money(available),
        "maxWithdrawAmount": _money(available),
        "updateTime": account.update_time,
    }
    head: dict[str, object] = {}
    if version == 2:
        head = {
            "feeTier": 0,
            "feeBurn": True,
            "canTrade": True,
            "canDeposit": True,
            "canWithdraw": True,
            "updateTime": 0,
            "multiAssetsMargin": False,
            "tradeGroupId": -1,
        }
        asset["marginAvailable"] = True
    return {**head, **totals, "assets": [asset], "positions": positions}


__all__ = [
    "CONTRACTS",
    "ORDER_COUNT_1M_HEADER",
    "ORDER_COUNT_10S_HEADER",
    "USED_WEIGHT_HEADER",
    "BinanceUsdmVenue",
    "Contract",
    "NewFuturesOrder",
    "account_json",
    "err_api_key_rejected",
    "parse_new_futures_order",
]
