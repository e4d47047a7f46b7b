"""Operations end to end: a real sidecar's admin API, scraped by a real Prometheus.

The sidecar runs as a process on the file backend against the venue simulator; the
Prometheus server is Debian's ``prometheus`` package (installed with apt-get when missing).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.demo import binance_service, sidecar_config, write_key_file
from proxy.procs import Proc, sidecar_argv
from tests.e2e.conftest import Sidecars
from tests.prometheus_tools import ensure_prometheus

pytestmark = pytest.mark.e2e

ORDER = "/api/v3/order?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000"
SCRAPE_INTERVAL_S = 1


_ensure_prometheus = ensure_prometheus


def _start(sidecars: Sidecars, tmp: Path, token: str | None) -> Proc:
    """A sidecar on the file backend with the Binance test services and an admin token."""
    venue = sidecars.venue
    services = {
        s: binance_service(venue.port, venue.ca_file, "/" + s.removeprefix("binance_"))
        for s in venue.keys
    }
    run = tmp / "ops-sidecar"
    run.mkdir()
    keys_path, kek_path = write_key_file(run, {s: venue.keys[s][0] for s in services})
    cfg = sidecar_config(keys_path, kek_path, services)
    if token is not None:
        token_file = run / "admin-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        cfg["admin"]["token_file"] = str(token_file)
    path = run / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = Proc(sidecar_argv(path), stderr_path=run / "stderr.log")
    sidecars.started.append(proc)
    return proc


def _http(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            got = head[len(name) :].strip("{}")
            if sorted(got.split(",")) == sorted(want.split(",")) if want else not got:
                return float(value)
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


@pytest.fixture
def prometheus_bins() -> tuple[str, str]:
    return _ensure_prometheus()


@pytest.fixture
def prometheus(
    prometheus_bins: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """Start Prometheus against a target given by ``start(admin_port)``; yields the URL
    factory."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(admin_port: int) -> str:
        port = _free_port()
        run = tmp_path / "prometheus"
        run.mkdir()
        (run / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s"},
                    "scrape_configs": [
                        {
                            "job_name": "authproxy",
                            "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
                        }
                    ],
                }
            )
        )
        log = (run / "prometheus.log").open("wb")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    prometheus_bins[0],
                    f"--config.file={run / 'prometheus.yml'}",
                    f"--storage.tsdb.path={run / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if _http(url + "/-/ready")[0] == 200:
                    return url
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    try:
        yield start
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        for log in logs:
            log.close()


