"""Binance USD-M futures (``venue: binance_usdm``): the sidecar against ccxt and the docs.

The signer is Binance's (``proxy/signers/binance.py``, ``BINANCE_USDM``); what is checked
here is the futures service as configured: the published futures example, ccxt's own
``binanceusdm.sign()`` with its clock frozen as an independent oracle, and the
classifier with the error bodies fapi actually sends.
"""

from __future__ import annotations

import functools
import secrets
from typing import Any
from urllib.parse import unquote

import ccxt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ServiceConfig
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection
from tests.proxy.helpers import NOW, pem_of, record, ring_of

SERVICE = ServiceConfig(
    name="binance_futures_trading",
    venue="binance_usdm",
    key_type="exchange_api",
    upstream="https://fapi.binance.com",
    route="/fapi",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
NOW_MS = int(NOW.timestamp() * 1000)
FORM = [(b"Content-Type", b"application/x-www-form-urlencoded")]

# The HMAC example of the USD-M "General Info" page (SIGNED Endpoint Examples for
# POST /fapi/v1/order - HMAC Keys):
# https://developers.binance.com/docs/derivatives/usds-margined-futures/general-info
# Example 3 (mixed query and body) is not used: the published signature covers
# "timestamp= 1591702613943" with a stray space, which no real request carries.
DOC_API_KEY = "dbefbc809e3e83c283a984c3a1459732ea7db1360ca80c5c2c8867408d28cc83"
DOC_SECRET = "2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9"
DOC_PARAMS = (
    "symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=9000&timeInForce=GTC&recvWindow=5000"
)
DOC_TIMESTAMP = 1591702613943
DOC_SIGNATURE = "3c661234138461fcc7a7d8746c6558c9842d4e10870d2ecbedf7777cad694af9"


def runtime(
    key_id: str, secret: str, algorithm: str = "hmac-sha256", at: Any = None
) -> ServiceRuntime:
    rt = ServiceRuntime(SERVICE, None)
    if at is None:
        ring = ring_of(SERVICE.name, record(key_id, secret, algorithm))
    else:
        from datetime import timedelta

        from keycache.record import make_record
        from tests.proxy.helpers import PERMS

        rec = make_record(
            key_id,
            secret,
            algorithm=algorithm,
            created_at=at - timedelta(days=1),
            expires_at=at + timedelta(days=1),
            permissions=PERMS,
        )
        ring = ring_of(SERVICE.name, rec, now=at)
    rt.keys = KeySet(ring, rt.venue, SERVICE)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return method, target, headers, body


# The same example in the fixture's shape, so that a binance_usdm vector added to
# tests/fixtures/published_vectors.json is reproduced by the same code.
DOC_VECTOR: dict[str, Any] = {
    "venue": "binance_usdm",
    "algorithm": "hmac-sha256",
    "api_key": DOC_API_KEY,
    "secret": DOC_SECRET,
    "signed_payload": f"{DOC_PARAMS}&timestamp={DOC_TIMESTAMP}",
    "expected_signature": DOC_SIGNATURE,
}


def reproduce(v: dict[str, Any], *, in_body: bool) -> None:
    """Send the vector's parameters (minus timestamp) through the sidecar at the vector's
    instant; the signed request must be exactly the published one."""
    from datetime import UTC, datetime

    params, _, ts = v["signed_payload"].rpartition("&timestamp=")
    at = datetime.fromtimestamp(int(ts) / 1000, UTC)
    rt = runtime(v["api_key"], v["secret"], v["algorithm"], at=at)
    # The engine also sends a stale credential the signer must replace.
    engine = params.encode() + b"&timestamp=1&signature=00"
    query, body = (b"", engine) if in_body else (engine, b"")
    data = rt.prepare(
        b"POST",
        b"/fapi/v1/order",
        query,
        encode_request_headers(FORM if in_body else []),
        body,
        int(ts) / 1000,
    )
    _, target, headers, sent_body = split(data)
    expected = f"{v['signed_payload']}&signature={v['expected_signature']}".encode()
    if in_body:
        assert (target, sent_body) == (b"/fapi/v1/order", expected)
    else:
        assert (target, sent_body) == (b"/fapi/v1/order?" + expected, b"")
    assert headers[b"X-MBX-APIKEY"] == v["api_key"].encode()


def test_published_vectors(vectors: list[dict[str, Any]]) -> None:
    """The futures docs' example, and any binance_usdm vector of the shared fixture."""
    for v in [DOC_VECTOR, *(v for v in vectors if v["venue"] == "binance_usdm")]:
        reproduce(v, in_body=False)


def test_published_example_in_a_form_body() -> None:
    reproduce(DOC_VECTOR, in_body=True)


# ----- ccxt's binanceusdm.sign() as the oracle


@functools.cache
def _ccxt_urlencode() -> Any:
    return ccxt.binanceusdm().urlencode


def ccxt_signed(
    api_key: str, secret: str, method: str, params: dict[str, Any], now_ms: int
) -> dict[str, Any]:
    """What ccxt sends for ``params`` on /fapi/v1/order, with the clock frozen at ``now_ms``.

    One thing is pinned besides the clock: ccxt puts ``timestamp`` first while the sidecar
    appends it (after ``recvWindow``), so ccxt's parameter order is made the sidecar's by
    moving ``timestamp`` last before ccxt url-encodes and signs. Encoding, key handling,
    signature encoding and placement (query for GET/DELETE, form body otherwise) are all
    ccxt's own.
    """
    exchange = ccxt.binanceusdm({"apiKey": api_key, "secret": secret})
    exchange.options["recvWindow"] = SERVICE.recv_window_ms
    exchange.nonce = lambda: now_ms
    encode = _ccxt_urlencode()

    def timestamp_last(values: dict[str, Any], *args: Any) -> str:
        moved = {k: v for k, v in values.items() if k != "timestamp"}
        moved["timestamp"] = values["timestamp"]
        return str(encode(moved, *args))

    exchange.urlencode = timestamp_last
    return dict(exchange.sign("order", "fapiPrivate", method, dict(params)))


_NAME = st.text(st.characters(min_codepoint=0x30, max_codepoint=0x7A), min_size=1, max_size=8)
_VALUE = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.integers(0, 10**12),
    st.decimals(min_value=0, max_value=10**6, places=4).map(str),
)
_RESERVED = {"timestamp", "signature", "recvWindow", "newClientOrderId"}


