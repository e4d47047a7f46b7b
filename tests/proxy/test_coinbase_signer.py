"""Coinbase Advanced Trade signing.

CDP keys: the JWT is verified here independently (decoded, signature checked with the
public key, claims checked) -- its nonce is random, so bytes cannot be compared, and
ccxt's coinbase writes an older claim set (``iss: coinbase-cloud``, ``aud``), so it is no
oracle for the JWT. Legacy HMAC keys: ccxt's own ``coinbase.sign`` (clock frozen) is.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import ccxt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection
from tests.proxy.helpers import NOW, pem_of, record, ring_of

SERVICE = ServiceConfig(
    name="coinbase_trading",
    venue="coinbase",
    key_type="exchange_api",
    upstream="https://api.coinbase.com",
    route="/coinbase",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
KEY_NAME = "organizations/0c1f6a2e-test/apiKeys/5d2b9c3a-test"
LEGACY_KEY = "LegacyTestKey0001"
LEGACY_SECRET = "legacyFixedTestSecretForProperty"  # no '=' and not 88 chars: ccxt's HMAC path
EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())
ED_PRIVATE = ed25519.Ed25519PrivateKey.generate()


def runtime_with(*records: dict[str, object], service: ServiceConfig = SERVICE) -> ServiceRuntime:
    rt = ServiceRuntime(service, None)
    rt.keys = KeySet(ring_of(service.name, *records), rt.venue, service)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return method, target, headers, body


RUNTIMES = {
    "es256": runtime_with(record(KEY_NAME, pem_of(EC_PRIVATE), "es256")),  # type: ignore[arg-type]
    "ed25519": runtime_with(record(KEY_NAME, pem_of(ED_PRIVATE), "ed25519")),
    "hmac": runtime_with(record(LEGACY_KEY, LEGACY_SECRET)),
}
ORACLE: Any = ccxt.coinbase({"apiKey": LEGACY_KEY, "secret": LEGACY_SECRET})


def _unb64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(token: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode and verify a JWT the way a JOSE library does; return (header, claims)."""
    head64, claims64, sig64 = token.split(".")
    for part in (head64, claims64, sig64):
        assert "=" not in part and "+" not in part and "/" not in part  # base64url, unpadded
    header = json.loads(_unb64url(head64))
    claims = json.loads(_unb64url(claims64))
    signature = _unb64url(sig64)
    signing_input = f"{head64}.{claims64}".encode()
    if kind == "es256":
        assert header["alg"] == "ES256"
        assert len(signature) == 64  # JOSE r || s, not DER
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        EC_PRIVATE.public_key().verify(
            encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256())
        )
    else:
        assert header["alg"] == "EdDSA"
        ED_PRIVATE.public_key().verify(signature, signing_input)
    return header, claims


@pytest.mark.parametrize("kind", ["es256", "ed25519"])
def test_jwt_header_and_claims_are_the_sdks(kind: str) -> None:
    now = 1_764_000_000.123
    data = RUNTIMES[kind].prepare(
        b"GET",
        b"/api/v3/brokerage/orders/historical/batch",
        b"order_status=OPEN&limit=10",
        encode_request_headers([]),
        b"",
        now,
    )
    _, target, headers, _ = split(data)
    assert target == b"/api/v3/brokerage/orders/historical/batch?order_status=OPEN&limit=10"
    scheme, _, token = headers[b"Authorization"].partition(b" ")
    assert scheme == b"Bearer"
    header, claims = verify_jwt(token.decode(), kind)
    assert list(header) == ["alg", "kid", "nonce", "typ"]  # PyJWT's sorted header
    assert header["kid"] == KEY_NAME and header["typ"] == "JWT"
    assert len(header["nonce"]) == 64 and int(header["nonce"], 16) >= 0
    assert claims == {
        "sub": KEY_NAME,
        "iss": "cdp",
        "nbf": 1_764_000_000,
        "exp": 1_764_000_120,
        # the query string is not part of the uri claim
        "uri": "GET api.coinbase.com/api/v3/brokerage/orders/historical/batch",
    }


def test_nonce_is_fresh_per_request_and_signature_breaks_on_tamper() -> None:
    rt = RUNTIMES["es256"]
    tokens = [
        split(rt.prepare(b"POST", b"/api/v3/brokerage/orders", b"", b"", b"{}", 1_764_000_000.0))[
            2
        ][b"Authorization"][7:].decode()
        for _ in range(2)
    ]
    nonces = [verify_jwt(t, "es256")[0]["nonce"] for t in tokens]
    assert nonces[0] != nonces[1]
    head64, claims64, sig64 = tokens[0].split(".")
    forged_claims = json.loads(_unb64url(claims64)) | {
        "uri": "POST api.coinbase.com/api/v3/brokerage/orders/batch_cancel"
    }
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidSignature):
        verify_jwt(f"{head64}.{forged}.{sig64}", "es256")


