"""Kraken spot REST (``/0/private``) as the venue verifies it: a pure verifier, thin routes.

Written from Kraken's documentation, independently of the sidecar's signers:
- https://docs.kraken.com/api/docs/guides/spot-rest-auth: ``API-Key``; ``API-Sign`` =
  base64(HMAC-SHA512(base64-decoded secret, URI path + SHA256(nonce + POST data)));
  ``nonce`` a POST parameter, "always increasing, unsigned 64-bit integer".
- https://docs.kraken.com/api/docs/guides/spot-errors: the error strings, always in an
  HTTP 200 answer ``{"error": ["EAPI:Invalid key"]}``.
- https://docs.kraken.com/rest/ (AddOrder, CancelOrder, OpenOrders, Balance, Time): the
  response shapes. Rate limits (support article "What are the API rate limits?"): a
  per-key counter that each non-trading call raises by 1 and that decays over time; past
  its maximum, ``EAPI:Rate limit exceeded``. Kraken sends no rate-limit headers.

Check order: key, then nonce syntax, then signature, then nonce order (a bad signature
does not consume a nonce). The nonce must exceed the last *accepted* one for the key.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import string
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from aiohttp import web

from proxy.simulator.base import Clock, SwappedKeys, note_of
from proxy.simulator.hmackeys import (
    SharedSecretKey,
    TokenBucket,
    decode_base64_secret,
    form_params,
    json_response,
    parse_shared_secret_keys,
    random_token,
)

VENUE_NAME = "kraken"
ALGORITHM = "hmac-sha512"
FORM = "application/x-www-form-urlencoded"

ERR_INVALID_KEY = "EAPI:Invalid key"
ERR_INVALID_SIGNATURE = "EAPI:Invalid signature"
ERR_INVALID_NONCE = "EAPI:Invalid nonce"
ERR_RATE_LIMIT = "EAPI:Rate limit exceeded"
ERR_INVALID_ARGUMENTS = "EGeneral:Invalid arguments"
ERR_UNKNOWN_PAIR = "EQuery:Unknown asset pair"
ERR_UNKNOWN_ORDER = "EOrder:Unknown order"

# "Intermediate" tier: counter maximum 20, decay 0.5 per second.
COUNTER_MAX = 20
COUNTER_DECAY_PER_S = 0.5
MAX_NONCE = (1 << 64) - 1

PAIRS = {"XBTUSD", "ETHUSD", "XBTEUR", "ETHXBT"}
BALANCES = {"ZUSD": "100000.0000", "XXBT": "10.0000000000", "XETH": "100.0000000000"}
_TXID_ALPHABET = string.ascii_uppercase + string.digits


def parse_kraken_keys(entries: object, path: str = VENUE_NAME) -> dict[str, SharedSecretKey]:
    """``[{"api_key", "algorithm": "hmac-sha512", "secret": <base64>}]``; KeySetError if bad."""
    return parse_shared_secret_keys(entries, path, ALGORITHM, decode_base64_secret)


@dataclass(frozen=True, slots=True)
class KrakenAccepted:
    key: SharedSecretKey
    nonce: int
    params: Mapping[str, str]


def expected_signature(secret: bytes, path: bytes, nonce: bytes, body: bytes) -> bytes:
    """The documented API-Sign for this request (base64 text)."""
    digest = hashlib.sha256(nonce + body).digest()
    return base64.b64encode(hmac.new(secret, path + digest, hashlib.sha512).digest())


def verify_kraken(
    *,
    api_key: str | None,
    api_sign: str | None,
    path: bytes,
    body: bytes,
    keys: Mapping[str, SharedSecretKey],
    last_nonces: Mapping[str, int],
) -> KrakenAccepted | str:
    """Verify a private request; return the accepted request or Kraken's error string.

    ``path`` is the URI path, ``body`` the raw form body, ``last_nonces`` the last accepted
    nonce per key. Pure: the caller records an accepted nonce.
    """
    key = keys.get(api_key) if api_key else None
    if key is None:
        return ERR_INVALID_KEY
    params = form_params(body)
    if params is None:
        return ERR_INVALID_ARGUMENTS
    raw_nonce = params.get("nonce", "")
    if not raw_nonce.isdigit() or not raw_nonce.isascii() or int(raw_nonce) > MAX_NONCE:
        return ERR_INVALID_NONCE
    expected = expected_signature(key.secret, path, raw_nonce.encode(), body)
    if api_sign is None or not hmac.compare_digest(expected, api_sign.encode("utf-8", "replace")):
        return ERR_INVALID_SIGNATURE
    nonce = int(raw_nonce)
    if nonce <= last_nonces.get(key.api_key, 0):
        return ERR_INVALID_NONCE
    return KrakenAccepted(key, nonce, {k: v for k, v in params.items() if k != "nonce"})


@dataclass(slots=True)
class KrakenOrder:
    txid: str
    pair: str
    side: str
    ordertype: str
    price: str
    volume: Decimal
    opentm: float
    userref: int
    cl_ord_id: str | None
    status: str = "open"
    closetm: float | None = None

    def description(self) -> str:
        at = f" @ limit {self.price}" if self.ordertype == "limit" else " @ market"
        return f"{self.side} {self.volume:.8f} {self.pair}{at}"

    def info(self) -> dict[str, object]:
        """The order-info shape of OpenOrders / QueryOrders."""
        info: dict[str, object] = {
            "refid": None,
            "userref": self.userref,
            "status": self.status,
            "opentm": self.opentm,
            "starttm": 0,
            "expiretm": 0,
            "descr": {
                "pair": self.pair,
                "type": self.side,
                "ordertype": self.ordertype,
                "price": self.price if self.ordertype == "limit" else "0",
                "price2": "0",
                "leverage": "none",
                "order": self.description(),
                "close": "",
            },
            "vol": f"{self.volume:.8f}",
            "vol_exec": "0.00000000",
            "cost": "0.00000",
            "fee": "0.00000",
            "price": "0.00000",
            "stopprice": "0.00000",
            "limitprice": "0.00000",
            "misc": "",
            "oflags": "fciq",
        }
        if self.cl_ord_id is not None:
            info["cl_ord_id"] = self.cl_ord_id
        if self.closetm is not None:
            info["closetm"] = self.closetm
        return info


@dataclass(slots=True)
class _Account:
    orders: dict[str, KrakenOrder] = field(default_factory=dict)


def _txid() -> str:
    parts = (random_token(_TXID_ALPHABET, n) for n in (6, 5, 6))
    return "-".join(parts)


class KrakenVenue(SwappedKeys[SharedSecretKey]):
    """Routes and state of the simulated Kraken spot venue. Loop thread only."""

    name = VENUE_NAME

    def __init__(
        self,
        *,
        clock: Clock,
        keys: Mapping[str, SharedSecretKey] | None = None,
        counter_max: float = COUNTER_MAX,
        counter_decay_per_s: float = COUNTER_DECAY_PER_S,
    ) -> None:
        self._clock = clock
        self._keys: Mapping[str, SharedSecretKey] = dict(keys or {})
        self._last_nonces: dict[str, int] = {}
        self._counter = TokenBucket(counter_max, counter_decay_per_s)
        self._accounts: dict[str, _Account] = {}

    # ----- key management (Venue protocol)

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, SharedSecretKey]:
        return parse_kraken_keys(entries, path)

    # ----- routes

    def routes(self) -> Sequence[web.RouteDef]:
        private = self._private
        return [
            web.get("/0/public/Time", self._time),
            web.post("/0/private/AddOrder", private(self._add_order, counts=False)),
            web.post("/0/private/CancelOrder", private(self._cancel_order, counts=False)),
            web.post("/0/private/OpenOrders", private(self._open_orders)),
            web.post("/0/private/Balance", private(self._balance)),
        ]

    async def _time(self, request: web.Request) -> web.Response:
        now = self._clock()
        return json_response(
            {
                "error": [],
                "result": {
                    "unixtime": now // 1000,
                    "rfc1123": email.utils.formatdate(now / 1000, usegmt=True),
                },
            }
        )

    def _private(
        self,
        action: Callable[[KrakenAccepted, _Account], object],
        *,
        counts: bool = True,
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            api_key = request.headers.get("API-Key")
            note.api_key = api_key
            key = self._keys.get(api_key) if api_key else None
            note.algorithm = key.algorithm if key is not None else None
            body = b""
            if request.content_type in (FORM, "application/octet-stream"):
                body = await request.read()
            verdict = verify_kraken(
                api_key=api_key,
                api_sign=request.headers.get("API-Sign"),
                path=request.path.encode(),
                body=body,
                keys=self._keys,
                last_nonces=self._last_nonces,
            )
            if isinstance(verdict, str):
                return self._error(request, verdict)
            self._last_nonces[verdict.key.api_key] = verdict.nonce
            if counts:
                allowed, _ = self._counter.take(verdict.key.api_key, self._clock())
                if not allowed:
                    return self._error(request, ERR_RATE_LIMIT)
            account = self._accounts.setdefault(verdict.key.account, _Account())
            result = action(verdict, account)
            if isinstance(result, _Refusal):
                return self._error(request, result.error)
            return json_response({"error": [], "result": result})

        return handle

    def _error(self, request: web.Request, error: str) -> web.Response:
        note_of(request).verdict = error
        return json_response({"error": [error]})  # Kraken: HTTP 200 even for errors

    # ----- actions (synchronous)

    def _add_order(self, accepted: KrakenAccepted, account: _Account) -> object:
        p = accepted.params
        pair, side, ordertype = p.get("pair", ""), p.get("type", ""), p.get("ordertype", "")
        if pair not in PAIRS:
            return _Refusal(ERR_UNKNOWN_PAIR if pair else ERR_INVALID_ARGUMENTS)
        if side not in ("buy", "sell") or ordertype not in ("limit", "market"):
            return _Refusal(ERR_INVALID_ARGUMENTS)
        try:
            volume = Decimal(p.get("volume", ""))
            price = p.get("price", "")
            if not volume.is_finite() or volume <= 0:
                raise InvalidOperation
            if ordertype == "limit" and not (Decimal(price).is_finite() and Decimal(price) > 0):
                raise InvalidOperation
        except InvalidOperation:
            return _Refusal(ERR_INVALID_ARGUMENTS)
        userref = p.get("userref", "0")
        order = KrakenOrder(
            txid=_txid(),
            pair=pair,
            side=side,
            ordertype=ordertype,
            price=price,
            volume=volume,
            opentm=self._clock() / 1000,
            userref=int(userref) if userref.lstrip("-").isdigit() else 0,
            cl_ord_id=p.get("cl_ord_id") or None,
        )
        if p.get("validate") not in ("true", "1"):
            account.orders[order.txid] = order
            if ordertype == "market":
                order.status, order.closetm = "closed", order.opentm
        return {"descr": {"order": order.description()}, "txid": [order.txid]}

    def _cancel_order(self, accepted: KrakenAccepted, account: _Account) -> object:
        ident = accepted.params.get("txid") or accepted.params.get("cl_ord_id") or ""
        matches = [
            o
            for o in account.orders.values()
            if o.status == "open" and ident in (o.txid, o.cl_ord_id, str(o.userref))
        ]
        if not ident or not matches:
            return _Refusal(ERR_UNKNOWN_ORDER)
        for order in matches:
            order.status, order.closetm = "canceled", self._clock() / 1000
        return {"count": len(matches)}

    def _open_orders(self, accepted: KrakenAccepted, account: _Account) -> object:
        return {"open": {t: o.info() for t, o in account.orders.items() if o.status == "open"}}

    def _balance(self, accepted: KrakenAccepted, account: _Account) -> object:
        return dict(BALANCES)


@dataclass(frozen=True, slots=True)
class _Refusal:
    error: str


__all__ = [
    "ERR_INVALID_KEY",
    "ERR_INVALID_NONCE",
    "ERR_INVALID_SIGNATURE",
    "ERR_RATE_LIMIT",
    "KrakenAccepted",
    "KrakenVenue",
    "expected_signature",
    "parse_kraken_keys",
    "verify_kraken",
]