@st.composite
def order_params(draw: st.DrawFn, method: str) -> dict[str, Any]:
    names = draw(st.lists(_NAME.filter(lambda n: n not in _RESERVED), unique=True, max_size=6))
    params: dict[str, Any] = {n: draw(_VALUE) for n in names}
    if draw(st.booleans()):  # the engine may choose its own recvWindow, anywhere
        items = list(params.items())
        items.insert(draw(st.integers(0, len(items))), ("recvWindow", draw(st.integers(1, 60000))))
        params = dict(items)
    if method == "POST":  # ccxt would invent a broker id otherwise
        params["newClientOrderId"] = draw(st.from_regex(r"[A-Za-z0-9_-]{1,36}", fullmatch=True))
    elif method == "PUT" and not params:
        params["symbol"] = "BTCUSDT"  # a form body must not be empty to be a body
    return params


@settings(max_examples=200, deadline=None)
@given(data=st.data(), method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]))
def test_property_matches_ccxt_binanceusdm_byte_for_byte(data: st.DataObject, method: str) -> None:
    params = data.draw(order_params(method))
    now_ms = data.draw(st.integers(NOW_MS - 80_000_000, NOW_MS + 29 * 86_400_000))
    secret = data.draw(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=16, max_size=64)
    )
    api_key = "k" + secrets.token_hex(8)
    expected = ccxt_signed(api_key, secret, method, params, now_ms)

    encoded = str(_ccxt_urlencode()(params)).encode()
    in_body = method in ("POST", "PUT")
    rt = runtime(api_key, secret)
    sent = rt.prepare(
        method.encode(),
        b"/fapi/v1/order",
        b"" if in_body else encoded,
        encode_request_headers(FORM if in_body else []),
        encoded if in_body else b"",
        now_ms / 1000,
    )
    sent_method, target, headers, body = split(sent)
    assert sent_method == method.encode()
    assert b"https://fapi.binance.com" + target == expected["url"].encode()
    assert body == (expected["body"] or "").encode()
    assert headers[b"X-MBX-APIKEY"] == expected["headers"]["X-MBX-APIKEY"].encode()


