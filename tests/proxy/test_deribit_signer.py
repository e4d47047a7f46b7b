"""Deribit signing: ccxt's ``deribit.sign`` as the oracle for query requests (clock and
nonce frozen), the documented formula written here for requests with a body (ccxt never
signs a body: it puts every private parameter in the query), and the classifier."""

from __future__ import annotations

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
from proxy.errors import SigningError
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection
from tests.proxy.helpers import NOW, random_hmac_secret, record, ring_of

SERVICE = ServiceConfig(
    name="deribit_trading",
    venue="deribit",
    key_type="exchange_api",
    upstream="https://www.deribit.com",
    route="/deribit",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
NOW_MS = int(NOW.timestamp() * 1000)


def runtime_with(key_id: str, secret: str, algorithm: str = "hmac-sha256") -> ServiceRuntime:
    rt = ServiceRuntime(SERVICE, None)
    rt.keys = KeySet(ring_of(SERVICE.name, record(key_id, secret, algorithm)), rt.venue, SERVICE)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return method, target, headers, body


def auth_fields(value: bytes) -> dict[str, str]:
    scheme, _, rest = value.decode().partition(" ")
    assert scheme == "deri-hmac-sha256"
    return dict(part.split("=", 1) for part in rest.split(","))


def documented_signature(secret: str, ts: str, nonce: str, method: str, uri: str, body: str) -> str:
    """docs.deribit.com/#authentication: RequestData = UPPERCASE(METHOD) + "\\n" + URI() +
    "\\n" + RequestBody + "\\n"; StringToSign = Timestamp + "\\n" + Nonce + "\\n" +
    RequestData; Signature = HEX(HMAC-SHA256(ClientSecret, StringToSign))."""
    request_data = method.upper() + "\n" + uri + "\n" + body + "\n"
    string_to_sign = ts + "\n" + nonce + "\n" + request_data
    return hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()


def test_docs_shell_example_formula() -> None:
    """The docs' shell example (ClientSecret=ABCD, GET get_account_summary?currency=BTC)
    publishes no fixed output; the signer must agree with the formula for its inputs."""
    rt = runtime_with("AAAAAAAAAAA", "ABCD")
    data = rt.prepare(
        b"GET",
        b"/api/v2/private/get_account_summary",
        b"currency=BTC",
        encode_request_headers([(b"Authorization", b"Basic forged")]),
        b"",
        NOW.timestamp(),
    )
    _, target, headers, body = split(data)
    assert target == b"/api/v2/private/get_account_summary?currency=BTC" and body == b""
    assert b"forged" not in data
    fields = auth_fields(headers[b"Authorization"])
    assert list(fields) == ["id", "ts", "sig", "nonce"]
    assert fields["id"] == "AAAAAAAAAAA" and fields["ts"] == str(NOW_MS)
    assert len(fields["nonce"]) == 16
    assert fields["sig"] == documented_signature(
        "ABCD", fields["ts"], fields["nonce"], "GET", target.decode(), ""
    )


def test_nonces_are_single_use() -> None:
    rt = runtime_with("client-" + secrets.token_hex(4), random_hmac_secret())
    seen = set()
    for _ in range(200):
        data = rt.prepare(b"GET", b"/api/v2/private/get_positions", b"", b"", b"", NOW.timestamp())
        seen.add(auth_fields(split(data)[2][b"Authorization"])["nonce"])
    assert len(seen) == 200


def test_client_id_that_would_break_the_header_is_refused() -> None:
    with pytest.raises(SigningError, match="client id"):
        runtime_with("a,b", random_hmac_secret())
    with pytest.raises(SigningError, match="hmac-sha256"):
        runtime_with("client", random_hmac_secret(), algorithm="hmac-sha384")


# --------------------------------------------------------------------------- ccxt oracle

ORACLE_KEY = "client-prop-" + secrets.token_hex(4)
ORACLE_SECRET = random_hmac_secret()
ORACLE_RT = runtime_with(ORACLE_KEY, ORACLE_SECRET)
ORACLE: Any = ccxt.deribit({"apiKey": ORACLE_KEY, "secret": ORACLE_SECRET})

names = st.text(st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=10)
values = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12), st.integers(), st.booleans()
)


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(names, values, max_size=6),
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    endpoint=st.sampled_from(["buy", "sell", "cancel", "get_open_orders_by_instrument"]),
    skew_ms=st.integers(min_value=-(10**9), max_value=10**9),
)
def test_property_ccxt_signs_the_same_request(
    params: dict[str, Any], method: str, endpoint: str, skew_ms: int
) -> None:
    """Query requests (ccxt's encoding, unicode values): the Authorization header equals
    the one ccxt builds with our timestamp and nonce."""
    now_ms = NOW_MS + skew_ms
    query = ORACLE.urlencode(params) if params else ""
    path = f"/api/v2/private/{endpoint}"
    data = ORACLE_RT.prepare(
        method.encode(), path.encode(), query.encode(), b"", b"", now_ms / 1000
    )
    _, target, headers, body = split(data)
    fields = auth_fields(headers[b"Authorization"])
    ORACLE.nonce = lambda: fields["nonce"]
    ORACLE.milliseconds = lambda: now_ms
    expected = ORACLE.sign(endpoint, "private", method, dict(params))
    assert target == expected["url"].removeprefix("https://www.deribit.com").encode()
    assert headers[b"Authorization"] == expected["headers"]["Authorization"].encode()
    assert body == b""


