"""The real sidecar holds engines to the service's budget and stops when the venue says so."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from proxy.demo import binance_service
from tests.e2e.conftest import Sidecars, Venue, raw_exchange
from tests.e2e.test_listener_errors import parse_responses

pytestmark = pytest.mark.e2e


def _orders(tag: str, n: int) -> bytes:
    return b"".join(
        b"POST /hmac/api/v3/order?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
        b"&quantity=0.01&price=30000&newClientOrderId=%s-%d HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 0\r\n\r\n" % (tag.encode(), i)
        for i in range(n)
    )


def test_over_budget_is_refused_at_once_and_never_reaches_the_venue(
    sidecars: Sidecars, venue: Venue
) -> None:
    import asyncio

    from tests.e2e.test_vault_e2e import signed_by

    svc = binance_service(
        venue.port,
        venue.ca_file,
        "/hmac",
        rate_limit={"requests_per_second": 10, "requests_per_minute": 25},
    )
    proc = sidecars.start({"binance_hmac": svc})
    port = proc.ready["listen"]["port"]
    answers = parse_responses(raw_exchange(port, _orders("rl", 40), timeout=20))
    statuses = Counter(status for status, _, _ in answers)
    assert len(answers) == 40
    assert statuses[200] <= 10 * 2  # at most two aligned seconds can be touched
    refused = [(h, b) for s, h, b in answers if s == 429]
    assert refused and statuses[200] + len(refused) == 40
    for headers, body in refused:
        assert headers[b"x-authproxy-error"] == b"rate_limited"
        assert int(headers[b"retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "rate_limited"
    seen = asyncio.run(signed_by(venue, "rl-"))
    assert len(seen) == statuses[200]  # a refused order was never signed nor sent
    per_second = Counter(int(t) for t, _, _ in seen)
    assert max(per_second.values()) <= 10


def test_a_venue_ban_holds_every_request_until_retry_after(
    sidecars: Sidecars, venue: Venue
) -> None:
    """418 with Retry-After: nothing reaches the venue before that time, engines get 429
    with the remaining time, then one probe goes out and traffic resumes."""
    import asyncio

    from tests.e2e.test_vault_e2e import signed_by

    proc = sidecars.start()
    port = proc.ready["listen"]["port"]
    banned = parse_responses(
        raw_exchange(
            port, b"GET /hmac/__sim/status?code=418&retry_after=2 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    )
    assert banned[0][0] == 418  # the venue's answer passes through
    t_ban = time.time()
    held = []
    n = 0
    while time.time() < t_ban + 1.8:
        (resp,) = parse_responses(raw_exchange(port, _orders(f"ban{n}x", 1)))
        held.append((time.time() - t_ban, resp))
        n += 1
        time.sleep(0.1)
    assert len(held) >= 10
    for elapsed, (status, headers, _) in held:
        assert status == 429 and headers[b"x-authproxy-error"] == b"rate_limited"
        # Retry-After is the ban's remaining time, in whole seconds rounded up.
        remaining = 2 - elapsed
        assert remaining - 0.1 <= int(headers[b"retry-after"]) < remaining + 1.1, elapsed
    time.sleep(max(0.0, 2.1 - (time.time() - t_ban)))
    after = [parse_responses(raw_exchange(port, _orders(f"unban{i}x", 1)))[0] for i in range(5)]
    assert [a[0] for a in after] == [200] * 5, after  # the probe, then the rest
    # Not one held request reached the venue; those after the ban all did.
    assert asyncio.run(signed_by(venue, "ban")) == []
    resumed = asyncio.run(signed_by(venue, "unban"))
    assert len(resumed) == 5
    assert min(t for t, _, _ in resumed) >= t_ban + 2 - 0.05  # the venue's clock is ours


def test_the_venues_weight_header_running_ahead_slows_the_sidecar_first(
    sidecars: Sidecars, venue: Venue
) -> None:
    """Another host behind the same IP has used nearly all of Binance's 6000 weight per
    minute: the sidecar reads X-MBX-USED-WEIGHT-1M, counts it, and refuses locally before
    the venue would answer 429 (which could turn into a ban)."""
    import asyncio

    from tests.e2e.test_vault_e2e import signed_by, sim_call

    # Not near a minute boundary: both counters must stay in one window for the test.
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)
    svc = binance_service(venue.port, venue.ca_file, "/hmac", clock_sync=False)
    proc = sidecars.start({"binance_hmac": svc})
    port = proc.ready["listen"]["port"]
    asyncio.run(sim_call(venue, "POST", "/__sim/binance/weight?used=5990"))
    try:
        answers = [
            parse_responses(raw_exchange(port, _test_orders(f"wt{i}x", 1)))[0] for i in range(30)
        ]
    finally:  # the simulator is shared by the session's tests
        asyncio.run(sim_call(venue, "POST", "/__sim/binance/weight?used=0"))
    statuses = Counter(a[0] for a in answers)
    assert statuses == {200: 10, 429: 20}, statuses  # exactly to the venue's 6000
    for status, headers, body in answers:
        if status == 429:
            assert headers[b"x-authproxy-error"] == b"rate_limited", body  # ours, not Binance's
            assert 1 <= int(headers[b"retry-after"]) <= 60
    seen = asyncio.run(signed_by(venue, "wt"))
    assert len(seen) == 10 and all(verdict == "ok" for _, _, verdict in seen)


def _test_orders(tag: str, n: int) -> bytes:
    """POST /api/v3/order/test: signed and verified like an order, weight 1, not counted as
    an order (so only the weight and request budgets apply)."""
    return b"".join(
        b"POST /hmac/api/v3/order/test?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
        b"&quantity=0.01&price=30000&newClientOrderId=%s-%d HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 0\r\n\r\n" % (tag.encode(), i)
        for i in range(n)
    )


def test_on_limit_wait_holds_requests_in_order_instead_of_refusing(
    sidecars: Sidecars, venue: Venue
) -> None:
    """on_limit: {wait_ms}: over the budget, a request waits for room (up to wait_ms)."""
    import asyncio

    from tests.e2e.test_vault_e2e import signed_by

    svc = binance_service(
        venue.port,
        venue.ca_file,
        "/hmac",
        rate_limit={"requests_per_second": 5},
        on_limit={"wait_ms": 2500},
    )
    proc = sidecars.start({"binance_hmac": svc})
    port = proc.ready["listen"]["port"]
    t0 = time.time()
    # Twelve engines at once, more than twice the bucket: all wait their turn (at most
    # 2 s: five per aligned second, paced 200 ms apart).
    statuses = asyncio.run(_at_once(port, [_test_orders(f"waitA{i}x", 1) for i in range(12)]))
    assert statuses == [200] * 12
    seen = sorted(t for t, _, _ in asyncio.run(signed_by(venue, "waitA")))
    assert len(seen) == 12
    # The first five at once (the bucket), the rest held back, never above the bucket:
    # at most 5 + t * 5/s in any t seconds (one of slack for the network's jitter).
    assert seen[4] - t0 < 0.5
    assert seen[-1] - seen[0] >= 1.0
    for i, first in enumerate(seen):
        for j in range(i + 1, len(seen)):
            assert j - i + 1 <= 5 + (seen[j] - first + 0.002) * 5 + 1
    # Twenty more at once: those that would wait longer than wait_ms are refused at once.
    statuses = asyncio.run(_at_once(port, [_test_orders(f"waitB{i}x", 1) for i in range(20)]))
    counts = Counter(statuses)
    assert counts[429] >= 5 and counts[200] >= 5 and counts[200] + counts[429] == 20, counts


async def _at_once(port: int, requests: list[bytes]) -> list[int]:
    """Each request on its own connection, all sent together; their statuses in order."""
    import asyncio

    async def one(data: bytes) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            return int(head.split(b" ", 2)[1])
        finally:
            writer.close()

    return list(await asyncio.gather(*(one(r) for r in requests)))


@pytest.mark.timeout(240)
def test_a_flood_at_ten_times_the_budget_gets_the_budget_and_no_burst(
    sidecars: Sidecars, venue: Venue
) -> None:
    """Two engines flood one service at ten times its 50 req/s for 60 s: the venue sees
    50 req/s within 2%, never more than the bucket at once, and each engine about half."""
    import asyncio

    from tests.e2e.test_vault_e2e import signed_by

    rate, seconds = 50, 60
    svc = binance_service(
        venue.port, venue.ca_file, "/hmac", rate_limit={"requests_per_second": rate}
    )
    proc = sidecars.start({"binance_hmac": svc})
    port = proc.ready["listen"]["port"]
    t0 = time.time()
    per_engine = asyncio.run(_flood(port, engines=2, rate=5 * rate, seconds=seconds))
    seen = sorted(t for t, _, _ in asyncio.run(signed_by(venue, "flood")))
    assert len(seen) == sum(ok for ok, _ in per_engine)
    assert all(ok + refused >= 0.9 * 5 * rate * seconds for ok, refused in per_engine)
    # The admitted rate, over the steady middle of the run.
    middle = [t for t in seen if t0 + 5 <= t < t0 + seconds - 5]
    measured = len(middle) / (seconds - 10)
    assert abs(measured - rate) <= 0.02 * rate, measured
    print(f"flood: admitted {measured:.2f}/s of {rate}/s; engines {per_engine} (ok, refused)")
    # No burst above the bucket (50 at once; the sim's clock has 1 ms resolution, and
    # network jitter may squeeze two arrivals together: one request of slack).
    interval = 1.0 / rate
    for i, first in enumerate(seen):
        for j in range(i + 1, min(i + 3 * rate, len(seen))):
            assert j - i + 1 <= rate + (seen[j] - first + 0.002) / interval + 1
    # Fair share: neither engine starved.
    admitted = [ok for ok, _ in per_engine]
    assert min(admitted) >= 0.4 * sum(admitted), admitted


async def _flood(port: int, *, engines: int, rate: int, seconds: float) -> list[tuple[int, int]]:
    """``engines`` keep-alive connections, each sending ``rate`` req/s on a fixed schedule
    (bounded: ``rate * seconds`` requests and ``seconds + 10`` s each)."""
    import asyncio

    async def engine(e: int) -> tuple[int, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ok = refused = 0
        start = time.monotonic()
        try:
            for i in range(rate * int(seconds)):
                due = start + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() > start + seconds + 10:
                    break
                writer.write(_test_orders(f"flood{e}x{i}", 1))
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                status = int(head.split(b" ", 2)[1])
                if status == 200:
                    ok += 1
                else:
                    assert status == 429, head
                    refused += 1
        finally:
            writer.close()
        return ok, refused

    return list(await asyncio.gather(*(engine(e) for e in range(engines))))
