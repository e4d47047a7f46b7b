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
and service). While more than one engine has asked in the service's shortest request
window (this one or the last), none may take more than its even share of that window's
limit, so one engine flooding a service cannot starve another of its share.

Speed: the general check walks every window (``_admit_slow``). Between window boundaries,
with room in every window, no venue block and the engine within its share, the answer is
known from four numbers: the least room left per unit and the window's end. ``admit``
keeps those and charges them alone (the fast path), and the windows' own counts catch up
(``sync``) whenever the slow path, a venue correction or a reader needs them. Both paths
give the same answers (the property tests run through both).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

REQUESTS = 0  # one per request
WEIGHT = 1  # the venue's request weight of the endpoint
ORDERS = 2  # one per order placed (the venue's order-count limits)
UNIT_NAMES = ("requests", "weight", "orders")

# While a half-open probe is out, others are told to come back this much later.
PROBE_WAIT_US = 100_000
# A cost above a window's whole limit can never be admitted; the caller gets this value.
NEVER = -1
_UNLIMITED = sys.maxsize


@dataclass(slots=True)
class Window:
    """At most ``limit`` units of ``unit`` per ``width_us``, aligned to the epoch."""

    width_us: int
    limit: int
    unit: int = REQUESTS
    start_us: int = -1  # start of the window ``used`` counts
    used: int = 0
    clients: int = 0  # distinct engines that asked in this window (fair sharing)
    prev_clients: int = 0  # ... in the window just before it

    def roll(self, start_us: int) -> None:
        self.prev_clients = self.clients if start_us - self.start_us == self.width_us else 0
        self.start_us = start_us
        self.used = 0
        self.clients = 0


@dataclass(slots=True)
class Pace:
    """GCRA: one request per ``interval_us`` on average, up to ``burst`` at once.
    ``tat`` is the theoretical arrival time of the next request."""

    interval_us: int
    burst: int
    tolerance_us: int = 0
    tat: int = 0

    def __post_init__(self) -> None:
        self.tolerance_us = (self.burst - 1) * self.interval_us


@dataclass(slots=True)
class Share:
    """One engine's use of one service's fairness window (its shortest request window)."""

    start_us: int = -1
    used: int = 0


