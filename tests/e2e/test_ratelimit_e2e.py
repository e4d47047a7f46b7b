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
    proc = sidecars.start()
    port = proc.ready["listen"]["port"]
    banned = parse_responses(
        raw_exchange(
            port, b"GET /hmac/__sim/status?code=418&retry_after=2 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    )
    assert banned[0][0] == 418  # the venue's answer passes through
    t_ban = time.monotonic()
    (held,) = parse_responses(raw_exchange(port, _orders("ban", 1)))
    assert held[0] == 429 and held[1][b"x-authproxy-error"] == b"rate_limited"
    assert 1 <= int(held[1][b"retry-after"]) <= 2
    time.sleep(max(0.0, 2.1 - (time.monotonic() - t_ban)))
    (after,) = parse_responses(raw_exchange(port, _orders("ban-after", 1)))
    assert after[0] == 200, after
