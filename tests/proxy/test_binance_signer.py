from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES
from tests.proxy.helpers import NOW, pem_of, random_hmac_secret, record, ring_of

SERVICE = ServiceConfig(
    name="binance_spot_trading",
    venue="binance",
    key_type="exchange_api",
    upstream="https://api.binance.com",
    route="/binance",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
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


def binance_vectors(vectors: list[dict[str, Any]], algorithm: str) -> list[dict[str, Any]]:
    return [v for v in vectors if v["venue"] == "binance" and v["algorithm"] == algorithm]


def test_published_hmac_vectors(vectors: list[dict[str, Any]]) -> None:
    found = binance_vectors(vectors, "hmac-sha256")
    assert len(found) == 2
    for v in found:
        rt = runtime_with(record(v["api_key"], v["secret"]))
        payload: str = v["signed_payload"]
        without_ts, _, ts = payload.rpartition("&timestamp=")
        # The engine sends the parameters (and a stale credential we must replace).
        query = unquote(without_ts).encode() + b"&signature=deadbeef&timestamp=1"
        data = rt.prepare(
            b"POST", b"/api/v3/order", query, encode_request_headers([]), b"", int(ts) / 1000
        )
        _, target, headers, body = split(data)
        assert target == (
            b"/api/v3/order?" + payload.encode() + b"&signature=" + v["expected_signature"].encode()
        )
        assert headers[b"X-MBX-APIKEY"] == v["api_key"].encode()
        assert body == b""


def test_published_ed25519_vector(vectors: list[dict[str, Any]]) -> None:
    (v,) = binance_vectors(vectors, "ed25519")
    rt = runtime_with(record("ed-key", v["secret"], "ed25519"))
    assert rt.keys is not None
    signer: Any = rt.keys.signer_for(NOW.timestamp())
    sig = signer._sign_payload(v["signed_payload"].encode())
    assert unquote(sig.decode()) == v["expected_signature"]


def test_mixed_query_and_body_signature_goes_last_in_body() -> None:
    secret = random_hmac_secret()
    rt = runtime_with(record("k1", secret))
    data = rt.prepare(
        b"POST",
        b"/api/v3/order",
        b"symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC",
        encode_request_headers([(b"Content-Type", b"application/x-www-form-urlencoded")]),
        b"quantity=1&price=0.1&recvWindow=5000",
        1499827319.559,
    )
    _, target, headers, body = split(data)
    assert target == b"/api/v3/order?symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC"
    signed, _, sig = body.rpartition(b"&signature=")
    assert signed == b"quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
    expected = hmac.new(secret.encode(), target.split(b"?")[1] + signed, hashlib.sha256)
    assert sig == expected.hexdigest().encode()
    assert headers[b"Content-Length"] == str(len(body)).encode()


def test_rsa_signature_verifies() -> None:
    private = rsa.generate_private_key(65537, 2048)
    rt = runtime_with(record("rsa-key", pem_of(private), "rsa-pkcs1-sha256"))
    data = rt.prepare(
        b"GET", b"/api/v3/account", b"", encode_request_headers([]), b"", NOW.timestamp()
    )
    _, target, _, _ = split(data)
    query = target.split(b"?", 1)[1]
    payload, _, sig = query.rpartition(b"&signature=")
    assert payload == b"recvWindow=5000&timestamp=%d" % int(NOW.timestamp() * 1000)
    private.public_key().verify(
        base64.b64decode(unquote(sig.decode())), payload, padding.PKCS1v15(), hashes.SHA256()
    )


def test_engine_credentials_and_hop_by_hop_headers_are_replaced() -> None:
    rt = runtime_with(record("real-key", random_hmac_secret()))
    data = rt.prepare(
        b"GET",
        b"/api/v3/openOrders",
        b"symbol=BTCUSDT",
        encode_request_headers(
            [
                (b"X-MBX-APIKEY", b"engine-key"),
                (b"Host", b"127.0.0.1:8080"),
                (b"Connection", b"keep-alive, X-Trace"),
                (b"X-Trace", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"X-Authproxy-Error", b"spoof"),
                (b"Accept-Encoding", b"gzip"),
            ]
        ),
        b"",
        NOW.timestamp(),
    )
    _, _, headers, _ = split(data)
    assert headers[b"X-MBX-APIKEY"] == b"real-key"
    assert headers[b"Host"] == b"api.binance.com"
    assert headers[b"Accept-Encoding"] == b"gzip"
    for gone in (b"Connection", b"X-Trace", b"Transfer-Encoding", b"X-Authproxy-Error"):
        assert gone not in headers
    assert list(headers).count(b"X-MBX-APIKEY") == 1


def test_non_ascii_is_percent_encoded_and_controls_refused() -> None:
    from proxy.errors import BadRequest

    rt = runtime_with(record("k", random_hmac_secret()))
    data = rt.prepare(
        b"GET",
        b"/api/v3/order",
        "symbol=１２".encode(),
        encode_request_headers([]),
        b"",
        NOW.timestamp(),
    )
    assert b"symbol=%EF%BC%91%EF%BC%92&" in data
    with pytest.raises(BadRequest):
        rt.prepare(
            b"GET",
            b"/api/v3/order",
            b"a=1\r\nX: y",
            encode_request_headers([]),
            b"",
            NOW.timestamp(),
        )


def test_unsupported_algorithm_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(SigningError, match="binance keys are"):
        runtime_with(record("ec", pem, "es256"))


@settings(max_examples=200, deadline=None)
@given(
    params=st.lists(
        st.tuples(
            st.text(st.characters(min_codepoint=0x30, max_codepoint=0x7A), min_size=1, max_size=8),
            st.text(st.characters(exclude_categories=("Cs",)), max_size=12),  # encodable
        ),
        max_size=6,
    ),
    in_body=st.booleans(),
    method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT"]),
)
def test_property_signature_covers_exactly_what_is_sent(
    params: list[tuple[str, str]], in_body: bool, method: bytes
) -> None:
    """Whatever the parameters, a Binance-style verifier written here accepts the bytes."""
    from urllib.parse import quote

    params = [(k, v) for k, v in params if k not in ("signature", "timestamp", "recvWindow")]
    encoded = "&".join(f"{quote(k)}={quote(v)}" for k, v in params).encode()
    secret = "fixed-test-secret-for-property"
    rt = runtime_with(record("prop-key", secret))
    query, body = (b"", encoded) if in_body else (encoded, b"")
    data = rt.prepare(
        method, b"/api/v3/order", query, encode_request_headers([]), body, NOW.timestamp()
    )
    _, target, headers, sent_body = split(data)
    sent_query = target.partition(b"?")[2]
    total = sent_query + sent_body
    payload, _, sig = total.rpartition(b"&signature=")
    assert b"&" not in sig and sig
    assert hmac.compare_digest(
        sig, hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest().encode()
    )
    assert payload.endswith(b"timestamp=%d" % int(NOW.timestamp() * 1000))
    assert headers[b"X-MBX-APIKEY"] == b"prop-key"


def test_registry_has_binance_venues() -> None:
    assert {"binance", "binance_usdm"} <= set(VENUES)
