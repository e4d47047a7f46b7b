"""BitMEX REST (``/api/v1``) as the venue verifies it: a pure verifier and thin routes.

Written from BitMEX's documentation, independently of the sidecar's signers:
- https://www.bitmex.com/app/apiKeysUsage: ``api-key``, ``api-expires`` (UNIX seconds),
  ``api-signature`` = hex(HMAC-SHA256(secret, verb + path-with-query + expires + data)).
- Errors ``{"error": {"message": ..., "name": "HTTPError"}}``: 401 "Invalid API Key." and
  "Signature not valid.", 400 "This request has expired - `expires` is in the past.
  Current time: <s>" (texts as BitMEX sends them, e.g. in BitMEX/sample-market-maker#49).
- https://www.bitmex.com/app/restAPI#Limits: a token bucket per key (the default, 120
  requests per minute refilled continuously), ``x-ratelimit-limit``,
  ``x-ratelimit-remaining``, ``x-ratelimit-reset`` on every answer, 429 with
  ``Retry-After`` when exhausted.
- Order shapes: https://www.bitmex.com/api/explorer/ (Order: POST/DELETE/GET /order).

Check order: key, expiry, signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from proxy.simulator.base import Clock, SwappedKeys, note_of
from proxy.simulator.hmackeys import (
    SharedSecretKey,
    TokenBucket,
    form_params,
    json_response,
    parse_shared_secret_keys,
    raw_target,
)

VENUE_NAME = "bitmex"
ALGORITHM = "hmac-sha256"

RATE_LIMIT_PER_MINUTE = 120


@dataclass(frozen=True, slots=True)
class BitmexError:
    """A refusal as BitMEX sends it."""

    status: int
    message: str
    name: str = "HTTPError"

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "name": self.name}}


ERR_INVALID_KEY = BitmexError(401, "Invalid API Key.")
ERR_SIGNATURE = BitmexError(401, "Signature not valid.")


def err_expired(now_s: int) -> BitmexError:
    return BitmexError(
        400, f"This request has expired - `expires` is in the past. Current time: {now_s}"
    )


def err_rate_limited(retry_s: int) -> BitmexError:
    return BitmexError(429, f"Rate limit exceeded, retry in {retry_s} seconds.", "RateLimitError")


def parse_bitmex_keys(entries: object, path: str = VENUE_NAME) -> dict[str, SharedSecretKey]:
    return parse_shared_secret_keys(entries, path, ALGORITHM)


def expected_signature(
    secret: bytes, verb: bytes, target: bytes, expires: bytes, data: bytes
) -> str:
    return hmac.new(secret, verb + target + expires + data, hashlib.sha256).hexdigest()


def verify_bitmex(
    *,
    headers: Mapping[str, str],
    verb: bytes,
    target: bytes,
    body: bytes,
    keys: Mapping[str, SharedSecretKey],
    now_ms: int,
) -> SharedSecretKey | BitmexError:
    """Verify one authenticated request; the key, or BitMEX's refusal. Pure.

    ``target`` is the path with its query exactly as received, ``body`` the raw body.
    """
    api_key = headers.get("api-key")
    key = keys.get(api_key) if api_key else None
    if key is None:
        return ERR_INVALID_KEY
    raw_expires = headers.get("api-expires", "")
    if not raw_expires.isdigit() or not raw_expires.isascii():
        return ERR_SIGNATURE
    now_s = now_ms // 1000
    if int(raw_expires) < now_s:
        return err_expired(now_s)
    expected = expected_signature(key.secret, verb, target, raw_expires.encode(), body)
    given = headers.get("api-signature", "").lower()
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        return ERR_SIGNATURE
    return key


def _iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    )


@dataclass(slots=True)
class BitmexOrder:
    order_id: str
    cl_ord_id: str
    symbol: str
    side: str
    order_qty: int
    price: float | None
    ord_type: str
    status: str
    created_ms: int
    updated_ms: int

    def json(self) -> dict[str, object]:
        open_ = self.status == "New"
        return {
            "orderID": self.order_id,
            "clOrdID": self.cl_ord_id,
            "clOrdLinkID": "",
            "account": 1,
            "symbol": self.symbol,
            "side": self.side,
            "orderQty": self.order_qty,
            "price": self.price,
            "displayQty": None,
            "stopPx": None,
            "pegOffsetValue": None,
            "pegPriceType": "",
            "currency": "USD",
            "settlCurrency": "XBt",
            "ordType": self.ord_type,
            "timeInForce": "GoodTillCancel",
            "execInst": "",
            "contingencyType": "",
            "ordStatus": self.status,
            "triggered": "",
            "workingIndicator": open_,
            "ordRejReason": "",
            "leavesQty": self.order_qty if open_ else 0,
            "cumQty": 0,
            "avgPx": None,
            "text": "Canceled: Canceled via API.\nSubmitted via API."
            if self.status == "Canceled"
            else "Submitted via API.",
            "transactTime": _iso(self.created_ms),
            "timestamp": _iso(self.updated_ms),
        }


@dataclass(slots=True)
class _Account:
    orders: dict[str, BitmexOrder] = field(default_factory=dict)


class _Refusal(Exception):
    def __init__(self, error: BitmexError) -> None:
        super().__init__(error.message)
        self.error = error


def _params(request: web.Request, body: bytes) -> dict[str, object]:
    """Parameters from the query and a JSON or form body (BitMEX accepts both)."""
    out: dict[str, object] = dict(form_params(request.raw_path.partition("?")[2].encode()) or {})
    if body:
        if request.content_type == "application/json":
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                raise _Refusal(BitmexError(400, "Unable to parse JSON body")) from exc
            if isinstance(parsed, dict):
                out.update(parsed)
        else:
            out.update(form_params(body) or {})
    return out


class BitmexVenue(SwappedKeys[SharedSecretKey]):
    """Routes and state of the simulated BitMEX venue. Loop thread only."""

    name = VENUE_NAME

    def __init__(
        self,
        *,
        clock: Clock,
        keys: Mapping[str, SharedSecretKey] | None = None,
        rate_limit_per_minute: int = RATE_LIMIT_PER_MINUTE,
    ) -> None:
        self._clock = clock
        self._keys: Mapping[str, SharedSecretKey] = dict(keys or {})
        self._limit = rate_limit_per_minute
        self._bucket = TokenBucket(rate_limit_per_minute, rate_limit_per_minute / 60)
        self._accounts: dict[str, _Account] = {}

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, SharedSecretKey]:
        return parse_bitmex_keys(entries, path)

    def routes(self) -> Sequence[web.RouteDef]:
        signed = self._signed
        return [
            web.post("/api/v1/order", signed(self._new_order)),
            web.delete("/api/v1/order", signed(self._cancel_order)),
            web.get("/api/v1/order", signed(self._orders), allow_head=False),
        ]

    def _signed(
        self, action: Callable[[dict[str, object], _Account, int], object]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            headers = {k.lower(): v for k, v in request.headers.items()}
            note.api_key = headers.get("api-key")
            body = await request.read()
            now = self._clock()
            verdict = verify_bitmex(
                headers=headers,
                verb=request.method.encode(),
                target=raw_target(request),
                body=body,
                keys=self._keys,
                now_ms=now,
            )
            if isinstance(verdict, BitmexError):
                return self._error(request, verdict, {})
            note.algorithm = verdict.algorithm
            allowed, left = self._bucket.take(verdict.api_key, now)
            limit_headers = {
                "x-ratelimit-limit": str(self._limit),
                "x-ratelimit-remaining": str(math.floor(left)),
                "x-ratelimit-reset": str(
                    now // 1000 + math.ceil((self._limit - left) * 60 / self._limit)
                ),
            }
            if not allowed:
                retry_s = max(1, math.ceil(self._bucket.ms_until(verdict.api_key) / 1000))
                limit_headers["Retry-After"] = str(retry_s)
                return self._error(request, err_rate_limited(retry_s), limit_headers)
            account = self._accounts.setdefault(verdict.account, _Account())
            try:
                payload = action(_params(request, body), account, now)
            except _Refusal as exc:
                return self._error(request, exc.error, limit_headers)
            return json_response(payload, headers=limit_headers)

        return handle

    def _error(
        self, request: web.Request, error: BitmexError, headers: Mapping[str, str]
    ) -> web.Response:
        note_of(request).verdict = error.message
        return json_response(error.body(), error.status, headers)

    # ----- actions

    def _new_order(self, p: dict[str, object], account: _Account, now: int) -> object:
        symbol, side = p.get("symbol"), p.get("side", "Buy")
        if not isinstance(symbol, str) or not symbol:
            raise _Refusal(BitmexError(400, "symbol is required"))
        if side not in ("Buy", "Sell"):
            raise _Refusal(BitmexError(400, "Invalid side"))
        try:
            qty = int(str(p.get("orderQty", "")))
            price = float(str(p["price"])) if p.get("price") is not None else None
        except ValueError as exc:
            raise _Refusal(BitmexError(400, "orderQty is invalid")) from exc
        if qty <= 0:
            raise _Refusal(BitmexError(400, "orderQty is invalid"))
        if price is not None and not math.isfinite(price):
            raise _Refusal(BitmexError(400, "Invalid price"))
        ord_type = str(p.get("ordType") or ("Limit" if price is not None else "Market"))
        if ord_type == "Limit" and (price is None or price <= 0):
            raise _Refusal(BitmexError(400, "Invalid price"))
        cl_ord_id = str(p.get("clOrdID") or "")
        if cl_ord_id and any(o.cl_ord_id == cl_ord_id for o in account.orders.values()):
            raise _Refusal(BitmexError(400, "Duplicate clOrdID"))
        order = BitmexOrder(
            order_id=str(uuid.uuid4()),
            cl_ord_id=cl_ord_id,
            symbol=symbol,
            side=side,
            order_qty=qty,
            price=price,
            ord_type=ord_type,
            status="New" if ord_type == "Limit" else "Filled",
            created_ms=now,
            updated_ms=now,
        )
        account.orders[order.order_id] = order
        return order.json()

    def _cancel_order(self, p: dict[str, object], account: _Account, now: int) -> object:
        wanted = {str(v) for k in ("orderID", "clOrdID") for v in _as_list(p.get(k))}
        found = [o for o in account.orders.values() if wanted & {o.order_id, o.cl_ord_id} - {""}]
        if not wanted or not found:
            raise _Refusal(BitmexError(404, "Not Found"))
        for order in found:
            if order.status == "New":
                order.status, order.updated_ms = "Canceled", now
        return [o.json() for o in found]

    def _orders(self, p: dict[str, object], account: _Account, now: int) -> object:
        symbol = p.get("symbol")
        open_only = False
        raw_filter = p.get("filter")
        if isinstance(raw_filter, str):
            try:
                filt = json.loads(raw_filter)
            except ValueError as exc:
                raise _Refusal(BitmexError(400, "Unable to parse filter")) from exc
            open_only = isinstance(filt, dict) and filt.get("open") is True
        return [
            o.json()
            for o in account.orders.values()
            if (symbol is None or o.symbol == symbol) and (not open_only or o.status == "New")
        ]


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


__all__ = [
    "ERR_INVALID_KEY",
    "ERR_SIGNATURE",
    "BitmexError",
    "BitmexVenue",
    "err_expired",
    "err_rate_limited",
    "expected_signature",
    "parse_bitmex_keys",
    "verify_bitmex",
]
