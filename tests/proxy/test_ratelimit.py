"""The limiter's arithmetic, as properties over arbitrary arrival sequences (µs clock)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ratelimit import (
    NEVER,
    ORDERS,
    PROBE_WAIT_US,
    WEIGHT,
    Limiter,
    Share,
    Window,
    limiter_for,
    pace_burst,
)

MS = 1_000
SECOND = 1_000_000
MINUTE = 60 * SECOND

arrivals = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=5 * SECOND),  # gap before the request
        st.integers(min_value=1, max_value=50),  # its weight
        st.integers(min_value=0, max_value=1),  # orders it places
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(
    gaps=arrivals,
    rps=st.integers(min_value=1, max_value=50),
    rpm=st.integers(min_value=1, max_value=500),
    weight_limit=st.integers(min_value=50, max_value=600),
    orders_10s=st.integers(min_value=1, max_value=20),
    start=st.integers(min_value=0, max_value=10**15),
)
def test_no_aligned_window_ever_admits_more_than_its_budget(
    gaps: list[tuple[int, int, int]],
    rps: int,
    rpm: int,
    weight_limit: int,
    orders_10s: int,
    start: int,
) -> None:
    lim = limiter_for(rps, rpm, ((WEIGHT, 60_000, weight_limit), (ORDERS, 10_000, orders_10s)))
    now = start
    per_second: Counter[int] = Counter()
    per_minute: Counter[int] = Counter()
    weight_per_minute: Counter[int] = Counter()
    orders_per_10s: Counter[int] = Counter()
    for gap, weight, orders in gaps:
        now += gap
        if lim.admit(now, weight, orders) == 0:
            per_second[now // SECOND] += 1
            per_minute[now // MINUTE] += 1
            weight_per_minute[now // MINUTE] += weight
            orders_per_10s[now // (10 * SECOND)] += orders
    assert all(v <= rps for v in per_second.values())
    assert all(v <= rpm for v in per_minute.values())
    assert all(v <= weight_limit for v in weight_per_minute.values())
    assert all(v <= orders_10s for v in orders_per_10s.values())


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=200 * MS), min_size=1, max_size=500),
    rps=st.integers(min_value=1, max_value=100),
    start=st.integers(min_value=0, max_value=10**15),
)
def test_no_burst_ever_exceeds_the_bucket(gaps: list[int], rps: int, start: int) -> None:
    """Whatever the alignment, any interval of length t admits at most burst + t * rate
    (GCRA's bound): fixed windows alone would let two full windows through back to back."""
    lim = limiter_for(rps, None)
    burst = pace_burst(rps, None)
    now = start
    admitted: list[int] = []
    for gap in gaps:
        now += gap
        if lim.admit(now) == 0:
            admitted.append(now)
    interval = -(-SECOND // rps)
    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            # j - i + 1 requests within admitted[j] - first µs
            assert j - i + 1 <= burst + (admitted[j] - first) // interval


@settings(max_examples=300, deadline=None)
@given(
    rps=st.integers(min_value=1, max_value=200),
    headroom=st.floats(min_value=1.0, max_value=3.0),  # spacing >= the budget's interval
    start=st.integers(min_value=0, max_value=10**15),
)
def test_a_steady_stream_under_the_budget_is_never_refused(
    rps: int, headroom: float, start: int
) -> None:
    """Evenly spaced requests at or under the per-second budget (and so the per-minute
    budget of 60x it) are all admitted, wherever the stream starts."""
    lim = limiter_for(rps, rps * 60)
    interval = -(-SECOND // rps) * headroom
    for n in range(3 * rps):
        assert lim.admit(start + int(n * interval)) == 0


def test_refusal_says_how_long_to_wait_and_charges_nothing() -> None:
    lim = Limiter((Window(SECOND, 2),))
    assert lim.admit(10_100 * MS) == 0
    assert lim.admit(10_200 * MS) == 0
    assert lim.admit(10_300 * MS) == 700 * MS  # next window starts at 11 s
    lim.sync()
    assert lim.windows[0].used == 2
    assert lim.admit(11_000 * MS) == 0
    lim = Limiter((Window(SECOND, 10, WEIGHT),))
    assert lim.admit(0, weight=11) == NEVER  # more than a whole window: never
    assert lim.windows[0].used == 0


def test_the_pace_refuses_a_second_burst_right_after_a_window_boundary() -> None:
    lim = limiter_for(10, None)
    end = 5 * SECOND - 1
    assert [lim.admit(end) for _ in range(10)] == [0] * 10
    # One µs later a new aligned window is empty, but the bucket is not: wait for a token.
    assert lim.admit(end + 1) == 100 * MS - 1
    assert lim.admit(end + 100 * MS) == 0


def test_venue_counter_raises_the_local_count() -> None:
    lim = limiter_for(None, None, ((WEIGHT, 60_000, 100),))
    t = 7 * MINUTE + 5 * MS
    assert lim.admit(t, weight=1) == 0
    lim.observe_used(t + 5 * MS, WEIGHT, MINUTE, 99)  # another host used 98 more
    assert lim.admit(t + 10 * MS, weight=1) == 0
    assert lim.admit(t + 20 * MS, weight=1) > 0
    lim.observe_used(t + 30 * MS, WEIGHT, MINUTE, 3)  # lower than ours: ignored
    lim.sync()
    assert lim.windows[0].used == 100
    lim.observe_used(t + 30 * MS, ORDERS, MINUTE, 10**6)  # a unit it does not count
    assert lim.windows[0].used == 100


def test_a_stop_holds_everything_then_lets_one_probe_through() -> None:
    lim = limiter_for(1000, None)
    lim.block(5 * SECOND, 120 * SECOND)
    assert lim.admit(6 * SECOND) == 119 * SECOND
    assert lim.admit(125 * SECOND) == 0  # the probe
    assert lim.probing
    assert lim.admit(125 * SECOND + 1) == PROBE_WAIT_US  # the rest wait for its answer
    lim.block(125 * SECOND + 10, 60 * SECOND)  # the probe was stopped too
    assert not lim.probing
    assert lim.admit(126 * SECOND) == 60 * SECOND - (SECOND - 10)
    assert lim.admit(186 * SECOND) == 0  # the next probe
    lim.probe_lost()  # no answer: the next request probes again
    assert lim.admit(186 * SECOND + 5 * MS) == 0
    assert lim.probing
    lim.probe_answered(186 * SECOND + 9 * MS)
    assert not lim.probing and lim.blocked_until_us == 0
    assert [lim.admit(187 * SECOND + i) for i in range(5)] == [0] * 5


def test_one_engine_cannot_starve_another() -> None:
    lim = limiter_for(10, None)
    lim.pace = None  # the windows' arithmetic alone
    flooder, other = Share(), Share()
    t = 3 * SECOND
    # Alone, an engine may use the whole budget.
    assert sum(lim.admit(t + i, share=flooder) == 0 for i in range(20)) == 10
    # The other engine arrives after the flooder took this window: it waits for the next.
    assert lim.admit(t + 50, share=other) > 0
    # From then on (it sent in the last window) the flooder stops at half the budget,
    # leaving the other engine its share even though the flooder asks first.
    for t in (4 * SECOND, 5 * SECOND):
        assert sum(lim.admit(t + i, share=flooder) == 0 for i in range(20)) == 5
        assert sum(lim.admit(t + 100 + i, share=other) == 0 for i in range(5)) == 5
    # The other engine goes quiet: after one window, the flooder has the budget again.
    assert sum(lim.admit(6 * SECOND + i, share=flooder) == 0 for i in range(20)) == 5
    assert sum(lim.admit(7 * SECOND + i, share=flooder) == 0 for i in range(20)) == 10


@settings(max_examples=200, deadline=None)
@given(
    order=st.lists(st.booleans(), min_size=1, max_size=300),
    limit=st.integers(min_value=2, max_value=60),
)
def test_fair_share_bounds_each_engine_once_both_send(order: list[bool], limit: int) -> None:
    """Once both engines have sent in a window, neither is admitted beyond ceil(limit / 2)
    (what one took before the other appeared stays taken)."""
    lim = Limiter((Window(SECOND, limit),))
    shares = (Share(), Share())
    got = [0, 0]
    seen = [False, False]
    before_other = [0, 0]  # admitted before the other engine's first request
    for i, which in enumerate(order):
        if not seen[which]:
            seen[which] = True
            before_other[not which] = got[not which]
        if lim.admit(SECOND + i, share=shares[which]) == 0:
            got[which] += 1
    half = -(-limit // 2)
    for e in (0, 1):
        if seen[not e]:
            assert got[e] <= max(half, before_other[e])


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3 * SECOND),  # gap
            st.one_of(st.none(), st.integers(min_value=0, max_value=120)),  # venue's count
        ),
        max_size=300,
    ),
    limit=st.integers(min_value=1, max_value=100),
)
def test_after_the_venue_reports_a_count_only_the_rest_of_the_limit_is_admitted(
    events: list[tuple[int, int | None]], limit: int
) -> None:
    """Whatever the venue reports mid-window (ahead of us, behind us), our admissions
    after the report stay within what the report left of that window's limit."""
    lim = limiter_for(None, None, ((WEIGHT, 60_000, limit),))
    now = 10**12
    reports: list[tuple[int, int, int]] = []  # (event index, time, count)
    admitted: list[tuple[int, int]] = []  # (event index, time)
    for i, (gap, count) in enumerate(events):
        now += gap
        if count is None:
            if lim.admit(now, weight=1) == 0:
                admitted.append((i, now))
        else:
            lim.observe_used(now, WEIGHT, MINUTE, count)
            reports.append((i, now, count))
    for i, t, count in reports:
        window = t // MINUTE
        after = sum(1 for j, a in admitted if j > i and a // MINUTE == window)
        assert after <= max(0, limit - count)
