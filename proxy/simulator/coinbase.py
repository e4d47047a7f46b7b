"""Coinbase Advanced Trade (``/api/v3/brokerage``) as the venue verifies it.

Written from Coinbase's public documentation, independently of the sidecar's signers
(nothing from ``proxy`` outside this package, nor ``keycache``). Sources, as read for
this module:

- CDP API keys and JWTs: https://docs.cdp.coinbase.com/get-started/authentication/jwt-authentication
  and coinbase-advanced-py's ``jwt_generator`` -- ``Authorization: Bearer <JWT>``, header
  ``alg`` (ES256 for EC P-256 keys, EdDSA for Ed25519 keys), ``kid`` (the key name) and a
  ``nonce``; claims ``sub`` (the key name), ``iss`` ``"cdp"``, ``nbf``, ``exp`` ("Your JWT
  expires after 2 minutes") and ``uri`` = ``"<METHOD> <host><path>"`` without the query
  string. The CDP SDK writes ``uris: [uri]`` instead, which Coinbase accepts as well; older
  tokens (ccxt) say ``iss: "coinbase-cloud"``.
- JWS (RFC 7515) and ES256's ``r || s`` signature encoding (RFC 7518 section 3.4).
- Legacy keys: https://docs.cloud.coinbase.com/advanced-trade-api/docs/rest-api-auth-legacy
  -- ``CB-ACCESS-KEY``, ``CB-ACCESS-TIMESTAMP`` (seconds, +/-30 s), ``CB-ACCESS-SIGN`` =
  hex HMAC-SHA256 of ``timestamp + METHOD + requestPath + body``, ``requestPath`` without
  the query; "A signature must be in lowercase letters or the program throws a 401".
- What a refusal looks like: Coinbase's gateway answers any authentication failure with
  ``401`` and the text ``Unauthorized`` (coinbase-advanced-py issues #56 and #132, ccxt
  #26300), except a legacy key's stale timestamp, which carries
  ``{"errors":[{"id":"authentication_error","message":"request timestamp expired"}]}``
  (ccxt's coinbase error table).
- Create order, cancel orders, get order, server time: the Advanced Trade API reference.

The request log's verdict names why a 401 was sent (``unknown_key``, ``bad_signature``,
``expired``, ``uri_mismatch``, ...), which the venue itself never tells.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from aiohttp import web
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from proxy.simulator.base import Clock, KeySetError, SwappedKeys, compact_json, note_of

VENUE_NAME = "coinbase"
LEGACY_KEY_HEADER = "CB-ACCESS-KEY"
LEGACY_SIGN_HEADER = "CB-ACCESS-SIGN"
LEGACY_TIMESTAMP_HEADER = "CB-ACCESS-TIMESTAMP"

LEGACY_WINDOW_S = 30  # "the same timestamp used to create the request signature, +/-30 seconds"
ISSUERS = frozenset({"cdp", "coinbase-cloud"})
ALGORITHMS = ("es256", "ed25519", "hmac-sha256")
_JWT_ALG = {"es256": "ES256", "ed25519": "EdDSA"}
_B64URL_RE = re.compile(rb"^[A-Za-z0-9_-]*$")
_HEX_LOWER_RE = re.compile(rb"^[0-9a-f]{64}$")
_P256_SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True)
class CoinbaseError:
    """A refusal: HTTP status, exact body bytes, and the reason for the request log."""

    status: int
    body: bytes
    reason: str
    content_type: str = "text/plain"


def unauthorized(reason: str) -> CoinbaseError:
    """The gateway's one answer to a failed authentication."""
    return CoinbaseError(401, b"Unauthorized\n", reason)


ERR_STALE_LEGACY = CoinbaseError(
    401,
    b'{"errors":[{"id":"authentication_error","message":"request timestamp expired"}]}',
    "expired",
    "application/json",
)


