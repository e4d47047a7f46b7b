"""Bybit v5 signing: ccxt's own ``bybit.sign`` (clock frozen) is the oracle, for HMAC and
RSA keys; unicode query values are checked against the documented formula instead."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

import ccxt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection
from tests.proxy.helpers import NOW, pem_of, random_hmac_secret, record, ring_of

SERVICE = ServiceConfig(
    name="bybit_trading",
    venue="bybit",
    key_type="exchange_api",
    upstream="https://api.bybit.com",
    route="/bybit",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
HMAC_KEY = "bybit-hmac-prop-0001"
HMAC_SECRET = "bybit-fixed-test-secret-for-property"
RSA_KEY = "bybit-rsa-prop-0001"
RSA_PRIVATE = rsa.generate_private_key(65537, 2048)
RSA_PEM = pem_of(RSA_PRIVATE)


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
    "hmac": runtime_with(record(HMAC_KEY, HMAC_SECRET)),
    "rsa": runtime_with(record(RSA_KEY, RSA_PEM, "rsa-pkcs1-sha256")),
}
ORACLES: dict[str, Any] = {
    "hmac": ccxt.bybit({"apiKey": HMAC_KEY, "secret": HMAC_SECRET}),
    "rsa": ccxt.bybit({"apiKey": RSA_KEY, "secret": RSA_PEM}),
}
for _oracle in ORACLES.values():
    _oracle.options["recvWindow"] = SERVICE.recv_window_ms


def test_no_published_vectors_are_misread(vectors: list[dict[str, Any]]) -> None:
    """Bybit's docs publish the formula but no key/signature pair; any vector added to the
    fixture for bybit must reproduce through the real signer."""
    for v in (v for v in vectors if v["venue"] == "bybit"):
        rt = runtime_with(record(v["api_key"], v["secret"], v["algorithm"]))
        data = rt.prepare(
            v["method"].encode(),
            v["path"].encode(),
            v.get("query", "").encode(),
            encode_request_headers([]),
            v.get("body", "").encode(),
            v["timestamp_ms"] / 1000,
        )
        assert split(data)[2][b"X-BAPI-SIGN"] == v["expected_signature"].encode()


def test_documented_get_and_post_plain_text() -> None:
    """The guide's examples: ``timestamp+api_key+recv_window+queryString`` for GET and
    ``...+raw_request_body`` for POST, hex HMAC-SHA256."""
    rt = RUNTIMES["hmac"]
    ts = 1658384314791
    data = rt.prepare(
        b"GET",
        b"/v5/order/realtime",
        b"category=option&symbol=BTC-29JUL22-25000-C",
        encode_request_headers([]),
        b"",
        ts / 1000,
    )
    _, target, headers, _ = split(data)
    plain = f"{ts}{HMAC_KEY}5000category=option&symbol=BTC-29JUL22-25000-C".encode()
    assert target == b"/v5/order/realtime?category=option&symbol=BTC-29JUL22-25000-C"
    assert (
        headers[b"X-BAPI-SIGN"]
        == hmac.new(HMAC_SECRET.encode(), plain, "sha256").hexdigest().encode()
    )
    assert headers[b"X-BAPI-TIMESTAMP"] == str(ts).encode()
    assert headers[b"X-BAPI-RECV-WINDOW"] == b"5000"
    assert headers[b"X-BAPI-API-KEY"] == HMAC_KEY.encode()

    body = b'{\n"category": "option"\n}'  # raw body, exactly as sent, whitespace included
    data = rt.prepare(
        b"POST",
        b"/v5/order/create",
        b"",
        encode_request_headers([(b"Content-Type", b"application/json")]),
        body,
        ts / 1000,
    )
    _, _, headers, sent = split(data)
    assert sent == body
    plain = f"{ts}{HMAC_KEY}5000".encode() + body
    assert (
        headers[b"X-BAPI-SIGN"]
        == hmac.new(HMAC_SECRET.encode(), plain, "sha256").hexdigest().encode()
    )


def test_recv_window_comes_from_the_service() -> None:
    from dataclasses import replace

    rt = runtime_with(record(HMAC_KEY, HMAC_SECRET), service=replace(SERVICE, recv_window_ms=20000))
    data = rt.prepare(
        b"GET", b"/v5/order/realtime", b"category=spot", encode_request_headers([]), b"", 1.0
    )
    _, _, headers, _ = split(data)
    assert headers[b"X-BAPI-RECV-WINDOW"] == b"20000"
    plain = f"1000{HMAC_KEY}20000category=spot".encode()
    assert (
        headers[b"X-BAPI-SIGN"]
        == hmac.new(HMAC_SECRET.encode(), plain, "sha256").hexdigest().encode()
    )


def test_engine_credential_headers_are_replaced() -> None:
    data = RUNTIMES["hmac"].prepare(
        b"GET",
        b"/v5/order/realtime",
        b"category=spot",
        encode_request_headers(
            [
                (b"X-BAPI-API-KEY", b"engine"),
                (b"X-BAPI-SIGN", b"forged"),
                (b"X-BAPI-TIMESTAMP", b"1"),
                (b"X-BAPI-RECV-WINDOW", b"60000"),
                (b"X-BAPI-SIGN-TYPE", b"2"),
            ]
        ),
        b"",
        NOW.timestamp(),
    )
    head = data.partition(b"\r\n\r\n")[0].lower()
    for name in (b"x-bapi-api-key", b"x-bapi-sign", b"x-bapi-timestamp", b"x-bapi-recv-window"):
        assert head.count(name + b":") == 1
    assert b"engine" not in head and b"forged" not in head and b"60000" not in head
    assert b"x-bapi-sign-type" not in head


def test_unsupported_algorithm_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with pytest.raises(SigningError, match="bybit keys are"):
        runtime_with(record("k", pem_of(ed25519.Ed25519PrivateKey.generate()), "ed25519"))
    with pytest.raises(SigningError, match="bybit keys are"):
        runtime_with(record("k", random_hmac_secret(), "hmac-sha512"))


_KEYS = st.text(st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=8)
# ccxt's bybit signs ``rawencode`` (the *unquoted* query) but sends it as is, so for GET it
# agrees with what goes on the wire only for values that need no percent-encoding.
_PLAIN_VALUES = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~"),
    max_size=12,
)
_UNICODE_VALUES = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_NOW_MS = st.integers(min_value=1_500_000_000_000, max_value=int(NOW.timestamp() * 1000))


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["hmac", "rsa"]),
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(
        ["v5/order/realtime", "v5/order/create", "v5/order/cancel", "v5/account/wallet-balance"]
    ),
    params=st.lists(st.tuples(_KEYS, _PLAIN_VALUES), max_size=6, unique_by=lambda kv: kv[0]),
    body_values=st.lists(_UNICODE_VALUES, max_size=6),
    now_ms=_NOW_MS,
)
def test_property_signature_matches_ccxt(
    kind: str,
    method: str,
    path: str,
    params: list[tuple[str, str]],
    body_values: list[str],
    now_ms: int,
) -> None:
    """GET: random parameter orders; POST: JSON bodies with unicode (or no body)."""
    oracle = ORACLES[kind]
    oracle.milliseconds = lambda: now_ms
    request = dict(params)
    if method == "POST":
        request = {k: body_values[i] for i, (k, _) in enumerate(params) if i < len(body_values)}
    expected = oracle.sign(path, "private", method, request)
    url = expected["url"].removeprefix("https://api.bybit.com")
    venue_path, _, query = url.encode().partition(b"?")
    body = (expected["body"] or "").encode() if method == "POST" else b""
    data = RUNTIMES[kind].prepare(
        method.encode(), venue_path, query, encode_request_headers([]), body, now_ms / 1000
    )
    _, target, headers, sent_body = split(data)
    assert target == (venue_path + b"?" + query if query else venue_path)
    assert sent_body == body
    for name in ("X-BAPI-API-KEY", "X-BAPI-TIMESTAMP", "X-BAPI-RECV-WINDOW", "X-BAPI-SIGN"):
        assert headers[name.encode()] == expected["headers"][name].encode(), name


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["hmac", "rsa"]),
    method=st.sampled_from([b"GET", b"DELETE"]),
    params=st.lists(st.tuples(_KEYS, _UNICODE_VALUES), max_size=6),
    now_ms=_NOW_MS,
)
def test_property_unicode_query_verifies_with_documented_formula(
    kind: str, method: bytes, params: list[tuple[str, str]], now_ms: int
) -> None:
    """Percent-encoded unicode, repeated names, any order: the signature covers the query
    exactly as it goes on the wire (formula from the guide, written here)."""
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params).encode()
    data = RUNTIMES[kind].prepare(
        method, b"/v5/order/realtime", query, encode_request_headers([]), b"", now_ms / 1000
    )
    _, target, headers, _ = split(data)
    sent_query = target.partition(b"?")[2]
    assert sent_query == query
    key = HMAC_KEY if kind == "hmac" else RSA_KEY
    plain = b"%d%s5000%s" % (now_ms, key.encode(), sent_query)
    sig = headers[b"X-BAPI-SIGN"]
    if kind == "hmac":
        assert hmac.compare_digest(
            sig, hmac.new(HMAC_SECRET.encode(), plain, hashlib.sha256).hexdigest().encode()
        )
    else:
        RSA_PRIVATE.public_key().verify(
            base64.b64decode(sig), plain, padding.PKCS1v15(), hashes.SHA256()
        )


def envelope(code: int, msg: str) -> dict[str, object]:
    return {"retCode": code, "retMsg": msg, "result": {}, "retExtInfo": {}, "time": 1672211918471}


# retCodes and HTTP statuses from https://bybit-exchange.github.io/docs/v5/error and
# /docs/v5/rate-limit (Bybit sends most of them with HTTP 200).
CLASSIFIED = [
    (200, envelope(10003, "API key is invalid."), Rejection.KEY_REJECTED),
    (401, envelope(10003, "API key is invalid."), Rejection.KEY_REJECTED),
    (
        200,
        envelope(10005, "Permission denied, please check your API key permissions."),
        Rejection.KEY_REJECTED,
    ),
    (
        200,
        envelope(10010, "Unmatched IP, please check your API key's bound IP addresses."),
        Rejection.KEY_REJECTED,
    ),
    (
        200,
        envelope(10004, "Error sign, please check your signature generation algorithm."),
        Rejection.BAD_SIGNATURE,
    ),
    (
        200,
        envelope(10002, "The request time exceeds the time window range."),
        Rejection.CLOCK_OR_NONCE,
    ),
    (200, envelope(10006, "Too many visits. Exceeded the API Rate Limit."), Rejection.RATE_LIMITED),
    (200, envelope(10018, "Exceeded the IP Rate Limit."), Rejection.RATE_LIMITED),
    (200, envelope(10009, "IP has been banned."), Rejection.BANNED),
    (200, envelope(110001, "Order does not exist"), Rejection.OTHER),
    (200, envelope(170213, "Order does not exist."), Rejection.OTHER),
    (200, envelope(10001, "Request parameter error"), Rejection.OTHER),
    (
        200,
        {"retCode": 0, "retMsg": "OK", "result": {"orderId": "1"}, "retExtInfo": {}, "time": 1},
        None,
    ),
    (403, None, Rejection.BANNED),  # "access too frequent": an HTML/plain page, no JSON
    (401, None, Rejection.KEY_REJECTED),
    (429, None, Rejection.RATE_LIMITED),
    (502, None, Rejection.OTHER),
    (200, None, None),
]


@pytest.mark.parametrize(("status", "body", "expected"), CLASSIFIED)
def test_classifier_table(status: int, body: object, expected: Rejection | None) -> None:
    raw = b"<html>403 Forbidden</html>" if body is None else json.dumps(body).encode()
    assert VENUES["bybit"].classify(status, raw) is expected
    compact = json.dumps(body, separators=(",", ":")).encode() if body is not None else raw
    assert VENUES["bybit"].classify(status, compact) is expected


def test_time_endpoint_parses_documented_answer() -> None:
    endpoint = VENUES["bybit"].time_endpoint
    assert endpoint is not None and endpoint.path == b"/v5/market/time"
    body = (
        b'{"retCode":0,"retMsg":"OK","result":{"timeSecond":"1688639403",'
        b'"timeNano":"1688639403423213947"},"retExtInfo":{},"time":1688639403423}'
    )
    assert endpoint.parse(body) == pytest.approx(1688639403423.213947)
    assert endpoint.parse(b'{"retCode":0,"result":{},"time":1688639403424}') == 1688639403424.0
    with pytest.raises(ValueError):
        endpoint.parse(b'{"retCode":0,"result":{}}')
