"""Every local failure answers the JSON error contract, and the listener keeps serving."""

from __future__ import annotations

import json
import socket
import time

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.demo import binance_service
from proxy.procs import Proc
from tests.e2e.conftest import Sidecars, raw_exchange

pytestmark = pytest.mark.e2e

GOOD = b"GET /hmac/api/v3/openOrders?symbol=BTCUSDT HTTP/1.1\r\nHost: x\r\n\r\n"


class _Collector:
    """httptools callbacks collecting every response of a keep-alive stream."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.headers, self.body))


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Parse every response in ``data``; raises if it is not valid, complete HTTP/1.1."""
    c = _Collector()
    c.parser.feed_data(data)
    assert c.done, data[:200]
    return c.done


def assert_error(resp: tuple[int, dict[bytes, bytes], bytes], status: int, code: str) -> None:
    got_status, headers, body = resp
    assert got_status == status, body
    assert headers[b"x-authproxy-error"] == code.encode()
    assert json.loads(body)["error"]["code"] == code
    assert headers[b"content-type"] == b"application/json"


def assert_still_serving(proc: Proc) -> None:
    (resp,) = parse_responses(raw_exchange(proc.ready["listen"]["port"], GOOD))
    assert resp[0] == 200, resp
    assert proc.popen.poll() is None


@pytest.fixture
def sidecar(sidecars: Sidecars) -> Proc:
    return sidecars.start(listen={"max_body_bytes": 1024})


def test_malformed_http_is_400_and_closed(sidecar: Proc) -> None:
    port = sidecar.ready["listen"]["port"]
    for junk in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /hmac HTTP/1.1\r\nBad Header\r\n\r\n",
    ):
        (resp,) = parse_responses(raw_exchange(port, junk))
        assert_error(resp, 400, "bad_request")
        assert resp[1][b"connection"] == b"close"
    assert_still_serving(sidecar)


def test_unknown_route_is_404_and_connection_stays_open(sidecar: Proc) -> None:
    port = sidecar.ready["listen"]["port"]
    data = raw_exchange(port, b"GET /nasdaq/x HTTP/1.1\r\nHost: x\r\n\r\n" + GOOD)
    first, second = parse_responses(data)
    assert_error(first, 404, "unknown_route")
    assert second[0] == 200  # pipelined after the 404, answered in order
    assert_still_serving(sidecar)


def test_body_over_limit_is_413(sidecar: Proc) -> None:
    port = sidecar.ready["listen"]["port"]
    declared = b"POST /hmac/api/v3/order HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
    (resp,) = parse_responses(raw_exchange(port, declared + b"x" * 5000))
    assert_error(resp, 413, "body_too_large")
    chunked = (
        b"POST /hmac/api/v3/order HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"100\r\n" + b"y" * 256 + b"\r\n" for _ in range(5))
        + b"0\r\n\r\n"
    )
    (resp,) = parse_responses(raw_exchange(port, chunked))
    assert_error(resp, 413, "body_too_large")
    assert_still_serving(sidecar)


def test_chunked_request_body_is_forwarded_with_content_length(sidecar: Proc) -> None:
    port = sidecar.ready["listen"]["port"]
    body = b"hello=world&a=b"
    req = (
        b"POST /hmac/__sim/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    (resp,) = parse_responses(raw_exchange(port, req))
    assert resp[0] == 200, resp
    echo = json.loads(resp[2])
    names = [k.lower() for k, _ in echo["headers"]]
    assert "transfer-encoding" not in names
    assert "content-length" in names


def test_upstream_refused_is_502(sidecars: Sidecars, venue) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    proc = sidecars.start({"binance_hmac": binance_service(closed_port, venue.ca_file, "/hmac")})
    t0 = time.monotonic()
    (resp,) = parse_responses(raw_exchange(proc.ready["listen"]["port"], GOOD))
    assert_error(resp, 502, "upstream_unavailable")
    assert time.monotonic() - t0 < 1.5  # refused at once, not after the 2 s timeout


def test_upstream_reset_is_502_then_serving(sidecar: Proc) -> None:
    port = sidecar.ready["listen"]["port"]
    (resp,) = parse_responses(
        raw_exchange(port, b"GET /hmac/__sim/reset HTTP/1.1\r\nHost: x\r\n\r\n")
    )
    assert_error(resp, 502, "upstream_unavailable")
    assert_still_serving(sidecar)


def test_upstream_timeout_is_504_then_serving(sidecars: Sidecars, venue) -> None:
    proc = sidecars.start(
        {
            "binance_hmac": binance_service(
                venue.port, venue.ca_file, "/hmac", timeout_ms=300, allow=["GET /__sim/slow"]
            )
        }
    )
    port = proc.ready["listen"]["port"]
    t0 = time.monotonic()
    (resp,) = parse_responses(
        raw_exchange(port, b"GET /hmac/__sim/slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
    )
    assert_error(resp, 504, "upstream_timeout")
    assert time.monotonic() - t0 < 2.5
    assert_still_serving(proc)


def test_gzip_response_passes_through_intact(sidecar: Proc) -> None:
    import gzip

    port = sidecar.ready["listen"]["port"]
    (resp,) = parse_responses(
        raw_exchange(
            port, b"GET /hmac/__sim/gzip HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
        )
    )
    assert resp[0] == 200
    assert resp[1][b"content-encoding"] == b"gzip"
    json.loads(gzip.decompress(resp[2]))


def test_pipelined_requests_answered_in_order(sidecar: Proc) -> None:
    port = sidecar.ready["listen"]["port"]
    reqs = b"".join(
        b"POST /hmac/__sim/echo?n=%d HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % i
        for i in range(20)
    )
    responses = parse_responses(raw_exchange(port, reqs))
    assert [json.loads(r[2])["query"].split("&")[0] for r in responses] == [
        f"n={i}" for i in range(20)
    ]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.one_of(
        st.binary(max_size=2048),
        st.builds(
            lambda a, b: a + b,
            st.sampled_from(
                [
                    b"GET /hmac/",
                    b"POST /hmac/api/v3/order HTTP/1.1\r\n",
                    b"GET /hmac/api/v3/ping HTTP/1.1\r\nContent-Length: ",
                ]
            ),
            st.binary(max_size=512),
        ),
    )
)
def test_random_bytes_never_crash_or_hang(sidecar: Proc, junk: bytes) -> None:
    port = sidecar.ready["listen"]["port"]
    data = raw_exchange(port, junk, timeout=5.0)
    if data:
        assert data.startswith(b"HTTP/1.1 "), data[:100]
        parse_responses(data)
    assert sidecar.popen.poll() is None
