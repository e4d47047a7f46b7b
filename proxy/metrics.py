"""Prometheus metrics: the only module that imports ``prometheus_client``.

The hot path never calls prometheus_client. Per request it touches only plain slotted
objects bound once per service at start-up (``ServiceMetrics``): a histogram observation
is one bucket index (``bucket_index``, inlined: two tuple lookups and one comparison) and
two integer additions, a counter is one integer addition. Everything is read and
converted to Prometheus families at scrape time by ``SidecarCollector`` (on the loop,
from the admin handler).

Labels are service names and fixed outcome words only: never a secret, never a key id.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

PREFIX = "authproxy_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Histogram upper bounds in nanoseconds: 1-2-5 steps from 10 µs to 1 s (DESIGN.md:
#: "buckets fine enough for tens of microseconds"; the sidecar's own overhead is ~10-50 µs).
BUCKETS_NS: tuple[int, ...] = (
    *(m * 10**e for e in range(4, 9) for m in (1, 2, 5)),
    10**9,
)

#: How many bits a duration may have: differences of ``perf_counter_ns`` stamps (a signed
#: 64-bit clock) lie in [0, 2**63), so the tables below cover every one.
MAX_NS_BITS = 64


def _bucket_tables(
    bounds: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(cut, low, high)`` indexed by a value's bit length ``b``: among the values with
    ``b`` bits, those above ``cut[b]`` fall in bucket ``high[b]``, the others in
    ``low[b]``. Exact because at most one bound lies among the values of one bit length
    (1-2-5 steps: each bound is at least twice the one before it). Raises ``ValueError``
    for bounds that are not increasing or where two share a bit length."""
    for a, b in pairwise(bounds):
        if b <= a or (a > 0 and a.bit_length() == b.bit_length()):
            raise ValueError("bounds must increase, no two with the same bit length")
    cut: list[int] = []
    low: list[int] = []
    for bits in range(MAX_NS_BITS + 1):
        first, last = (1 << bits) >> 1, (1 << bits) - 1  # the values with this bit length
        low.append(bisect_left(bounds, first))
        inside = [b for b in bounds if first <= b <= last]
        cut.append(inside[0] if inside else last)
    return tuple(cut), tuple(low), tuple(i + 1 for i in low)


#: ``BUCKETS_NS`` index tables (``_bucket_tables``). Measured under callgrind, the
#: expression in ``bucket_index`` costs ~540 instructions against ~900 for ``bisect_left``
#: over the 16 bounds; four histograms per request make that the largest saving.
BUCKET_CUT, BUCKET_LOW, BUCKET_HIGH = _bucket_tables(BUCKETS_NS)


def bucket_index(ns: int) -> int:
    """The ``BUCKETS_NS`` bucket of ``ns`` nanoseconds, the same as
    ``bisect_left(BUCKETS_NS, ns)`` for every ``0 <= ns < 2**64``. The hot path inlines
    this expression (a call would cost more than its body)."""
    b = ns.bit_length()
    return BUCKET_HIGH[b] if ns > BUCKET_CUT[b] else BUCKET_LOW[b]


#: Request outcomes (stable label values).
OUTCOMES = ("ok", "venue_error", "rejected", "upstream_failed", "rate_limited")


class Histogram:
    """A fixed-bucket histogram over integer nanoseconds. ``observe`` runs on the loop
    (no lock: the loop is the only writer; a scrape reads on the loop too)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[int, ...] = BUCKETS_NS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(self.bounds, ns)] += 1
        self.total += ns

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs in seconds, +Inf last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((_le(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _le(ns: int) -> str:
    return repr(ns / 1e9)


class ServiceMetrics:
    """One service's request metrics, bound once at start-up (hot path: attribute access
    and integer arithmetic only)."""

    __slots__ = (
        "duration",
        "name",
        "outcomes",
        "overhead",
        "rate_limited",
        "signing",
        "upstream",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.duration = Histogram()  # whole time in the sidecar
        self.overhead = Histogram()  # duration minus upstream time
        self.signing = Histogram()
        self.upstream = Histogram()
        # outcome counts, indexed like OUTCOMES
        self.outcomes = [0] * len(OUTCOMES)
        self.rate_limited = 0  # rate-limit rejections (no limiter yet: stays 0)


OK, VENUE_ERROR, REJECTED, UPSTREAM_FAILED, RATE_LIMITED = range(len(OUTCOMES))

#: Ingress request outcomes (stable label values): verified and answered by the protected
#: service, refused by verification (401/400 auth codes), a malformed or oversized HTTP
#: request, the protected service failed or timed out.
INGRESS_OUTCOMES = ("ok", "refused", "bad_request", "upstream_failed")
I_OK, I_REFUSED, I_BAD_REQUEST, I_UPSTREAM_FAILED = range(len(INGRESS_OUTCOMES))


class IngressMetrics:
    """One ingress listener's counters, bound once at start-up. ``refusals`` counts every
    refusal by its error code (the codes of docs/internal-auth.md, fixed at start-up);
    counting is one dict lookup and one addition, always on."""

    __slots__ = ("keys_live", "name", "outcomes", "refusals", "verify")

    def __init__(self, name: str, codes: Iterable[str]) -> None:
        self.name = name
        self.outcomes = [0] * len(INGRESS_OUTCOMES)
        self.refusals: dict[str, int] = dict.fromkeys(codes, 0)
        self.verify = Histogram()  # time to verify one request (all five steps + nonce)
        self.keys_live = 0  # verification keys held over all accepted callers


@dataclass(frozen=True, slots=True)
class KeyGauge:
    """What the collector shows about one service's keys (public data only)."""

    live: int
    expires: float | None  # epoch seconds of the newest live key's expiry
    activates: float | None  # epoch seconds of the newest live key's activation
    memory_locked: bool | None


