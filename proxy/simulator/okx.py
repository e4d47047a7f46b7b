"""OKX v5 REST as the venue verifies it: a pure verifier and thin routes.

Written from OKX's public documentation, independently of the sidecar's signers (nothing
from ``proxy`` outside this package, nor ``keycache``). Sources, as read for this module:

- REST authentication ("Making requests", "Signature"):
  https://www.okx.com/docs-v5/en/#overview-rest-authentication -- the four ``OK-ACCESS-*``
  headers; ``sign = Base64(HMAC-SHA256(secret, timestamp + method + requestPath + body))``,
  a GET's query string being part of ``requestPath``; the timestamp is ISO-8601 UTC with
  milliseconds, e.g. ``2020-12-08T09:08:57.715Z``, and a request whose timestamp is 30
  seconds away from the server's time is expired.
- Error codes, messages and HTTP statuses: https://www.okx.com/docs-v5/en/#error-code
  (50011 429, 50014 400, 50102-50113 401).
- Place / cancel order, order details, pending orders, system time: the endpoint pages of
  the same docs (response shapes; place-order rate limit 60 requests per 2 seconds).

The core is :func:`verify_okx`, a synchronous function over bytes. :class:`OkxVenue`
adapts aiohttp requests to it and keeps a tiny order book for realistic answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from aiohttp import web

from proxy.simulator.base import Clock, KeySetError, SwappedKeys, compact_json, note_of

VENUE_NAME = "okx"
KEY_HEADER = "OK-ACCESS-KEY"
SIGN_HEADER = "OK-ACCESS-SIGN"
TIMESTAMP_HEADER = "OK-ACCESS-TIMESTAMP"
PASSPHRASE_HEADER = "OK-ACCESS-PASSPHRASE"  # noqa: S105 - a header name, not a secret

# "The request will be considered expired if the timestamp in the request header is
# 30 seconds apart from the API server time" (docs, REST authentication).
TIMESTAMP_WINDOW_MS = 30_000
# Place order: "Rate Limit: 60 requests per 2 seconds" (per user ID and instrument).
ORDER_LIMIT = 60
ORDER_WINDOW_MS = 2_000

_TIMESTAMP_RE = re.compile(rb"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@dataclass(frozen=True, slots=True)
class OkxError:
    """A rejection exactly as OKX sends it: HTTP ``status`` and ``{"msg", "code"}``."""

    status: int
    code: str
    msg: str

    def body(self) -> dict[str, object]:
        return {"msg": self.msg, "code": self.code}


ERR_KEY_EMPTY = OkxError(401, "50103", 'Request header "OK-ACCESS-KEY" cannot be empty.')
ERR_PASSPHRASE_EMPTY = OkxError(
    401, "50104", 'Request header "OK-ACCESS-PASSPHRASE" cannot be empty.'
)
ERR_PASSPHRASE_WRONG = OkxError(401, "50105", 'Request header "OK-ACCESS-PASSPHRASE" incorrect.')
ERR_SIGN_EMPTY = OkxError(401, "50106", 'Request header "OK-ACCESS-SIGN" cannot be empty.')
ERR_TIMESTAMP_EMPTY = OkxError(
    401, "50107", 'Request header "OK-ACCESS-TIMESTAMP" cannot be empty.'
)
ERR_KEY_INVALID = OkxError(401, "50111", "Invalid OK-ACCESS-KEY.")
ERR_TIMESTAMP_INVALID = OkxError(401, "50112", "Invalid OK-ACCESS-TIMESTAMP.")
ERR_SIGNATURE = OkxError(401, "50113", "Invalid signature.")
ERR_EXPIRED = OkxError(401, "50102", "Timestamp request expired.")
ERR_RATE_LIMIT = OkxError(
    429,
    "50011",
    "Rate limit reached. Please refer to API documentation and throttle requests accordingly.",
)
ERR_JSON = OkxError(400, "50002", "JSON syntax error.")


def err_empty(name: str) -> OkxError:
    """50014 for a missing mandatory parameter."""
    return OkxError(400, "50014", f"Parameter {name} cannot be empty.")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class OkxKey:
    """An OKX API key as the venue holds it: secret and passphrase (HMAC only)."""

    api_key: str
    secret: bytes = field(repr=False)
    passphrase: bytes = field(repr=False)
    algorithm: str = "hmac-sha256"

    def expected_signature(self, prehash: bytes) -> bytes:
        return base64.b64encode(hmac.new(self.secret, prehash, hashlib.sha256).digest())


def _str_field(entry: Mapping[str, object], name: str, path: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise KeySetError(f"{path}.{name}", "must be a non-empty string")
    return value


def parse_okx_keys(entries: object, path: str = VENUE_NAME) -> dict[str, OkxKey]:
    """Validate a keys-document list for OKX: ``{"api_key", "algorithm": "hmac-sha256",
    "secret", "passphrase"}`` each. Raises :class:`KeySetError` naming the first bad field."""
    if not isinstance(entries, list):
        raise KeySetError(path, "must be a list of key objects")
    keys: dict[str, OkxKey] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise KeySetError(where, "must be an object")
        api_key = _str_field(entry, "api_key", where)
        if api_key in keys:
            raise KeySetError(f"{where}.api_key", "duplicate api_key")
        if entry.get("algorithm", "hmac-sha256") != "hmac-sha256":
            raise KeySetError(f"{where}.algorithm", "must be hmac-sha256 (OKX keys are HMAC)")
        secret = _str_field(entry, "secret", where)
        passphrase = _str_field(entry, "passphrase", where)
        keys[api_key] = OkxKey(api_key, secret.encode(), passphrase.encode())
    return keys


# --------------------------------------------------------------------------- verification


def parse_timestamp(raw: bytes) -> int | None:
    """``2020-12-08T09:08:57.715Z`` → epoch milliseconds; None unless exactly that shape."""
    if _TIMESTAMP_RE.match(raw) is None:
        return None
    try:
        moment = datetime.strptime(raw.decode("ascii"), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return int(moment.replace(tzinfo=UTC).timestamp() * 1000 + 0.5)


def verify_okx(
    *,
    method: bytes,
    request_path: bytes,
    body: bytes,
    headers: Mapping[str, bytes],
    keys: Mapping[str, OkxKey],
    now_ms: int,
) -> OkxKey | OkxError:
    """Verify a private OKX REST request; pure, never raises.

    ``request_path`` is the path with its query string exactly as received; ``body`` the
    raw body; ``headers`` the four ``OK-ACCESS-*`` headers present (name → raw value).
    Check order (OKX documents none): every header present (50103, 50106, 50107, 50104),
    the key known (50111), the timestamp well formed (50112) and within 30 s (50102), the
    passphrase (50105), the signature last (50113).
    """
    api_key = headers.get(KEY_HEADER, b"")
    signature = headers.get(SIGN_HEADER, b"")
    timestamp = headers.get(TIMESTAMP_HEADER, b"")
    passphrase = headers.get(PASSPHRASE_HEADER, b"")
    if not api_key:
        return ERR_KEY_EMPTY
    if not signature:
        return ERR_SIGN_EMPTY
    if not timestamp:
        return ERR_TIMESTAMP_EMPTY
    if not passphrase:
        return ERR_PASSPHRASE_EMPTY
    key = keys.get(api_key.decode("utf-8", "replace"))
    if key is None:
        return ERR_KEY_INVALID
    sent_ms = parse_timestamp(timestamp)
    if sent_ms is None:
        return ERR_TIMESTAMP_INVALID
    if abs(now_ms - sent_ms) > TIMESTAMP_WINDOW_MS:
        return ERR_EXPIRED
    if not hmac.compare_digest(passphrase, key.passphrase):
        return ERR_PASSPHRASE_WRONG
    expected = key.expected_signature(timestamp + method + request_path + body)
    if not hmac.compare_digest(signature, expected):
        return ERR_SIGNATURE
    return key


# --------------------------------------------------------------------------- orders


@dataclass(slots=True)
class OkxOrder:
    """One order in the simulated book."""

    inst_id: str
    ord_id: str
    cl_ord_id: str
    side: str
    ord_type: str
    td_mode: str
    sz: str
    px: str
    state: str
    c_time: int
    u_time: int

    def details(self) -> dict[str, object]:
        """The shape of ``GET /api/v5/trade/order`` (the fields a client reads)."""
        return {
            "instType": "SPOT",
            "instId": self.inst_id,
            "ordId": self.ord_id,
            "clOrdId": self.cl_ord_id,
            "tag": "",
            "px": self.px,
            "sz": self.sz,
            "ordType": self.ord_type,
            "side": self.side,
            "tdMode": self.td_mode,
            "accFillSz": "0",
            "fillPx": "",
            "avgPx": "",
            "state": self.state,
            "fee": "0",
            "feeCcy": self.inst_id.split("-")[0],
            "cTime": str(self.c_time),
            "uTime": str(self.u_time),
        }


_ORD_TYPES = frozenset({"market", "limit", "post_only", "fok", "ioc"})
_TD_MODES = frozenset({"cash", "cross", "isolated", "spot_isolated"})


def _decimal_ok(text: str) -> bool:
    try:
        return Decimal(text) > 0
    except InvalidOperation:
        return False


class OkxVenue(SwappedKeys[OkxKey]):
    """Routes and state of the simulated OKX venue. Loop thread only."""

    name = VENUE_NAME

    def __init__(self, *, clock: Clock, keys: Mapping[str, OkxKey] | None = None) -> None:
        self._clock = clock
        self._keys: Mapping[str, OkxKey] = dict(keys or {})  # swapped whole, never mutated
        self._orders: dict[str, OkxOrder] = {}
        self._ids = itertools.count(612_345_678_901_234_567)
        self._order_windows: dict[str, tuple[int, int]] = {}

    # ----- key management (Venue protocol)

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, OkxKey]:
        return parse_okx_keys(entries, path)

    # ----- routes

    def routes(self) -> Sequence[web.RouteDef]:
        private = self._private
        return [
            web.get("/api/v5/public/time", self._time, allow_head=False),
            web.post("/api/v5/trade/order", private(self._place)),
            web.post("/api/v5/trade/cancel-order", private(self._cancel)),
            web.get("/api/v5/trade/order", private(self._order_details), allow_head=False),
            web.get("/api/v5/trade/orders-pending", private(self._pending), allow_head=False),
        ]

    def _json(self, payload: object, status: int = 200) -> web.Response:
        return web.Response(
            text=compact_json(payload), status=status, content_type="application/json"
        )

    def _error(self, request: web.Request, error: OkxError) -> web.Response:
        note_of(request).verdict = int(error.code)
        return self._json(error.body(), error.status)

    async def _time(self, request: web.Request) -> web.Response:
        return self._json({"code": "0", "msg": "", "data": [{"ts": str(self._clock())}]})

    def _private(
        self, action: Callable[[OkxKey, Mapping[str, str], bytes, int], OkxError | object]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            raw_headers = {
                name: request.headers[name].encode("utf-8", "surrogateescape")
                for name in (KEY_HEADER, SIGN_HEADER, TIMESTAMP_HEADER, PASSPHRASE_HEADER)
                if name in request.headers
            }
            note.api_key = request.headers.get(KEY_HEADER)
            known = self._keys.get(note.api_key or "")
            note.algorithm = known.algorithm if known is not None else None
            body = await request.read()
            now = self._clock()
            verdict = verify_okx(
                method=request.method.encode(),
                request_path=request.raw_path.encode("utf-8", "surrogateescape"),
                body=body,
                headers=raw_headers,
                keys=self._keys,
                now_ms=now,
            )
            if isinstance(verdict, OkxError):
                return self._error(request, verdict)
            result = action(verdict, request.query, body, now)
            if isinstance(result, OkxError):
                return self._error(request, result)
            return self._json(result)

        return handle

    # ----- private endpoint actions (synchronous)

    def _place(
        self, key: OkxKey, query: Mapping[str, str], body: bytes, now: int
    ) -> OkxError | object:
        try:
            params = json.loads(body)
        except ValueError:
            return ERR_JSON
        if not isinstance(params, dict):
            return ERR_JSON
        for name in ("instId", "tdMode", "side", "ordType", "sz"):
            if not isinstance(params.get(name), str) or not params[name]:
                return err_empty(name)
        window_start, count = self._order_windows.get(key.api_key, (now, 0))
        if now - window_start >= ORDER_WINDOW_MS:
            window_start, count = now, 0
        if count >= ORDER_LIMIT:
            return ERR_RATE_LIMIT
        self._order_windows[key.api_key] = (window_start, count + 1)
        cl_ord_id = str(params.get("clOrdId", ""))
        failure = self._order_failure(params)
        ord_id = "" if failure else str(next(self._ids))
        item = {
            "clOrdId": cl_ord_id,
            "ordId": ord_id,
            "tag": str(params.get("tag", "")),
            "ts": str(now),
            "sCode": failure[0] if failure else "0",
            "sMsg": failure[1] if failure else "Order placed",
        }
        envelope = {"inTime": str(now * 1000), "outTime": str(now * 1000 + 250)}
        if failure:
            return {"code": "1", "msg": "All operations failed", "data": [item], **envelope}
        self._orders[ord_id] = OkxOrder(
            inst_id=params["instId"],
            ord_id=ord_id,
            cl_ord_id=cl_ord_id,
            side=params["side"],
            ord_type=params["ordType"],
            td_mode=params["tdMode"],
            sz=params["sz"],
            px=str(params.get("px", "")),
            state="live",
            c_time=now,
            u_time=now,
        )
        return {"code": "0", "msg": "", "data": [item], **envelope}

    @staticmethod
    def _order_failure(params: Mapping[str, object]) -> tuple[str, str] | None:
        if params["side"] not in ("buy", "sell"):
            return "51000", "Parameter side error"
        if params["ordType"] not in _ORD_TYPES:
            return "51000", "Parameter ordType error"
        if params["tdMode"] not in _TD_MODES:
            return "51000", "Parameter tdMode error"
        if not _decimal_ok(str(params["sz"])):
            return "51000", "Parameter sz error"
        if params["ordType"] != "market" and not _decimal_ok(str(params.get("px", ""))):
            return "51000", "Parameter px error"
        return None

    def _find(self, inst_id: str, ord_id: str, cl_ord_id: str) -> OkxOrder | None:
        for order in reversed(self._orders.values()):
            if order.inst_id == inst_id and (
                (ord_id and order.ord_id == ord_id)
                or (not ord_id and cl_ord_id and order.cl_ord_id == cl_ord_id)
            ):
                return order
        return None

    def _cancel(
        self, key: OkxKey, query: Mapping[str, str], body: bytes, now: int
    ) -> OkxError | object:
        try:
            params = json.loads(body)
        except ValueError:
            return ERR_JSON
        if not isinstance(params, dict):
            return ERR_JSON
        inst_id = params.get("instId")
        if not isinstance(inst_id, str) or not inst_id:
            return err_empty("instId")
        ord_id, cl_ord_id = str(params.get("ordId", "")), str(params.get("clOrdId", ""))
        if not ord_id and not cl_ord_id:
            return OkxError(400, "51003", "Either client order ID or order ID is required.")
        order = self._find(inst_id, ord_id, cl_ord_id)
        envelope = {"inTime": str(now * 1000), "outTime": str(now * 1000 + 180)}
        if order is None or order.state != "live":
            item = {
                "clOrdId": cl_ord_id,
                "ordId": ord_id,
                "ts": str(now),
                "sCode": "51400",
                "sMsg": "Order cancellation failed as the order has been filled, "
                "canceled or does not exist.",
            }
            return {"code": "1", "msg": "All operations failed", "data": [item], **envelope}
        order.state, order.u_time = "canceled", now
        item = {
            "clOrdId": order.cl_ord_id,
            "ordId": order.ord_id,
            "ts": str(now),
            "sCode": "0",
            "sMsg": "",
        }
        return {"code": "0", "msg": "", "data": [item], **envelope}

    def _order_details(
        self, key: OkxKey, query: Mapping[str, str], body: bytes, now: int
    ) -> OkxError | object:
        inst_id = query.get("instId", "")
        if not inst_id:
            return err_empty("instId")
        ord_id, cl_ord_id = query.get("ordId", ""), query.get("clOrdId", "")
        if not ord_id and not cl_ord_id:
            return OkxError(400, "51003", "Either client order ID or order ID is required.")
        order = self._find(inst_id, ord_id, cl_ord_id)
        if order is None:
            return {"code": "51603", "msg": "Order does not exist", "data": []}
        return {"code": "0", "msg": "", "data": [order.details()]}

    def _pending(
        self, key: OkxKey, query: Mapping[str, str], body: bytes, now: int
    ) -> OkxError | object:
        inst_id = query.get("instId", "")
        orders = [
            o.details()
            for o in reversed(self._orders.values())
            if o.state == "live" and (not inst_id or o.inst_id == inst_id)
        ]
        return {"code": "0", "msg": "", "data": orders}


__all__ = [
    "ERR_EXPIRED",
    "ERR_KEY_INVALID",
    "ERR_PASSPHRASE_WRONG",
    "ERR_RATE_LIMIT",
    "ERR_SIGNATURE",
    "OkxError",
    "OkxKey",
    "OkxVenue",
    "parse_okx_keys",
    "parse_timestamp",
    "verify_okx",
]
