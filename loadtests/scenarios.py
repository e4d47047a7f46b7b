"""Schedules and the saturation search: pure functions and a small state machine.

A schedule is an `array('q')` of intended send times in nanoseconds after t0, which is
all the generator needs. No I/O here.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

NS_PER_S = 1_000_000_000


def piecewise(segments: Sequence[tuple[float, float]]) -> array[int]:
    """Back-to-back segments of (seconds, requests per second), each evenly spaced."""
    out = array("q")
    start = 0.0
    for seconds, rate in segments:
        if seconds <= 0 or rate <= 0:
            raise ValueError(f"segment needs seconds > 0 and rate > 0, got {seconds}, {rate}")
        count = max(1, round(seconds * rate))
        step = NS_PER_S / rate
        out.extend(round(start + i * step) for i in range(count))
        start += seconds * NS_PER_S
    return out


def constant(rate: float, seconds: float) -> array[int]:
    """`rate` requests per second, evenly spaced, for `seconds`."""
    return piecewise([(seconds, rate)])


@dataclass(frozen=True, slots=True)
class Burst:
    """`base` req/s, and `factor` times that for `burst_s` in the middle of every period."""

    base: float
    factor: float
    burst_s: float
    period_s: float
    seconds: float

    def windows(self) -> list[tuple[float, float]]:
        """(start, end) of each burst in seconds after t0."""
        lead = (self.period_s - self.burst_s) / 2
        count = int(self.seconds // self.period_s)
        return [
            (k * self.period_s + lead, k * self.period_s + lead + self.burst_s)
            for k in range(count)
        ]

    def schedule(self) -> array[int]:
        if not 0 < self.burst_s < self.period_s or self.seconds < self.period_s:
            raise ValueError("need 0 < burst_s < period_s <= seconds")
        lead = (self.period_s - self.burst_s) / 2
        tail = self.period_s - self.burst_s - lead
        period = [(lead, self.base), (self.burst_s, self.base * self.factor), (tail, self.base)]
        return piecewise(period * int(self.seconds // self.period_s))


@dataclass(slots=True)
class SaturationSearch:
    """Bounded search for the highest rate that passes (p99 under the limit, no errors).

    Doubles from `start` while probes pass (up to `ceiling`), halves while they fail (down
    to `floor`), then bisects geometrically between the best pass and the lowest fail
    until they are within `resolution` of each other. Never more than `max_probes`.
    """

    start: float
    ceiling: float
    floor: float
    max_probes: int
    resolution: float = 1.15
    probes: list[tuple[float, bool]] = field(default_factory=list)

    def record(self, rate: float, passed: bool) -> None:
        self.probes.append((rate, passed))

    @property
    def best(self) -> float | None:
        """The highest rate that passed, or None."""
        passed = [r for r, ok in self.probes if ok]
        return max(passed) if passed else None

    def next_rate(self) -> float | None:
        """The next rate to probe, or None when the search is over."""
        if len(self.probes) >= self.max_probes:
            return None
        if not self.probes:
            return _nice(self.start)
        lo = self.best
        above = [r for r, ok in self.probes if not ok and (lo is None or r > lo)]
        hi = min(above) if above else None
        if hi is None:
            assert lo is not None
            if lo >= self.ceiling:
                return None
            return _nice(min(lo * 2, self.ceiling))
        if lo is None:
            rate = hi / 2
            return _nice(rate) if rate >= self.floor else None
        if hi / lo <= self.resolution:
            return None
        rate = _nice(math.sqrt(lo * hi))
        return None if rate in (lo, hi) else rate


def _nice(rate: float) -> float:
    """Round to two significant digits (so probes read 1400, not 1414.2)."""
    if rate <= 0:
        return rate
    scale = 10 ** (math.floor(math.log10(rate)) - 1)
    return float(round(rate / scale) * scale)
