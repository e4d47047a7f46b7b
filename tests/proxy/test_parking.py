"""on_limit parking: a refusal while the queue is released starts the connection's next
pipelined request, which goes through the limiter then and there: the release must not
break on it (it did: the queue was changed while being walked)."""

from __future__ import annotations

import asyncio

from proxy.ratelimit import Limiter, Pace
from proxy.server import _release_parked
from tests.proxy.listener_harness import Listener

ORDER = (
    b"POST /binance/api/v3/order?symbol=BTCUSDT HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
)


async def test_a_refusal_during_release_starts_the_next_pipelined_request() -> None:
    now = [1_000_000.0]
    listener = Listener(asyncio.get_running_loop(), clock=lambda: now[0])
    service = listener.service
    service.limiter = Limiter((), Pace(250_000, 1))  # one request per 250 ms
    service.wait_us = 500_000
    conn, transport = listener.connect()
    conn.data_received(ORDER * 3)  # pipelined: the first goes out
    assert len(listener.answer_all()) == 1  # ...and its answer starts the second: parked
    assert len(service.parked) == 1
    service.limiter.block(int(now[0] * 1e6), 10_000_000)  # the venue said stop
    _release_parked(service, listener.router.clock)  # the second is refused at once...
    # ...and the third, next on the connection, meets the same 10 s stop: refused too.
    assert len(service.parked) == 0
    answers = b"".join(transport.written).split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"429", b"429"]
    if service.park_timer is not None:
        service.park_timer.cancel()
