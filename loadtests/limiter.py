"""Micro-benchmark of the rate limiter's per-request check (``Limiter.admit``).

    python -m loadtests.limiter [--requests N]

Reports the cost of one admission with the policy's two windows (per second and per
minute), best of five runs; a micro-benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time

from proxy.ratelimit import limiter_for


def run(n: int) -> float:
    lim = limiter_for(10**9, 10**10)  # never refuses: measures the admitted path
    now = int(time.time() * 1000)
    admit = lim.admit
    t0 = time.perf_counter()
    for i in range(n):
        admit(now + (i >> 10))
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500_000)
    args = parser.parse_args()
    best = min(run(args.requests) for _ in range(5))
    print(f"Limiter.admit, two windows (best of 5 x {args.requests}): {best:.3f} µs")


if __name__ == "__main__":
    main()
