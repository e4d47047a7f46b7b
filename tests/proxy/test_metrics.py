"""proxy.metrics: histogram arithmetic, the exposition, the alert rules (promtool)."""

from __future__ import annotations

import asyncio
import subprocess
from bisect import bisect_left
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.metrics import (
    BUCKETS_NS,
    MAX_NS_BITS,
    OK,
    OUTCOMES,
    Histogram,
    KeyGauge,
    Metrics,
    ServiceMetrics,
    StoreGauge,
    _bucket_tables,
    bucket_index,
)
from tests.prometheus_tools import ensure_prometheus

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def test_buckets_span_ten_microseconds_to_one_second() -> None:
    assert BUCKETS_NS[0] == 10_000
    assert BUCKETS_NS[-1] == 1_000_000_000
    assert list(BUCKETS_NS) == sorted(set(BUCKETS_NS))


def test_histogram_counts_each_value_in_its_bucket_cumulatively() -> None:
    h = Histogram()
    for ns in (5_000, 10_000, 10_001, 2_000_000_000):
        h.observe(ns)
    buckets = dict(h.buckets())
    assert buckets["1e-05"] == 2  # le is inclusive
    assert buckets["2e-05"] == 3
    assert buckets["1.0"] == 3
    assert buckets["+Inf"] == 4
    assert h.total == 5_000 + 10_000 + 10_001 + 2_000_000_000


#: Durations where a bucket index could go wrong: around each bound and each power of two.
_EDGES = sorted(
    {
        v
        for c in (*BUCKETS_NS, *(1 << k for k in range(MAX_NS_BITS + 1)))
        for v in range(c - 3, c + 4)
        if 0 <= v < 2**MAX_NS_BITS
    }
)


@given(st.integers(0, 2**MAX_NS_BITS - 1) | st.integers(0, 2 * 10**9) | st.sampled_from(_EDGES))
def test_bucket_index_is_bisect_left_for_every_duration(ns: int) -> None:
    assert bucket_index(ns) == bisect_left(BUCKETS_NS, ns)


def test_bucket_index_is_bisect_left_at_every_edge() -> None:
    assert [bucket_index(ns) for ns in _EDGES] == [bisect_left(BUCKETS_NS, ns) for ns in _EDGES]


def test_bucket_tables_refuse_bounds_closer_than_double() -> None:
    # Two bounds with one bit length would need two comparisons: refused, not mis-bucketed.
    with pytest.raises(ValueError):
        _bucket_tables((10, 15))


def _serve(requests: int) -> ServiceMetrics:
    """Send ``requests`` orders through the real listener (``loadtests.hotpath``'s fakes,
    metrics on) and return the service's metrics."""
    from loadtests.hotpath import REQUEST, RESPONSE, build
    from proxy.runtime import new_event_loop

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        client, upstream, _ct, _ut = build(loop, metrics=True)
        for _ in range(requests):
            client.data_received(REQUEST)
            upstream.data_received(RESPONSE)
        sm = client.router.routes[b"/binance"].metrics
        assert sm is not None
        return sm
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_served_requests_land_in_every_histogram_once() -> None:
    sm = _serve(25)
    for h in (sm.duration, sm.overhead, sm.signing, sm.upstream):
        assert sum(h.counts) == 25
        assert h.total > 0
    # overhead is duration minus upstream, request by request
    assert sm.overhead.total == sm.duration.total - sm.upstream.total
    assert sm.outcomes[OK] == 25