def _query(url: str, expr: str) -> float | None:
    status, body = _http(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    result = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _wait_for(url: str, expr: str, want: float, timeout: float = 30) -> float | None:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = _query(url, expr)
        if got == want:
            return got
        time.sleep(0.5)
    return got


def _send_orders(port: int, route: str, n: int, tag: str) -> None:
    for i in range(n):
        status, body = _http(
            f"http://127.0.0.1:{port}{route}{ORDER}&newClientOrderId={tag}-{i}", data=b""
        )
        assert status == 200, body


def test_prometheus_scrapes_request_counter_and_overhead_histogram(
    sidecars: Sidecars, prometheus: Any
) -> None:
    sc = _start(sidecars, sidecars.run_dir, None)
    admin = sc.ready["admin"]
    assert admin["address"] == "127.0.0.1"
    url = prometheus(admin["port"])
    requests = 'authproxy_requests_total{service="binance_hmac",outcome="ok"}'
    overhead = 'authproxy_overhead_seconds_count{service="binance_hmac"}'
    assert _wait_for(url, requests, 0.0) == 0.0
    assert _wait_for(url, overhead, 0.0) == 0.0
    _send_orders(sc.ready["listen"]["port"], "/hmac", 25, "prom")
    assert _wait_for(url, requests, 25.0) == 25.0
    assert _wait_for(url, overhead, 25.0) == 25.0
    # every request's overhead is counted in some bucket, and it is less than its duration
    assert _wait_for(url, overhead.replace("_count", "_bucket").replace("}", ',le="+Inf"}'), 25.0)
    total = _query(url, 'authproxy_request_duration_seconds_sum{service="binance_hmac"}')
    own = _query(url, 'authproxy_overhead_seconds_sum{service="binance_hmac"}')
    assert total is not None and own is not None and 0 < own < total


def test_admin_api_endpoints_and_no_secret_anywhere(
    sidecars: Sidecars, prometheus_bins: tuple[str, str]
) -> None:
    token = secrets.token_hex(24)
    sc = _start(sidecars, sidecars.run_dir, token)
    base = f"http://127.0.0.1:{sc.ready['admin']['port']}"
    port = sc.ready["listen"]["port"]
    _send_orders(port, "/hmac", 3, "adm")
    bodies: list[bytes] = []

    status, body = _http(base + "/healthz")
    assert status == 200
    status, body = _http(base + "/readyz")
    assert status == 200, body
    bodies.append(body)

    status, metrics = _http(base + "/metrics")
    assert status == 200
    bodies.append(metrics)
    check = subprocess.run(
        [prometheus_bins[1], "check", "metrics"], input=metrics, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    text = metrics.decode()
    assert _metric(text, "authproxy_requests_total", service="binance_hmac", outcome="ok") == 3
    assert _metric(text, "authproxy_memory_locked", service="binance_hmac") in (0.0, 1.0)

    status, body = _http(base + "/keys")
    assert status == 200
    bodies.append(body)
    keys = json.loads(body)["services"]["binance_hmac"]["keys"]
    kid = sidecars.venue.keys["binance_hmac"][0]["key_id"]
    assert [(k["key_id"], k["state"], k["checksum_ok"]) for k in keys] == [(kid, "active", True)]

    revoke = json.dumps({"service": "binance_hmac", "key_id": kid}).encode()
    ctype = {"Content-Type": "application/json"}
    assert _http(base + "/keys/revoke", data=revoke, headers=ctype)[0] == 401
    wrong = {**ctype, "Authorization": "Bearer " + "0" * len(token)}
    status, body = _http(base + "/keys/revoke", data=revoke, headers=wrong)
    assert status == 401
    bodies.append(body)
    good = {**ctype, "Authorization": "Bearer " + token}
    unknown = json.dumps({"service": "nope", "key_id": kid}).encode()
    assert _http(base + "/keys/revoke", data=unknown, headers=good)[0] == 404
    status, body = _http(base + "/keys/revoke", data=revoke, headers=good)
    assert (status, json.loads(body)) == (200, {"revoked": True})
    # dropped at once: the next order has no key to sign with
    status, body = _http(f"http://127.0.0.1:{port}/hmac{ORDER}&newClientOrderId=after", data=b"")
    assert status == 503, body
    bodies.append(body)
    status, body = _http(base + "/keys/revoke", data=revoke, headers=good)
    assert (status, json.loads(body)) == (200, {"revoked": False})
    status, body = _http(base + "/readyz")
    assert status == 503
    bodies.append(body)
    status, body = _http(base + "/metrics")
    bodies.append(body)
    assert _metric(body.decode(), "authproxy_revocations_total", service="binance_hmac") == 1

    assert sc.stop() == 0
    log = (sidecars.run_dir / "ops-sidecar" / "stderr.log").read_bytes()
    events = [json.loads(line)["event"] for line in log.splitlines() if line.startswith(b"{")]
    for once in ("starting", "ready", "keys_swapped", "stopped"):
        assert events.count(once) == 1, events
    assert events.count("key_revoked") == 2, events  # one per call, never per request
    bodies.append(log)
    secrets_held = [token.encode()]
    for record, _ in sidecars.venue.keys.values():
        secrets_held.append(str(record["secret_key"]).encode())
        if record.get("passphrase"):
            secrets_held.append(str(record["passphrase"]).encode())
    for blob in bodies:
        for secret in secrets_held:
            assert secret not in blob