def test_uri_claim_uses_the_upstream_host_with_its_port() -> None:
    from dataclasses import replace

    service = replace(SERVICE, upstream="https://127.0.0.1:8443")
    rt = runtime_with(record(KEY_NAME, pem_of(ED_PRIVATE), "ed25519"), service=service)
    data = rt.prepare(
        b"DELETE", b"/api/v3/brokerage/x", b"", encode_request_headers([]), b"", 1_764_000_000.0
    )
    _, claims = verify_jwt(split(data)[2][b"Authorization"][7:].decode(), "ed25519")
    assert claims["uri"] == "DELETE 127.0.0.1:8443/api/v3/brokerage/x"


def test_documented_legacy_signature() -> None:
    """Legacy docs: hex HMAC-SHA256 of timestamp + METHOD + requestPath (no query) + body."""
    body = b'{"client_order_id":"c1","product_id":"BTC-USD","side":"BUY"}'
    data = RUNTIMES["hmac"].prepare(
        b"POST", b"/api/v3/brokerage/orders", b"", encode_request_headers([]), body, 1667500462.9
    )
    _, _, headers, sent = split(data)
    assert sent == body
    assert headers[b"CB-ACCESS-TIMESTAMP"] == b"1667500462"
    assert headers[b"CB-ACCESS-KEY"] == LEGACY_KEY.encode()
    prehash = b"1667500462POST/api/v3/brokerage/orders" + body
    assert (
        headers[b"CB-ACCESS-SIGN"]
        == hmac.new(LEGACY_SECRET.encode(), prehash, hashlib.sha256).hexdigest().encode()
    )
    assert b"Authorization" not in headers


def test_engine_credential_headers_are_replaced() -> None:
    data = RUNTIMES["es256"].prepare(
        b"GET",
        b"/api/v3/brokerage/accounts",
        b"",
        encode_request_headers(
            [
                (b"Authorization", b"Bearer engine.forged.token"),
                (b"CB-ACCESS-KEY", b"engine"),
                (b"CB-ACCESS-SIGN", b"forged"),
                (b"CB-ACCESS-TIMESTAMP", b"1"),
            ]
        ),
        b"",
        NOW.timestamp(),
    )
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert head.count(b"authorization:") == 1
    assert b"forged" not in head and b"engine" not in head and b"cb-access" not in head


def test_unsupported_keys_are_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    with pytest.raises(SigningError, match="coinbase keys are"):
        runtime_with(record("k", pem_of(rsa.generate_private_key(65537, 2048)), "rsa-pkcs1-sha256"))
    p384 = ec.generate_private_key(ec.SECP384R1())
    from keycache.errors import KeyRecordError

    with pytest.raises(KeyRecordError, match="P-256"):  # refused before any signer sees it
        runtime_with(record("k", pem_of(p384), "es256"))  # type: ignore[arg-type]


_KEYS = st.text(st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=8)
_VALUES = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_NOW_MS = st.integers(min_value=1_500_000_000_000, max_value=int(NOW.timestamp() * 1000))
_PATHS = [
    "brokerage/orders",
    "brokerage/orders/batch_cancel",
    "brokerage/accounts",
    "brokerage/orders/historical/batch",
]


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
    path=st.sampled_from(_PATHS),
    params=st.lists(st.tuples(_KEYS, _VALUES), max_size=6, unique_by=lambda kv: kv[0]),
    now_ms=_NOW_MS,
)
def test_property_legacy_signature_matches_ccxt(
    method: str, path: str, params: list[tuple[str, str]], now_ms: int
) -> None:
    ORACLE.milliseconds = lambda: now_ms
    expected = ORACLE.sign(path, ["v3", "private"], method, dict(params))
    venue_path, _, query = (
        expected["url"].removeprefix("https://api.coinbase.com").encode().partition(b"?")
    )
    body = (expected["body"] or "").encode()
    data = RUNTIMES["hmac"].prepare(
        method.encode(), venue_path, query, encode_request_headers([]), body, now_ms / 1000
    )
    _, target, headers, sent = split(data)
    assert target == (venue_path + b"?" + query if query else venue_path)
    assert sent == body
    for name in ("CB-ACCESS-KEY", "CB-ACCESS-SIGN", "CB-ACCESS-TIMESTAMP"):
        assert headers[name.encode()] == expected["headers"][name].encode(), name


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["es256", "ed25519"]),
    method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT"]),
    path=st.sampled_from(_PATHS),
    params=st.lists(st.tuples(_KEYS, _VALUES), max_size=4),
    json_body=st.one_of(st.none(), st.dictionaries(_KEYS, _VALUES, max_size=4)),
    now_ms=_NOW_MS,
)
def test_property_jwt_verifies_and_binds_method_host_path(
    kind: str,
    method: bytes,
    path: str,
    params: list[tuple[str, str]],
    json_body: dict[str, str] | None,
    now_ms: int,
) -> None:
    from urllib.parse import quote

    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params).encode()
    body = json.dumps(json_body, ensure_ascii=False).encode() if json_body is not None else b""
    venue_path = b"/api/v3/" + path.encode()
    data = RUNTIMES[kind].prepare(
        method, venue_path, query, encode_request_headers([]), body, now_ms / 1000
    )
    _, target, headers, sent = split(data)
    assert target == (venue_path + b"?" + query if query else venue_path)
    assert sent == body
    header, claims = verify_jwt(headers[b"Authorization"].removeprefix(b"Bearer ").decode(), kind)
    assert header["kid"] == claims["sub"] == KEY_NAME
    assert claims["nbf"] == now_ms // 1000 and claims["exp"] == claims["nbf"] + 120
    assert claims["uri"] == f"{method.decode()} api.coinbase.com{venue_path.decode()}"