def api_error(status: int, error: str, message: str) -> CoinbaseError:
    """An Advanced Trade JSON error body."""
    body = compact_json({"error": error, "error_details": message, "message": message})
    return CoinbaseError(status, body.encode(), error, "application/json")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class CdpKey:
    """A CDP API key as Coinbase holds it: the public half of an EC P-256 or Ed25519 key."""

    api_key: str
    algorithm: str
    public_key: ec.EllipticCurvePublicKey | Ed25519PublicKey = field(repr=False)

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        try:
            if isinstance(self.public_key, Ed25519PublicKey):
                self.public_key.verify(signature, signing_input)
            else:
                if len(signature) != _P256_SIGNATURE_BYTES:
                    return False  # DER or any other length is not a JWS ES256 signature
                r = int.from_bytes(signature[:32], "big")
                s = int.from_bytes(signature[32:], "big")
                der = encode_dss_signature(r, s)
                self.public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class LegacyKey:
    """A legacy (coinbase.com settings) API key: the shared secret."""

    api_key: str
    secret: bytes = field(repr=False)
    algorithm: str = "hmac-sha256"


CoinbaseKey = CdpKey | LegacyKey


def _str_field(entry: Mapping[str, object], name: str, path: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise KeySetError(f"{path}.{name}", "must be a non-empty string")
    return value


def parse_coinbase_keys(entries: object, path: str = VENUE_NAME) -> dict[str, CoinbaseKey]:
    """Validate a keys-document list for Coinbase: ``{"api_key", "algorithm": "es256" |
    "ed25519", "public_key": PEM}`` (CDP keys; ``api_key`` is the key name, the JWT's
    ``kid``) or ``{"api_key", "algorithm": "hmac-sha256", "secret"}`` (legacy keys)."""
    if not isinstance(entries, list):
        raise KeySetError(path, "must be a list of key objects")
    keys: dict[str, CoinbaseKey] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise KeySetError(where, "must be an object")
        api_key = _str_field(entry, "api_key", where)
        if api_key in keys:
            raise KeySetError(f"{where}.api_key", "duplicate api_key")
        algorithm = entry.get("algorithm")
        if algorithm == "hmac-sha256":
            keys[api_key] = LegacyKey(api_key, _str_field(entry, "secret", where).encode())
            continue
        if algorithm not in _JWT_ALG:
            raise KeySetError(f"{where}.algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        pem = _str_field(entry, "public_key", where)
        try:
            public = serialization.load_pem_public_key(pem.encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeySetError(f"{where}.public_key", "is not a PEM public key") from exc
        ed_ok = algorithm == "ed25519" and isinstance(public, Ed25519PublicKey)
        ec_ok = (
            algorithm == "es256"
            and isinstance(public, ec.EllipticCurvePublicKey)
            and isinstance(public.curve, ec.SECP256R1)
        )
        if not (ed_ok or ec_ok):
            raise KeySetError(f"{where}.public_key", f"is not a {algorithm} public key")
        assert isinstance(public, Ed25519PublicKey | ec.EllipticCurvePublicKey)
        keys[api_key] = CdpKey(api_key, algorithm, public)
    return keys


# --------------------------------------------------------------------------- verification


def _b64url_decode(part: bytes) -> bytes | None:
    if _B64URL_RE.match(part) is None or len(part) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        return None


def _json_object(raw: bytes | None) -> dict[str, object] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A request whose credentials verified."""

    key: CoinbaseKey


def verify_jwt(
    *,
    token: bytes,
    method: str,
    host: str,
    path: str,
    keys: Mapping[str, CoinbaseKey],
    now_ms: int,
) -> Accepted | CoinbaseError:
    """Verify a CDP JWT for this request; pure, never raises.

    ``host`` is the request's ``Host`` header, ``path`` the raw path without the query.
    Refused (401) when malformed, ``kid`` unknown or not a CDP key, ``alg`` not the key's,
    the signature does not verify, ``sub`` is not ``kid``, ``iss`` unknown, ``now`` is
    before ``nbf`` or not before ``exp``, the ``nonce`` is missing, or neither ``uri`` nor
    ``uris`` names ``"<METHOD> <host><path>"``.
    """
    parts = token.split(b".")
    if len(parts) != 3:  # a JWS compact serialization has three parts
        return unauthorized("malformed_jwt")
    header = _json_object(_b64url_decode(parts[0]))
    claims = _json_object(_b64url_decode(parts[1]))
    signature = _b64url_decode(parts[2])
    if header is None or claims is None or signature is None:
        return unauthorized("malformed_jwt")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if not isinstance(key, CdpKey):
        return unauthorized("unknown_key")
    if header.get("alg") != _JWT_ALG[key.algorithm]:
        return unauthorized("wrong_alg")
    if not key.verify(parts[0] + b"." + parts[1], signature):
        return unauthorized("bad_signature")
    nonce = header.get("nonce")
    if not isinstance(nonce, str) or not nonce:
        return unauthorized("no_nonce")
    if claims.get("sub") != kid:
        return unauthorized("sub_mismatch")
    if claims.get("iss") not in ISSUERS:
        return unauthorized("bad_issuer")
    nbf, exp = claims.get("nbf"), claims.get("exp")
    if not isinstance(nbf, int) or not isinstance(exp, int):
        return unauthorized("bad_times")
    if now_ms < nbf * 1000 or now_ms >= exp * 1000:
        return unauthorized("expired")
    expected = f"{method} {host}{path}"
    uris = claims.get("uris")
    if claims.get("uri") != expected and not (isinstance(uris, list) and expected in uris):
        return unauthorized("uri_mismatch")
    return Accepted(key)


def verify_legacy(
    *,
    api_key: bytes,
    signature: bytes,
    timestamp: bytes,
    method: bytes,
    path: bytes,
    body: bytes,
    keys: Mapping[str, CoinbaseKey],
    now_ms: int,
) -> Accepted | CoinbaseError:
    """Verify a legacy-key request (``CB-ACCESS-*``); pure, never raises.

    ``path`` is the raw path without the query string, as the legacy docs sign it.
    """
    key = keys.get(api_key.decode("utf-8", "replace"))
    if not isinstance(key, LegacyKey):
        return unauthorized("unknown_key")
    if not timestamp.isdigit():
        return unauthorized("bad_timestamp")
    if abs(now_ms // 1000 - int(timestamp)) > LEGACY_WINDOW_S:
        return ERR_STALE_LEGACY
    if _HEX_LOWER_RE.match(signature) is None:
        return unauthorized("bad_signature")
    expected = hmac.new(key.secret, timestamp + method + path + body, hashlib.sha256)
    if not hmac.compare_digest(signature, expected.hexdigest().encode()):
        return unauthorized("bad_signature")
    return Accepted(key)


# --------------------------------------------------------------------------- orders


@dataclass(slots=True)
class CoinbaseOrder:
    order_id: str
    client_order_id: str
    product_id: str
    side: str
    configuration: dict[str, object]
    status: str
    created: int

    def as_json(self) -> dict[str, object]:
        """The ``order`` object of ``GET /orders/historical/{order_id}`` (fields clients read)."""
        created = (
            datetime.fromtimestamp(self.created / 1000, UTC).isoformat().replace("+00:00", "Z")
        )
        return {
            "order_id": self.order_id,
            "product_id": self.product_id,
            "user_id": "sim-user",
            "order_configuration": self.configuration,
            "side": self.side,
            "client_order_id": self.client_order_id,
            "status": self.status,
            "time_in_force": "GOOD_UNTIL_CANCELLED",
            "created_time": created,
            "completion_percentage": "0",
            "filled_size": "0",
            "average_filled_price": "0",
            "number_of_fills": "0",
            "filled_value": "0",
            "pending_cancel": False,
            "size_in_quote": False,
            "total_fees": "0",
            "order_type": "LIMIT" if "limit_limit_gtc" in self.configuration else "MARKET",
            "product_type": "SPOT",
        }


def _positive(value: object) -> bool:
    try:
        return isinstance(value, str) and Decimal(value) > 0
    except InvalidOperation:
        return False


def _valid_configuration(configuration: object) -> bool:
    """``limit_limit_gtc`` (base_size, limit_price) or ``market_market_ioc`` (one size)."""
    if not isinstance(configuration, dict) or len(configuration) != 1:
        return False
    ((kind, spec),) = configuration.items()
    if not isinstance(spec, dict):
        return False
    if kind == "limit_limit_gtc":
        return _positive(spec.get("base_size")) and _positive(spec.get("limit_price"))
    if kind == "market_market_ioc":
        return _positive(spec.get("base_size")) or _positive(spec.get("quote_size"))
    return False


class CoinbaseVenue(SwappedKeys[CoinbaseKey]):
    """Routes and state of the simulated Coinbase Advanced Trade venue. Loop thread only."""

    name = VENUE_NAME

    def __init__(self, *, clock: Clock, keys: Mapping[str, CoinbaseKey] | None = None) -> None:
        self._clock = clock
        self._keys: Mapping[str, CoinbaseKey] = dict(keys or {})  # swapped whole
        self._orders: dict[str, CoinbaseOrder] = {}
        self._seq = itertools.count(1)

    # ----- key management (Venue protocol)

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, CoinbaseKey]:
        return parse_coinbase_keys(entries, path)

    # ----- routes

    def routes(self) -> Sequence[web.RouteDef]:
        private = self._private
        return [
            web.get("/api/v3/brokerage/time", self._time, allow_head=False),
            web.post("/api/v3/brokerage/orders", private(self._create)),
            web.post("/api/v3/brokerage/orders/batch_cancel", private(self._cancel)),
            web.get(
                "/api/v3/brokerage/orders/historical/{order_id}",
                private(self._get_order),
                allow_head=False,
            ),
        ]

    @staticmethod
    def _json(payload: object, status: int = 200) -> web.Response:
        return web.Response(
            text=compact_json(payload), status=status, content_type="application/json"
        )

    async def _time(self, request: web.Request) -> web.Response:
        now = self._clock()
        iso = datetime.fromtimestamp(now / 1000, UTC).isoformat(timespec="milliseconds")
        return self._json(
            {
                "iso": iso.replace("+00:00", "Z"),
                "epochSeconds": str(now // 1000),
                "epochMillis": str(now),
            }
        )

    def _authenticate(
        self, request: web.Request, body: bytes, now: int
    ) -> Accepted | CoinbaseError:
        raw_path = request.raw_path.partition("?")[0]
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme != "Bearer" or not token:
                return unauthorized("malformed_jwt")
            return verify_jwt(
                token=token.encode("utf-8", "surrogateescape"),
                method=request.method,
                host=request.host,
                path=raw_path,
                keys=self._keys,
                now_ms=now,
            )
        if LEGACY_KEY_HEADER in request.headers:
            return verify_legacy(
                api_key=request.headers[LEGACY_KEY_HEADER].encode("utf-8", "surrogateescape"),
                signature=request.headers.get(LEGACY_SIGN_HEADER, "").encode(
                    "utf-8", "surrogateescape"
                ),
                timestamp=request.headers.get(LEGACY_TIMESTAMP_HEADER, "").encode(
                    "utf-8", "surrogateescape"
                ),
                method=request.method.encode(),
                path=raw_path.encode("utf-8", "surrogateescape"),
                body=body,
                keys=self._keys,
                now_ms=now,
            )
        return unauthorized("no_credentials")

    def _private(
        self,
        action: Callable[[CoinbaseKey, web.Request, bytes, int], CoinbaseError | object],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.Response:
            note = note_of(request)
            body = await request.read()
            now = self._clock()
            verdict = self._authenticate(request, body, now)
            if isinstance(verdict, Accepted):
                note.api_key, note.algorithm = verdict.key.api_key, verdict.key.algorithm
                result = action(verdict.key, request, body, now)
            else:
                result = verdict
            if isinstance(result, CoinbaseError):
                note.verdict = result.reason
                return web.Response(
                    body=result.body, status=result.status, content_type=result.content_type
                )
            return self._json(result)

        return handle

    # ----- private endpoint actions (synchronous)

    def _create(
        self, key: CoinbaseKey, request: web.Request, body: bytes, now: int
    ) -> CoinbaseError | object:
        params = _json_object(body)
        if params is None:
            return api_error(400, "INVALID_ARGUMENT", "request body is not a JSON object")
        client_order_id = params.get("client_order_id")
        product_id = params.get("product_id")
        side = params.get("side")
        configuration = params.get("order_configuration")
        if not isinstance(client_order_id, str) or not client_order_id:
            return api_error(400, "INVALID_ARGUMENT", "client_order_id is required")
        if not isinstance(product_id, str) or not product_id:
            return api_error(400, "INVALID_ARGUMENT", "product_id is required")
        if side not in ("BUY", "SELL"):
            return {
                "success": False,
                "failure_reason": "UNKNOWN_FAILURE_REASON",
                "order_id": "",
                "error_response": {
                    "error": "INVALID_SIDE",
                    "message": "Invalid side",
                    "error_details": "",
                    "preview_failure_reason": "PREVIEW_INVALID_SIDE",
                },
            }
        if not _valid_configuration(configuration):
            return {
                "success": False,
                "failure_reason": "UNKNOWN_FAILURE_REASON",
                "order_id": "",
                "error_response": {
                    "error": "UNSUPPORTED_ORDER_CONFIGURATION",
                    "message": "Unsupported order configuration",
                    "error_details": "",
                    "preview_failure_reason": "PREVIEW_INVALID_ORDER_CONFIG",
                },
            }
        assert isinstance(configuration, dict)
        # The same client_order_id twice returns the first order (Coinbase de-duplicates).
        for order in self._orders.values():
            if order.client_order_id == client_order_id:
                break
        else:
            order = CoinbaseOrder(
                order_id=str(uuid.UUID(int=next(self._seq))),
                client_order_id=client_order_id,
                product_id=product_id,
                side=str(side),
                configuration=configuration,
                status="OPEN",
                created=now,
            )
            self._orders[order.order_id] = order
        return {
            "success": True,
            "success_response": {
                "order_id": order.order_id,
                "product_id": order.product_id,
                "side": order.side,
                "client_order_id": order.client_order_id,
            },
            "order_configuration": order.configuration,
        }

    def _cancel(
        self, key: CoinbaseKey, request: web.Request, body: bytes, now: int
    ) -> CoinbaseError | object:
        params = _json_object(body)
        order_ids = params.get("order_ids") if params is not None else None
        if not isinstance(order_ids, list) or not all(isinstance(i, str) for i in order_ids):
            return api_error(400, "INVALID_ARGUMENT", "order_ids is required")
        results = []
        for order_id in order_ids:
            order = self._orders.get(order_id)
            if order is None or order.status != "OPEN":
                results.append(
                    {
                        "success": False,
                        "failure_reason": "UNKNOWN_CANCEL_ORDER",
                        "order_id": order_id,
                    }
                )
                continue
            order.status = "CANCELLED"
            results.append(
                {
                    "success": True,
                    "failure_reason": "UNKNOWN_CANCEL_FAILURE_REASON",
                    "order_id": order_id,
                }
            )
        return {"results": results}

    def _get_order(
        self, key: CoinbaseKey, request: web.Request, body: bytes, now: int
    ) -> CoinbaseError | object:
        order = self._orders.get(request.match_info["order_id"])
        if order is None:
            return api_error(404, "NOT_FOUND", "order with this orderID was not found")
        return {"order": order.as_json()}


__all__ = [
    "ERR_STALE_LEGACY",
    "Accepted",
    "CdpKey",
    "CoinbaseError",
    "CoinbaseVenue",
    "LegacyKey",
    "parse_coinbase_keys",
    "unauthorized",
    "verify_jwt",
    "verify_legacy",
]
