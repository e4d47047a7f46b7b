"""Rate-limit arithmetic: pure, synchronous, O(1), with the clock passed in (microseconds).

A service's budget is two kinds of limit, checked together before a request is signed:

- **Fixed windows aligned to the epoch**, the way the venues count (Binance's
  ``X-MBX-USED-WEIGHT-1M`` resets at each minute, its order counts at each 10 s and each
  day). Each window counts one unit: requests (the policy's ``requests_per_second`` and
  ``requests_per_minute``), request weight, or orders (the venue's own limits, from
  ``proxy.venue_limits``). No aligned window ever admits more than its limit.
- **A pace (GCRA) per request rate**, so that no burst exceeds the bucket: over any
  interval of length ``t``, at most ``burst + t * rate`` requests go out, whatever the
  alignment (fixed windows alone would let two full windows through back to back).

The venue's own counters correct the local count (``observe_used``: traffic from other
hosts on the same IP counts too), and a venue's "stop" (429/418, or its remaining quota at
zero) blocks the service (``block``) until the time it gave; then one request goes out as
a probe (half-open) and the rest wait until its answer says the venue is open again.

Fair sharing: ``admit`` takes the calling engine's ``Share`` (one per engine connection
and service). While more than one engine has sent in a window (this one or the last), none
may take more than its even share of that window's limit, so one engine flooding a
service cannot starve another of its share.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUESTS = 0  # one per request
WEIGHT = 1  # the venue's request weight of the endpoint
ORDERS = 2  # one per order placed (the venue's order-count limits)
UNIT_NAMES = ("requests", "weight", "orders")

# While a half-open probe is out, others are told to come back this much later.
PROBE_WAIT_US = 100_000
# A cost above a window's whole limit can never be admitted; the caller gets this value.
NEVER = -1


@dataclass(slots=True)
class Window:
    """At most ``limit`` units of ``unit`` per ``width_us``, aligned to the epoch."""

    width_us: int
    limit: int
    unit: int = REQUESTS
    start_us: int = -1  # start of the window ``used`` counts
    used: int = 0
    clients: int = 0  # distinct engines charged in this window
    prev_clients: int = 0  # ... in the window just before it

    def roll(self, start_us: int) -> None:
        self.prev_clients = self.clients if start_us - self.start_us == self.width_us else 0
        self.start_us = start_us
        self.used = 0
        self.clients = 0


@dataclass(slots=True)
class Pace:
    """GCRA for one request rate: one request per ``interval_us`` on average, up to
    ``burst`` at once. ``tat`` is the theoretical arrival time of the next request."""

    interval_us: int
    burst: int
    tolerance_us: int = 0
    tat: int = 0

    def __post_init__(self) -> None:
        self.tolerance_us = (self.burst - 1) * self.interval_us


@dataclass(slots=True)
class Share:
    """One engine's use of each window of one service (for fair sharing)."""

    start_us: list[int]
    used: list[int]

    @classmethod
    def of(cls, limiter: Limiter) -> Share:
        n = len(limiter.windows)
        return cls([-1] * n, [0] * n)


