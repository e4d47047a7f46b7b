"""Gemini REST (``/v1``) as the venue verifies it: a pure verifier and thin routes.

Written from Gemini's documentation, independently of the sidecar's signers:
- https://docs.gemini.com/rest-api/#private-api-invocation: the request is the base64
  JSON payload in ``X-GEMINI-PAYLOAD``; ``X-GEMINI-SIGNATURE`` = hex(HMAC-SHA384(secret,
  that base64 text)); the payload's ``request`` must name the endpoint and its ``nonce``
  must increase per key ("session").
- https://docs.gemini.com/rest-api/#error-codes: ``{"result": "error", "reason": ...,
  "message": ...}``; reasons InvalidApiKey, MissingApikeyHeader, MissingPayloadHeader,
  MissingSignatureHeader, InvalidSignature, InvalidJson, EndpointMismatch, InvalidNonce,
  RateLimit (HTTP 429), OrderNotFound (404). Private endpoints: 600 requests per minute.
- Order status shape: https://docs.gemini.com/rest-api/#order-status.

Check order: key, headers present, signature, payload JSON, endpoint, nonce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from proxy.simulator.base import Clock, SwappedKeys, note_of
from proxy.simulator.hmackeys import (
    SharedSecretKey,
    TokenBucket,
    json_response,
    next_id,
    parse_shared_secret_keys,
)

VENUE_NAME = "gemini"
ALGORITHM = "hmac-sha384"
RATE_LIMIT_PER_MINUTE = 600
SYMBOLS = {"btcusd", "ethusd", "ethbtc", "solusd"}


@dataclass(frozen=True, slots=True)
class GeminiError:
    status: int
    reason: str
    message: str

    def body(self) -> dict[str, object]:
        return {"result": "error", "reason": self.reason, "message": self.message}


ERR_MISSING_KEY = GeminiError(400, "MissingApikeyHeader", "The X-GEMINI-APIKEY header was missing")
ERR_INVALID_KEY = GeminiError(400, "InvalidApiKey", "Invalid API key")
ERR_MISSING_PAYLOAD = GeminiError(
    400, "MissingPayloadHeader", "The X-GEMINI-PAYLOAD header was missing"
)
ERR_MISSING_SIGNATURE = GeminiError(
    400, "MissingSignatureHeader", "The X-GEMINI-SIGNATURE header was missing"
)
ERR_SIGNATURE = GeminiError(
    400, "InvalidSignature", "The signature did not match the expected signature"
)
ERR_JSON = GeminiError(400, "InvalidJson", "The JSON provided is invalid")
ERR_RATE = GeminiError(429, "RateLimit", "Requests were made too frequently")


def err_endpoint(request: object, path: str) -> GeminiError:
    return GeminiError(
        400,
        "EndpointMismatch",
        f"EndpointMismatch: payload request {request!r} does not match the endpoint {path}",
    )


def err_nonce(nonce: object) -> GeminiError:
    return GeminiError(
        400,
        "InvalidNonce",
        f"Nonce '{nonce}' has not increased since your last call to the Gemini API.",
    )


def parse_gemini_keys(entries: object, path: str = VENUE_NAME) -> dict[str, SharedSecretKey]:
    return parse_shared_secret_keys(entries, path, ALGORITHM)


@dataclass(frozen=True, slots=True)
class GeminiAccepted:
    key: SharedSecretKey
    nonce: int
    payload: Mapping[str, Any]


def expected_signature(secret: bytes, payload_b64: bytes) -> str:
    return hmac.new(secret, payload_b64, hashlib.sha384).hexdigest()


def verify_gemini(
    *,
    headers: Mapping[str, str],
    path: str,
    keys: Mapping[str, SharedSecretKey],
    last_nonces: Mapping[str, int],
) -> GeminiAccepted | GeminiError:
    """Verify a private request from its headers (lower-case names). Pure."""
    api_key = headers.get("x-gemini-apikey")
    if not api_key:
        return ERR_MISSING_KEY
    key = keys.get(api_key)
    if key is None:
        return ERR_INVALID_KEY
    payload_b64 = headers.get("x-gemini-payload")
    if not payload_b64:
        return ERR_MISSING_PAYLOAD
    signature = headers.get("x-gemini-signature")
    if not signature:
        return ERR_MISSING_SIGNATURE
    raw = payload_b64.encode("utf-8", "replace")
    expected = expected_signature(key.secret, raw)
    if not hmac.compare_digest(expected.encode(), signature.lower().encode("utf-8", "replace")):
        return ERR_SIGNATURE
    try:
        payload = json.loads(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError):
        return ERR_JSON
    if not isinstance(payload, dict):
        return ERR_JSON
    if payload.get("request") != path:
        return err_endpoint(payload.get("request"), path)
    nonce = payload.get("nonce")
    # Numbers, or digit strings (ccxt sends "nonce": "<ms>").
    if isinstance(nonce, bool) or not (
        isinstance(nonce, int) or (isinstance(nonce, str) and nonce.isdigit())
    ):
        return err_nonce(nonce)
    value = int(nonce)
    if value <= last_nonces.get(key.api_key, 0):
        return err_nonce(nonce)
    return GeminiAccepted(key, value, payload)


@dataclass(slots=True)
class GeminiOrder:
    order_id: str
    symbol: str
    side: str
    type: str
    price: str
    amount: str
    client_order_id: str | None
    options: list[Any]
    timestampms: int
    is_live: bool = True
    is_cancelled: bool = False

    def status(self) -> dict[str, object]:
        body: dict[str, object] = {
            "order_id": self.order_id,
            "id": self.order_id,
            "symbol": self.symbol,
            "exchange": "gemini",
            "avg_execution_price": "0.00",
            "side": self.side,
            "type": self.type,
            "timestamp": str(self.timestampms // 1000),
            "timestampms": self.timestampms,
            "is_live": self.is_live,
            "is_cancelled": self.is_cancelled,
            "is_hidden": False,
            "was_forced": False,
            "executed_amount": "0",
            "options": self.options,
            "price": self.price,
            "original_amount": self.amount,
            "remaining_amount": self.amount if self.is_live else "0",
        }
        if self.client_order_id is not None:
            body["client_order_id"] = self.client_order_id
        return body


@dataclass(slots=True)
class _Account:
    orders: dict[str, GeminiOrder] = field(default_factory=dict)


class _Refusal(Exception):
    def __init__(self, error: GeminiError) -> None:
        super().__init__(error.message)
        self.error = error


def _decimal(payload: Mapping[str, Any], name: str) -> str:
    raw = payload.get(name)
    try:
        if not isinstance(raw, str) or Decimal(raw) <= 0:
            raise InvalidOperation
    except InvalidOperation as exc:
        reason = "InvalidPrice" if name == "price" else "InvalidQuantity"
        raise _Refusal(GeminiError(400, reason, f"Invalid {name} for symbol")) from exc
    return raw


class GeminiVenue(SwappedKeys[SharedSecretKey]):
    """Routes and state of the simulated Gemini venue. Loop thread only."""

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
        self._last_nonces: dict[str, int] = {}
        self._bucket = TokenBucket(rate_limit_per_minute, rate_limit_per_minute / 60)
        self._accounts: dict[str, _Account] = {}

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, SharedSecretKey]:
        return parse_gemini_keys(entries, path)

    def routes(self) -> Sequence[web.RouteDef]:
        private = self._private
        return [
            web.post("/v1/order/new", private(self._new_order)),
            web.post("/v1/order/cancel", private(self._cancel_order)),
            web.post("/v1/order/status", private(self._order_status)),
            web.post("/v1/orders", private(self._active_orders)),
        ]

    def _private(
        self, action: Callable[[Mapping[str, Any], _Account, int], object]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            headers = {k.lower(): v for k, v in request.headers.items()}
            note.api_key = headers.get("x-gemini-apikey")
            await request.read()  # the payload is in the header; the body is empty
            verdict = verify_gemini(
                headers=headers,
                path=request.path,
                keys=self._keys,
                last_nonces=self._last_nonces,
            )
            if isinstance(verdict, GeminiError):
                return self._error(request, verdict)
            note.algorithm = verdict.key.algorithm
            self._last_nonces[verdict.key.api_key] = verdict.nonce
            now = self._clock()
            if not self._bucket.take(verdict.key.api_key, now)[0]:
                return self._error(request, ERR_RATE)
            account = self._accounts.setdefault(verdict.key.account, _Account())
            try:
                return json_response(action(verdict.payload, account, now))
            except _Refusal as exc:
                return self._error(request, exc.error)

        return handle

    def _error(self, request: web.Request, error: GeminiError) -> web.Response:
        note_of(request).verdict = error.reason
        return json_response(error.body(), error.status)

    # ----- actions

    def _new_order(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        symbol = p.get("symbol")
        if not isinstance(symbol, str) or symbol.lower() not in SYMBOLS:
            raise _Refusal(GeminiError(400, "InvalidSymbol", f"Invalid symbol {symbol!r}"))
        side = p.get("side")
        if side not in ("buy", "sell"):
            raise _Refusal(GeminiError(400, "InvalidSide", "Invalid side for symbol"))
        order_type = p.get("type", "exchange limit")
        if order_type != "exchange limit":
            raise _Refusal(GeminiError(400, "InvalidOrderType", "Invalid order type"))
        amount, price = _decimal(p, "amount"), _decimal(p, "price")
        client_order_id = p.get("client_order_id")
        if client_order_id is not None and not isinstance(client_order_id, str):
            raise _Refusal(
                GeminiError(400, "ClientOrderIdMustBeString", "Client order id must be a string")
            )
        options = p.get("options", [])
        if not isinstance(options, list):
            raise _Refusal(GeminiError(400, "OptionsMustBeArray", "Options must be an array"))
        order = GeminiOrder(
            order_id=str(7_000_000_000 + next_id()),
            symbol=symbol.lower(),
            side=side,
            type=order_type,
            price=price,
            amount=amount,
            client_order_id=client_order_id,
            options=options,
            timestampms=now,
        )
        account.orders[order.order_id] = order
        return order.status()

    def _find(self, p: Mapping[str, Any], account: _Account) -> GeminiOrder:
        order_id = p.get("order_id")
        order = account.orders.get(str(order_id)) if order_id is not None else None
        if order is None and p.get("client_order_id") is not None:
            matches = [
                o for o in account.orders.values() if o.client_order_id == p["client_order_id"]
            ]
            order = matches[-1] if matches else None
        if order is None:
            if order_id is None and p.get("client_order_id") is None:
                raise _Refusal(GeminiError(400, "MissingOrderField", "order_id must be specified"))
            raise _Refusal(GeminiError(404, "OrderNotFound", f"Order {order_id} not found"))
        return order

    def _cancel_order(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        order = self._find(p, account)
        order.is_live, order.is_cancelled = False, True
        return order.status()

    def _order_status(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        return self._find(p, account).status()

    def _active_orders(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        return [o.status() for o in account.orders.values() if o.is_live]


__all__ = [
    "ERR_INVALID_KEY",
    "ERR_SIGNATURE",
    "GeminiAccepted",
    "GeminiError",
    "GeminiVenue",
    "err_nonce",
    "expected_signature",
    "parse_gemini_keys",
    "verify_gemini",
]
