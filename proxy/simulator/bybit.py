"""Bybit v5 REST as the venue verifies it: a pure verifier and thin routes.

Written from Bybit's public documentation, independently of the sidecar's signers (nothing
from ``proxy`` outside this package, nor ``keycache``). Sources, as read for this module:

- Integration guidance, "Authentication" and "Create A Request":
  https://bybit-exchange.github.io/docs/v5/guide -- ``X-BAPI-API-KEY``,
  ``X-BAPI-TIMESTAMP``, ``X-BAPI-SIGN``, optional ``X-BAPI-RECV-WINDOW`` (default 5000);
  the plain text is ``timestamp + api_key + recv_window + queryString`` for a GET and
  ``... + raw_request_body`` for a POST; HMAC keys sign with hex HMAC-SHA256, RSA keys
  with Base64 RSA-SHA256; the timing rule
  ``server_time - recv_window <= timestamp < server_time + 1000``.
- Error codes: https://bybit-exchange.github.io/docs/v5/error (10001-10018, 110001).
- Rate limits and their response headers:
  https://bybit-exchange.github.io/docs/v5/rate-limit -- ``X-Bapi-Limit``,
  ``X-Bapi-Limit-Status``, ``X-Bapi-Limit-Reset-Timestamp``; per UID and endpoint, a
  rolling one-second window; spot ``/v5/order/create`` and ``/v5/order/cancel`` 20 req/s.
- Place order, cancel order, get open orders, get server time: the endpoint pages.

The envelope of every answer is ``{"retCode", "retMsg", "result", "retExtInfo", "time"}``
and Bybit sends its authentication refusals with HTTP 200.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from aiohttp import web
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from proxy.simulator.base import Clock, KeySetError, SwappedKeys, compact_json, note_of

VENUE_NAME = "bybit"
KEY_HEADER = "X-BAPI-API-KEY"
TIMESTAMP_HEADER = "X-BAPI-TIMESTAMP"
SIGN_HEADER = "X-BAPI-SIGN"
RECV_WINDOW_HEADER = "X-BAPI-RECV-WINDOW"
LIMIT_HEADER = "X-Bapi-Limit"
LIMIT_STATUS_HEADER = "X-Bapi-Limit-Status"
LIMIT_RESET_HEADER = "X-Bapi-Limit-Reset-Timestamp"

DEFAULT_RECV_WINDOW_MS = 5000
MAX_AHEAD_MS = 1000  # timestamp < server_time + 1000
RATE_WINDOW_MS = 1000  # "rolling time window per second and UID"
# Per-endpoint limits (spot column of the rate-limit table; the read endpoint is not in it
# and gets the documented GET IP ceiling of 50 req/s, so every answer carries the headers).
RATE_LIMITS: Mapping[str, int] = {
    "/v5/order/create": 20,
    "/v5/order/cancel": 20,
    "/v5/order/realtime": 50,
}
ALGORITHMS = ("hmac-sha256", "rsa-pkcs1-sha256")


@dataclass(frozen=True, slots=True)
class BybitError:
    """A refusal as Bybit sends it: HTTP ``status`` (200 for most) and retCode/retMsg."""

    status: int
    code: int
    msg: str


ERR_PARAMS = 10001
ERR_TIME_WINDOW = 10002
ERR_KEY_INVALID = BybitError(200, 10003, "API key is invalid.")
ERR_SIGN = 10004
ERR_TOO_MANY_VISITS = BybitError(200, 10006, "Too many visits!")
ERR_ORDER_NOT_EXISTS = BybitError(200, 110001, "Order does not exist.")


def err_time_window(timestamp: int | str, now_ms: int, recv_window: int) -> BybitError:
    """10002, worded as Bybit words it (the values it compared)."""
    return BybitError(
        200,
        ERR_TIME_WINDOW,
        "invalid request, please check your server timestamp or recv_window param. "
        f"req_timestamp[{timestamp}],server_timestamp[{now_ms}],recv_window[{recv_window}]",
    )


def err_sign(origin: bytes) -> BybitError:
    """10004, with the plain text Bybit expected (public data: no secret in it)."""
    return BybitError(
        200, ERR_SIGN, f"error sign! origin_string[{origin.decode('utf-8', 'replace')}]"
    )


def err_params(detail: str) -> BybitError:
    return BybitError(200, ERR_PARAMS, f"params error: {detail}")


def envelope(code: int, msg: str, result: object, now_ms: int) -> dict[str, object]:
    return {"retCode": code, "retMsg": msg, "result": result, "retExtInfo": {}, "time": now_ms}


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class BybitHmacKey:
    """A system-generated key: the shared secret."""

    api_key: str
    secret: bytes = field(repr=False)
    algorithm: str = "hmac-sha256"

    def verify(self, plain: bytes, signature: bytes) -> bool:
        """Hex HMAC-SHA256; hex digits compared as bytes, so case does not matter."""
        try:
            given = bytes.fromhex(signature.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(given, hmac.new(self.secret, plain, hashlib.sha256).digest())


@dataclass(frozen=True, slots=True)
class BybitRsaKey:
    """A self-generated key: Bybit holds only the public half."""

    api_key: str
    public_key: RSAPublicKey = field(repr=False)
    algorithm: str = "rsa-pkcs1-sha256"

    def verify(self, plain: bytes, signature: bytes) -> bool:
        try:
            raw = base64.b64decode(signature, validate=True)
            self.public_key.verify(raw, plain, padding.PKCS1v15(), hashes.SHA256())
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True


BybitKey = BybitHmacKey | BybitRsaKey


def _str_field(entry: Mapping[str, object], name: str, path: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise KeySetError(f"{path}.{name}", "must be a non-empty string")
    return value


def parse_bybit_keys(entries: object, path: str = VENUE_NAME) -> dict[str, BybitKey]:
    """Validate a keys-document list for Bybit: ``{"api_key", "algorithm": "hmac-sha256",
    "secret"}`` or ``{"api_key", "algorithm": "rsa-pkcs1-sha256", "public_key": PEM}``."""
    if not isinstance(entries, list):
        raise KeySetError(path, "must be a list of key objects")
    keys: dict[str, BybitKey] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise KeySetError(where, "must be an object")
        api_key = _str_field(entry, "api_key", where)
        if api_key in keys:
            raise KeySetError(f"{where}.api_key", "duplicate api_key")
        algorithm = entry.get("algorithm")
        if algorithm == "hmac-sha256":
            keys[api_key] = BybitHmacKey(api_key, _str_field(entry, "secret", where).encode())
        elif algorithm == "rsa-pkcs1-sha256":
            pem = _str_field(entry, "public_key", where)
            try:
                public = serialization.load_pem_public_key(pem.encode())
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise KeySetError(f"{where}.public_key", "is not a PEM public key") from exc
            if not isinstance(public, RSAPublicKey):
                raise KeySetError(f"{where}.public_key", "is not an RSA public key")
            keys[api_key] = BybitRsaKey(api_key, public)
        else:
            raise KeySetError(f"{where}.algorithm", f"must be one of {', '.join(ALGORITHMS)}")
    return keys


# --------------------------------------------------------------------------- verification


def verify_bybit(
    *,
    method: bytes,
    query: bytes,
    body: bytes,
    headers: Mapping[str, bytes],
    keys: Mapping[str, BybitKey],
    now_ms: int,
) -> BybitKey | BybitError:
    """Verify a private Bybit v5 request; pure, never raises.

    ``query`` is the raw query string and ``body`` the raw body as received; ``headers``
    the ``X-BAPI-*`` headers present. Check order (Bybit documents none): the key (10003),
    the timestamp and recv_window (10002), the signature last (10004).
    """
    api_key = headers.get(KEY_HEADER, b"")
    key = keys.get(api_key.decode("utf-8", "replace")) if api_key else None
    if key is None:
        return ERR_KEY_INVALID
    raw_ts = headers.get(TIMESTAMP_HEADER, b"")
    # "timestamp + API key + (recv_window) + ...": the window is signed only when sent.
    raw_window = headers.get(RECV_WINDOW_HEADER, b"")
    if raw_window and not raw_window.isdigit():
        return err_params("recv_window")
    recv_window = int(raw_window) if raw_window else DEFAULT_RECV_WINDOW_MS
    if not raw_ts.isdigit():
        return err_time_window(raw_ts.decode("utf-8", "replace"), now_ms, recv_window)
    timestamp = int(raw_ts)
    if not now_ms - recv_window <= timestamp < now_ms + MAX_AHEAD_MS:
        return err_time_window(timestamp, now_ms, recv_window)
    signed = body if method == b"POST" else query
    plain = raw_ts + api_key + raw_window + signed
    if not key.verify(plain, headers.get(SIGN_HEADER, b"")):
        return err_sign(plain)
    return key


# --------------------------------------------------------------------------- rate limits


class RollingLimiter:
    """Per (key, endpoint) request times over a rolling window. Loop thread only."""

    __slots__ = ("_hits", "_window_ms")

    def __init__(self, window_ms: int = RATE_WINDOW_MS) -> None:
        self._window_ms = window_ms
        self._hits: dict[tuple[str, str], deque[int]] = {}

    def take(self, key: str, endpoint: str, limit: int, now_ms: int) -> tuple[bool, int, int]:
        """Count one request; return (allowed, remaining, reset timestamp ms)."""
        hits = self._hits.setdefault((key, endpoint), deque())
        while hits and hits[0] <= now_ms - self._window_ms:
            hits.popleft()
        if len(hits) >= limit:
            return False, 0, hits[0] + self._window_ms
        hits.append(now_ms)
        return True, limit - len(hits), now_ms


# --------------------------------------------------------------------------- orders


@dataclass(slots=True)
class BybitOrder:
    category: str
    symbol: str
    order_id: str
    order_link_id: str
    side: str
    order_type: str
    qty: str
    price: str
    time_in_force: str
    status: str
    created: int
    updated: int

    def realtime(self) -> dict[str, object]:
        """One element of ``GET /v5/order/realtime``'s list (the fields a client reads)."""
        return {
            "orderId": self.order_id,
            "orderLinkId": self.order_link_id,
            "symbol": self.symbol,
            "price": self.price,
            "qty": self.qty,
            "side": self.side,
            "orderStatus": self.status,
            "cancelType": "UNKNOWN" if self.status != "Cancelled" else "CancelByUser",
            "avgPrice": "",
            "leavesQty": self.qty if self.status == "New" else "0",
            "cumExecQty": "0",
            "cumExecValue": "0",
            "cumExecFee": "0",
            "timeInForce": self.time_in_force,
            "orderType": self.order_type,
            "createdTime": str(self.created),
            "updatedTime": str(self.updated),
        }


