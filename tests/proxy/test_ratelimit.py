"""The limiter's arithmetic, as properties over arbitrary arrival sequences."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ratelimit import Limiter, Window, limiter_for

arrivals = st.lists(
    st.tuples(st.integers(min_value=0, max_value=5_000), st.integers(min_value=1, max_value=5)),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(
    gaps=arrivals,
    rps=st.integers(min_value=1, max_value=50),
    rpm=st.integers(min_value=1, max_value=500),
    start=st.integers(min_value=0, max_value=10**12),
)
def test_no_aligned_window_ever_admits_more_than_its_budget(
    gaps: list[tuple[int, int]], rps: int, rpm: int, start: int
) -> None:
    lim = limiter_for(rps, rpm)
    now = start
    per_second: Counter[int] = Counter()
    per_minute: Counter[int] = Counter()
    for gap, cost in gaps:
        now += gap
        if lim.admit(now, cost) == 0:
            per_second[now // 1000] += cost
            per_minute[now // 60_000] += cost
    assert all(v <= rps for v in per_second.values())
    assert all(v <= rpm for v in per_minute.values())


@settings(max_examples=300, deadline=None)
@given(
    rps=st.integers(min_value=1, max_value=200),
    headroom=st.floats(min_value=1.05, max_value=3.0),  # spacing >= 1.05x the budget interval
    start=st.integers(min_value=0, max_value=10**12),
)
def test_a_steady_stream_under_the_budget_is_never_refused(
    rps: int, headroom: float, start: int
) -> None:
    """Evenly spaced requests under the per-second budget (and so the per-minute
    budget of 60x it) are all admitted, wherever the stream starts. (At exactly the budget,
    whole-millisecond timestamps can put one more arrival in a window: refused, rightly.)"""
    lim = limiter_for(rps, rps * 60)
    interval = 1000.0 * headroom / rps
    for n in range(3 * rps):
        assert lim.admit(start + int(n * interval)) == 0


def test_refusal_says_how_long_to_wait_and_charges_nothing() -> None:
    lim = Limiter((Window(1000, 2),))
    assert lim.admit(10_100) == 0
    assert lim.admit(10_200) == 0
    assert lim.admit(10_300) == 700  # next window starts at 11_000
    assert lim.windows[0].used == 2
    assert lim.admit(11_000) == 0
    assert lim.admit(11_001, cost=5) == -1  # more than a whole window: never


def test_venue_counter_raises_the_local_count() -> None:
    lim = limiter_for(None, 100)
    assert lim.admit(60_000 * 7 + 5) == 0
    lim.observe_used(60_000 * 7 + 10, 60_000, 99)  # another host used 98 more
    assert lim.admit(60_000 * 7 + 20) == 0
    assert lim.admit(60_000 * 7 + 30) > 0
    lim.observe_used(60_000 * 7 + 40, 60_000, 3)  # lower than ours: ignored
    assert lim.windows[0].used == 100


def test_block_holds_everything_until_retry_after() -> None:
    lim = limiter_for(1000, None)
    lim.block(5_000, 120_000)
    assert lim.admit(6_000) == 119_000
    assert lim.admit(125_000) == 0
