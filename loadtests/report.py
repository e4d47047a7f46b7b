"""From raw generator timings to statistics, the JSON document and the Markdown summary.

Pure apart from the `write_*` functions. Every latency is counted from the request's
intended send time (see `loadtests.openloop`) and recorded into an HdrHistogram in
microseconds (1 us .. 60 s, 3 significant digits); `max` is exact. Percentiles of short
windows (timelines, before/after an event) are exact nearest-rank over the samples.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from loadtests.openloop import INCOMPLETE, OK, JobResult

HDR_LOWEST_US = 1
HDR_HIGHEST_US = 60_000_000
HDR_SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
BASELINE = "direct"
# The generator noticing requests this late (p99): it (or the host under it) set the pace,
# so the path's own figures at that percentile are hidden under the generator's lateness.
GEN_LAG_LIMIT_US = 100.0
SAT_LIMIT_US = 1000.0  # the saturation criterion: p99 from intended send under 1 ms
SAT_PERCENTILE = 99.0
# A host that took a CPU away for more than this share of a spin (see openloop.StallProbe)
# puts every path's p99 above 1 ms by itself; the search then judges by p90 instead.
SAT_STALL_LIMIT = 0.01
SAT_FALLBACK_PERCENTILE = 90.0
_PERCENTILE_FIELDS = {50.0: "p50_us", 90.0: "p90_us", 99.0: "p99_us", 99.9: "p999_us"}


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
        return math.nan
    rank = max(1, -(-len(sorted_ns) * pct // 100))  # ceil without floats drifting
    return sorted_ns[min(int(rank), len(sorted_ns)) - 1] / 1000


@dataclass(frozen=True, slots=True)
class PathStats:
    """One path in one scenario (all its rounds merged), warm-up excluded."""

    path: str
    target_rps: float  # mean intended rate
    requests: int  # intended after warm-up
    ok: int  # 2xx answers
    errors: int  # non-2xx, I/O errors, timeouts
    incomplete: int  # unanswered (or never sent) when the drain window closed
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: float
    mean_us: float
    throughput_rps: float  # 2xx per second, from the first intended send to the last answer
    gen_lag_p99_us: float  # how late the generator noticed requests were due
    gen_lag_max_us: float
    generator_late: bool  # gen_lag_p99_us > GEN_LAG_LIMIT_US
    connections: int
    connects: int
    rounds: int
    statuses: dict[str, int]
    error_kinds: dict[str, int]
    hdr_us: str  # the histogram, HdrHistogram base64 encoding

    @property
    def failed(self) -> int:
        return self.errors + self.incomplete


def _measured(result: JobResult, warmup_s: float) -> range:
    """Indices of the requests intended at or after the warm-up."""
    cut = int(warmup_s * 1e9)
    offsets = result.offsets_ns
    lo, hi = 0, len(offsets)
    while lo < hi:  # bisect: offsets are non-decreasing
        mid = (lo + hi) // 2
        if offsets[mid] < cut:
            lo = mid + 1
        else:
            hi = mid
    return range(lo, len(offsets))


def path_stats(results: Sequence[JobResult], warmup_s: float) -> PathStats:
    """Merge the rounds of one path into its statistics."""
    ok_ns: list[int] = []
    lags: list[int] = []
    requests = errors = incomplete = connects = 0
    intended_s = busy_s = 0.0
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    for res in results:
        idx = _measured(res, warmup_s)
        if not idx:
            continue
        requests += len(idx)
        first, last = res.offsets_ns[idx[0]], res.offsets_ns[idx[-1]]
        last_answer = first
        for i in idx:
            code = res.outcome[i]
            lags.append(res.lag_ns[i])
            if code == OK:
                ns = res.latency_ns[i]
                ok_ns.append(ns)
                last_answer = max(last_answer, res.offsets_ns[i] + ns)
            elif code == INCOMPLETE:
                incomplete += 1
            else:
                errors += 1
        step = (last - first) / (len(idx) - 1) if len(idx) > 1 else 0
        intended_s += (last - first + step) / 1e9
        busy_s += max(last_answer - first, last - first + step) / 1e9
        statuses.update(res.statuses)
        kinds.update(res.errors)
        connects += res.connects
    hist = histogram_us(ok_ns)
    have = bool(ok_ns)
    lags.sort()
    gen_lag_p99 = exact_percentile_us(lags, 99.0) if lags else 0.0
    return PathStats(
        path=results[0].path if results else "",
        target_rps=requests / intended_s if intended_s > 0 else 0.0,
        requests=requests,
        ok=len(ok_ns),
        errors=errors,
        incomplete=incomplete,
        p50_us=hist.get_value_at_percentile(50.0) if have else 0,
        p90_us=hist.get_value_at_percentile(90.0) if have else 0,
        p99_us=hist.get_value_at_percentile(99.0) if have else 0,
        p999_us=hist.get_value_at_percentile(99.9) if have else 0,
        max_us=max(ok_ns) / 1000 if have else 0.0,
        mean_us=sum(ok_ns) / len(ok_ns) / 1000 if have else 0.0,
        throughput_rps=len(ok_ns) / busy_s if busy_s > 0 else 0.0,
        gen_lag_p99_us=gen_lag_p99,
        gen_lag_max_us=lags[-1] / 1000 if lags else 0.0,
        generator_late=gen_lag_p99 > GEN_LAG_LIMIT_US,
        connections=max((r.connections for r in results), default=0),
        connects=connects,
        rounds=len(results),
        statuses={str(k): v for k, v in sorted(statuses.items())},
        error_kinds=dict(sorted(kinds.items())),
        hdr_us=hist.encode().decode("ascii") if have else "",
    )


def percentile_us(stats: PathStats, pct: float) -> int:
    value: int = getattr(stats, _PERCENTILE_FIELDS[pct])
    return value


def passes(stats: PathStats, limit_us: float = SAT_LIMIT_US, pct: float = SAT_PERCENTILE) -> bool:
    """The saturation criterion: every request answered 2xx, the percentile under the limit."""
    return stats.ok > 0 and stats.failed == 0 and percentile_us(stats, pct) < limit_us


def saturation_percentile(
    requested: float | None, stalls: dict[str, dict[str, float]]
) -> tuple[float, str]:
    """The percentile the saturation search judges by, and why."""
    if requested is not None:
        return requested, "as asked (--sat-percentile)"
    worst = max((s["stalled_fraction"] for s in stalls.values()), default=0.0)
    if worst > SAT_STALL_LIMIT:
        return SAT_FALLBACK_PERCENTILE, (
            f"p{SAT_PERCENTILE:g} is out of reach on this host: it took a CPU away "
            f"{worst:.1%} of the time before the run (over {SAT_STALL_LIMIT:.0%})"
        )
    return SAT_PERCENTILE, "the issue's criterion"


def added_vs_direct(stats: dict[str, PathStats]) -> dict[str, dict[str, int]]:
    """What each path adds over `direct` at each percentile (us); {} without direct."""
    base = stats.get(BASELINE)
    if base is None or base.ok == 0:
        return {}
    out = {}
    for name, s in stats.items():
        if name == BASELINE or s.ok == 0:
            continue
        out[name] = {
            "p50": s.p50_us - base.p50_us,
            "p90": s.p90_us - base.p90_us,
            "p99": s.p99_us - base.p99_us,
            "p999": s.p999_us - base.p999_us,
        }
    return out


def added_ratio(
    added: dict[str, dict[str, int]], path: str = "sidecar"
) -> dict[str, float | None] | None:
    """`path`'s added latency / nginx's at p50 and p99 (None where nginx added <= 0)."""
    side, ngx = added.get(path), added.get("nginx")
    if side is None or ngx is None:
        return None
    return {q: side[q] / ngx[q] if ngx[q] > 0 else None for q in ("p50", "p99")}


def timeline(result: JobResult, window_s: float) -> list[dict[str, Any]]:
    """Per window of intended send time: requests, failures and exact p50/p99/max (us)."""
    width = int(window_s * 1e9)
    buckets: dict[int, list[int]] = {}
    failed: Counter[int] = Counter()
    sent: Counter[int] = Counter()
    for i, offset in enumerate(result.offsets_ns):
        w = offset // width
        sent[w] += 1
        if result.outcome[i] == OK:
            buckets.setdefault(w, []).append(result.latency_ns[i])
        else:
            failed[w] += 1
    out = []
    for w in sorted(sent):
        lat = sorted(buckets.get(w, []))
        out.append(
            {
                "t_s": round(w * window_s, 6),
                "requests": sent[w],
                "failed": failed[w],
                "p50_us": exact_percentile_us(lat, 50.0) if lat else None,
                "p99_us": exact_percentile_us(lat, 99.0) if lat else None,
                "max_us": lat[-1] / 1000 if lat else None,
            }
        )
    return out


def around(result: JobResult, at_s: float, span_s: float) -> dict[str, Any]:
    """Requests intended in the `span_s` before and after `at_s`: p99 of each, the step
    (after minus before, us) and failures on each side.

    Also the run's own noise at that scale: the median |p99 step| between adjacent
    `span_s` windows away from the event. A step well inside it is not the event's.
    """
    at, span = int(at_s * 1e9), int(span_s * 1e9)
    sides: dict[str, list[int]] = {"before": [], "after": []}
    failed = {"before": 0, "after": 0}
    # Windows of span_s aligned on the event, over the whole run: index -1 is "before".
    windows: dict[int, list[int]] = {}
    for i, offset in enumerate(result.offsets_ns):
        w = (offset - at) // span
        ok = result.outcome[i] == OK
        if ok:
            windows.setdefault(w, []).append(result.latency_ns[i])
        if w not in (-1, 0):
            continue
        side = "before" if w == -1 else "after"
        if ok:
            sides[side].append(result.latency_ns[i])
        else:
            failed[side] += 1
    p99 = {k: exact_percentile_us(sorted(v), 99.0) for k, v in sides.items()}
    p50 = {k: exact_percentile_us(sorted(v), 50.0) for k, v in sides.items()}
    step = p99["after"] - p99["before"]
    by_window = {w: exact_percentile_us(sorted(v), 99.0) for w, v in windows.items()}
    steps = sorted(
        abs(by_window[w + 1] - by_window[w])
        for w in by_window
        if w + 1 in by_window and w != -1  # the event's own step is not noise
    )
    return {
        "span_s": span_s,
        "p50_before_us": _finite(p50["before"]),
        "p50_after_us": _finite(p50["after"]),
        "p99_before_us": _finite(p99["before"]),
        "p99_after_us": _finite(p99["after"]),
        "p99_step_us": _finite(step),
        "p99_step_noise_us": _finite(steps[len(steps) // 2]) if steps else None,
        "failed_before": failed["before"],
        "failed_after": failed["after"],
    }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 1)


def stats_json(stats: dict[str, PathStats]) -> dict[str, Any]:
    return {name: asdict(s) for name, s in stats.items()}


# ---------------------------------------------------------------------- Markdown


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _path_row(scenario: str, s: dict[str, Any], added: dict[str, int] | None) -> str:
    errors = f"{s['errors']}" + (f" +{s['incomplete']} unanswered" if s["incomplete"] else "")
    add = f"{added['p50']:+,} / {added['p99']:+,}" if added else "-"
    return (
        f"| {scenario} | {s['path']} | {s['target_rps']:,.0f} | {s['connections']} "
        f"| {_us(s['p50_us'])} | {_us(s['p90_us'])} | {_us(s['p99_us'])} "
        f"| {_us(s['p999_us'])} | {_us(s['max_us'])} | {s['throughput_rps']:,.0f} "
        f"| {errors} | {add} | {_us(s['gen_lag_p99_us'])} |"
    )


def summary_markdown(doc: dict[str, Any]) -> str:
    """The run as Markdown tables: per scenario and path, saturation, events, plots."""
    m = doc["machine"]
    pin = doc["pinning"]
    lines = [
        f"# authproxy load test {doc['stamp']}",
        "",
        f"{m['cpu_model']}, {m['nproc']} CPU(s) ({len(m['usable_cpus'])} usable); "
        + (
            f"generator on CPU {pin['client_cpu']}, servers on CPU {pin['server_cpu']}; "
            if pin["client_cpu"] is not None
            else "one usable CPU: nothing pinned, generator and servers share it; "
        )
        + f"{m['nginx']}; Python {m['python']}; "
        f"sidecar venue {doc['options'].get('venue', '?')}; "
        f"load average before {doc['load_average']['before'][0]:.2f}. "
        f"Wall time {doc['wall_s']:.0f} s.",
        "",
        *_stall_lines(doc.get("host_stalls") or {}),
        "Latencies in microseconds from the intended send time (open loop, coordinated "
        "omission counted), 2xx only; errors = non-2xx + I/O + timeouts. *added* = the "
        "path's percentile minus direct's, same scenario, same run. *gen lag p99* = how "
        "late the generator noticed requests were due (host stalls or a busy generator): "
        "a path's percentiles near it are the host's, not the path's.",
        "",
        "| scenario | path | rate | conns | p50 | p90 | p99 | p99.9 | max | req/s done "
        "| errors | added p50 / p99 | gen lag p99 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    ratios = []
    for sc in doc["scenarios"]:
        if sc["kind"] == "saturation":
            continue
        added = sc.get("added_vs_direct_us", {})
        for name, s in sc["paths"].items():
            lines.append(_path_row(sc["name"], s, added.get(name)))
        r = sc.get("sidecar_over_nginx_added")
        if r:
            f = sc.get("floor_over_nginx_added") or {"p50": None, "p99": None}
            ratios.append(
                f"| {sc['name']} | {_ratio(r['p50'])} | {_ratio(r['p99'])} "
                f"| {_ratio(f['p50'])} | {_ratio(f['p99'])} |"
            )
    if ratios:
        lines += [
            "",
            "Added latency over nginx's (lower is better; 1.00x = as fast as nginx). *floor* "
            "is the bare forwarder on the sidecar's stack (`loadtests/floor.py`): what any "
            "proxy on CPython, uvloop and httptools adds before doing any work of its own:",
            "",
            "| scenario | sidecar p50 | sidecar p99 | floor p50 | floor p99 |",
            "|---|--:|--:|--:|--:|",
            *ratios,
        ]
    for sc in doc["scenarios"]:
        if sc["kind"] != "saturation":
            continue
        lines += [
            "",
            f"Saturation: highest rate with p{sc['percentile']:g} < {sc['limit_us']:,.0f} us "
            f"and no errors, {sc['probe_s']:g} s probes, {sc['connections']} connections "
            f"(p{sc['percentile']:g}: {sc['percentile_reason']}):",
            "",
            f"| path | highest passing rate | probes (rate: p{sc['percentile']:g} us) |",
            "|---|--:|---|",
        ]
        for name, res in sc["search"].items():
            probes = ", ".join(
                f"{p['rate']:,.0f}: {_us(p['stats'][_PERCENTILE_FIELDS[sc['percentile']]])}"
                f"{'' if p['passed'] else ' FAIL'}"
                f"{' (gen late)' if p['stats']['generator_late'] else ''}"
                for p in res["probes"]
            )
            best = res["best_rps"]
            lines.append(f"| {name} | {_us(best) if best else 'none'} | {probes} |")
        r = sc.get("sidecar_over_nginx_throughput")
        if r is not None:
            lines += ["", f"Sidecar saturation rate / nginx's: {r:.0%}."]
            f = sc.get("floor_over_nginx_throughput")
            if f is not None:
                lines[-1] += f" The floor's / nginx's: {f:.0%}."
    events = [sc for sc in doc["scenarios"] if sc.get("events")]
    if events:
        lines += [
            "",
            "Events under load: p99 over the seconds before and after the event, the step "
            "between them, and the median step between adjacent windows of the same length "
            "elsewhere in the run (the host's noise at that scale):",
            "",
            "| scenario | event | at s | errors (whole run) | p50 before / after "
            "| p99 before | p99 after | step | step noise | sidecar saw it |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        verdicts = [
            "",
            "Verdicts (issue 10: zero errors; around a rotation no p99 step > 100 us):",
            "",
        ]
        for sc in events:
            for ev in sc["events"]:
                a = ev.get("around") or {}
                seen = ev.get("sidecar_reaction") or "-"
                failed = sum(s["errors"] + s["incomplete"] for s in sc["paths"].values())
                lines.append(
                    f"| {sc['name']} | {ev['name']} | {ev['start_s']:.2f} | {failed} "
                    f"| {_us(a.get('p50_before_us'))} / {_us(a.get('p50_after_us'))} "
                    f"| {_us(a.get('p99_before_us'))} | {_us(a.get('p99_after_us'))} "
                    f"| {_signed(a.get('p99_step_us'))} | {_us(a.get('p99_step_noise_us'))} "
                    f"| {seen} |"
                )
        lines += verdicts
    for sc in events:
        v = sc.get("verdict")
        if not v:
            continue
        parts = [f"errors {v['errors']}"]
        if "new_key_swapped_in" in v:
            parts.insert(0, f"new key swapped in: {'yes' if v['new_key_swapped_in'] else 'NO'}")
            parts.append(
                f"p99 step {_signed(v['p99_step_us'])} us (limit {v['step_limit_us']:g} us"
                + (
                    ")"
                    if v.get("conclusive", True)
                    else f"; inconclusive: the run's own step noise is "
                    f"{_us(v.get('p99_step_noise_us'))} us)"
                )
            )
        verdict = "PASS" if v["ok"] else "FAIL"
        if not v.get("conclusive", True):
            verdict = f"INCONCLUSIVE ({verdict.lower()} as measured)"
        lines.append(f"- {sc['name']}: {'; '.join(parts)}: {verdict}")
    skipped = doc.get("skipped") or []
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    plots = doc.get("plots") or []
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    lines += ["", f"Results: `{doc.get('json_name', '')}`", ""]
    return "\n".join(lines)


def _stall_lines(stalls: dict[str, dict[str, float]]) -> list[str]:
    if not stalls:
        return []
    parts = [
        f"{cpu.replace('_', ' ')}: {st['stalls']:.0f} stalls, {st['stalled_fraction']:.1%} "
        f"of the time, longest {st['longest_us']:,.0f} us"
        for cpu, st in stalls.items()
    ]
    return [
        f"Host jitter, spinning {next(iter(stalls.values()))['seconds']:g} s per CPU before "
        f"the run (gaps > {next(iter(stalls.values()))['threshold_us']:g} us): "
        + "; ".join(parts)
        + ".",
        "",
    ]


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+,.0f}"


# ---------------------------------------------------------------------- files


def write_json(results_dir: Path, stamp: str, document: dict[str, Any]) -> Path:
    """Write `document` to results_dir/bench-<stamp>.json (never overwriting); return it."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1, allow_nan=False, default=str) + "\n"
    path = results_dir / f"bench-{stamp}.json"
    with path.open("x") as f:
        f.write(text)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
