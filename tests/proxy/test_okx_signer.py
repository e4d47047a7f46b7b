"""OKX v5 signing: ccxt's own ``okx.sign`` (clock frozen) is the oracle."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import timedelta
from typing import Any

import ccxt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keycache.record import make_record
from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection
from tests.proxy.helpers import NOW, PERMS, random_hmac_secret, record, ring_of

SERVICE = ServiceConfig(
    name="okx_trading",
    venue="okx",
    key_type="exchange_api",
    upstream="https://www.okx.com",
    route="/okx",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
API_KEY = "okx-prop-key-0001"
SECRET = "okx-fixed-test-secret-for-property"
PASSPHRASE = "Pass phrase: 1!"  # spaces and punctuation travel as-is in the header


def okx_record(key_id: str, secret: str, passphrase: str | None) -> dict[str, object]:
    return make_record(
        key_id,
        secret,
        created_at=NOW - timedelta(days=1),
        expires_at=NOW + timedelta(days=30),
        permissions=PERMS,
        passphrase=passphrase,
    )


def runtime_with(*records: dict[str, object]) -> ServiceRuntime:
    rt = ServiceRuntime(SERVICE, None)
    rt.keys = KeySet(ring_of(SERVICE.name, *records), rt.venue, SERVICE)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return method, target, headers, body


RUNTIME = runtime_with(okx_record(API_KEY, SECRET, PASSPHRASE))
ORACLE: Any = ccxt.okx({"apiKey": API_KEY, "secret": SECRET, "password": PASSPHRASE})


def test_no_published_vectors_are_misread(vectors: list[dict[str, Any]]) -> None:
    """OKX's docs publish the formula but no key/signature pair; any vector added to the
    fixture for okx must reproduce through the real signer."""
    for v in (v for v in vectors if v["venue"] == "okx"):
        rt = runtime_with(okx_record(v["api_key"], v["secret"], v.get("passphrase", "p")))
        data = rt.prepare(
            v["method"].encode(),
            v["path"].encode(),
            v.get("query", "").encode(),
            encode_request_headers([]),
            v.get("body", "").encode(),
            v["timestamp_ms"] / 1000,
        )
        assert split(data)[2][b"OK-ACCESS-SIGN"] == v["expected_signature"].encode()


def test_documented_example_prehash() -> None:
    """The docs' example: sign(timestamp + 'GET' + '/api/v5/account/balance?ccy=BTC')."""
    ts_ms = 1607418537715  # 2020-12-08T09:08:57.715Z, the docs' example timestamp
    data = RUNTIME.prepare(
        b"GET",
        b"/api/v5/account/balance",
        b"ccy=BTC",
        encode_request_headers([]),
        b"",
        ts_ms / 1000,
    )
    _, target, headers, body = split(data)
    assert target == b"/api/v5/account/balance?ccy=BTC"
    assert headers[b"OK-ACCESS-TIMESTAMP"] == b"2020-12-08T09:08:57.715Z"
    prehash = b"2020-12-08T09:08:57.715ZGET/api/v5/account/balance?ccy=BTC"
    expected = base64.b64encode(hmac.new(SECRET.encode(), prehash, hashlib.sha256).digest())
    assert headers[b"OK-ACCESS-SIGN"] == expected
    assert headers[b"OK-ACCESS-KEY"] == API_KEY.encode()
    assert headers[b"OK-ACCESS-PASSPHRASE"] == PASSPHRASE.encode()
    assert body == b""


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, b"1970-01-01T00:00:00.000Z"),
        (1607418537005, b"2020-12-08T09:08:57.005Z"),
        (1607418537999, b"2020-12-08T09:08:57.999Z"),
        (1607418538000, b"2020-12-08T09:08:58.000Z"),
    ],
)
def test_timestamp_format_and_second_cache(ms: int, text: bytes) -> None:
    data = RUNTIME.prepare(b"GET", b"/x", b"", encode_request_headers([]), b"", ms / 1000)
    assert split(data)[2][b"OK-ACCESS-TIMESTAMP"] == text


def test_engine_credential_headers_are_replaced() -> None:
    data = RUNTIME.prepare(
        b"POST",
        b"/api/v5/trade/order",
        b"",
        encode_request_headers(
            [
                (b"OK-ACCESS-KEY", b"engine"),
                (b"ok-access-sign", b"forged"),
                (b"OK-ACCESS-TIMESTAMP", b"2000-01-01T00:00:00.000Z"),
                (b"OK-ACCESS-PASSPHRASE", b"guess"),
                (b"Content-Type", b"application/json"),
            ]
        ),
        b'{"instId":"BTC-USDT"}',
        NOW.timestamp(),
    )
    head = data.partition(b"\r\n\r\n")[0].lower()
    for name in (b"ok-access-key", b"ok-access-sign", b"ok-access-timestamp"):
        assert head.count(name + b":") == 1
    assert b"engine" not in head and b"forged" not in head and b"guess" not in head
    assert b"content-type: application/json" in head


