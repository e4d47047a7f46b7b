"""Fuzzing the real listener in-process: 100 000 inputs, structured and raw.

Each input goes to a fresh engine connection of the real ``ClientConnection`` (the
parser, routing, signing and framing of the sidecar; only the sockets are fakes). What
must hold for every input: nothing raises out of the listener, every answer is a whole
HTTP response, and every request that reaches the venue is a single well-formed, signed
request for the service's venue: strict HTTP/1.1, one Host, a Content-Length that
matches, no Transfer-Encoding, no control bytes in the target, the key header once.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.listener_harness import API_KEY, Listener, ParsedRequest

EXAMPLES = int(os.environ.get("AUTHPROXY_FUZZ_EXAMPLES", "100000"))

METHODS = [b"GET", b"POST", b"DELETE", b"PUT", b"HEAD", b"OPTIONS", b"CONNECT", b"G\x00T", b""]
TARGET_BITS = [
    b"/binance",
    b"/binance/api/v3/order",
    b"/api/v3/order",
    b"?symbol=BTCUSDT",
    b"&side=BUY",
    b"&signature=x",
    b"&timestamp=1",
    b"/../",
    b"%0d%0a",
    b"%00",
    b"\r\n",
    b"\x00",
    b" ",
    b"#frag",
    b"http://evil/",
    b"*",
]
HEADER_NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"X-MBX-APIKEY",
    b"Expect",
    b"Upgrade",
    b"Content-Type",
    b"X-Authproxy-Error",
    b" Host",
    b"Ho st",
    b"X\x00Y",
    b"",
]
HEADER_VALUES = [
    b"0",
    b"5",
    b"-1",
    b"99999999999999999999",
    b"chunked",
    b"gzip, chunked",
    b"chunked, gzip",
    b"keep-alive",
    b"close",
    b"Upgrade",
    b"100-continue",
    b"websocket",
    b"x\r\n folded",
    b"a\x00b",
    b"\x7f",
    b"application/x-www-form-urlencoded",
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b""]


def _request(rng: random.Random) -> bytes:
    target = b"".join(rng.choice(TARGET_BITS) for _ in range(rng.randint(0, 6)))
    headers = b"".join(
        rng.choice(HEADER_NAMES) + b": " + rng.choice(HEADER_VALUES) + b"\r\n"
        for _ in range(rng.randint(0, 6))
    )
    body = rng.randbytes(rng.randint(0, 40))
    if rng.random() < 0.3:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    line = rng.choice(METHODS) + b" " + target + b" " + rng.choice(VERSIONS) + b"\r\n"
    return line + headers + b"\r\n" + body


def _routed_request(rng: random.Random) -> bytes:
    """A request that reaches the service unless one of its extra headers or the flips
    spoil it: what makes the forwarded-request checks bite."""
    method = rng.choice([b"GET", b"POST", b"DELETE", b"PUT"])
    target = b"/binance/api/v3/" + rng.choice([b"order", b"account", b"openOrders", b"x"])
    target += b"".join(rng.choice(TARGET_BITS[3:7]) for _ in range(rng.randint(0, 3)))
    headers = b"".join(
        rng.choice(HEADER_NAMES) + b": " + rng.choice(HEADER_VALUES) + b"\r\n"
        for _ in range(rng.choice((0, 0, 1, 2)))
    )
    body = rng.randbytes(rng.randint(0, 40)) if method != b"GET" else b""
    return b"%s %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (
        method,
        target,
        headers,
        len(body),
        body,
    )


def make_input(rng: random.Random) -> bytes:
    """One input: routed requests (pipelined), well-formed-ish requests, raw bytes, or
    requests with junk spliced in; then, sometimes, a few bytes flipped."""
    kind = rng.random()
    if kind < 0.35:
        data = b"".join(_routed_request(rng) for _ in range(rng.randint(1, 3)))
    elif kind < 0.6:
        data = b"".join(_request(rng) for _ in range(rng.randint(1, 3)))
    elif kind < 0.8:
        data = rng.randbytes(rng.randint(0, 200))
    else:
        req = _request(rng)
        at = rng.randint(0, len(req))
        data = req[:at] + rng.randbytes(rng.randint(1, 20)) + req[at:]
    if data and rng.random() < 0.2:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        data = bytes(buf)
    return data


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield Listener(loop)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def check_forwarded(data: bytes) -> None:
    req = ParsedRequest(data)  # raises on anything the venue's parser would refuse
    assert req.complete == 1, data
    assert req.method in {b"GET", b"POST", b"DELETE", b"PUT", b"HEAD", b"OPTIONS"}, data
    assert req.url.startswith(b"/") and not any(c < 0x21 or c == 0x7F for c in req.url), data
    names = [n for n, _ in req.headers]
    assert names.count(b"host") == 1 and dict(req.headers)[b"host"] == b"127.0.0.1:9443"
    assert b"transfer-encoding" not in names
    assert (
        names.count(b"x-mbx-apikey") == 1 and dict(req.headers)[b"x-mbx-apikey"] == API_KEY.encode()
    )
    lengths = [v for n, v in req.headers if n == b"content-length"]
    assert len(lengths) <= 1 and int(lengths[0] if lengths else b"0") == len(req.body)
    assert b"signature=" in req.url or b"signature=" in req.body


BATCH = 100  # inputs per example: hypothesis's own cost per example dominates otherwise


def feed(listener: Listener, data: bytes, cut: int) -> int:
    """Feed one input on a fresh connection; return how many requests reached the venue."""
    conn, transport = listener.connect()
    # In two reads, split anywhere: framing must not depend on where the bytes break.
    conn.data_received(data[:cut])
    conn.data_received(data[cut:])
    forwarded = listener.answer_all()
    for sent in forwarded:
        check_forwarded(sent)
        assert b"/binance" in data  # only routed input reaches the venue
    out = b"".join(transport.written)
    assert not out or out.startswith(b"HTTP/1.1 "), out[:80]
    conn.eof_received()
    conn.connection_lost(None)
    assert listener.router.connections == 0
    # One engine connection, answered in order, never needs a second venue connection.
    assert listener.extra_connects == 0
    return len(forwarded)


@settings(
    max_examples=max(1, EXAMPLES // BATCH),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(min_value=0, max_value=2**64))
def test_the_listener_survives_anything_and_forwards_only_well_formed_requests(
    listener: Listener, seed: int
) -> None:
    """Hypothesis draws a seed; each example feeds BATCH inputs made from it (a failure
    names the seed, which replays it exactly)."""
    rng = random.Random(seed)
    forwarded = 0
    for _ in range(BATCH):
        data = make_input(rng)
        forwarded += feed(listener, data, rng.randint(0, len(data)))
    # The checks on forwarded requests had something to check. Per batch only "some": the
    # count is random (mean 32 of 100 over 300 seeds, least 15), and seed 675518 gave 9,
    # which failed the "at least 10" this asserted before.
    assert forwarded >= 1, forwarded
