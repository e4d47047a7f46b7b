"""Deribit API v2 over HTTP as the venue verifies it: a pure verifier and thin routes.

Written from Deribit's documentation, independently of the sidecar's signers:
- https://docs.deribit.com/#authentication ("Deribit Signature Credentials"):
  ``Authorization: deri-hmac-sha256 id=ClientId,ts=Timestamp,sig=Signature,nonce=Nonce``;
  Signature = hex(HMAC-SHA256(ClientSecret, Timestamp + "\\n" + Nonce + "\\n" +
  UPPERCASE(METHOD) + "\\n" + URI + "\\n" + RequestBody + "\\n")); the timestamp (ms) "is
  valid for 60 seconds since generation".
- https://docs.deribit.com/#rpc-error-codes: 13004 invalid_credentials, 13009
  unauthorized ("Wrong or expired authorization token or bad signature"), 10028
  too_many_requests, 10004 order_not_found, -32602 Invalid params.
- JSON-RPC envelope with ``usIn``/``usOut``/``usDiff``/``testnet``; methods over HTTP as
  ``GET /api/v2/<method>?params`` or ``POST`` of a JSON-RPC request.
- Rate limits (support article "Rate Limits"): a credit pool per account, 500 credits per
  non-matching request, 50 000 maximum, refilled at 10 000 per second.

Not documented, so chosen here and marked: errors answer HTTP 400 (429 for
too_many_requests), and the 13009 answers carry a ``data.reason`` of
``"invalid_signature"``, ``"timestamp_expired"`` (more than 60 s from the server clock,
either way) or ``"invalid_token"`` (no usable Authorization header).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.simulator.base import Clock, SwappedKeys, note_of
from proxy.simulator.hmackeys import (
    SharedSecretKey,
    TokenBucket,
    form_params,
    json_response,
    next_id,
    parse_shared_secret_keys,
    raw_target,
)

VENUE_NAME = "deribit"
ALGORITHM = "hmac-sha256"
TIMESTAMP_VALID_MS = 60_000
CREDITS_MAX = 50_000
CREDITS_PER_S = 10_000
CREDITS_PER_REQUEST = 500
INSTRUMENTS = {"BTC-PERPETUAL", "ETH-PERPETUAL"}


@dataclass(frozen=True, slots=True)
class DeribitError:
    code: int
    message: str
    reason: str | None = None
    status: int = 400

    def error(self) -> dict[str, object]:
        out: dict[str, object] = {"message": self.message, "code": self.code}
        if self.reason is not None:
            out["data"] = {"reason": self.reason}
        return out


ERR_INVALID_CREDENTIALS = DeribitError(13004, "invalid_credentials")
ERR_NO_AUTH = DeribitError(13009, "unauthorized", "invalid_token")
ERR_SIGNATURE = DeribitError(13009, "unauthorized", "invalid_signature")
ERR_TIMESTAMP = DeribitError(13009, "unauthorized", "timestamp_expired")
ERR_TOO_MANY = DeribitError(10028, "too_many_requests", status=429)
ERR_NOT_FOUND = DeribitError(10004, "order_not_found")


def err_params(reason: str) -> DeribitError:
    return DeribitError(-32602, "Invalid params", reason)


def parse_deribit_keys(entries: object, path: str = VENUE_NAME) -> dict[str, SharedSecretKey]:
    return parse_shared_secret_keys(entries, path, ALGORITHM)


def expected_signature(
    secret: bytes, ts: bytes, nonce: bytes, method: bytes, uri: bytes, body: bytes
) -> str:
    data = b"\n".join((ts, nonce, method.upper(), uri, body)) + b"\n"
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def parse_authorization(value: str | None) -> dict[str, str] | None:
    """The fields of a ``deri-hmac-sha256`` Authorization value, or None."""
    if not value:
        return None
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "deri-hmac-sha256":
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, val = part.strip().partition("=")
        if not sep:
            return None
        fields[name] = val
    if not {"id", "ts", "sig", "nonce"} <= fields.keys():
        return None
    return fields


def verify_deribit(
    *,
    authorization: str | None,
    method: bytes,
    uri: bytes,
    body: bytes,
    keys: Mapping[str, SharedSecretKey],
    now_ms: int,
) -> SharedSecretKey | DeribitError:
    """Verify a private request's Authorization header; the key or the error. Pure."""
    fields = parse_authorization(authorization)
    if fields is None:
        return ERR_NO_AUTH
    key = keys.get(fields["id"])
    if key is None:
        return ERR_INVALID_CREDENTIALS
    ts = fields["ts"]
    if not ts.isdigit() or not ts.isascii():
        return ERR_SIGNATURE
    if abs(now_ms - int(ts)) > TIMESTAMP_VALID_MS:
        return ERR_TIMESTAMP
    expected = expected_signature(
        key.secret, ts.encode(), fields["nonce"].encode("utf-8", "replace"), method, uri, body
    )
    if not hmac.compare_digest(expected.encode(), fields["sig"].lower().encode("utf-8", "replace")):
        return ERR_SIGNATURE
    return key


