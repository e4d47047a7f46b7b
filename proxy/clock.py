"""Venue clocks: how far our clock is from each venue's, measured off the hot path.

Venues reject a request whose timestamp is outside their window (Binance -1021, OKX
50102, Bybit 10002). The sidecar asks each venue's public time endpoint every
``SYNC_INTERVAL_S`` over the service's own warm pool, keeps the last few samples, and
applies the offset of the sample with the smallest round trip (the one whose midpoint
estimate is tightest, as NTP does) to every timestamp it signs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ProxyError

SYNC_INTERVAL_S = 30.0  # clocks drift by ms per hour at worst; 30 s is plenty and cheap
SAMPLES_KEPT = 8  # the min-RTT sample among the last 8 (4 minutes of history)
MAX_PLAUSIBLE_OFFSET_MS = 10 * 60 * 1000  # beyond 10 minutes a venue's answer is not trusted
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Sample:
    rtt_ms: float
    offset_ms: float


def offset_of(sent_ms: float, received_ms: float, venue_ms: float) -> Sample:
    """One probe: the venue's time against the midpoint of our send and receive times."""
    return Sample(received_ms - sent_ms, venue_ms - (sent_ms + received_ms) / 2)


def best_offset(samples: deque[Sample] | list[Sample]) -> float | None:
    """The offset of the sample with the smallest round trip; None without samples."""
    if not samples:
        return None
    return min(samples, key=lambda s: s.rtt_ms).offset_ms


class ClockSync:
    """Keeps one service's ``clock_offset_ms`` current. Runs on the loop; never blocks.

    ``probe`` performs one GET of the time endpoint and returns the venue's time in epoch
    milliseconds (raising ProxyError or ValueError on failure); ``apply`` receives the new
    offset; ``log`` reports changes and failures.
    """

    def __init__(
        self,
        service: str,
        probe: Callable[[], asyncio.Future[float]],
        apply: Callable[[float], None],
        log: Callable[..., None],
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = SYNC_INTERVAL_S,
    ) -> None:
        self.service = service
        self.probe = probe
        self.apply = apply
        self.log = log
        self.clock = clock
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        self.offset_ms: float | None = None
        self.last_error: str | None = None

    async def sync_once(self) -> float | None:
        """Probe once; returns the offset now applied (None if none is known yet)."""
        sent = self.clock() * 1000
        try:
            venue_ms = await asyncio.wait_for(self.probe(), PROBE_TIMEOUT_S)
        except (ProxyError, ValueError, TimeoutError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            self.log("clock_sync_failed", service=self.service, error=self.last_error)
            return self.offset_ms
        received = self.clock() * 1000
        sample = offset_of(sent, received, venue_ms)
        if abs(sample.offset_ms) > MAX_PLAUSIBLE_OFFSET_MS:
            self.log("clock_sync_implausible", service=self.service, offset_ms=sample.offset_ms)
            return self.offset_ms
        self.samples.append(sample)
        best = best_offset(self.samples)
        assert best is not None
        previous = self.offset_ms
        self.offset_ms = best
        self.last_error = None
        self.apply(best)
        if previous is None or abs(best - previous) >= 50:
            self.log(
                "clock_offset",
                service=self.service,
                offset_ms=round(best, 1),
                rtt_ms=round(sample.rtt_ms, 2),
            )
        return best

    async def run(self) -> None:
        """Probe every ``interval_s`` (with jitter) until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s * random.uniform(0.9, 1.1))  # noqa: S311
            await self.sync_once()
