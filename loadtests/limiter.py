"""Micro-benchmark of the rate limiter's per-request step on the hot path.

    python -m loadtests.limiter [--requests N]

Times, best of five runs of N requests each, what ``proxy.server`` does per request before
signing: the endpoint's cost in the venue's units (``VenueLimits.cost``), the engine's
share lookup and ``Limiter.admit`` over a Binance service's windows (the policy's per
second and per minute, the venue's weight per minute and orders per 10 s and per day) and
its pace. Also the bare ``admit`` with the policy's two windows only, and an empty
loop of the same shape (subtracted from both). A micro-benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time

from proxy.ratelimit import Share, limiter_for
from proxy.venue_limits import BINANCE


def _empty(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    return time.perf_counter() - t0


def run_full(n: int) -> float:
    """Cost lookup + share lookup + admit, as the hot path does it (admitted path)."""
    lim = limiter_for(10**9, 10**10, tuple((u, w, lim * 10**6) for u, w, lim in BINANCE.windows))
    costs = BINANCE
    shares: dict[object, Share] = {}
    key = object()
    shares[key] = Share()
    now = int(time.time() * 1_000_000)
    admit = lim.admit
    t0 = time.perf_counter()
    for i in range(n):
        cost = costs.cost(b"POST", b"/api/v3/order")
        weight = cost.weight if cost.by_query is None else cost.by_query(b"")
        share = shares.get(key)
        admit(now + i, weight, cost.orders, share)
    return time.perf_counter() - t0


def run_bare(n: int) -> float:
    lim = limiter_for(10**9, 10**10)  # never refuses: measures the admitted path
    now = int(time.time() * 1_000_000)
    admit = lim.admit
    t0 = time.perf_counter()
    for i in range(n):
        admit(now + i)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300_000)
    args = parser.parse_args()
    n = args.requests
    empty = min(_empty(n) for _ in range(5))
    full = (min(run_full(n) for _ in range(5)) - empty) / n * 1e6
    bare = (min(run_bare(n) for _ in range(5)) - empty) / n * 1e6
    print(f"per request, best of 5 x {n}, loop overhead subtracted:")
    print(f"  Binance service: cost + share + admit (5 windows, pace): {full:.3f} µs")
    print(f"  admit alone, the policy's 2 windows and pace:             {bare:.3f} µs")


if __name__ == "__main__":
    main()
