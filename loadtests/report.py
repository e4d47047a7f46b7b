"""Turning raw client measurements into percentiles, added latency, a table and JSON.

Pure: no I/O except `write_json`. Latencies are recorded into an HdrHistogram per path in
microseconds (1 us .. 60 s, 3 significant digits); per-round percentiles come from the
exact nanosecond samples so that rounds can be paired across paths.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from loadtests.client import PathRecord

HDR_LOWEST_US = 1
HDR_HIGHEST_US = 60_000_000
HDR_SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
BASELINE = "direct"
PROXIES = ("nginx", "sidecar")


def histogram_us(latencies_ns: Iterable[int]) -> HdrHistogram:
    """An HdrHistogram of the samples in whole microseconds, clamped to its range."""
    hist = HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_SIGNIFICANT_DIGITS)
    for ns in latencies_ns:
        us = (ns + 500) // 1000
        hist.record_value(min(max(us, HDR_LOWEST_US), HDR_HIGHEST_US))
    return hist


def exact_percentile_us(sorted_ns: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of sorted nanosecond samples, in microseconds (nan if empty)."""
    if not sorted_ns:
        return float("nan")
    rank = max(1, -(-len(sorted_ns) * pct // 100))  # ceil without floats drifting
    return sorted_ns[min(int(rank), len(sorted_ns)) - 1] / 1000


@dataclass(frozen=True, slots=True)
class PathSummary:
    name: str
    count: int  # 2xx responses measured
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: float  # exact, not bucketed
    mean_us: float
    throughput_rps: float  # 2xx per second of this path's closed-loop wall time
    errors: int  # non-2xx plus connection/protocol errors in measured rounds
    statuses: dict[str, int]
    error_kinds: dict[str, int]
    warmup_ok: int
    warmup_failed: int
    aborted: str | None
    round_p50_us: list[float]
    round_p99_us: list[float]
    hdr_us: str  # the histogram, HdrHistogram base64 encoding


def summarize(record: PathRecord) -> PathSummary:
    samples = [ns for batch in record.latencies_ns for ns in batch]
    hist = histogram_us(samples)
    count = len(samples)
    loop_s = sum(record.loop_ns) / 1e9
    rounds = [sorted(batch) for batch in record.latencies_ns]
    return PathSummary(
        name=record.name,
        count=count,
        p50_us=hist.get_value_at_percentile(50.0) if count else 0,
        p90_us=hist.get_value_at_percentile(90.0) if count else 0,
        p99_us=hist.get_value_at_percentile(99.0) if count else 0,
        p999_us=hist.get_value_at_percentile(99.9) if count else 0,
        max_us=max(samples) / 1000 if count else 0.0,
        mean_us=sum(samples) / count / 1000 if count else 0.0,
        throughput_rps=count / loop_s if loop_s > 0 else 0.0,
        errors=sum(record.statuses.values()) + sum(record.errors.values()),
        statuses={str(k): v for k, v in sorted(record.statuses.items())},
        error_kinds=dict(sorted(record.errors.items())),
        warmup_ok=record.warmup_ok,
        warmup_failed=record.warmup_failed,
        aborted=record.aborted,
        round_p50_us=[exact_percentile_us(r, 50.0) for r in rounds if r],
        round_p99_us=[exact_percentile_us(r, 99.0) for r in rounds if r],
        hdr_us=hist.encode().decode("ascii") if count else "",
    )


@dataclass(frozen=True, slots=True)
class Added:
    """Latency a proxy path adds over the direct path, in microseconds."""

    name: str
    p50_us: int
    p99_us: int
    # Per-round p50 differences (same round, same drift): median, min, max.
    paired_p50_median_us: float | None
    paired_p50_min_us: float | None
    paired_p50_max_us: float | None


def added_latency(summaries: dict[str, PathSummary]) -> dict[str, Added]:
    base = summaries.get(BASELINE)
    if base is None or base.count == 0:
        return {}
    out = {}
    for name in PROXIES:
        s = summaries.get(name)
        if s is None or s.count == 0:
            continue
        # Rounds pair up by index; a path aborted early simply has fewer rounds.
        paired = [a - b for a, b in zip(s.round_p50_us, base.round_p50_us, strict=False)]
        out[name] = Added(
            name=name,
            p50_us=s.p50_us - base.p50_us,
            p99_us=s.p99_us - base.p99_us,
            paired_p50_median_us=statistics.median(paired) if paired else None,
            paired_p50_min_us=min(paired) if paired else None,
            paired_p50_max_us=max(paired) if paired else None,
        )
    return out


def added_ratio(added: dict[str, Added]) -> dict[str, float | None] | None:
    """sidecar added / nginx added at p50 and p99 (None where nginx added <= 0)."""
    side, ngx = added.get("sidecar"), added.get("nginx")
    if side is None or ngx is None:
        return None
    return {
        "p50": side.p50_us / ngx.p50_us if ngx.p50_us > 0 else None,
        "p99": side.p99_us / ngx.p99_us if ngx.p99_us > 0 else None,
    }


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a (nginx added <= 0)"


def format_report(
    summaries: dict[str, PathSummary],
    added: dict[str, Added],
    ratio: dict[str, float | None] | None,
) -> str:
    """The human-readable table (latencies in microseconds)."""
    lines = [
        f"{'path':<8} {'n':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>8} "
        f"{'mean':>7} {'req/s':>8} {'errors':>6}   (latency in us)",
    ]
    for s in summaries.values():
        lines.append(
            f"{s.name:<8} {s.count:>7} {s.p50_us:>7} {s.p90_us:>7} {s.p99_us:>7} "
            f"{s.p999_us:>7} {s.max_us:>8.0f} {s.mean_us:>7.1f} {s.throughput_rps:>8.0f} "
            f"{s.errors:>6}"
        )
        if s.errors or s.warmup_failed:
            detail = {**{f"HTTP {k}": v for k, v in s.statuses.items()}, **s.error_kinds}
            lines.append(f"{'':<8} errors: {detail}; warm-up failures: {s.warmup_failed}")
        if s.aborted:
            lines.append(f"{'':<8} ABORTED: {s.aborted}")
    if added:
        lines += [
            "",
            f"{'added vs direct (us)':<21} {'p50':>7} {'p99':>7}   p50 paired by round: "
            "median [min, max]",
        ]
        for a in added.values():
            paired = (
                f"{a.paired_p50_median_us:+.1f} "
                f"[{a.paired_p50_min_us:+.1f}, {a.paired_p50_max_us:+.1f}]"
                if a.paired_p50_median_us is not None
                and a.paired_p50_min_us is not None
                and a.paired_p50_max_us is not None
                else "n/a"
            )
            lines.append(f"{a.name:<21} {a.p50_us:>+7} {a.p99_us:>+7}   {paired}")
    if ratio is not None:
        lines += [
            "",
            f"sidecar/nginx added latency: p50 {_fmt_ratio(ratio['p50'])}, "
            f"p99 {_fmt_ratio(ratio['p99'])}",
        ]
    return "\n".join(lines)


def as_json(
    summaries: dict[str, PathSummary],
    added: dict[str, Added],
    ratio: dict[str, float | None] | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    return {
        **meta,
        "paths": {name: asdict(s) for name, s in summaries.items()},
        "added_vs_direct_us": {name: asdict(a) for name, a in added.items()},
        "sidecar_over_nginx_added": ratio,
    }


def write_json(results_dir: Path, stamp: str, document: dict[str, Any]) -> Path:
    """Write `document` to results_dir/bench-<stamp>.json (never overwriting); return it."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, allow_nan=False, default=str) + "\n"
    for n in range(100):
        path = results_dir / (f"bench-{stamp}.json" if n == 0 else f"bench-{stamp}-{n}.json")
        try:
            with path.open("x") as f:
                f.write(text)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"too many results named bench-{stamp}*.json in {results_dir}")
