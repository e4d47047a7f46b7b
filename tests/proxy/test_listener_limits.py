"""The listener refuses smuggling, slow requests and connection floods, and nothing it
refuses is signed or sent (the real ClientConnection, in-process; see listener_harness)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from tests.proxy.listener_harness import VENUE_OK, Listener

ORDER = b"POST /binance/api/v3/order?symbol=BTCUSDT&side=BUY HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def _status_and_code(out: bytes) -> tuple[int, str]:
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]["code"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Both framings: which one a venue or a middlebox believes decides what it sees next.
        ORDER + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ORDER + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        ORDER + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        ORDER + b"Content-Length: 4, 4\r\n\r\nabcd",
        ORDER + b"Transfer-Encoding: gzip, chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        ORDER + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ORDER + b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",  # obs-fold
        ORDER + b"Bad Name: x\r\nContent-Length: 0\r\n\r\n",
        ORDER + b"X-Nul: a\x00b\r\nContent-Length: 0\r\n\r\n",
        ORDER + b"X-Ctl: a\x01b\r\nContent-Length: 0\r\n\r\n",
        b"POST /binance/api/v3/order?a=1\x00 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /binance/api/v3/order?a=1\rb HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"CONNECT /binance/api/v3/order HTTP/1.1\r\nHost: x\r\n\r\n",
        ORDER + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
        ORDER + b"Content-Length: -1\r\n\r\n",
        b"POST /binance/api/v3/order HTTP/1.1\nHost: x\nContent-Length: 0\n\n",  # bare LF
    ],
)
def test_smuggling_shapes_are_refused_and_never_forwarded(
    loop: asyncio.AbstractEventLoop, request_bytes: bytes
) -> None:
    listener = Listener(loop)
    conn, transport = listener.connect()
    conn.data_received(request_bytes + b"GET /binance/api/v3/account HTTP/1.1\r\nHost: x\r\n\r\n")
    assert listener.answer_all() == []  # nothing reached the venue, not even the second
    out = b"".join(transport.written)
    assert _status_and_code(out) == (400, "bad_request"), out
    assert transport.closed


def test_a_parameter_meant_for_the_venue_cannot_carry_a_raw_crlf_in_the_body(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A form body is signed and sent as-is, framed by Content-Length: bytes in it cannot
    become headers at the venue. Percent-encoded CR/LF stay encoded."""
    listener = Listener(loop)
    conn, _transport = listener.connect()
    body = b"symbol=BTCUSDT&newClientOrderId=a%0D%0AX-Injected:%201"
    conn.data_received(ORDER + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    (sent,) = listener.answer_all()
    head, _, forwarded = sent.partition(b"\r\n\r\n")
    assert b"X-Injected" not in head
    assert forwarded.startswith(body)


def test_a_slow_request_head_is_ended_with_408_and_others_are_served(
    loop: asyncio.AbstractEventLoop,
) -> None:
    listener = Listener(loop, header_timeout=2.0, body_timeout=3.0)
    slow, slow_t = listener.connect()
    slow.data_received(b"POST /binance/api/v3/order HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    _idle, idle_t = listener.connect()  # connected, sends nothing: an engine between orders
    body_slow, body_t = listener.connect()
    body_slow.data_received(ORDER + b"Content-Length: 10\r\n\r\nabc")
    for _ in range(2):
        listener.router.sweep()
    assert slow_t.written == [] and not slow_t.closed  # two sweeps: 1 s seen, not yet 2 s
    listener.router.sweep()
    assert _status_and_code(b"".join(slow_t.written)) == (408, "request_timeout")
    assert slow_t.closed
    assert body_t.written == []  # its body has 3 s
    listener.router.sweep()
    assert _status_and_code(b"".join(body_t.written)) == (408, "request_timeout")
    assert listener.answer_all() == []  # neither slow request was signed or sent
    assert idle_t.written == [] and not idle_t.closed  # idle keep-alive is not slow-loris
    fresh, fresh_t = listener.connect()
    fresh.data_received(ORDER + b"Content-Length: 0\r\n\r\n")
    assert len(listener.answer_all()) == 1
    assert b"".join(fresh_t.written).startswith(b"HTTP/1.1 200 OK")


def test_a_request_that_keeps_arriving_in_time_is_not_cut(loop: asyncio.AbstractEventLoop) -> None:
    listener = Listener(loop, header_timeout=2.0)
    conn, transport = listener.connect()
    for _ in range(5):  # one request completes between every two sweeps
        conn.data_received(ORDER + b"Content-Length: 0\r\n\r\n")
        listener.answer_all()
        conn.data_received(b"GET /binance/api/v3/account HTTP/1.1\r\n")
        listener.router.sweep()
        conn.data_received(b"Host: x\r\n\r\n")
        listener.answer_all()
    assert not transport.closed
    assert b"".join(transport.written).count(b"HTTP/1.1 200 OK") == 10


def test_connections_beyond_the_cap_get_503_and_are_closed(loop: asyncio.AbstractEventLoop) -> None:
    listener = Listener(loop, max_connections=3)
    conns = [listener.connect() for _ in range(3)]
    extra, extra_t = listener.connect()
    assert _status_and_code(b"".join(extra_t.written)) == (503, "too_many_connections")
    assert extra_t.closed
    extra.connection_lost(None)
    assert all(not t.closed for _, t in conns)
    conns[0][0].connection_lost(None)
    again, again_t = listener.connect()  # room again
    again.data_received(ORDER + b"Content-Length: 0\r\n\r\n")
    assert len(listener.answer_all()) == 1 and not again_t.closed


def test_draining_closes_each_connection_after_its_answer(loop: asyncio.AbstractEventLoop) -> None:
    listener = Listener(loop)
    busy, busy_t = listener.connect()
    _idle, idle_t = listener.connect()
    busy.data_received(ORDER + b"Content-Length: 0\r\n\r\n")  # in flight at the venue
    listener.router.drain()
    assert listener.router.close_idle() == 1  # only the idle one
    assert idle_t.closed and not busy_t.closed
    listener.answer_all()
    answer = b"".join(busy_t.written)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"\r\nConnection: close\r\n" in answer
    assert busy_t.closed


def test_pipelined_requests_reuse_the_one_venue_connection(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Three pipelined orders on a pool of one warm connection: each goes out on it once
    the answer before it is in, and the pool opens no other connection (it did, one per
    pipelined request, when the answer was passed on before the connection was free)."""
    listener = Listener(loop)
    conn, transport = listener.connect()
    order = ORDER + b"Content-Length: 0\r\n\r\n"
    conn.data_received(order * 3)
    spawned: list[int] = []
    sent = []
    while listener.up_transport.written:
        sent.append(b"".join(listener.up_transport.written))
        listener.up_transport.written.clear()
        listener.upstream.data_received(VENUE_OK)
        spawned.append(len(listener.pool._tasks))
    assert len(sent) == 3
    assert spawned == [0, 0, 0]
    assert not listener.pool.waiters
    assert listener.pool.idle == [listener.upstream]
    out = b"".join(transport.written)
    assert out.count(b"HTTP/1.1 200 ") == 3