@dataclass(frozen=True, slots=True)
class StoreGauge:
    """One service's key-store health (Vault watcher; the file backend has none)."""

    state: str
    last_sync: float | None  # epoch seconds
    errors: Mapping[str, int]


@dataclass
class SidecarState:
    """Read-outs the collector calls at scrape time; the runtime fills them in. Every
    callable runs on the loop and must not block."""

    services: Mapping[str, ServiceMetrics]
    ingress: Mapping[str, IngressMetrics] = field(default_factory=dict)
    keys: Callable[[str], KeyGauge] = lambda _s: KeyGauge(0, None, None, None)
    store: Callable[[str], StoreGauge | None] = lambda _s: None
    fallbacks: Callable[[str], int] = lambda _s: 0
    clock_offset_ms: Callable[[str], float] = lambda _s: 0.0
    upstream_connections: Callable[[str], int] = lambda _s: 0
    engine_connections: Callable[[], int] = lambda: 0
    vault_token_ttl: Callable[[], float | None] = lambda: None
    rotations: dict[str, int] = field(default_factory=dict)
    revocations: dict[str, int] = field(default_factory=dict)
    loop_lag_s: list[float] = field(default_factory=lambda: [0.0])
    ready: Callable[[], bool] = lambda: False
    started: float = field(default_factory=time.time)