@settings(max_examples=150, deadline=None)
@given(
    params=st.dictionaries(names, values, max_size=5),
    query=st.dictionaries(
        names, st.text(st.characters(exclude_categories=("Cs",)), max_size=6), max_size=3
    ),
    method=st.sampled_from(["POST", "PUT", "post"]),
    indent=st.none() | st.integers(min_value=0, max_value=2),
)
def test_property_bodies_follow_the_documented_formula(
    params: dict[str, Any], query: dict[str, str], method: str, indent: int | None
) -> None:
    """JSON-RPC bodies (any formatting, unicode): signed exactly as sent, per the docs."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "private/buy", "params": params},
        indent=indent,
        ensure_ascii=False,
    ).encode()
    raw_query = ORACLE.urlencode(query) if query else ""
    data = ORACLE_RT.prepare(
        method.encode(), b"/api/v2/private/buy", raw_query.encode(), b"", body, NOW.timestamp()
    )
    _, target, headers, sent = split(data)
    assert sent == body
    fields = auth_fields(headers[b"Authorization"])
    assert fields["sig"] == documented_signature(
        ORACLE_SECRET, fields["ts"], fields["nonce"], method, target.decode(), body.decode()
    )


# --------------------------------------------------------------------------- classifier

DERIBIT = VENUES["deribit"]


def err(code: int, message: str, data: object = None) -> bytes:
    error: dict[str, object] = {"message": message, "code": code}
    if data is not None:
        error["data"] = data
    return json.dumps(
        {"jsonrpc": "2.0", "error": error, "testnet": False, "usIn": 1, "usOut": 2, "usDiff": 1}
    ).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"jsonrpc":"2.0","result":{"order":{}},"usIn":1}', None),
        (400, err(13004, "invalid_credentials"), Rejection.KEY_REJECTED),
        (200, err(13004, "invalid_credentials"), Rejection.KEY_REJECTED),  # JSON-RPC on 200
        (400, err(13009, "unauthorized", {"reason": "invalid_signature"}), Rejection.BAD_SIGNATURE),
        (400, err(13009, "unauthorized"), Rejection.BAD_SIGNATURE),
        (400, err(10000, "authorization_required"), Rejection.BAD_SIGNATURE),
        (
            400,
            err(13009, "unauthorized", {"reason": "timestamp_expired"}),
            Rejection.CLOCK_OR_NONCE,
        ),
        (429, err(10028, "too_many_requests"), Rejection.RATE_LIMITED),
        (400, err(10047, "matching_engine_queue_full"), Rejection.RATE_LIMITED),
        (400, err(13002, "account_blocked"), Rejection.BANNED),
        (400, err(10009, "not_enough_funds"), Rejection.OTHER),
        (400, err(-32602, "Invalid params", {"reason": "x"}), Rejection.OTHER),
        (429, b"", Rejection.RATE_LIMITED),
        (502, b"<html>bad gateway</html>", Rejection.OTHER),
    ],
)
def test_classifier(status: int, body: bytes, expected: Rejection | None) -> None:
    assert DERIBIT.classify(status, body) is expected


def test_time_endpoint() -> None:
    endpoint = DERIBIT.time_endpoint
    assert endpoint is not None and endpoint.path == b"/api/v2/public/get_time"
    assert endpoint.parse(b'{"jsonrpc":"2.0","result":1550147385946,"testnet":false}') == (
        1550147385946.0
    )
    with pytest.raises(ValueError):
        endpoint.parse(b'{"jsonrpc":"2.0","error":{"code":10001,"message":"error"}}')
