"""Rate-limit arithmetic: pure, synchronous, O(1), with the clock passed in.

The budget is counted the way the venues count it: in fixed windows aligned to the epoch
(Binance's ``X-MBX-USED-WEIGHT-1M`` resets at each minute, its order counts at each 10 s
and each day). A request is admitted only if every window of the service has room for
its cost (its weight); then every window is charged. So no aligned window ever admits
more than its budget, and a steady stream under the budget is never refused. What the
venue reports it has counted (traffic from other hosts on the same IP included) raises
the local count toward it; a venue's "stop" (429/418 with Retry-After) blocks the
service until that time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Window:
    """One fixed window: at most ``limit`` units per ``width_ms``, aligned to the epoch."""

    width_ms: int
    limit: int
    start_ms: int = 0  # start of the window ``used`` counts
    used: int = 0

    def roll(self, now_ms: int) -> None:
        start = now_ms - now_ms % self.width_ms
        if start != self.start_ms:
            self.start_ms = start
            self.used = 0

    def wait_ms(self, now_ms: int, cost: int) -> int:
        """0 if ``cost`` fits now, else the ms until this window next resets."""
        self.roll(now_ms)
        if self.used + cost <= self.limit:
            return 0
        if cost > self.limit:
            return -1  # never fits
        return self.start_ms + self.width_ms - now_ms


@dataclass(slots=True)
class Limiter:
    """The windows of one service (its key type's budget) and any venue-imposed block."""

    windows: tuple[Window, ...]
    blocked_until_ms: int = 0

    def admit(self, now_ms: int, cost: int = 1) -> int:
        """Charge ``cost`` and return 0, or charge nothing and return the ms to wait.

        -1 means the cost exceeds a window's whole budget: it can never be admitted.
        """
        if now_ms < self.blocked_until_ms:
            return self.blocked_until_ms - now_ms
        longest = 0
        for w in self.windows:
            wait = w.wait_ms(now_ms, cost)
            if wait < 0:
                return -1
            longest = max(longest, wait)
        if longest:
            return longest
        for w in self.windows:
            w.used += cost
        return 0

    def observe_used(self, now_ms: int, width_ms: int, used: int) -> None:
        """The venue says it has counted ``used`` in its current ``width_ms`` window:
        never count less than the venue does (others on the same IP count too)."""
        for w in self.windows:
            if w.width_ms == width_ms:
                w.roll(now_ms)
                w.used = max(w.used, used)

    def block(self, now_ms: int, retry_after_ms: int) -> None:
        """The venue said stop: nothing goes out until ``retry_after_ms`` from now."""
        self.blocked_until_ms = max(self.blocked_until_ms, now_ms + retry_after_ms)


def limiter_for(requests_per_second: int | None, requests_per_minute: int | None) -> Limiter:
    """The policy's ``rate_limits`` of a key type as a Limiter (a missing rate: no window)."""
    windows = []
    if requests_per_second:
        windows.append(Window(1_000, requests_per_second))
    if requests_per_minute:
        windows.append(Window(60_000, requests_per_minute))
    return Limiter(tuple(windows))
