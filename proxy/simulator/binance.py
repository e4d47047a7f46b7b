"""Binance spot REST (``/api/v3``) as the venue verifies it: a pure verifier and thin routes.

Written from Binance's public documentation, independently of the sidecar's signers, so it
can serve as their oracle (it imports nothing from ``proxy`` outside this package, nor
``keycache``). Sources, as read for this module:

- Request security / SIGNED endpoints and the HMAC, RSA and Ed25519 examples:
  https://developers.binance.com/docs/binance-spot-api-docs/rest-api/request-security
  and ``rest-api.md`` in github.com/binance/binance-spot-api-docs.
- Error codes and their exact texts: ``errors.md`` in the same repository.
- Endpoint parameters, weights and response shapes: the endpoint pages of the same docs.

The core is :func:`verify_binance`, a synchronous function over bytes that needs no loop and
no socket. :class:`BinanceVenue` adapts aiohttp requests to it and keeps a tiny in-memory
order book so order, cancel, open-orders and account calls answer with realistic shapes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import string
import urllib.parse
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Context, Decimal
from typing import ClassVar, Literal, TypeAlias

from aiohttp import web
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from proxy.simulator.base import Clock, KeySetError, SwappedKeys, compact_json, note_of

VENUE_NAME = "binance"
API_KEY_HEADER = "X-MBX-APIKEY"
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
ORDER_COUNT_10S_HEADER = "X-MBX-ORDER-COUNT-10S"
ORDER_COUNT_1D_HEADER = "X-MBX-ORDER-COUNT-1D"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

# Timing security (request-security page): recvWindow defaults to 5000 and "cannot go
# beyond 60,000"; a request may be at most 1000 ms ahead of the server's clock.
DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60_000
MAX_AHEAD_MS = 1000

# Rate-limit windows the response headers report (IP weight per minute, orders per 10 s
# and per day), as listed by exchangeInfo's rateLimits.
WEIGHT_WINDOW_MS = 60_000
WEIGHT_LIMIT = 6000  # REQUEST_WEIGHT per minute per IP (exchangeInfo's rateLimits)
ORDER_WINDOW_10S_MS = 10_000
ORDER_WINDOW_1D_MS = 86_400_000

# Request weights from the endpoint pages (current values; older docs list half of some).
WEIGHT_PING = 1
WEIGHT_TIME = 1
WEIGHT_EXCHANGE_INFO = 20
WEIGHT_NEW_ORDER = 1
WEIGHT_TEST_ORDER = 1
WEIGHT_QUERY_ORDER = 4
WEIGHT_CANCEL_ORDER = 1
WEIGHT_OPEN_ORDERS_ONE_SYMBOL = 6
WEIGHT_OPEN_ORDERS_ALL_SYMBOLS = 80
WEIGHT_ACCOUNT = 20

# Closed (filled/canceled) orders kept per account for GET /api/v3/order; bounds memory in
# long benchmark runs. Open orders are never dropped.
MAX_CLOSED_ORDERS_PER_ACCOUNT = 50_000

DEFAULT_ACCOUNT = "main"
Algorithm: TypeAlias = Literal["hmac-sha256", "ed25519", "rsa-pkcs1-sha256"]
ALGORITHMS: tuple[Algorithm, ...] = ("hmac-sha256", "ed25519", "rsa-pkcs1-sha256")

# Legal ranges Binance reports in -1100 messages for DECIMAL and client-order-id fields.
DECIMAL_RANGE = r"^([0-9]{1,20})(\.[0-9]{1,20})?$"
CLIENT_ORDER_ID_RANGE = r"^[\.A-Z\:/a-z0-9_-]{1,36}$"
_DECIMAL_RE = re.compile(DECIMAL_RANGE)
_CLIENT_ORDER_ID_RE = re.compile(CLIENT_ORDER_ID_RANGE)
_LONG_RE = re.compile(r"^[0-9]{1,20}$")

# Decimal arithmetic wide enough for 20 integer + 20 fraction digits without rounding.
_DEC = Context(prec=60)
_EIGHT_DP = Decimal("0.00000001")
_ZERO = Decimal(0)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class BinanceError:
    """A rejection exactly as Binance sends it: HTTP ``status`` and ``{"code", "msg"}``."""

    status: int
    code: int
    msg: str

    def body(self) -> dict[str, object]:
        """The JSON body Binance returns."""
        return {"code": self.code, "msg": self.msg}


class BinanceReject(Exception):
    """Raised by endpoint logic to answer with ``error``; caught in the route adapter."""

    def __init__(self, error: BinanceError) -> None:
        super().__init__(error.msg)
        self.error = error


ERR_API_KEY_FORMAT = BinanceError(401, -2014, "API-key format invalid.")
ERR_API_KEY_REJECTED = BinanceError(401, -2015, "Invalid API-key, IP, or permissions for action.")
ERR_INVALID_SIGNATURE = BinanceError(400, -1022, "Signature for this request is not valid.")
ERR_OUTSIDE_RECV_WINDOW = BinanceError(
    400, -1021, "Timestamp for this request is outside of the recvWindow."
)
ERR_AHEAD_OF_SERVER = BinanceError(
    400, -1021, "Timestamp for this request was 1000ms ahead of the server's time."
)
ERR_DUPLICATE_PARAMETER = BinanceError(400, -1101, "Duplicate values for a parameter detected.")
ERR_ILLEGAL_CHARS = BinanceError(400, -1100, "Illegal characters found in a parameter.")
ERR_BAD_RECV_WINDOW = BinanceError(400, -1131, "recvWindow must be less than 60000")
ERR_BAD_SYMBOL = BinanceError(400, -1121, "Invalid symbol.")
ERR_BAD_SIDE = BinanceError(400, -1117, "Invalid side.")
ERR_BAD_ORDER_TYPE = BinanceError(400, -1116, "Invalid orderType.")
ERR_BAD_TIME_IN_FORCE = BinanceError(400, -1115, "Invalid timeInForce.")
ERR_UNKNOWN_ORDER = BinanceError(400, -2011, "Unknown order sent.")
ERR_NO_SUCH_ORDER = BinanceError(400, -2013, "Order does not exist.")
ERR_DUPLICATE_ORDER = BinanceError(400, -2010, "Duplicate order sent.")
ERR_LOT_SIZE = BinanceError(400, -1013, "Filter failure: LOT_SIZE")
ERR_TOO_MUCH_WEIGHT = BinanceError(
    429,
    -1003,
    "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. "
    "Please use WebSocket Streams for live updates to avoid polling the API.",
)
ERR_PRICE_FILTER = BinanceError(400, -1013, "Filter failure: PRICE_FILTER")


def err_mandatory(name: str) -> BinanceError:
    """-1102 for one missing, empty or malformed mandatory parameter."""
    return BinanceError(
        400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


def err_either(first: str, second: str) -> BinanceError:
    """-1102 when one of two alternative parameters must be sent and neither was."""
    return BinanceError(
        400, -1102, f"Param '{first}' or '{second}' must be sent, but both were empty/null!"
    )


def err_illegal(name: str, legal_range: str) -> BinanceError:
    """-1100 naming the parameter and its legal range."""
    return BinanceError(
        400,
        -1100,
        f"Illegal characters found in parameter '{name}'; legal range is '{legal_range}'.",
    )


def err_not_required(name: str) -> BinanceError:
    """-1106 for a parameter the order type does not take."""
    return BinanceError(400, -1106, f"Parameter '{name}' sent when not required.")


def err_empty(name: str) -> BinanceError:
    """-1105 for an optional parameter sent with an empty value."""
    return BinanceError(400, -1105, f"Parameter '{name}' was empty.")


# --------------------------------------------------------------------------- keys


def _b64_signature(signature: str) -> bytes | None:
    """Decode an RSA/Ed25519 signature: percent-decoded, then strict base64."""
    try:
        return base64.b64decode(urllib.parse.unquote(signature), validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class HmacKey:
    """An HMAC-SHA256 API key as the venue holds it (the shared secret)."""

    api_key: str
    secret: bytes = field(repr=False)
    account: str = DEFAULT_ACCOUNT
    algorithm: ClassVar[Algorithm] = "hmac-sha256"

    def verify(self, payload: bytes, signature: str) -> bool:
        """True iff ``signature`` is the hex HMAC of ``payload``; hex case is ignored
        ("Signatures generated using HMAC are not case-sensitive")."""
        expected = hmac.new(self.secret, payload, hashlib.sha256).hexdigest().encode()
        given = urllib.parse.unquote(signature).lower().encode("utf-8", "replace")
        return hmac.compare_digest(expected, given)


@dataclass(frozen=True, slots=True)
class Ed25519Key:
    """An Ed25519 API key as the venue holds it (the public key)."""

    api_key: str
    public_key: Ed25519PublicKey = field(repr=False)
    account: str = DEFAULT_ACCOUNT
    algorithm: ClassVar[Algorithm] = "ed25519"

    def verify(self, payload: bytes, signature: str) -> bool:
        """True iff ``signature`` (base64, percent-encoded, case-sensitive) signs ``payload``."""
        raw = _b64_signature(signature)
        if raw is None:
            return False
        try:
            self.public_key.verify(raw, payload)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class RsaKey:
    """An RSA API key (RSASSA-PKCS1-v1_5 with SHA-256) as the venue holds it."""

    api_key: str
    public_key: RSAPublicKey = field(repr=False)
    account: str = DEFAULT_ACCOUNT
    algorithm: ClassVar[Algorithm] = "rsa-pkcs1-sha256"

    def verify(self, payload: bytes, signature: str) -> bool:
        """True iff ``signature`` (base64, percent-encoded, case-sensitive) signs ``payload``."""
        raw = _b64_signature(signature)
        if raw is None:
            return False
        try:
            self.public_key.verify(raw, payload, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True


BinanceKey: TypeAlias = HmacKey | Ed25519Key | RsaKey


def _str_field(entry: Mapping[str, object], name: str, path: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise KeySetError(f"{path}.{name}", "must be a non-empty string")
    return value


def parse_binance_keys(entries: object, path: str = VENUE_NAME) -> dict[str, BinanceKey]:
    """Validate a keys-document list for Binance and return the keys by API key.

    Each entry is ``{"api_key", "algorithm", "secret"}`` for ``hmac-sha256`` or
    ``{"api_key", "algorithm", "public_key": <PEM SubjectPublicKeyInfo>}`` for ``ed25519``
    and ``rsa-pkcs1-sha256``, plus an optional ``account`` (keys sharing an account see the
    same orders, as two keys of one Binance account do). Raises :class:`KeySetError`
    naming the first bad field.
    """
    if not isinstance(entries, list):
        raise KeySetError(path, "must be a list of key objects")
    keys: dict[str, BinanceKey] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise KeySetError(where, "must be an object")
        api_key = _str_field(entry, "api_key", where)
        if api_key in keys:
            raise KeySetError(f"{where}.api_key", "duplicate api_key")
        if api_key != api_key.strip():
            raise KeySetError(f"{where}.api_key", "must not have surrounding whitespace")
        algorithm = entry.get("algorithm")
        if algorithm not in ALGORITHMS:
            raise KeySetError(f"{where}.algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        account = entry.get("account", DEFAULT_ACCOUNT)
        if not isinstance(account, str) or not account:
            raise KeySetError(f"{where}.account", "must be a non-empty string")
        key: BinanceKey
        if algorithm == "hmac-sha256":
            secret = _str_field(entry, "secret", where)
            key = HmacKey(api_key=api_key, secret=secret.encode("utf-8"), account=account)
        else:
            pem = _str_field(entry, "public_key", where)
            try:
                public = serialization.load_pem_public_key(pem.encode("ascii"))
            except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
                raise KeySetError(f"{where}.public_key", "not a PEM public key") from exc
            if algorithm == "ed25519":
                if not isinstance(public, Ed25519PublicKey):
                    raise KeySetError(f"{where}.public_key", "not an Ed25519 public key")
                key = Ed25519Key(api_key=api_key, public_key=public, account=account)
            else:
                if not isinstance(public, RSAPublicKey):
                    raise KeySetError(f"{where}.public_key", "not an RSA public key")
                key = RsaKey(api_key=api_key, public_key=public, account=account)
        keys[api_key] = key
    return keys


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class Param:
    """One ``name=value`` segment: the bytes as received and its form-decoded name/value."""

    raw: bytes
    name: str
    value: str


def _form_decode(raw: bytes) -> str:
    """application/x-www-form-urlencoded decoding of one name or value; UTF-8 strict."""
    return urllib.parse.unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")


def split_params(raw: bytes) -> list[Param] | BinanceError:
    """Split a raw query string or form body into parameters, keeping each raw segment.

    Empty segments (``a=1&&b=2``) are skipped. Returns -1100 if a name or value is not
    UTF-8 after percent-decoding, -1101 if a name occurs twice.
    """
    params: list[Param] = []
    seen: set[str] = set()
    for segment in raw.split(b"&"):
        if not segment:
            continue
        raw_name, _, raw_value = segment.partition(b"=")
        try:
            name, value = _form_decode(raw_name), _form_decode(raw_value)
        except UnicodeDecodeError:
            return ERR_ILLEGAL_CHARS
        if name in seen:
            return ERR_DUPLICATE_PARAMETER
        seen.add(name)
        params.append(Param(segment, name, value))
    return params


@dataclass(frozen=True, slots=True)
class BinanceAccepted:
    """A SIGNED request that passed every check of :func:`verify_binance`.

    ``params`` merges query and body (the query wins for a name sent in both, as Binance
    documents) without ``signature``.
    """

    key: BinanceKey
    params: Mapping[str, str]
    timestamp: int
    recv_window: int


def _signed_payload(query: bytes, body: bytes, signature: Param, in_body: bool) -> bytes | None:
    """totalParams without the trailing ``signature`` parameter, or None if it is not last.

    Binance: "totalParams is defined as the query string concatenated with the request
    body" (no ``&`` between them; see the docs' mixed example). The signature must be the
    last parameter of totalParams: the last of the body, or of the query when the body is
    empty. Anything else cannot verify, so it ends as -1022.
    """
    if in_body:
        segments = body.split(b"&")
        if segments[-1] != signature.raw:
            return None
        return query + b"&".join(segments[:-1])
    if body:
        return None
    segments = query.split(b"&")
    if segments[-1] != signature.raw:
        return None
    return b"&".join(segments[:-1])


def verify_binance(
    *,
    api_key: str | None,
    query: bytes,
    body: bytes,
    keys: Mapping[str, BinanceKey],
    now_ms: int,
) -> BinanceAccepted | BinanceError:
    """Verify a SIGNED Binance REST request the way the venue does; pure, never raises.

    ``query`` is the raw query string and ``body`` the raw form body, both exactly as
    received (no re-encoding); pass ``b""`` for a body the venue would not read (a GET's, or
    one that is not ``application/x-www-form-urlencoded``). ``api_key`` is the
    ``X-MBX-APIKEY`` header (None if absent); ``now_ms`` the server's clock.

    Check order. Binance documents none (request-security and errors pages checked), so
    this one is a choice, driven by what each check needs: the key header first (missing,
    -2014; unknown or revoked, -2015: the key decides how to verify), then the parameters
    are parsed (-1100, -1101), then ``signature`` must be present (-1102), then
    ``timestamp`` / ``recvWindow`` are validated and the timing rule applied (-1102,
    -1105, -1100, -1131, -1021: a stale request reports -1021 whatever its signature), and
    the signature is checked last (-1022).

    Timing rule, verbatim from the docs: accept iff ``timestamp < serverTime + 1000`` and
    ``serverTime - timestamp <= recvWindow``.
    """
    if api_key is None or not api_key.strip():
        return ERR_API_KEY_FORMAT
    key = keys.get(api_key)
    if key is None:
        return ERR_API_KEY_REJECTED

    query_params = split_params(query)
    if isinstance(query_params, BinanceError):
        return query_params
    body_params = split_params(body)
    if isinstance(body_params, BinanceError):
        return body_params

    signatures = [(p, False) for p in query_params if p.name == "signature"]
    signatures += [(p, True) for p in body_params if p.name == "signature"]
    if len(signatures) > 1:
        return ERR_DUPLICATE_PARAMETER
    if not signatures or not signatures[0][0].value:
        return err_mandatory("signature")
    signature, in_body = signatures[0]

    # "If a parameter [is] sent in both the query string and request body, the query
    # string parameter will be used."
    params = {p.name: p.value for p in body_params if p.name != "signature"}
    params.update({p.name: p.value for p in query_params if p.name != "signature"})

    raw_timestamp = params.get("timestamp", "")
    if not _LONG_RE.match(raw_timestamp):
        return err_mandatory("timestamp")
    timestamp = int(raw_timestamp)
    recv_window = DEFAULT_RECV_WINDOW_MS
    if "recvWindow" in params:
        raw_window = params["recvWindow"]
        if not raw_window:
            return err_empty("recvWindow")
        if not _LONG_RE.match(raw_window):
            return ERR_ILLEGAL_CHARS
        recv_window = int(raw_window)
        if recv_window > MAX_RECV_WINDOW_MS:
            return ERR_BAD_RECV_WINDOW

    if timestamp >= now_ms + MAX_AHEAD_MS:
        return ERR_AHEAD_OF_SERVER
    if now_ms - timestamp > recv_window:
        return ERR_OUTSIDE_RECV_WINDOW

    payload = _signed_payload(query, body, signature, in_body)
    raw_signature = signature.raw.partition(b"=")[2]
    try:
        signature_text = raw_signature.decode("ascii")
    except UnicodeDecodeError:
        return ERR_INVALID_SIGNATURE
    if payload is None or not key.verify(payload, signature_text):
        return ERR_INVALID_SIGNATURE
    return BinanceAccepted(key=key, params=params, timestamp=timestamp, recv_window=recv_window)


# --------------------------------------------------------------------------- counters


class FixedWindowCounter:
    """Sums per key over fixed windows aligned to multiples of ``window_ms`` (like the
    venue's per-minute weight and per-10s/per-day order counters). Not thread-safe; loop only.
    """

    __slots__ = ("_counts", "_window_ms")

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._counts: dict[str, tuple[int, int]] = {}

    def add(self, key: str, now_ms: int, amount: int) -> int:
        """Add ``amount`` to ``key``'s current window; return the window's new total."""
        window = now_ms // self._window_ms
        current_window, total = self._counts.get(key, (window, 0))
        if current_window != window:
            total = 0
        total += amount
        self._counts[key] = (window, total)
        return total

    def set(self, key: str, now_ms: int, total: int) -> None:
        """Make ``key``'s current window total ``total``."""
        self._counts[key] = (now_ms // self._window_ms, total)

    def peek(self, key: str, now_ms: int) -> int:
        """The current window's total for ``key`` (0 if nothing counted yet)."""
        current_window, total = self._counts.get(key, (-1, 0))
        return total if current_window == now_ms // self._window_ms else 0


# --------------------------------------------------------------------------- market


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    """A tradable symbol and the price MARKET orders fill at."""

    symbol: str
    base: str
    quote: str
    price: Decimal


SYMBOLS: Mapping[str, SymbolInfo] = {
    s.symbol: s
    for s in (
        SymbolInfo("BTCUSDT", "BTC", "USDT", Decimal("65000.00")),
        SymbolInfo("ETHUSDT", "ETH", "USDT", Decimal("3500.00")),
        SymbolInfo("BNBUSDT", "BNB", "USDT", Decimal("600.00")),
        SymbolInfo("LTCBTC", "LTC", "BTC", Decimal("0.00120000")),
        SymbolInfo("ETHBTC", "ETH", "BTC", Decimal("0.05400000")),
        SymbolInfo("BNBBTC", "BNB", "BTC", Decimal("0.00920000")),
    )
}

INITIAL_BALANCES: Mapping[str, Decimal] = {
    "BTC": Decimal("10.00000000"),
    "ETH": Decimal("100.00000000"),
    "BNB": Decimal("1000.00000000"),
    "LTC": Decimal("1000.00000000"),
    "USDT": Decimal("1000000.00000000"),
}

SELF_TRADE_PREVENTION_MODE = "EXPIRE_MAKER"  # Binance's current default for spot symbols
_CLIENT_ID_ALPHABET = string.ascii_letters + string.digits


def _fmt(value: Decimal) -> str:
    """Binance's decimal rendering: eight fraction digits, e.g. ``"0.10000000"``."""
    return f"{value.quantize(_EIGHT_DP, rounding=ROUND_DOWN, context=_DEC):f}"


def _generated_client_order_id() -> str:
    """An id shaped like the venue's (22 alphanumerics, e.g. ``6gCrw2kRUAF9CvJDGP16IP``)."""
    return "".join(secrets.choice(_CLIENT_ID_ALPHABET) for _ in range(22))


@dataclass(slots=True)
class Order:
    """One order in the simulated book (mutable: status changes on fill or cancel)."""

    symbol: str
    order_id: int
    client_order_id: str
    side: str
    type: str
    time_in_force: str
    price: Decimal
    orig_qty: Decimal
    executed_qty: Decimal
    cummulative_quote_qty: Decimal
    orig_quote_order_qty: Decimal
    status: str
    time: int
    update_time: int

    @property
    def is_open(self) -> bool:
        """Whether the order still rests on the book."""
        return self.status in {"NEW", "PARTIALLY_FILLED"}

    def base_fields(self) -> dict[str, object]:
        """Fields common to the RESULT, query and cancel shapes."""
        return {
            "price": _fmt(self.price),
            "origQty": _fmt(self.orig_qty),
            "executedQty": _fmt(self.executed_qty),
            "origQuoteOrderQty": _fmt(self.orig_quote_order_qty),
            "cummulativeQuoteQty": _fmt(self.cummulative_quote_qty),
            "status": self.status,
            "timeInForce": self.time_in_force,
            "type": self.type,
            "side": self.side,
        }

    def query_json(self) -> dict[str, object]:
        """The shape of GET /api/v3/order and each GET /api/v3/openOrders element."""
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
            **self.base_fields(),
            "stopPrice": _fmt(_ZERO),
            "icebergQty": _fmt(_ZERO),
            "time": self.time,
            "updateTime": self.update_time,
            "isWorking": True,
            "workingTime": self.time,
            "selfTradePreventionMode": SELF_TRADE_PREVENTION_MODE,
        }


@dataclass(slots=True)
class Account:
    """The orders of one venue account; several API keys may share it."""

    name: str
    orders: dict[int, Order] = field(default_factory=dict)
    closed: deque[int] = field(default_factory=deque)

    def open_orders(self, symbol: str | None) -> list[Order]:
        """Open orders, oldest first, optionally of one symbol."""
        return [
            o for o in self.orders.values() if o.is_open and (symbol is None or o.symbol == symbol)
        ]

    def find(self, symbol: str, order_id: int | None, client_order_id: str | None) -> Order | None:
        """Look an order up by id (preferred, as Binance does) or by client order id."""
        if order_id is not None:
            order = self.orders.get(order_id)
            return order if order is not None and order.symbol == symbol else None
        matches = [
            o
            for o in self.orders.values()
            if o.symbol == symbol and o.client_order_id == client_order_id
        ]
        open_matches = [o for o in matches if o.is_open]
        if open_matches:
            return open_matches[-1]
        return matches[-1] if matches else None

    def close(self, order: Order) -> None:
        """Record that ``order`` left the book; forget the oldest closed ones past the cap."""
        self.closed.append(order.order_id)
        while len(self.closed) > MAX_CLOSED_ORDERS_PER_ACCOUNT:
            self.orders.pop(self.closed.popleft(), None)


def _decimal_param(params: Mapping[str, str], name: str) -> Decimal | None:
    """Parse an optional DECIMAL parameter; None if absent. Raises BinanceReject (-1100)."""
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not _DECIMAL_RE.match(raw):
        raise BinanceReject(err_illegal(name, DECIMAL_RANGE))
    return Decimal(raw)


def _long_param(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not _LONG_RE.match(raw):
        raise BinanceReject(ERR_ILLEGAL_CHARS)
    return int(raw)


def _symbol_param(params: Mapping[str, str], *, mandatory: bool) -> SymbolInfo | None:
    raw = params.get("symbol", "")
    if not raw:
        if mandatory:
            raise BinanceReject(err_mandatory("symbol"))
        return None
    info = SYMBOLS.get(raw)
    if info is None:
        raise BinanceReject(ERR_BAD_SYMBOL)
    return info


@dataclass(frozen=True, slots=True)
class NewOrder:
    """A validated POST /api/v3/order (or /order/test) request."""

    symbol: SymbolInfo
    side: str
    type: str
    time_in_force: str
    quantity: Decimal
    price: Decimal
    quote_order_qty: Decimal
    client_order_id: str | None
    response_type: str


def parse_new_order(params: Mapping[str, str]) -> NewOrder:
    """Validate new-order parameters (LIMIT and MARKET); raise BinanceReject on the first
    problem, in the order Binance lists the parameters. Pure."""
    symbol = _symbol_param(params, mandatory=True)
    assert symbol is not None
    side = params.get("side", "")
    if not side:
        raise BinanceReject(err_mandatory("side"))
    if side not in {"BUY", "SELL"}:
        raise BinanceReject(ERR_BAD_SIDE)
    order_type = params.get("type", "")
    if not order_type:
        raise BinanceReject(err_mandatory("type"))
    if order_type not in {"LIMIT", "MARKET"}:
        # Binance knows more types; the simulator implements these two only.
        raise BinanceReject(ERR_BAD_ORDER_TYPE)

    quantity = _decimal_param(params, "quantity")
    quote_qty = _decimal_param(params, "quoteOrderQty")
    price = _decimal_param(params, "price")
    time_in_force = params.get("timeInForce", "")
    if order_type == "LIMIT":
        if not time_in_force:
            raise BinanceReject(err_mandatory("timeInForce"))
        if time_in_force not in {"GTC", "IOC", "FOK"}:
            raise BinanceReject(ERR_BAD_TIME_IN_FORCE)
        if quantity is None:
            raise BinanceReject(err_mandatory("quantity"))
        if price is None:
            raise BinanceReject(err_mandatory("price"))
        if price <= 0:
            raise BinanceReject(ERR_PRICE_FILTER)
    else:
        if time_in_force:
            raise BinanceReject(err_not_required("timeInForce"))
        if price is not None:
            raise BinanceReject(err_not_required("price"))
        if quantity is None and quote_qty is None:
            raise BinanceReject(err_either("quantity", "quoteOrderQty"))
        price = symbol.price
        if quantity is None:
            assert quote_qty is not None
            quantity = _DEC.divide(quote_qty, price).quantize(
                _EIGHT_DP, rounding=ROUND_DOWN, context=_DEC
            )
        time_in_force = "GTC"
    if quantity <= 0:
        raise BinanceReject(ERR_LOT_SIZE)

    client_order_id = params.get("newClientOrderId") or None
    if client_order_id is not None and not _CLIENT_ORDER_ID_RE.match(client_order_id):
        raise BinanceReject(err_illegal("newClientOrderId", CLIENT_ORDER_ID_RANGE))
    response_type = params.get("newOrderRespType") or "FULL"
    if response_type not in {"ACK", "RESULT", "FULL"}:
        raise BinanceReject(ERR_ILLEGAL_CHARS)
    return NewOrder(
        symbol=symbol,
        side=side,
        type=order_type,
        time_in_force=time_in_force,
        quantity=quantity,
        price=price,
        quote_order_qty=quote_qty or _ZERO,
        client_order_id=client_order_id,
        response_type=response_type,
    )


# --------------------------------------------------------------------------- the venue


@dataclass(frozen=True, slots=True)
class _Signed:
    """A SIGNED endpoint: its weight (may depend on the query) and its action."""

    weight: Callable[[bytes], int]
    action: Callable[[BinanceAccepted, int], object]
    counts_order: bool = False


def _query_has(query: bytes, name: bytes) -> bool:
    """Whether the raw query names ``name`` (for weights that depend on a parameter)."""
    return any(seg.partition(b"=")[0] == name for seg in query.split(b"&"))


def raw_query(request: web.Request) -> bytes:
    """The query string exactly as received (aiohttp's ``query_string`` is decoded)."""
    # aiohttp decodes the request target as UTF-8 with surrogateescape; undo that exactly.
    return request.raw_path.partition("?")[2].encode("utf-8", "surrogateescape")


def _remote(request: web.Request) -> str:
    return request.remote or "unknown"


class BinanceVenue(SwappedKeys[BinanceKey]):
    """Routes and state of the simulated Binance spot venue. Loop thread only.

    ``clock`` is the server's clock (milliseconds); ``keys`` the initial key set.
    """

    name = VENUE_NAME

    def __init__(self, *, clock: Clock, keys: Mapping[str, BinanceKey] | None = None) -> None:
        self._clock = clock
        # Swapped as one reference on rotation; never mutated in place.
        self._keys: Mapping[str, BinanceKey] = dict(keys or {})
        self._weights = FixedWindowCounter(WEIGHT_WINDOW_MS)
        self._orders_10s = FixedWindowCounter(ORDER_WINDOW_10S_MS)
        self._orders_1d = FixedWindowCounter(ORDER_WINDOW_1D_MS)
        self._accounts: dict[str, Account] = {}
        self._next_order_id = 1
        self._next_trade_id = 1

    # ----- key management (Venue protocol)

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, BinanceKey]:
        return parse_binance_keys(entries, path)

    @property
    def keys(self) -> Mapping[str, BinanceKey]:
        """The current key set (read-only view for tests and the demo)."""
        return self._keys

    # ----- routes

    def routes(self) -> Sequence[web.RouteDef]:
        """All Binance routes the simulator serves."""
        signed = self._signed_handler
        return [
            web.post("/__sim/binance/weight", self._set_weight),
            web.get("/api/v3/ping", self._ping),
            web.get("/api/v3/time", self._time),
            web.get("/api/v3/exchangeInfo", self._exchange_info),
            web.post(
                "/api/v3/order",
                signed(_Signed(lambda _q: WEIGHT_NEW_ORDER, self._new_order, counts_order=True)),
            ),
            web.post(
                "/api/v3/order/test",
                signed(_Signed(lambda _q: WEIGHT_TEST_ORDER, self._test_order)),
            ),
            web.get(
                "/api/v3/order",
                signed(_Signed(lambda _q: WEIGHT_QUERY_ORDER, self._query_order)),
                allow_head=False,
            ),
            web.delete(
                "/api/v3/order",
                signed(_Signed(lambda _q: WEIGHT_CANCEL_ORDER, self._cancel_order)),
            ),
            web.get(
                "/api/v3/openOrders",
                signed(_Signed(_open_orders_weight, self._open_orders)),
                allow_head=False,
            ),
            web.get(
                "/api/v3/account",
                signed(_Signed(lambda _q: WEIGHT_ACCOUNT, self._account)),
                allow_head=False,
            ),
        ]

    # ----- adapters

    def _json(self, payload: object, headers: Mapping[str, str], status: int = 200) -> web.Response:
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
        """Count the request's weight and note its key; return the response headers."""
        note = note_of(request)
        api_key = request.headers.get(API_KEY_HEADER)
        note.api_key = api_key
        key = self._keys.get(api_key) if api_key else None
        note.algorithm = key.algorithm if key is not None else None
        used = self._weights.add(_remote(request), self._clock(), weight)
        return {USED_WEIGHT_HEADER: str(used)}

    def _over_weight(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        """Over the IP's weight limit: 429 -1003 with Retry-After until the window resets
        (the request's own weight still counts, as at Binance)."""
        if int(headers[USED_WEIGHT_HEADER]) <= WEIGHT_LIMIT:
            return None
        now = self._clock()
        left_ms = WEIGHT_WINDOW_MS - now % WEIGHT_WINDOW_MS
        headers["Retry-After"] = str(-(-left_ms // 1000))
        return self._error(request, ERR_TOO_MUCH_WEIGHT, headers)

    async def _set_weight(self, request: web.Request) -> web.Response:
        """``POST /__sim/binance/weight?used=N``: the caller's IP has used N weight in this
        minute, as if another host behind the same IP had (tests of the sidecar's
        correction; ``used=0`` puts it back). Answers the previous and the new count."""
        raw = request.query.get("used", "")
        if not raw.isdigit():
            return web.json_response({"error": "used must be a non-negative integer"}, status=400)
        remote, now = _remote(request), self._clock()
        before = self._weights.peek(remote, now)
        self._weights.set(remote, now, int(raw))
        return web.json_response({"before": before, "used": int(raw)})

    def _signed_handler(
        self, endpoint: _Signed
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.Response:
            query = raw_query(request)
            headers = self._start(request, endpoint.weight(query))
            over = self._over_weight(request, headers)
            if over is not None:
                return over
            body = b""
            # Binance reads parameters from a form body only, and never from a GET's body.
            if request.method != "GET" and request.content_type == FORM_CONTENT_TYPE:
                body = await request.read()
            now = self._clock()
            verdict = verify_binance(
                api_key=request.headers.get(API_KEY_HEADER),
                query=query,
                body=body,
                keys=self._keys,
                now_ms=now,
            )
            if isinstance(verdict, BinanceError):
                return self._error(request, verdict, headers)
            try:
                payload = endpoint.action(verdict, now)
            except BinanceReject as exc:
                return self._error(request, exc.error, headers)
            if endpoint.counts_order:
                account = verdict.key.account
                headers[ORDER_COUNT_10S_HEADER] = str(self._orders_10s.add(account, now, 1))
                headers[ORDER_COUNT_1D_HEADER] = str(self._orders_1d.add(account, now, 1))
            return self._json(payload, headers)

        return handle

    def _unsigned_params(self, request: web.Request) -> dict[str, str] | BinanceError:
        parsed = split_params(raw_query(request))
        if isinstance(parsed, BinanceError):
            return parsed
        return {p.name: p.value for p in parsed}

    # ----- unsigned endpoints

    async def _ping(self, request: web.Request) -> web.Response:
        headers = self._start(request, WEIGHT_PING)
        params = self._unsigned_params(request)
        if isinstance(params, BinanceError):
            return self._error(request, params, headers)
        return self._json({}, headers)

    async def _time(self, request: web.Request) -> web.Response:
        headers = self._start(request, WEIGHT_TIME)
        params = self._unsigned_params(request)
        if isinstance(params, BinanceError):
            return self._error(request, params, headers)
        return self._json({"serverTime": self._clock()}, headers)

    async def _exchange_info(self, request: web.Request) -> web.Response:
        headers = self._start(request, WEIGHT_EXCHANGE_INFO)
        params = self._unsigned_params(request)
        if isinstance(params, BinanceError):
            return self._error(request, params, headers)
        try:
            only = _symbol_param(params, mandatory=False)
        except BinanceReject as exc:
            return self._error(request, exc.error, headers)
        symbols = [only] if only is not None else list(SYMBOLS.values())
        return self._json(exchange_info(symbols, self._clock()), headers)

    # ----- signed endpoint actions (synchronous; raise BinanceReject)

    def _account_of(self, accepted: BinanceAccepted) -> Account:
        name = accepted.key.account
        account = self._accounts.get(name)
        if account is None:
            account = self._accounts[name] = Account(name)
        return account

    def _test_order(self, accepted: BinanceAccepted, now: int) -> object:
        parse_new_order(accepted.params)
        return {}

    def _new_order(self, accepted: BinanceAccepted, now: int) -> object:
        request = parse_new_order(accepted.params)
        account = self._account_of(accepted)
        symbol = request.symbol.symbol
        if request.client_order_id is not None:
            existing = account.find(symbol, None, request.client_order_id)
            if existing is not None and existing.is_open:
                raise BinanceReject(ERR_DUPLICATE_ORDER)
        order_id = self._next_order_id
        self._next_order_id += 1
        filled = request.type == "MARKET"
        quote = _DEC.multiply(request.quantity, request.price) if filled else _ZERO
        order = Order(
            symbol=symbol,
            order_id=order_id,
            client_order_id=request.client_order_id or _generated_client_order_id(),
            side=request.side,
            type=request.type,
            time_in_force=request.time_in_force,
            price=_ZERO if filled else request.price,
            orig_qty=request.quantity,
            executed_qty=request.quantity if filled else _ZERO,
            cummulative_quote_qty=quote,
            orig_quote_order_qty=request.quote_order_qty,
            status="FILLED" if filled else "NEW",
            time=now,
            update_time=now,
        )
        account.orders[order_id] = order
        fills: list[dict[str, object]] = []
        if filled:
            account.close(order)
            fills.append(
                {
                    "price": _fmt(request.price),
                    "qty": _fmt(request.quantity),
                    "commission": _fmt(_ZERO),
                    "commissionAsset": "BNB",
                    "tradeId": self._next_trade_id,
                }
            )
            self._next_trade_id += 1
        ack: dict[str, object] = {
            "symbol": symbol,
            "orderId": order_id,
            "orderListId": -1,
            "clientOrderId": order.client_order_id,
            "transactTime": now,
        }
        if request.response_type == "ACK":
            return ack
        result = {
            **ack,
            **order.base_fields(),
            "workingTime": now,
            "selfTradePreventionMode": SELF_TRADE_PREVENTION_MODE,
        }
        if request.response_type == "FULL":
            result["fills"] = fills
        return result

    def _lookup(self, accepted: BinanceAccepted) -> tuple[Account, Order | None]:
        params = accepted.params
        symbol = _symbol_param(params, mandatory=True)
        assert symbol is not None
        order_id = _long_param(params, "orderId")
        client_order_id = params.get("origClientOrderId") or None
        if order_id is None and client_order_id is None:
            raise BinanceReject(err_either("origClientOrderId", "orderId"))
        account = self._account_of(accepted)
        return account, account.find(symbol.symbol, order_id, client_order_id)

    def _query_order(self, accepted: BinanceAccepted, now: int) -> object:
        _, order = self._lookup(accepted)
        if order is None:
            raise BinanceReject(ERR_NO_SUCH_ORDER)
        return order.query_json()

    def _cancel_order(self, accepted: BinanceAccepted, now: int) -> object:
        account, order = self._lookup(accepted)
        if order is None or not order.is_open:
            raise BinanceReject(ERR_UNKNOWN_ORDER)
        cancel_id = accepted.params.get("newClientOrderId") or _generated_client_order_id()
        order.status = "CANCELED"
        order.update_time = now
        account.close(order)
        return {
            "symbol": order.symbol,
            "origClientOrderId": order.client_order_id,
            "orderId": order.order_id,
            "orderListId": -1,
            "clientOrderId": cancel_id,
            "transactTime": now,
            **order.base_fields(),
            "selfTradePreventionMode": SELF_TRADE_PREVENTION_MODE,
        }

    def _open_orders(self, accepted: BinanceAccepted, now: int) -> object:
        symbol = _symbol_param(accepted.params, mandatory=False)
        account = self._account_of(accepted)
        return [o.query_json() for o in account.open_orders(symbol.symbol if symbol else None)]

    def _account(self, accepted: BinanceAccepted, now: int) -> object:
        account = self._account_of(accepted)
        return account_info(account, now)


def _open_orders_weight(query: bytes) -> int:
    """6 with a symbol, 80 for all symbols (GET /api/v3/openOrders)."""
    if _query_has(query, b"symbol"):
        return WEIGHT_OPEN_ORDERS_ONE_SYMBOL
    return WEIGHT_OPEN_ORDERS_ALL_SYMBOLS


def account_info(account: Account, now: int) -> dict[str, object]:
    """GET /api/v3/account's shape; ``locked`` reflects the account's open LIMIT orders."""
    locked = dict.fromkeys(INITIAL_BALANCES, _ZERO)
    for order in account.open_orders(None):
        info = SYMBOLS[order.symbol]
        remaining = order.orig_qty - order.executed_qty
        if order.side == "BUY":
            locked[info.quote] = locked.get(info.quote, _ZERO) + _DEC.multiply(
                remaining, order.price
            )
        else:
            locked[info.base] = locked.get(info.base, _ZERO) + remaining
    balances = [
        {
            "asset": asset,
            "free": _fmt(max(total - locked[asset], _ZERO)),
            "locked": _fmt(locked[asset]),
        }
        for asset, total in INITIAL_BALANCES.items()
    ]
    return {
        "makerCommission": 10,
        "takerCommission": 10,
        "buyerCommission": 0,
        "sellerCommission": 0,
        "commissionRates": {
            "maker": "0.00100000",
            "taker": "0.00100000",
            "buyer": "0.00000000",
            "seller": "0.00000000",
        },
        "canTrade": True,
        "canWithdraw": True,
        "canDeposit": True,
        "brokered": False,
        "requireSelfTradePrevention": False,
        "preventSor": False,
        "updateTime": now,
        "accountType": "SPOT",
        "balances": balances,
        "permissions": ["SPOT"],
        # A stable fake uid per account name (crc32 is for spreading, not security).
        "uid": 100_000_000 + zlib.crc32(account.name.encode()) % 900_000_000,
    }


def exchange_info(symbols: Sequence[SymbolInfo], now: int) -> dict[str, object]:
    """A minimal but real-shaped GET /api/v3/exchangeInfo answer."""
    return {
        "timezone": "UTC",
        "serverTime": now,
        "rateLimits": [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": WEIGHT_LIMIT,
            },
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
            {
                "rateLimitType": "RAW_REQUESTS",
                "interval": "MINUTE",
                "intervalNum": 5,
                "limit": 61000,
            },
        ],
        "exchangeFilters": [],
        "symbols": [
            {
                "symbol": s.symbol,
                "status": "TRADING",
                "baseAsset": s.base,
                "baseAssetPrecision": 8,
                "quoteAsset": s.quote,
                "quotePrecision": 8,
                "quoteAssetPrecision": 8,
                "baseCommissionPrecision": 8,
                "quoteCommissionPrecision": 8,
                "orderTypes": ["LIMIT", "MARKET"],
                "icebergAllowed": False,
                "ocoAllowed": False,
                "otoAllowed": False,
                "quoteOrderQtyMarketAllowed": True,
                "allowTrailingStop": False,
                "cancelReplaceAllowed": False,
                "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False,
                "filters": [
                    {
                        "filterType": "PRICE_FILTER",
                        "minPrice": "0.00000001",
                        "maxPrice": "1000000.00000000",
                        "tickSize": "0.00000001",
                    },
                    {
                        "filterType": "LOT_SIZE",
                        "minQty": "0.00000001",
                        "maxQty": "9000000.00000000",
                        "stepSize": "0.00000001",
                    },
                ],
                "permissions": [],
                "permissionSets": [["SPOT"]],
                "defaultSelfTradePreventionMode": SELF_TRADE_PREVENTION_MODE,
                "allowedSelfTradePreventionModes": [
                    "NONE",
                    "EXPIRE_TAKER",
                    "EXPIRE_MAKER",
                    "EXPIRE_BOTH",
                ],
            }
            for s in symbols
        ],
    }


__all__ = [
    "ALGORITHMS",
    "API_KEY_HEADER",
    "ORDER_COUNT_1D_HEADER",
    "ORDER_COUNT_10S_HEADER",
    "USED_WEIGHT_HEADER",
    "Algorithm",
    "BinanceAccepted",
    "BinanceError",
    "BinanceKey",
    "BinanceReject",
    "BinanceVenue",
    "Ed25519Key",
    "FixedWindowCounter",
    "HmacKey",
    "Param",
    "RsaKey",
    "parse_binance_keys",
    "parse_new_order",
    "split_params",
    "verify_binance",
]