@dataclass(slots=True)
class Limiter:
    """The windows and paces of one service and any venue-imposed block."""

    windows: tuple[Window, ...]
    paces: tuple[Pace, ...] = ()
    blocked_until_us: int = 0  # 0: open
    probing: bool = False  # the block has passed and one probe is out

    def admit(
        self, now_us: int, weight: int = 1, orders: int = 0, share: Share | None = None
    ) -> int:
        """Charge the request and return 0, or charge nothing and return the µs to wait.

        ``weight`` and ``orders`` are its cost in the venue's units (a request always costs
        one request). ``NEVER`` (-1): it costs more than a window's whole limit. After a
        block, the first request admitted is the probe (``probing`` turns True).
        """
        if self.blocked_until_us:
            if now_us < self.blocked_until_us:
                return self.blocked_until_us - now_us
            if self.probing:
                return PROBE_WAIT_US
        longest = 0
        for i, w in enumerate(self.windows):
            unit = w.unit
            cost = 1 if unit == REQUESTS else weight if unit == WEIGHT else orders
            if cost:
                start = now_us - now_us % w.width_us
                if start != w.start_us:
                    w.roll(start)
                if share is not None and share.start_us[i] != start:
                    # First ask in this window: the engine counts as active from now,
                    # admitted or not (a refused engine is still demand).
                    share.start_us[i] = start
                    share.used[i] = 0
                    w.clients += 1
                if w.used + cost > w.limit:
                    if cost > w.limit:
                        return NEVER
                    wait = start + w.width_us - now_us
                    longest = max(longest, wait)
                elif share is not None:
                    n = w.clients if w.clients > w.prev_clients else w.prev_clients
                    if n > 1 and (share.used[i] + cost) * n > w.limit + n - 1:  # > ceil(L/n)
                        wait = start + w.width_us - now_us
                        longest = max(longest, wait)
        for p in self.paces:
            tat = p.tat if p.tat > now_us else now_us
            wait = tat - p.tolerance_us - now_us
            if wait > longest:  # noqa: PLR1730 - per request: a compare, not a call
                longest = wait
        if longest:
            return longest
        for i, w in enumerate(self.windows):
            unit = w.unit
            cost = 1 if unit == REQUESTS else weight if unit == WEIGHT else orders
            if cost:
                w.used += cost
                if share is not None:
                    share.used[i] += cost
        for p in self.paces:
            p.tat = (p.tat if p.tat > now_us else now_us) + p.interval_us
        if self.blocked_until_us:
            self.probing = True
        return 0

    def observe_used(self, now_us: int, unit: int, width_us: int, used: int) -> None:
        """The venue says it has counted ``used`` units in its current ``width_us`` window:
        never count less than the venue does (others on the same IP count too)."""
        for w in self.windows:
            if w.unit == unit and w.width_us == width_us:
                start = now_us - now_us % width_us
                if start != w.start_us:
                    w.roll(start)
                w.used = max(w.used, used)

    def block(self, now_us: int, wait_us: int) -> None:
        """The venue said stop: nothing goes out until ``wait_us`` from now, then a probe."""
        self.blocked_until_us = max(self.blocked_until_us, now_us + wait_us)
        self.probing = False

    def probe_answered(self, now_us: int) -> None:
        """The probe came back without a stop: the venue is open again. (A stop goes to
        ``block`` instead, which sets the new time and ends the probe.)"""
        if self.probing and now_us >= self.blocked_until_us:
            self.blocked_until_us = 0
        self.probing = False

    def probe_lost(self) -> None:
        """The probe got no answer (timeout, connection lost): the next request probes."""
        self.probing = False


def pace_burst(requests_per_second: int | None, requests_per_minute: int | None) -> int:
    """The bucket: one second's worth of the tightest rate (at least one request)."""
    per_second = [r for r in (requests_per_second, (requests_per_minute or 0) // 60) if r]
    return max(1, min(per_second)) if per_second else 1


def limiter_for(
    requests_per_second: int | None,
    requests_per_minute: int | None,
    venue_windows: tuple[tuple[int, int, int], ...] = (),
) -> Limiter:
    """The policy's ``rate_limits`` of a key type (a missing rate: no limit of that width)
    plus the venue's own ``(unit, width_ms, limit)`` windows, as a Limiter."""
    windows: list[Window] = []
    paces: list[Pace] = []
    burst = pace_burst(requests_per_second, requests_per_minute)
    for rate, width_ms in ((requests_per_second, 1_000), (requests_per_minute, 60_000)):
        if rate:
            windows.append(Window(width_ms * 1000, rate))
            # Rounded up, so the pace never exceeds the rate.
            paces.append(Pace(-(-width_ms * 1000 // rate), min(burst, rate)))
    for unit, width_ms, limit in venue_windows:
        windows.append(Window(width_ms * 1000, limit, unit))
    return Limiter(tuple(windows), tuple(paces))