class SidecarCollector(Collector):
    """Turns ``SidecarState`` into Prometheus families at scrape time."""

    def __init__(self, state: SidecarState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st = self.state
        names = sorted(st.services)
        p = PREFIX
        hists = (
            ("request_duration_seconds", "Whole time a request spends in the sidecar", "duration"),
            (
                "overhead_seconds",
                "The sidecar's own time per request (total minus upstream)",
                "overhead",
            ),
            ("signing_duration_seconds", "Time to choose a key and sign a request", "signing"),
            ("upstream_duration_seconds", "Time from submit to the venue's answer", "upstream"),
        )
        for name, doc, attr in hists:
            fam = HistogramMetricFamily(p + name, doc, labels=["service"])
            for svc in names:
                h: Histogram = getattr(st.services[svc], attr)
                fam.add_metric([svc], h.buckets(), h.total / 1e9)
            yield fam
        req = CounterMetricFamily(
            p + "requests", "Requests by service and outcome", labels=["service", "outcome"]
        )
        rl = CounterMetricFamily(
            p + "rate_limit_rejections", "Requests refused by the rate limiter", labels=["service"]
        )
        fb = CounterMetricFamily(
            p + "key_fallbacks", "Requests re-signed with the other key", labels=["service"]
        )
        rot = CounterMetricFamily(p + "rotations", "Key ring swaps", labels=["service"])
        rev = CounterMetricFamily(p + "revocations", "Keys revoked at once", labels=["service"])
        live = GaugeMetricFamily(p + "keys_live", "Live key versions held", labels=["service"])
        exp = GaugeMetricFamily(
            p + "key_expiry_timestamp_seconds", "Expiry of the newest live key", labels=["service"]
        )
        act = GaugeMetricFamily(
            p + "key_activation_timestamp_seconds",
            "Activation of the newest live key",
            labels=["service"],
        )
        lock = GaugeMetricFamily(
            p + "memory_locked", "1 if the service's key buffer is mlocked", labels=["service"]
        )
        offset = GaugeMetricFamily(
            p + "venue_clock_offset_seconds",
            "Venue clock minus ours, added to signed timestamps",
            labels=["service"],
        )
        up = GaugeMetricFamily(
            p + "upstream_connections", "Open connections to the venue", labels=["service"]
        )
        sync = GaugeMetricFamily(
            p + "keystore_last_sync_timestamp_seconds",
            "When the key store was last read successfully",
            labels=["service"],
        )
        age = GaugeMetricFamily(
            p + "keystore_sync_age_seconds",
            "Seconds since the last successful sync",
            labels=["service"],
        )
        in_sync = GaugeMetricFamily(
            p + "keystore_in_sync", "1 if the key store is in sync", labels=["service"]
        )
        errs = CounterMetricFamily(
            p + "keystore_errors", "Key-store sync errors by kind", labels=["service", "kind"]
        )
        now = time.time()
        for svc in names:
            m = st.services[svc]
            for i, outcome in enumerate(OUTCOMES):
                req.add_metric([svc, outcome], m.outcomes[i])
            rl.add_metric([svc], m.rate_limited)
            fb.add_metric([svc], st.fallbacks(svc))
            rot.add_metric([svc], st.rotations.get(svc, 0))
            rev.add_metric([svc], st.revocations.get(svc, 0))
            k = st.keys(svc)
            live.add_metric([svc], k.live)
            if k.expires is not None:
                exp.add_metric([svc], k.expires)
            if k.activates is not None:
                act.add_metric([svc], k.activates)
            if k.memory_locked is not None:
                lock.add_metric([svc], 1.0 if k.memory_locked else 0.0)
            offset.add_metric([svc], st.clock_offset_ms(svc) / 1000)
            up.add_metric([svc], st.upstream_connections(svc))
            s = st.store(svc)
            if s is None:  # the file backend is read once: always in sync
                in_sync.add_metric([svc], 1.0)
                continue
            in_sync.add_metric([svc], 1.0 if s.state == "in_sync" else 0.0)
            if s.last_sync is not None:
                sync.add_metric([svc], s.last_sync)
                age.add_metric([svc], max(0.0, now - s.last_sync))
            for kind, count in sorted(s.errors.items()):
                errs.add_metric([svc, kind], count)
        yield from (req, rl, fb, rot, rev, live, exp, act, lock, offset, up)
        yield from (sync, age, in_sync, errs)
        eng = GaugeMetricFamily(p + "engine_connections", "Open connections from the engine")
        eng.add_metric([], st.engine_connections())
        yield eng
        lag = GaugeMetricFamily(p + "event_loop_lag_seconds", "Last measured event-loop lag")
        lag.add_metric([], st.loop_lag_s[0])
        yield lag
        ready = GaugeMetricFamily(p + "ready", "1 if /readyz would answer 200")
        ready.add_metric([], 1.0 if st.ready() else 0.0)
        yield ready
        ttl = st.vault_token_ttl()
        if ttl is not None:
            t = GaugeMetricFamily(p + "vault_token_ttl_seconds", "Seconds left on the Vault token")
            t.add_metric([], ttl)
            yield t
        yield from _ingress_families(st.ingress)
        start = GaugeMetricFamily(p + "start_time_seconds", "When the sidecar started")
        start.add_metric([], st.started)
        yield start


def _ingress_families(ingress: Mapping[str, IngressMetrics]) -> Iterator[Metric]:
    if not ingress:
        return
    p = PREFIX
    req = CounterMetricFamily(
        p + "ingress_requests",
        "Requests at an ingress by outcome",
        labels=["ingress", "outcome"],
    )
    ref = CounterMetricFamily(
        p + "ingress_refusals",
        "Requests an ingress refused, by error code",
        labels=["ingress", "code"],
    )
    ver = HistogramMetricFamily(
        p + "ingress_verify_duration_seconds",
        "Time to verify one request's HFT-AUTH-V1 signature",
        labels=["ingress"],
    )
    keys = GaugeMetricFamily(
        p + "ingress_keys_live",
        "Caller keys an ingress accepts right now",
        labels=["ingress"],
    )
    for name in sorted(ingress):
        m = ingress[name]
        for i, outcome in enumerate(INGRESS_OUTCOMES):
            req.add_metric([name, outcome], m.outcomes[i])
        for code, count in sorted(m.refusals.items()):
            ref.add_metric([name, code], count)
        ver.add_metric([name], m.verify.buckets(), m.verify.total / 1e9)
        keys.add_metric([name], m.keys_live)
    yield from (req, ref, ver, keys)


class Metrics:
    """The registry and the per-service children; built once at start-up."""

    def __init__(
        self, services: Iterable[str], ingress: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        """``ingress`` maps each ingress listener's name to its refusal codes."""
        self.services: dict[str, ServiceMetrics] = {s: ServiceMetrics(s) for s in services}
        self.ingress: dict[str, IngressMetrics] = {
            name: IngressMetrics(name, codes) for name, codes in (ingress or {}).items()
        }
        self.state = SidecarState(self.services, self.ingress)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SidecarCollector(self.state))

    def render(self) -> bytes:
        """The text exposition (on the loop; O(services * buckets))."""
        return generate_latest(self.registry)
