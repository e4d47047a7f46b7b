"""Gemini signing: the published example, ccxt's ``gemini.sign`` as the oracle (nonce
frozen), the payload built from the engine's JSON body, and the classifier."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

import ccxt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ServiceConfig
from proxy.errors import BadRequest, SigningError
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection
from proxy.signers.gemini import engine_members
from tests.proxy.helpers import NOW, random_hmac_secret, record, ring_of

SERVICE = ServiceConfig(
    name="gemini_trading",
    venue="gemini",
    key_type="exchange_api",
    upstream="https://api.gemini.com",
    route="/gemini",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
NOW_MS = int(NOW.timestamp() * 1000)


def runtime_with(key_id: str, secret: str, algorithm: str = "hmac-sha384") -> ServiceRuntime:
    rt = ServiceRuntime(SERVICE, None)
    rt.keys = KeySet(ring_of(SERVICE.name, record(key_id, secret, algorithm)), rt.venue, SERVICE)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    return method, target, headers, body  # type: ignore[return-value]


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    (value,) = [v for n, v in headers if n.lower() == name.lower()]
    return value


def send(
    rt: ServiceRuntime, path: bytes, body: bytes, now_ms: int = NOW_MS
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes, bytes]:
    """(target, headers, sent body, decoded payload)."""
    data = rt.prepare(b"POST", path, b"", encode_request_headers([]), body, now_ms / 1000)
    _, target, headers, sent = split(data)
    payload = base64.b64decode(header(headers, b"X-GEMINI-PAYLOAD"), validate=True)
    return target, headers, sent, payload


def test_published_vector_payload_and_signature(vectors: list[dict[str, Any]]) -> None:
    """The docs' exact payload bytes (pretty-printed, as published) through the signer's
    base64 + HMAC-SHA384 step."""
    (v,) = [v for v in vectors if v["venue"] == "gemini"]
    rt = runtime_with("gemini-doc-" + secrets.token_hex(4), v["secret"])
    assert rt.keys is not None
    signer: Any = rt.keys.signer_for(NOW.timestamp())
    encoded, signature = signer.sign_payload(v["payload_json"].encode())
    assert encoded == v["expected_payload_b64"].encode()
    assert signature == v["expected_signature"].encode()


def test_published_vector_through_prepare(vectors: list[dict[str, Any]]) -> None:
    """The same request sent by an engine: the payload carries the same members."""
    (v,) = [v for v in vectors if v["venue"] == "gemini"]
    doc = json.loads(v["payload_json"])
    rt = runtime_with("gemini-doc-" + secrets.token_hex(4), v["secret"])
    target, headers, sent, payload = send(
        rt, doc["request"].encode(), b'{\n    "order_id": 18834\n}\n', doc["nonce"]
    )
    assert target == b"/v1/order/status" and sent == b""
    assert payload == b'{"request":"/v1/order/status","nonce":123456,"order_id": 18834}'
    assert json.loads(payload) == doc
    expected = hmac.new(
        v["secret"].encode(), header(headers, b"X-GEMINI-PAYLOAD"), hashlib.sha384
    ).hexdigest()
    assert header(headers, b"X-GEMINI-SIGNATURE") == expected.encode()


def test_headers_as_documented_and_body_empty() -> None:
    rt = runtime_with("account-" + secrets.token_hex(4), random_hmac_secret())
    data = rt.prepare(
        b"POST",
        b"/v1/order/new",
        b"",
        encode_request_headers([(b"X-GEMINI-SIGNATURE", b"forged"), (b"X-Trace", b"1")]),
        b'{"symbol":"btcusd","amount":"1","price":"100","side":"buy","type":"exchange limit"}',
        NOW.timestamp(),
    )
    _, _, headers, body = split(data)
    assert body == b""
    assert header(headers, b"Content-Type") == b"text/plain"
    assert header(headers, b"Content-Length") == b"0"
    assert header(headers, b"Cache-Control") == b"no-cache"
    assert header(headers, b"X-Trace") == b"1"
    assert b"forged" not in data


@pytest.mark.parametrize(
    ("body", "members"),
    [
        (b"", b""),
        (b"  \n", b""),
        (b"{}", b""),
        (b' { "a" : 1 } ', b'"a" : 1'),
        (b'{"request":"/v1/x","nonce":9,"a":[1, 2]}', b'"a":[1, 2]'),
        (
            b'{"a":{"nonce":1},"nonce":"2","b":"\\"request\\""}',
            b'"a":{"nonce":1},"b":"\\"request\\""',
        ),
        (b'{"price":0.10000000000000000001}', b'"price":0.10000000000000000001'),
        (b'{"nonce":1}', b""),
    ],
)
def test_engine_members(body: bytes, members: bytes) -> None:
    assert engine_members(body) == members


@pytest.mark.parametrize(
    "body", [b"[1]", b"symbol=btcusd", b'{"nonce":1,}', b'{"nonce":1} x', b"\xff{}", b'"x"']
)
def test_non_object_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(BadRequest):
        engine_members(body)


def test_nonces_increase_and_survive_rebuilds() -> None:
    key_id, secret = "account-" + secrets.token_hex(4), random_hmac_secret()
    rt = runtime_with(key_id, secret)
    nonces = [json.loads(send(rt, b"/v1/orders", b"")[3])["nonce"] for _ in range(20)]
    assert nonces == sorted(set(nonces)) and nonces[0] == NOW_MS
    again = runtime_with(key_id, secret)
    assert json.loads(send(again, b"/v1/orders", b"", NOW_MS - 1000)[3])["nonce"] > nonces[-1]


def test_only_hmac_sha384_keys() -> None:
    with pytest.raises(SigningError, match="hmac-sha384"):
        runtime_with("account-x", random_hmac_secret(), algorithm="hmac-sha256")


# --------------------------------------------------------------------------- ccxt oracle

ORACLE_KEY = "account-prop-" + secrets.token_hex(6)  # ccxt insists on an account key
ORACLE_SECRET = random_hmac_secret()
ORACLE_RT = runtime_with(ORACLE_KEY, ORACLE_SECRET)
ORACLE: Any = ccxt.gemini({"apiKey": ORACLE_KEY, "secret": ORACLE_SECRET})

names = st.text(min_size=1, max_size=8).filter(lambda n: n not in ("request", "nonce"))
scalars = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none())
values = st.one_of(scalars, st.lists(scalars, max_size=3))


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(names, values, max_size=6),
    endpoint=st.sampled_from(["v1/order/new", "v1/order/cancel", "v1/orders", "v1/balances"]),
    method=st.sampled_from([b"POST", b"GET", b"DELETE"]),
)
def test_property_ccxt_builds_the_same_payload(
    params: dict[str, Any], endpoint: str, method: bytes
) -> None:
    """The engine sends ccxt's JSON body; the sidecar's payload is ccxt's payload byte for
    byte (up to the nonce's type: the docs write a number, ccxt a string) and its
    signature is ccxt's HMAC of the base64 payload the sidecar sent."""
    engine_body = ORACLE.json(params).encode() if params else b""
    data = ORACLE_RT.prepare(
        method, b"/" + endpoint.encode(), b"", b"", engine_body, NOW.timestamp()
    )
    _, target, headers, sent = split(data)
    b64 = header(headers, b"X-GEMINI-PAYLOAD")
    payload = base64.b64decode(b64)
    nonce = json.loads(payload)["nonce"]
    ORACLE.nonce = lambda: nonce
    expected = ORACLE.sign(endpoint, "private", "POST", dict(params))
    theirs = base64.b64decode(expected["headers"]["X-GEMINI-PAYLOAD"])
    assert payload == theirs.replace(b'"nonce":"%d"' % nonce, b'"nonce":%d' % nonce, 1)
    assert target == expected["url"].removeprefix("https://api.gemini.com").encode()
    assert sent == b""
    signature = ORACLE.hmac(b64, ORACLE_SECRET.encode(), hashlib.sha384)
    assert header(headers, b"X-GEMINI-SIGNATURE") == signature.encode()
    assert header(headers, b"X-GEMINI-APIKEY") == ORACLE_KEY.encode()


@settings(max_examples=100, deadline=None)
@given(
    params=st.dictionaries(st.sampled_from(["request", "nonce", "a", "b", "ü"]), values),
    indent=st.none() | st.integers(min_value=0, max_value=4),
    ascii_only=st.booleans(),
)
def test_property_any_json_formatting_verifies(
    params: dict[str, Any], indent: int | None, ascii_only: bool
) -> None:
    """Pretty-printed or unicode engine bodies, even with their own request/nonce: the
    payload decodes to the engine's members plus ours, and the documented HMAC verifies."""
    body = json.dumps(params, indent=indent, ensure_ascii=ascii_only).encode()
    _, headers, _, payload = send(ORACLE_RT, b"/v1/order/new", body)
    decoded = json.loads(payload)
    expected = {k: v for k, v in params.items() if k not in ("request", "nonce")}
    assert decoded == {"request": "/v1/order/new", "nonce": decoded["nonce"], **expected}
    assert list(decoded)[:2] == ["request", "nonce"]
    b64 = header(headers, b"X-GEMINI-PAYLOAD")
    assert b64 == base64.b64encode(payload)
    signature = hmac.new(ORACLE_SECRET.encode(), b64, hashlib.sha384).hexdigest()
    assert header(headers, b"X-GEMINI-SIGNATURE") == signature.encode()


# --------------------------------------------------------------------------- classifier

GEMINI = VENUES["gemini"]


def err(reason: str, message: str = "x") -> bytes:
    return json.dumps({"result": "error", "reason": reason, "message": message}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"order_id":"1","is_live":true}', None),
        (400, err("InvalidApiKey", "Invalid API key"), Rejection.KEY_REJECTED),
        (400, err("MissingApikeyHeader"), Rejection.KEY_REJECTED),
        (400, err("InvalidSignature"), Rejection.BAD_SIGNATURE),
        (400, err("MissingSignatureHeader"), Rejection.BAD_SIGNATURE),
        (400, err("MissingPayloadHeader"), Rejection.BAD_SIGNATURE),
        (
            400,
            err("InvalidNonce", "Nonce '1' has not increased since your last call."),
            Rejection.CLOCK_OR_NONCE,
        ),
        (429, err("RateLimit", "Requests were made too frequently"), Rejection.RATE_LIMITED),
        (429, b"", Rejection.RATE_LIMITED),
        (406, err("InsufficientFunds"), Rejection.OTHER),
        (404, err("OrderNotFound"), Rejection.OTHER),
        (403, err("MissingRole"), Rejection.OTHER),
        (503, err("Maintenance"), Rejection.OTHER),
    ],
)
def test_classifier(status: int, body: bytes, expected: Rejection | None) -> None:
    assert GEMINI.classify(status, body) is expected


def test_no_time_endpoint() -> None:
    assert GEMINI.time_endpoint is None


def test_engine_content_type_is_replaced_not_repeated() -> None:
    rt = runtime_with("gem-key", random_hmac_secret())
    data = rt.prepare(
        b"POST",
        b"/v1/order/new",
        b"",
        encode_request_headers(
            [
                (b"Content-Type", b"application/json"),
                (b"User-Agent", b"engine/1"),
                (b"cache-control", b"max-age=0"),
            ]
        ),
        b'{"symbol":"btcusd"}',
        NOW.timestamp(),
    )
    _, _, headers, _ = split(data)
    assert [v for n, v in headers if n.lower() == b"content-type"] == [b"text/plain"]
    assert [v for n, v in headers if n.lower() == b"cache-control"] == [b"no-cache"]
    assert header(headers, b"User-Agent") == b"engine/1"