@pytest.mark.parametrize("step", [10_000, 10_001, 19_999, 3_333_334, 400_000_000])
def test_served_requests_land_in_the_bucket_of_their_duration(
    step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener inlines the bucket index (four copies of ``bucket_index``): with a clock
    that advances ``step`` per reading, each histogram must hold what bisect_left says.
    Per request the listener reads the clock four times: arrival, sent upstream, answer
    in, answer out; so signing and upstream take one step, overhead two, duration three."""
    import itertools

    from proxy import server

    monkeypatch.setattr(server, "perf_counter_ns", itertools.count(step, step).__next__)
    sm = _serve(5)
    for h, steps in ((sm.signing, 1), (sm.upstream, 1), (sm.overhead, 2), (sm.duration, 3)):
        expected = [0] * len(h.counts)
        expected[bisect_left(BUCKETS_NS, steps * step)] = 5
        assert h.counts == expected
        assert h.total == 5 * steps * step


def _metrics() -> Metrics:
    m = Metrics(["svc_a", "svc_b"])
    sm = m.services["svc_a"]
    sm.outcomes[OK] += 3
    sm.duration.observe(40_000)
    sm.overhead.observe(15_000)
    m.state.keys = lambda s: KeyGauge(1, 1.9e9, 1.7e9, True)
    m.state.store = lambda s: StoreGauge("in_sync", 1.8e9, {"unreachable": 2})
    m.state.vault_token_ttl = lambda: 3600.0
    return m


def test_exposition_has_the_contract_names_and_only_service_and_outcome_labels() -> None:
    text = _metrics().render().decode()
    for name in (
        "authproxy_request_duration_seconds_bucket",
        "authproxy_overhead_seconds_bucket",
        "authproxy_signing_duration_seconds_count",
        "authproxy_upstream_duration_seconds_count",
        "authproxy_rate_limit_rejections_total",
        "authproxy_key_fallbacks_total",
        "authproxy_rotations_total",
        "authproxy_revocations_total",
        "authproxy_key_expiry_timestamp_seconds",
        "authproxy_key_activation_timestamp_seconds",
        "authproxy_keystore_sync_age_seconds",
        "authproxy_keystore_errors_total",
        "authproxy_vault_token_ttl_seconds",
        "authproxy_memory_locked",
        "authproxy_event_loop_lag_seconds",
        "authproxy_engine_connections",
        "authproxy_upstream_connections",
        "authproxy_venue_clock_offset_seconds",
    ):
        assert name in text, name
    assert 'authproxy_requests_total{outcome="ok",service="svc_a"} 3.0' in text
    for outcome in OUTCOMES:
        assert f'outcome="{outcome}",service="svc_b"' in text
    labels = set()
    for line in text.splitlines():
        if "{" in line and not line.startswith("#"):
            for pair in line[line.index("{") + 1 : line.index("}")].split(","):
                labels.add(pair.split("=")[0])
    assert labels == {"service", "outcome", "le", "kind"}


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from Debian's prometheus package, installed when missing (never skipped)."""
    return ensure_prometheus()[1]


def test_exposition_passes_promtool_check_metrics(promtool: str) -> None:
    out = subprocess.run(
        [promtool, "check", "metrics"], input=_metrics().render(), capture_output=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_promtool_check_and_unit_tests(promtool: str) -> None:
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"],
        cwd=MONITORING,
        capture_output=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=MONITORING,
        capture_output=True,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_has_a_unit_test() -> None:
    import yaml

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert alerts == tested


def test_dashboard_and_alerts_use_only_metrics_the_sidecar_exports() -> None:
    import json
    import re

    exported = set(re.findall(r"^(authproxy_\w+)", _metrics().render().decode(), re.M))
    json.loads((MONITORING / "grafana-dashboard.json").read_text())  # valid JSON
    for name in ("grafana-dashboard.json", "alerts.yml"):
        used = set(re.findall(r"authproxy_\w+", (MONITORING / name).read_text()))
        assert used, name
        assert used <= exported, (name, used - exported)


def test_admin_metrics_switch_defaults_on_and_can_be_turned_off(seed_policy_yaml: str) -> None:
    from proxy.config import parse_config
    from tests.proxy.test_config import BASE

    assert parse_config(BASE + seed_policy_yaml).admin is not None
    on = parse_config(BASE + seed_policy_yaml).admin
    assert on is not None and on.metrics is True
    text = BASE.replace("port: 9901}", "port: 9901, metrics: false}")
    off = parse_config(text + seed_policy_yaml).admin
    assert off is not None and off.metrics is False