# Coinbase's real answers: a bare 401 "Unauthorized" for any authentication failure
# (coinbase-advanced-py #56/#132, ccxt #26300); the v2-style body for a stale legacy
# timestamp (ccxt's coinbase.py); Advanced Trade JSON error bodies otherwise.
CLASSIFIED: list[tuple[int, bytes, Rejection | None]] = [
    (401, b"Unauthorized\n", Rejection.KEY_REJECTED),
    (401, b"Unauthorized", Rejection.KEY_REJECTED),
    (
        401,
        b'{"errors":[{"id":"authentication_error","message":"request timestamp expired"}]}',
        Rejection.CLOCK_OR_NONCE,
    ),
    (
        401,
        b'{"errors":[{"id":"authentication_error","message":"invalid signature"}]}',
        Rejection.KEY_REJECTED,
    ),
    (
        401,
        b'{"error":"UNAUTHENTICATED","error_details":"","message":"Unauthenticated"}',
        Rejection.KEY_REJECTED,
    ),
    (429, b"<html><head><title>Coinbase</title></head></html>", Rejection.RATE_LIMITED),
    (
        429,
        b'{"errors":[{"id":"rate_limit_exceeded","message":"Too many requests"}]}',
        Rejection.RATE_LIMITED,
    ),
    (
        403,
        b'{"error":"PERMISSION_DENIED","error_details":"Missing required scopes","message":"Missing required scopes"}',
        Rejection.OTHER,
    ),
    (
        400,
        b'{"error":"INVALID_ARGUMENT","error_details":"invalid product_id","message":"invalid product_id"}',
        Rejection.OTHER,
    ),
    (
        200,
        b'{"success":false,"failure_reason":"UNKNOWN_FAILURE_REASON","order_id":"",'
        b'"error_response":{"error":"INSUFFICIENT_FUND","message":"Insufficient balance in source account"}}',
        Rejection.OTHER,
    ),
    (200, b'{"success":true,"success_response":{"order_id":"11111-000000-000000"}}', None),
    (
        200,
        b'{"iso":"2026-11-28T12:00:00Z","epochSeconds":"1795867200","epochMillis":"1795867200000"}',
        None,
    ),
    (500, b"", Rejection.OTHER),
]


@pytest.mark.parametrize(("status", "body", "expected"), CLASSIFIED)
def test_classifier_table(status: int, body: bytes, expected: Rejection | None) -> None:
    assert VENUES["coinbase"].classify(status, body) is expected


def test_time_endpoint_parses_documented_answer() -> None:
    endpoint = VENUES["coinbase"].time_endpoint
    assert endpoint is not None and endpoint.path == b"/api/v3/brokerage/time"
    body = b'{"iso":"2023-05-17T21:19:13.123Z","epochSeconds":"1684358353","epochMillis":"1684358353123"}'
    assert endpoint.parse(body) == 1684358353123.0
    with pytest.raises(ValueError):
        endpoint.parse(b'{"iso":"2023-05-17T21:19:13Z"}')


def test_quote_and_backslash_in_the_path_stay_valid_json() -> None:
    data = RUNTIMES["es256"].prepare(
        b"GET", b'/api/v3/x"y\\z', b"", encode_request_headers([]), b"", 1_764_000_000.0
    )
    _, claims = verify_jwt(split(data)[2][b"Authorization"][7:].decode(), "es256")
    assert claims["uri"] == 'GET api.coinbase.com/api/v3/x"y\\z'