@dataclass(slots=True)
class DeribitOrder:
    order_id: str
    instrument: str
    direction: str
    amount: float
    price: float | str
    order_type: str
    label: str
    created: int
    state: str = "open"
    updated: int = 0

    def json(self) -> dict[str, object]:
        return {
            "web": False,
            "time_in_force": "good_til_cancelled",
            "replaced": False,
            "reduce_only": False,
            "price": self.price,
            "post_only": False,
            "order_type": self.order_type,
            "order_state": self.state,
            "order_id": self.order_id,
            "max_show": self.amount,
            "last_update_timestamp": self.updated or self.created,
            "label": self.label,
            "is_liquidation": False,
            "instrument_name": self.instrument,
            "filled_amount": 0.0,
            "direction": self.direction,
            "creation_timestamp": self.created,
            "average_price": 0.0,
            "api": True,
            "amount": self.amount,
        }


@dataclass(slots=True)
class _Account:
    orders: dict[str, DeribitOrder] = field(default_factory=dict)


class _Refusal(Exception):
    def __init__(self, error: DeribitError) -> None:
        super().__init__(error.message)
        self.error = error


class DeribitVenue(SwappedKeys[SharedSecretKey]):
    """Routes and state of the simulated Deribit venue. Loop thread only."""

    name = VENUE_NAME

    def __init__(
        self,
        *,
        clock: Clock,
        keys: Mapping[str, SharedSecretKey] | None = None,
        credits_max: int = CREDITS_MAX,
        credits_per_s: int = CREDITS_PER_S,
    ) -> None:
        self._clock = clock
        self._keys: Mapping[str, SharedSecretKey] = dict(keys or {})
        self._credits = TokenBucket(credits_max, credits_per_s)
        self._accounts: dict[str, _Account] = {}

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, SharedSecretKey]:
        return parse_deribit_keys(entries, path)

    def routes(self) -> Sequence[web.RouteDef]:
        private = self._private
        routes = [web.get("/api/v2/public/get_time", self._get_time, allow_head=False)]
        for name, action in (
            ("buy", self._buy),
            ("sell", self._sell),
            ("cancel", self._cancel),
            ("get_open_orders_by_instrument", self._open_orders),
        ):
            handler = private(action)
            routes.append(web.get(f"/api/v2/private/{name}", handler, allow_head=False))
            routes.append(web.post(f"/api/v2/private/{name}", handler))
        return routes

    def _envelope(self, request_id: object, arrived_us: int) -> dict[str, object]:
        out_us = self._clock() * 1000
        env: dict[str, object] = {"jsonrpc": "2.0"}
        if request_id is not None:
            env["id"] = request_id
        env.update({"usIn": arrived_us, "usOut": out_us, "usDiff": out_us - arrived_us})
        env["testnet"] = True
        return env

    async def _get_time(self, request: web.Request) -> web.Response:
        now = self._clock()
        return json_response({**self._envelope(None, now * 1000), "result": now})

    def _private(
        self, action: Callable[[Mapping[str, Any], _Account, int], object]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            arrived_us = self._clock() * 1000
            authorization = request.headers.get("Authorization")
            fields = parse_authorization(authorization)
            note.api_key = fields["id"] if fields else None
            body = await request.read()
            now = self._clock()
            request_id: object = None
            verdict = verify_deribit(
                authorization=authorization,
                method=request.method.encode(),
                uri=raw_target(request),
                body=body,
                keys=self._keys,
                now_ms=now,
            )
            if isinstance(verdict, DeribitError):
                return self._error(request, verdict, request_id, arrived_us)
            note.algorithm = verdict.algorithm
            try:
                params, request_id = _params(request, body)
                if not self._credits.take(verdict.account, now, CREDITS_PER_REQUEST)[0]:
                    raise _Refusal(ERR_TOO_MANY)
                account = self._accounts.setdefault(verdict.account, _Account())
                result = action(params, account, now)
            except _Refusal as exc:
                return self._error(request, exc.error, request_id, arrived_us)
            return json_response({**self._envelope(request_id, arrived_us), "result": result})

        return handle

    def _error(
        self, request: web.Request, error: DeribitError, request_id: object, arrived_us: int
    ) -> web.Response:
        note_of(request).verdict = error.code
        body = {**self._envelope(request_id, arrived_us), "error": error.error()}
        return json_response(body, error.status)

    # ----- actions

    def _place(self, direction: str, p: Mapping[str, Any], account: _Account, now: int) -> object:
        instrument = p.get("instrument_name")
        if not isinstance(instrument, str) or instrument not in INSTRUMENTS:
            raise _Refusal(DeribitError(10020, "invalid_or_unsupported_instrument"))
        try:
            amount = float(p.get("amount", ""))
        except (TypeError, ValueError) as exc:
            raise _Refusal(err_params("amount: value is required")) from exc
        if not math.isfinite(amount) or amount <= 0:
            raise _Refusal(DeribitError(10021, "invalid_amount"))
        order_type = str(p.get("type", "limit"))
        price: float | str = "market_price"
        if order_type == "limit":
            try:
                price = float(p.get("price", ""))
            except (TypeError, ValueError) as exc:
                raise _Refusal(err_params("price: value is required")) from exc
            if not math.isfinite(price) or price <= 0:
                raise _Refusal(DeribitError(10023, "invalid_price"))
        order = DeribitOrder(
            order_id=f"{instrument.split('-')[0]}-{next_id()}",
            instrument=instrument,
            direction=direction,
            amount=amount,
            price=price,
            order_type=order_type,
            label=str(p.get("label", "")),
            created=now,
            state="open" if order_type == "limit" else "filled",
        )
        account.orders[order.order_id] = order
        return {"trades": [], "order": order.json()}

    def _buy(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        return self._place("buy", p, account, now)

    def _sell(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        return self._place("sell", p, account, now)

    def _cancel(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        order = account.orders.get(str(p.get("order_id", "")))
        if order is None or order.state != "open":
            raise _Refusal(ERR_NOT_FOUND)
        order.state, order.updated = "cancelled", now
        return order.json()

    def _open_orders(self, p: Mapping[str, Any], account: _Account, now: int) -> object:
        instrument = p.get("instrument_name")
        return [
            o.json()
            for o in account.orders.values()
            if o.state == "open" and o.instrument == instrument
        ]


def _params(request: web.Request, body: bytes) -> tuple[Mapping[str, Any], object]:
    """A method's params from the query (GET) or a JSON-RPC body (POST); and the rpc id."""
    if request.method == "GET" or not body:
        params = form_params(request.raw_path.partition("?")[2].encode())
        if params is None:
            raise _Refusal(err_params("query is not UTF-8"))
        return params, None
    try:
        rpc = json.loads(body)
    except ValueError as exc:
        raise _Refusal(DeribitError(-32700, "Parse error")) from exc
    if not isinstance(rpc, dict) or not isinstance(rpc.get("params", {}), dict):
        raise _Refusal(DeribitError(11050, "bad_request"))
    return rpc.get("params", {}), rpc.get("id")


__all__ = [
    "ERR_INVALID_CREDENTIALS",
    "ERR_SIGNATURE",
    "ERR_TIMESTAMP",
    "DeribitError",
    "DeribitVenue",
    "expected_signature",
    "parse_authorization",
    "parse_deribit_keys",
    "verify_deribit",
]