_CATEGORIES = frozenset({"spot", "linear", "inverse", "option"})


class BybitVenue(SwappedKeys[BybitKey]):
    """Routes and state of the simulated Bybit v5 venue. Loop thread only."""

    name = VENUE_NAME

    def __init__(self, *, clock: Clock, keys: Mapping[str, BybitKey] | None = None) -> None:
        self._clock = clock
        self._keys: Mapping[str, BybitKey] = dict(keys or {})  # swapped whole
        self._orders: dict[str, BybitOrder] = {}
        self._limiter = RollingLimiter()
        self._seq = itertools.count(1)

    # ----- key management (Venue protocol)

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, BybitKey]:
        return parse_bybit_keys(entries, path)

    # ----- routes

    def routes(self) -> Sequence[web.RouteDef]:
        private = self._private
        return [
            web.get("/v5/market/time", self._time, allow_head=False),
            web.post("/v5/order/create", private(self._create)),
            web.post("/v5/order/cancel", private(self._cancel)),
            web.get("/v5/order/realtime", private(self._realtime), allow_head=False),
        ]

    def _json(
        self, payload: object, headers: Mapping[str, str] | None = None, status: int = 200
    ) -> web.Response:
        return web.Response(
            text=compact_json(payload),
            status=status,
            content_type="application/json",
            headers=headers,
        )

    async def _time(self, request: web.Request) -> web.Response:
        now = self._clock()
        result = {"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)}
        return self._json(envelope(0, "OK", result, now))

    def _private(
        self, action: Callable[[BybitKey, Mapping[str, str], bytes, int], BybitError | object]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            note.api_key = request.headers.get(KEY_HEADER)
            known = self._keys.get(note.api_key or "")
            note.algorithm = known.algorithm if known is not None else None
            raw = {
                name: request.headers[name].encode("utf-8", "surrogateescape")
                for name in (KEY_HEADER, TIMESTAMP_HEADER, SIGN_HEADER, RECV_WINDOW_HEADER)
                if name in request.headers
            }
            body = await request.read()
            now = self._clock()
            verdict = verify_bybit(
                method=request.method.encode(),
                query=request.raw_path.partition("?")[2].encode("utf-8", "surrogateescape"),
                body=body,
                headers=raw,
                keys=self._keys,
                now_ms=now,
            )
            if isinstance(verdict, BybitError):
                note.verdict = verdict.code
                return self._json(
                    envelope(verdict.code, verdict.msg, {}, now), None, verdict.status
                )
            limit = RATE_LIMITS[request.path]
            allowed, remaining, reset = self._limiter.take(
                verdict.api_key, request.path, limit, now
            )
            headers = {
                LIMIT_HEADER: str(limit),
                LIMIT_STATUS_HEADER: str(remaining),
                LIMIT_RESET_HEADER: str(reset),
            }
            if not allowed:
                note.verdict = ERR_TOO_MANY_VISITS.code
                error = ERR_TOO_MANY_VISITS
                return self._json(envelope(error.code, error.msg, {}, now), headers)
            result = action(verdict, request.query, body, now)
            if isinstance(result, BybitError):
                note.verdict = result.code
                return self._json(
                    envelope(result.code, result.msg, {}, now), headers, result.status
                )
            return self._json(envelope(0, "OK", result, now), headers)

        return handle

    # ----- private endpoint actions (synchronous)

    @staticmethod
    def _json_body(body: bytes) -> dict[str, object] | BybitError:
        try:
            params = json.loads(body)
        except ValueError:
            return err_params("request body is not JSON")
        if not isinstance(params, dict):
            return err_params("request body is not a JSON object")
        return params

    def _create(
        self, key: BybitKey, query: Mapping[str, str], body: bytes, now: int
    ) -> BybitError | object:
        params = self._json_body(body)
        if isinstance(params, BybitError):
            return params
        for name in ("category", "symbol", "side", "orderType", "qty"):
            if not isinstance(params.get(name), str) or not params[name]:
                return err_params(name)
        if params["category"] not in _CATEGORIES:
            return err_params("category")
        if params["side"] not in ("Buy", "Sell"):
            return err_params("side")
        if params["orderType"] not in ("Limit", "Market"):
            return err_params("orderType")
        price = str(params.get("price", ""))
        for name, value in (("qty", str(params["qty"])), ("price", price)):
            if name == "price" and params["orderType"] == "Market":
                continue
            try:
                if Decimal(value) <= 0:
                    return err_params(name)
            except InvalidOperation:
                return err_params(name)
        link_id = str(params.get("orderLinkId", ""))
        if link_id and any(o.order_link_id == link_id for o in self._orders.values()):
            return BybitError(200, 110072, "OrderLinkedID is duplicate")
        order_id = str(uuid.UUID(int=next(self._seq)))
        self._orders[order_id] = BybitOrder(
            category=str(params["category"]),
            symbol=str(params["symbol"]),
            order_id=order_id,
            order_link_id=link_id,
            side=str(params["side"]),
            order_type=str(params["orderType"]),
            qty=str(params["qty"]),
            price=price,
            time_in_force=str(params.get("timeInForce", "GTC")),
            status="New",
            created=now,
            updated=now,
        )
        return {"orderId": order_id, "orderLinkId": link_id}

    def _find(self, symbol: str, order_id: str, link_id: str) -> BybitOrder | None:
        for order in self._orders.values():
            if order.symbol == symbol and (
                (order_id and order.order_id == order_id)
                or (not order_id and link_id and order.order_link_id == link_id)
            ):
                return order
        return None

    def _cancel(
        self, key: BybitKey, query: Mapping[str, str], body: bytes, now: int
    ) -> BybitError | object:
        params = self._json_body(body)
        if isinstance(params, BybitError):
            return params
        for name in ("category", "symbol"):
            if not isinstance(params.get(name), str) or not params[name]:
                return err_params(name)
        order = self._find(
            str(params["symbol"]),
            str(params.get("orderId", "")),
            str(params.get("orderLinkId", "")),
        )
        if order is None or order.status != "New":
            return ERR_ORDER_NOT_EXISTS
        order.status, order.updated = "Cancelled", now
        return {"orderId": order.order_id, "orderLinkId": order.order_link_id}

    def _realtime(
        self, key: BybitKey, query: Mapping[str, str], body: bytes, now: int
    ) -> BybitError | object:
        category = query.get("category", "")
        if category not in _CATEGORIES:
            return err_params("category")
        symbol, order_id = query.get("symbol", ""), query.get("orderId", "")
        link_id = query.get("orderLinkId", "")
        found = [
            o.realtime()
            for o in reversed(self._orders.values())
            if o.category == category
            and (not symbol or o.symbol == symbol)
            and (not order_id or o.order_id == order_id)
            and (not link_id or o.order_link_id == link_id)
            and (o.status == "New" or order_id or link_id)
        ]
        return {"list": found, "nextPageCursor": "", "category": category}


__all__ = [
    "ERR_KEY_INVALID",
    "LIMIT_HEADER",
    "LIMIT_RESET_HEADER",
    "LIMIT_STATUS_HEADER",
    "BybitError",
    "BybitHmacKey",
    "BybitRsaKey",
    "BybitVenue",
    "RollingLimiter",
    "parse_bybit_keys",
    "verify_bybit",
]