@dataclass(slots=True)
class Limiter:
    """The windows and pace of one service and any venue-imposed block."""

    windows: tuple[Window, ...]
    pace: Pace | None = None
    blocked_until_us: int = 0  # 0: open
    probing: bool = False  # the block has passed and one probe is out
    # The fast path's summary of the windows, valid in [_from_us, _to_us) (see ``_refresh``):
    # the least room left per unit, and that room when last synced into the windows.
    _from_us: int = field(default=0, repr=False)
    _to_us: int = field(default=-1, repr=False)
    _room_r: int = field(default=0, repr=False)
    _room_w: int = field(default=0, repr=False)
    _room_o: int = field(default=0, repr=False)
    _base_r: int = field(default=0, repr=False)
    _base_w: int = field(default=0, repr=False)
    _base_o: int = field(default=0, repr=False)
    _fair: Window | None = field(default=None, repr=False)  # the fairness window
    _fair_n: int = field(default=0, repr=False)  # engines sharing it
    # A tenth of the smallest weight and order limits: below that room, ``near_limit``.
    _near_w: int = field(default=0, repr=False)
    _near_o: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        requests = [w for w in self.windows if w.unit == REQUESTS]
        self._fair = min(requests, key=lambda w: w.width_us) if requests else None
        for unit in (WEIGHT, ORDERS):
            limits = [w.limit for w in self.windows if w.unit == unit]
            near = min(limits) // 10 + 1 if limits else 0
            if unit == WEIGHT:
                self._near_w = near
            else:
                self._near_o = near

    def near_limit(self) -> bool:
        """Whether a venue window (weight, orders) has less than a tenth of its room left
        (as of the last refresh or charge): the venue's counters are then read on every
        answer rather than sampled (``proxy.server``)."""
        return self._room_w < self._near_w or self._room_o < self._near_o

    def admit(
        self, now_us: int, weight: int = 1, orders: int = 0, share: Share | None = None
    ) -> int:
        """Charge the request and return 0, or charge nothing and return the µs to wait.

        ``weight`` and ``orders`` are its cost in the venue's units (a request always costs
        one request). ``NEVER`` (-1): it costs more than a window's whole limit. After a
        block, the first request admitted is the probe (``probing`` turns True).
        """
        if (
            self.blocked_until_us
            or not self._from_us <= now_us < self._to_us
            or self._room_r < 1
            or weight > self._room_w
            or orders > self._room_o
        ):
            return self._admit_slow(now_us, weight, orders, share)
        pace = self.pace
        if pace is not None:
            tat = pace.tat if pace.tat > now_us else now_us
            if tat - pace.tolerance_us > now_us:
                return self._admit_slow(now_us, weight, orders, share)
        if share is not None:
            fair = self._fair
            if fair is not None:
                n = self._fair_n
                if share.start_us != fair.start_us or (
                    n > 1 and (share.used + 1) * n > fair.limit + n - 1
                ):
                    return self._admit_slow(now_us, weight, orders, share)
                share.used += 1
        if pace is not None:
            pace.tat = tat + pace.interval_us
        self._room_r -= 1
        self._room_w -= weight
        self._room_o -= orders
        return 0

    def sync(self) -> None:
        """Bring the windows' counts up to date with what the fast path charged."""
        charged = (
            self._base_r - self._room_r,
            self._base_w - self._room_w,
            self._base_o - self._room_o,
        )
        if any(charged):
            for w in self.windows:
                w.used += charged[w.unit]
            self._base_r, self._base_w, self._base_o = self._room_r, self._room_w, self._room_o

    def _refresh(self, now_us: int) -> None:
        """Recompute the fast path's summary for the windows current at ``now_us``."""
        start_max, end_min = 0, _UNLIMITED
        room = [_UNLIMITED, _UNLIMITED, _UNLIMITED]
        for w in self.windows:
            start = now_us - now_us % w.width_us
            if start != w.start_us:
                w.roll(start)
            start_max = max(start_max, start)
            end_min = min(end_min, start + w.width_us)
            room[w.unit] = min(room[w.unit], w.limit - w.used)
        self._from_us, self._to_us = start_max, end_min
        self._room_r, self._room_w, self._room_o = room
        self._base_r, self._base_w, self._base_o = room
        fair = self._fair
        if fair is not None:
            self._fair_n = max(fair.clients, fair.prev_clients)

    def _invalidate(self) -> None:
        self.sync()
        self._to_us = -1  # the next admit takes the slow path and refreshes

    def _admit_slow(self, now_us: int, weight: int, orders: int, share: Share | None) -> int:
        self.sync()
        try:
            return self._check_and_charge(now_us, weight, orders, share)
        finally:
            self._refresh(now_us)

    def _check_and_charge(self, now_us: int, weight: int, orders: int, share: Share | None) -> int:
        """The general rule, over every window (the fast path is a shortcut of it)."""
        if self.blocked_until_us:
            if now_us < self.blocked_until_us:
                return self.blocked_until_us - now_us
            if self.probing:
                return PROBE_WAIT_US
        longest = 0
        for w in self.windows:
            unit = w.unit
            cost = 1 if unit == REQUESTS else weight if unit == WEIGHT else orders
            if cost:
                start = now_us - now_us % w.width_us
                if start != w.start_us:
                    w.roll(start)
                if w.used + cost > w.limit:
                    if cost > w.limit:
                        return NEVER
                    longest = max(longest, start + w.width_us - now_us)
        fair = self._fair
        if share is not None and fair is not None:
            if share.start_us != fair.start_us:
                # First ask in this window: the engine counts as active from now,
                # admitted or not (a refused engine is still demand).
                share.start_us = fair.start_us
                share.used = 0
                fair.clients += 1
            n = max(fair.clients, fair.prev_clients)
            if n > 1 and (share.used + 1) * n > fair.limit + n - 1:  # over ceil(limit / n)
                longest = max(longest, fair.start_us + fair.width_us - now_us)
        pace = self.pace
        if pace is not None:
            longest = max(longest, max(pace.tat, now_us) - pace.tolerance_us - now_us)
        if longest:
            return longest
        for w in self.windows:
            unit = w.unit
            w.used += 1 if unit == REQUESTS else weight if unit == WEIGHT else orders
        if share is not None and fair is not None:
            share.used += 1
        if pace is not None:
            pace.tat = max(pace.tat, now_us) + pace.interval_us
        if self.blocked_until_us:
            self.probing = True
        return 0

    def observe_used(self, now_us: int, unit: int, width_us: int, used: int) -> None:
        """The venue says it has counted ``used`` units in its current ``width_us`` window:
        never count less than the venue does (others on the same IP count too)."""
        if unit == REQUESTS:
            pending = self._base_r - self._room_r
        elif unit == WEIGHT:
            pending = self._base_w - self._room_w
        else:
            pending = self._base_o - self._room_o
        for w in self.windows:
            if w.unit == unit and w.width_us == width_us:
                if w.start_us <= now_us < w.start_us + width_us and used <= w.used + pending:
                    continue  # the usual case: the venue counts what we sent, or less
                self._invalidate()
                pending = 0
                start = now_us - now_us % width_us
                if start != w.start_us:
                    w.roll(start)
                w.used = max(w.used, used)

    def block(self, now_us: int, wait_us: int) -> None:
        """The venue said stop: nothing goes out until ``wait_us`` from now, then a probe."""
        self._invalidate()
        self.blocked_until_us = max(self.blocked_until_us, now_us + wait_us)
        self.probing = False

    def probe_answered(self, now_us: int) -> None:
        """The probe came back without a stop: the venue is open again. (A stop goes to
        ``block`` instead, which sets the new time and ends the probe.)"""
        self._invalidate()
        if self.probing and now_us >= self.blocked_until_us:
            self.blocked_until_us = 0
        self.probing = False

    def probe_lost(self) -> None:
        """The probe got no answer (timeout, connection lost): the next request probes."""
        self._invalidate()
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
    plus the venue's own ``(unit, width_ms, limit)`` windows, as a Limiter.

    One pace, at the tightest sustained rate of the two (the other can then never bind),
    its interval rounded up so it never exceeds the rate."""
    windows: list[Window] = []
    interval = 0
    for rate, width_ms in ((requests_per_second, 1_000), (requests_per_minute, 60_000)):
        if rate:
            windows.append(Window(width_ms * 1000, rate))
            interval = max(interval, -(-width_ms * 1000 // rate))
    for unit, width_ms, limit in venue_windows:
        windows.append(Window(width_ms * 1000, limit, unit))
    pace = (
        Pace(interval, pace_burst(requests_per_second, requests_per_minute)) if interval else None
    )
    return Limiter(tuple(windows), pace)