def test_key_without_passphrase_or_with_wrong_algorithm_is_refused() -> None:
    with pytest.raises(SigningError, match="passphrase"):
        runtime_with(okx_record("k", random_hmac_secret(), None))
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.proxy.helpers import pem_of

    with pytest.raises(SigningError, match="okx keys are hmac-sha256"):
        runtime_with(record("k", pem_of(ed25519.Ed25519PrivateKey.generate()), "ed25519"))


_KEYS = st.text(st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=8)
_VALUES = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(
        ["trade/orders-pending", "trade/cancel-order", "account/balance", "trade/amend-order"]
    ),
    params=st.lists(st.tuples(_KEYS, _VALUES), max_size=6, unique_by=lambda kv: kv[0]),
    now_ms=st.integers(min_value=1_500_000_000_000, max_value=int(NOW.timestamp() * 1000)),
)
def test_property_signature_matches_ccxt(
    method: str, path: str, params: list[tuple[str, str]], now_ms: int
) -> None:
    """Random parameter orders, unicode values, empty and JSON bodies: ccxt signs the same."""
    ORACLE.milliseconds = lambda: now_ms
    expected = ORACLE.sign(path, "private", method, dict(params))
    target = expected["url"].removeprefix("https://www.okx.com").encode()
    venue_path, _, query = target.partition(b"?")
    body = (expected["body"] or "").encode()
    data = RUNTIME.prepare(
        method.encode(), venue_path, query, encode_request_headers([]), body, now_ms / 1000
    )
    _, sent_target, headers, sent_body = split(data)
    assert sent_target == target
    assert sent_body == body
    for name in ("OK-ACCESS-KEY", "OK-ACCESS-SIGN", "OK-ACCESS-TIMESTAMP", "OK-ACCESS-PASSPHRASE"):
        assert headers[name.encode()] == expected["headers"][name].encode(), name


# Real bodies from https://www.okx.com/docs-v5/en/#error-code (HTTP status, body).
CLASSIFIED = [
    (401, {"msg": "Invalid OK-ACCESS-KEY", "code": "50111"}, Rejection.KEY_REJECTED),
    (
        401,
        {"msg": 'Request header "OK-ACCESS-PASSPHRASE" incorrect.', "code": "50105"},
        Rejection.KEY_REJECTED,
    ),
    (
        401,
        {"msg": "APIKey does not match current environment.", "code": "50101"},
        Rejection.KEY_REJECTED,
    ),
    (401, {"msg": "Invalid Sign", "code": "50113"}, Rejection.BAD_SIGNATURE),
    (401, {"msg": "Timestamp request expired", "code": "50102"}, Rejection.CLOCK_OR_NONCE),
    (401, {"msg": "Invalid OK-ACCESS-TIMESTAMP", "code": "50112"}, Rejection.CLOCK_OR_NONCE),
    (429, {"msg": "Too Many Requests", "code": "50011"}, Rejection.RATE_LIMITED),
    (200, {"msg": "Sub-account rate limit reached", "code": "50061"}, Rejection.RATE_LIMITED),
    (400, {"msg": "Parameter instId cannot be empty", "code": "50014"}, Rejection.OTHER),
    (
        200,
        {
            "code": "1",
            "msg": "All operations failed",
            "data": [
                {
                    "clOrdId": "",
                    "ordId": "",
                    "sCode": "51008",
                    "sMsg": "Insufficient balance",
                    "tag": "",
                }
            ],
        },
        Rejection.OTHER,
    ),
    (
        200,
        {"code": "0", "msg": "", "data": [{"ordId": "1", "sCode": "0", "sMsg": "Order placed"}]},
        None,
    ),
    (429, None, Rejection.RATE_LIMITED),
    (401, None, Rejection.KEY_REJECTED),
    (503, None, Rejection.OTHER),
]


@pytest.mark.parametrize(("status", "body", "expected"), CLASSIFIED)
def test_classifier_table(status: int, body: object, expected: Rejection | None) -> None:
    raw = b"<html>busy</html>" if body is None else json.dumps(body).encode()
    assert VENUES["okx"].classify(status, raw) is expected
    compact = json.dumps(body, separators=(",", ":")).encode() if body is not None else raw
    assert VENUES["okx"].classify(status, compact) is expected


def test_time_endpoint_parses_documented_answer() -> None:
    endpoint = VENUES["okx"].time_endpoint
    assert endpoint is not None and endpoint.path == b"/api/v5/public/time"
    body = b'{"code":"0","msg":"","data":[{"ts":"1597026383085"}]}'
    assert endpoint.parse(body) == 1597026383085.0
    with pytest.raises(ValueError):
        endpoint.parse(b'{"code":"0","data":[]}')
