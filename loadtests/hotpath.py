"""Micro-benchmark of the hot path's own work, with no sockets and no event loop I/O.

Drives the real ``ClientConnection`` and ``UpstreamConnection`` callbacks with fake
transports: request bytes in, signed bytes out, response bytes in, response bytes out.
What it reports is the CPU the sidecar spends per request in Python and C, without the
syscalls and the scheduler, which the end-to-end benchmark (``loadtests.bench``) shows.

    python -m loadtests.hotpath [--requests N] [--metrics {on,off,both}]

``--metrics both`` (the default) runs with and without the per-request observations
(``admin.metrics``) interleaved and reports the difference.

Times on shared machines are noisy; instruction counts are not. Per request, in
instructions (the difference of two request counts cancels start-up):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m loadtests.hotpath --requests 2000 --repeat 1   # and again with 4000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from keycache.record import make_record
from keycache.ring import build_ring
from proxy.config import ServiceConfig
from proxy.metrics import Metrics
from proxy.ratelimit import limiter_for
from proxy.runtime import new_event_loop
from proxy.server import ClientConnection, Router
from proxy.service import KeySet, ServiceRuntime
from proxy.upstream import UpstreamConnection, UpstreamPool
from proxy.venue_limits import BINANCE

REQUEST = (
    b"POST /binance/api/v3/order?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
    b"&quantity=0.01&price=30000 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"User-Agent: engine/1.0\r\nContent-Length: 0\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 28 Nov 2026 19:58:14 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 47\r\nConnection: keep-alive\r\n"
    b"X-MBX-USED-WEIGHT-1M: 1\r\n\r\n"
    b'{"symbol":"BTCUSDT","orderId":1,"status":"NEW"}'
)


class FakeTransport:
    """Collects writes and records close and pause; stands in for the uvloop transports
    (here and in the listener tests, ``tests/proxy/listener_harness.py``)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def build(
    loop: asyncio.AbstractEventLoop, metrics: bool = False
) -> tuple[ClientConnection, UpstreamConnection, FakeTransport, FakeTransport]:
    now = datetime.now(UTC)
    record = make_record(
        "k" * 64,
        "s" * 64,
        created_at=now - timedelta(days=1),
        expires_at=now + timedelta(days=1),
        permissions=["place_orders"],
    )
    ring = build_ring("bench", [(1, record)], now=now, overlap=timedelta(hours=24))
    svc = ServiceConfig(
        name="bench",
        venue="binance",
        key_type="exchange_api",
        upstream="https://127.0.0.1:9443",
        route="/binance",
        ca_file=None,
        timeout_ms=2000,
        recv_window_ms=5000,
        pool_size=1,
    )
    runtime = ServiceRuntime(svc, None)
    # Binance's real windows, scaled up so that a run of any length stays admitted: what is
    # measured is the full check of every request, not the refusal path.
    runtime.limiter = limiter_for(
        10**9, 10**10, tuple((unit, width, limit * 10**6) for unit, width, limit in BINANCE.windows)
    )
    runtime.keys = KeySet(ring, runtime.venue, svc)
    pool = UpstreamPool(svc, loop)
    runtime.pool = pool
    up_transport, client_transport = FakeTransport(), FakeTransport()
    upstream = UpstreamConnection(pool)
    upstream.connection_made(up_transport)  # type: ignore[arg-type]
    pool.idle.append(upstream)
    if metrics:
        runtime.metrics = Metrics(["bench"]).services["bench"]
    # A clock that advances a fixed 25 µs per reading (C-level, as cheap as time.time):
    # what runs on a timer (the venue's usage headers every USAGE_EVERY_S) then runs
    # equally often per request however slow the run is, so instruction counts under
    # callgrind (where a request takes milliseconds) repeat and compare.
    clock = itertools.count(time.time(), 25e-6).__next__
    client = ClientConnection(
        Router({"bench": runtime}, max_body=1 << 20, metrics=metrics, clock=clock)
    )
    client.connection_made(client_transport)  # type: ignore[arg-type]
    return client, upstream, client_transport, up_transport


def run(n: int, metrics: bool = False) -> float:
    loop = new_event_loop()  # uvloop, as in the sidecar
    asyncio.set_event_loop(loop)
    try:
        client, upstream, ct, ut = build(loop, metrics)
        for _ in range(1000):  # warm-up
            client.data_received(REQUEST)
            upstream.data_received(RESPONSE)
        assert ct.written[-1].startswith(b"HTTP/1.1 200 OK"), ct.written[-1][:80]
        t0 = time.perf_counter()
        for _ in range(n):
            client.data_received(REQUEST)
            upstream.data_received(RESPONSE)
        elapsed = time.perf_counter() - t0
        ct.written.clear()
        ut.written.clear()
        return elapsed / n * 1e6
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument(
        "--repeat", type=int, default=5, help="report the best of this many runs (1 under valgrind)"
    )
    parser.add_argument(
        "--metrics",
        choices=("on", "off", "both"),
        default="both",
        help="per-request metric observations on, off, or both interleaved (default)",
    )
    args = parser.parse_args()
    modes = {"on": (True,), "off": (False,), "both": (False, True)}[args.metrics]
    best = {m: float("inf") for m in modes}
    for _ in range(args.repeat):
        for m in modes:
            best[m] = min(best[m], run(args.requests, m))
    for m in modes:
        label = "with metrics" if m else "without metrics"
        print(
            f"hot path CPU per request, {label} (best of {args.repeat} x {args.requests}): "
            f"{best[m]:.2f} µs"
        )
    if len(modes) == 2:
        print(f"metrics cost per request: {best[True] - best[False]:.2f} µs")


if __name__ == "__main__":
    main()
