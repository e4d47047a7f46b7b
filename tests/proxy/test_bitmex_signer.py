"""BitMEX signing: the three published examples, ccxt's ``bitmex.sign`` as the oracle
(clock frozen), the expiry arithmetic, and the classifier with BitMEX's error bodies."""

from __future__ import annotations

import hashlib
import hmac
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


def service(recv_window_ms: int = 5000) -> ServiceConfig:
    return ServiceConfig(
        name="bitmex_trading",
        venue="bitmex",
        key_type="exchange_api",
        upstream="https://www.bitmex.com",
        route="/bitmex",
        ca_file=None,
        timeout_ms=2000,
        recv_window_ms=recv_window_ms,
        pool_size=1,
    )


def runtime_with(
    key_id: str, secret: str, algorithm: str = "hmac-sha256", recv_window_ms: int = 5000
) -> ServiceRuntime:
    svc = service(recv_window_ms)
    rt = ServiceRuntime(svc, None)
    rt.keys = KeySet(ring_of(svc.name, record(key_id, secret, algorithm)), rt.venue, svc)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return method, target, headers, body


def test_published_vectors(vectors: list[dict[str, Any]]) -> None:
    found = [v for v in vectors if v["venue"] == "bitmex"]
    assert len(found) == 3
    for v in found:
        rt = runtime_with(v["api_key"], v["secret"])
        path, _, query = v["path"].partition("?")
        # api-expires = now + the 5000 ms window, in seconds: sign at expires - 5 s.
        now_s = (int(v["expires"]) * 1000 - 5000) / 1000
        data = rt.prepare(
            v["verb"].encode(),
            path.encode(),
            query.encode(),
            encode_request_headers([(b"api-signature", b"forged"), (b"api-key", b"engine")]),
            v["data"].encode(),
            now_s,
        )
        _, target, headers, body = split(data)
        assert target == v["path"].encode()
        assert body == v["data"].encode()
        assert headers[b"api-key"] == v["api_key"].encode()
        assert headers[b"api-expires"] == v["expires"].encode()
        assert headers[b"api-signature"] == v["expected_signature"].encode()
        assert b"forged" not in data and b"engine" not in data


@pytest.mark.parametrize(
    ("now_ms", "window_ms", "expires"),
    [
        (1_518_064_231_000, 5000, 1_518_064_236),
        (1_518_064_231_001, 5000, 1_518_064_237),  # rounded up: never shorter than the window
        (1_518_064_231_999, 5000, 1_518_064_237),
        (1_518_064_231_500, 1500, 1_518_064_233),
        (1_518_064_231_000, 60000, 1_518_064_291),
    ],
)
def test_expires_is_now_plus_window_rounded_up(now_ms: int, window_ms: int, expires: int) -> None:
    secret = random_hmac_secret()
    rt = runtime_with("bmx-" + secrets.token_hex(4), secret, recv_window_ms=window_ms)
    data = rt.prepare(b"GET", b"/api/v1/position", b"", b"", b"", now_ms / 1000)
    _, _, headers, _ = split(data)
    assert headers[b"api-expires"] == b"%d" % expires
    expected = hmac.new(
        secret.encode(), b"GET/api/v1/position%d" % expires, hashlib.sha256
    ).hexdigest()
    assert headers[b"api-signature"] == expected.encode()


def test_only_hmac_sha256_keys() -> None:
    with pytest.raises(SigningError, match="hmac-sha256"):
        runtime_with("bmx", random_hmac_secret(), algorithm="hmac-sha512")


# --------------------------------------------------------------------------- ccxt oracle

ORACLE_KEY = "bmx-prop-" + secrets.token_hex(6)
ORACLE_SECRET = random_hmac_secret()
ORACLE_RT = runtime_with(ORACLE_KEY, ORACLE_SECRET)
ORACLE: Any = ccxt.bitmex(
    {"apiKey": ORACLE_KEY, "secret": ORACLE_SECRET, "options": {"recvWindow": 5000}}
)
NOW_S = int(NOW.timestamp())

names = st.text(st.characters(min_codepoint=0x41, max_codepoint=0x7A), min_size=1, max_size=8)
values = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(10**9), max_value=10**9),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(names, values, max_size=6),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    endpoint=st.sampled_from(["order", "order/all", "position/leverage", "execution"]),
    seconds=st.integers(min_value=NOW_S - 10**6, max_value=NOW_S + 10**6),
)
def test_property_ccxt_signs_the_same_bytes(
    params: dict[str, Any], method: str, endpoint: str, seconds: int
) -> None:
    """GET parameters in the query, others as a JSON body (ccxt's own encodings): the
    sidecar's target, body, api-expires and api-signature equal ccxt's, byte for byte."""
    ORACLE.seconds = lambda: seconds
    expected = ORACLE.sign(endpoint, "private", method, dict(params))
    url: str = expected["url"]
    path, _, query = url.removeprefix("https://www.bitmex.com").partition("?")
    body: str = expected["body"] or ""
    data = ORACLE_RT.prepare(
        method.encode(),
        path.encode(),
        query.encode(),
        encode_request_headers([(b"Content-Type", b"application/json")]),
        body.encode(),
        seconds,
    )
    _, target, headers, sent = split(data)
    assert target == url.removeprefix("https://www.bitmex.com").encode()
    assert sent == body.encode()
    for name in ("api-key", "api-expires", "api-signature"):
        assert headers[name.encode()] == str(expected["headers"][name]).encode()


# --------------------------------------------------------------------------- classifier

BITMEX = VENUES["bitmex"]


def err(message: str, name: str = "HTTPError") -> bytes:
    return b'{"error":{"message":"%s","name":"%s"}}' % (message.encode(), name.encode())


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"orderID":"x"}', None),
        (401, err("Invalid API Key."), Rejection.KEY_REJECTED),
        (403, err("This key is disabled."), Rejection.KEY_REJECTED),
        (401, err("Signature not valid."), Rejection.BAD_SIGNATURE),
        (
            400,
            err("This request has expired - `expires` is in the past. Current time: 1516534870"),
            Rejection.CLOCK_OR_NONCE,
        ),
        (
            429,
            err("Rate limit exceeded, retry in 1 seconds.", "RateLimitError"),
            Rejection.RATE_LIMITED,
        ),
        (429, b"", Rejection.RATE_LIMITED),
        (403, err("Access Denied"), Rejection.OTHER),
        (403, b"<html>Forbidden</html>", Rejection.BANNED),
        (400, err("Account has insufficient Available Balance, 100 XBt required"), Rejection.OTHER),
        (503, err("The system is currently overloaded. Please try again later."), Rejection.OTHER),
        (401, b"not json", Rejection.KEY_REJECTED),
    ],
)
def test_classifier(status: int, body: bytes, expected: Rejection | None) -> None:
    assert BITMEX.classify(status, body) is expected


def test_no_time_endpoint() -> None:
    assert BITMEX.time_endpoint is None