@pytest.fixture(scope="module")
def asymmetric_keys() -> dict[str, str]:
    return {
        "ed25519": pem_of(ed25519.Ed25519PrivateKey.generate()),
        "rsa-pkcs1-sha256": pem_of(rsa.generate_private_key(65537, 2048)),
    }


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa-pkcs1-sha256"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_asymmetric_keys_match_ccxt(
    asymmetric_keys: dict[str, str], algorithm: str, method: str
) -> None:
    """Ed25519 and RSA PKCS#1 v1.5 signatures are deterministic: byte equality holds."""
    pem = asymmetric_keys[algorithm]
    params = {"symbol": "BTCUSDT", "side": "BUY", "note": "ü / +=&"}
    if method == "POST":
        params["newClientOrderId"] = "asym-1"
    expected = ccxt_signed("asym-key", pem, method, params, NOW_MS)
    encoded = str(_ccxt_urlencode()(params)).encode()
    rt = runtime("asym-key", pem, algorithm)
    in_body = method == "POST"
    sent = rt.prepare(
        method.encode(),
        b"/fapi/v1/order",
        b"" if in_body else encoded,
        encode_request_headers(FORM if in_body else []),
        encoded if in_body else b"",
        NOW.timestamp(),
    )
    _, target, _, body = split(sent)
    assert b"https://fapi.binance.com" + target == expected["url"].encode()
    assert body == (expected["body"] or "").encode()
    signature = (expected["body"] or expected["url"]).rpartition("&signature=")[2]
    assert unquote(signature).endswith("=")  # base64, percent-encoded by both


# ----- classifier, with the bodies fapi sends (error-code page; -2015 names the IP)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"orderId":1}', None),
        (
            401,
            b'{"code":-2015,"msg":"Invalid API-key, IP, or permissions for action, '
            b'request ip: 203.0.113.7"}',
            Rejection.KEY_REJECTED,
        ),
        (401, b'{"code":-2014,"msg":"API-key format invalid."}', Rejection.KEY_REJECTED),
        (
            400,
            b'{"code":-1022,"msg":"Signature for this request is not valid."}',
            Rejection.BAD_SIGNATURE,
        ),
        (
            400,
            b'{"code":-1021,"msg":"Timestamp for this request is outside of the recvWindow."}',
            Rejection.CLOCK_OR_NONCE,
        ),
        (
            400,
            b'{"code":-1021,"msg":"Timestamp for this request was 1000ms ahead of the server\'s time."}',
            Rejection.CLOCK_OR_NONCE,
        ),
        (
            429,
            b'{"code":-1003,"msg":"Too many requests; current limit is 2400 requests per minute."}',
            Rejection.RATE_LIMITED,
        ),
        (
            429,
            b'{"code":-1015,"msg":"Too many new orders; current limit is 1200 orders per MINUTE."}',
            Rejection.RATE_LIMITED,
        ),
        (418, b"", Rejection.BANNED),
        (
            400,
            b'{"code":-4164,"msg":"Order\'s notional must be no smaller than 100"}',
            Rejection.OTHER,
        ),
        (400, b'{"code":-2019,"msg":"Margin is insufficient."}', Rejection.OTHER),
        (
            503,
            b'{"code":-1008,"msg":"Request throttled by system-level protection."}',
            Rejection.OTHER,
        ),
    ],
)
def test_classifier_with_futures_bodies(
    status: int, body: bytes, expected: Rejection | None
) -> None:
    assert VENUES["binance_usdm"].classify(status, body) is expected


def test_time_endpoint_is_fapi() -> None:
    endpoint = VENUES["binance_usdm"].time_endpoint
    assert endpoint is not None
    assert endpoint.path == b"/fapi/v1/time"
    assert endpoint.parse(b'{"serverTime":1499827319559}') == 1499827319559.0
