from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.clock import MAX_PLAUSIBLE_OFFSET_MS, ClockSync, Sample, best_offset, offset_of
from proxy.errors import UpstreamUnavailable


def test_offset_is_venue_time_minus_midpoint() -> None:
    s = offset_of(sent_ms=1000.0, received_ms=1010.0, venue_ms=31005.0)
    assert s == Sample(rtt_ms=10.0, offset_ms=30000.0)


def test_best_offset_takes_the_smallest_round_trip() -> None:
    assert best_offset([]) is None
    samples = [Sample(50.0, 120.0), Sample(2.0, 100.0), Sample(9.0, 80.0)]
    assert best_offset(samples) == 100.0


class Probe:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    def __call__(self) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            fut.set_exception(answer)
        else:
            fut.set_result(answer)
        return fut


async def test_sync_applies_plausible_offsets_and_keeps_the_last_on_failure() -> None:
    applied: list[float] = []
    events: list[str] = []
    now = iter([1000.0, 1000.010, 2000.0, 2000.002, 3000.0, 3000.001, 4000.0])
    sync = ClockSync(
        "svc",
        Probe(
            [
                1000_005.0 + 250,
                2000_001.0 + 240,
                UpstreamUnavailable("down"),
                4000_000.0 + MAX_PLAUSIBLE_OFFSET_MS * 2,
            ]
        ),
        applied.append,
        lambda event, **_: events.append(event),
        clock=lambda: next(now),
    )
    assert await sync.sync_once() == pytest.approx(250.0)
    assert await sync.sync_once() == pytest.approx(240.0)  # smaller round trip wins
    assert await sync.sync_once() == pytest.approx(240.0)  # failure: keep what we had
    assert applied == [pytest.approx(250.0), pytest.approx(240.0)]
    assert "clock_sync_failed" in events
    assert sync.last_error == "down"
