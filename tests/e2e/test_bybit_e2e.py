"""The real sidecar signs for Bybit (HMAC and RSA keys), the real simulator verifies over
TLS, as Bybit would."""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keycache.record import make_record
from proxy.procs import Proc, simulator_argv
from proxy.signers import VENUES, Rejection
from tests.e2e.conftest import Sidecars

pytestmark = pytest.mark.e2e

PERMISSIONS = ["read_market_data", "place_orders", "cancel_orders", "read_account_info"]
JSON = {"Content-Type": "application/json"}
ORDER = {
    "category": "spot",
    "symbol": "BTCUSDT",
    "side": "Buy",
    "orderType": "Limit",
    "qty": "0.01",
    "price": "30000",
}


class BybitSim:
    """A simulator process with Bybit keys, and the sidecar key records that match them."""

    def __init__(self, run_dir: Path, *extra: str) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        times = {"created_at": now - timedelta(days=1), "expires_at": now + timedelta(days=30)}
        self.records: dict[str, dict[str, object]] = {}
        venue_keys: list[dict[str, str]] = []
        for service in ("bybit_hmac", "bybit_revoked"):
            key_id, secret = secrets.token_hex(9), secrets.token_urlsafe(27)
            self.records[service] = make_record(key_id, secret, permissions=PERMISSIONS, **times)
            venue_keys.append({"api_key": key_id, "algorithm": "hmac-sha256", "secret": secret})
        private = rsa.generate_private_key(65537, 2048)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        public = (
            private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        key_id = secrets.token_hex(9)
        self.records["bybit_rsa"] = make_record(
            key_id, pem, algorithm="rsa-pkcs1-sha256", permissions=PERMISSIONS, **times
        )
        venue_keys.append(
            {"api_key": key_id, "algorithm": "rsa-pkcs1-sha256", "public_key": public}
        )
        keys_file = run_dir / "bybit-keys.json"
        keys_file.write_text(json.dumps({"bybit": venue_keys}))
        self.proc = Proc(
            simulator_argv(keys_file, run_dir / "state", *extra), stderr_path=run_dir / "sim.log"
        )

    @property
    def port(self) -> int:
        return int(self.proc.ready["port"])

    def service(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "venue": "bybit",
            "key_type": "exchange_api",
            "upstream": f"https://127.0.0.1:{self.port}",
            "route": "/" + name.replace("_", "-"),
            "ca_file": self.proc.ready["ca_file"],
            "timeout_ms": 2000,
            **extra,
        }

    def direct(
        self, method: str, url: str, headers: dict[str, str], body: str = ""
    ) -> tuple[int, bytes]:
        # urllib frames the body itself: a dry run's Content-Length would not fit a tampered body.
        headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
        request = urllib.request.Request(
            url, data=body.encode() or None, method=method, headers=headers
        )
        context = ssl.create_default_context(cafile=self.proc.ready["ca_file"])
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


@pytest.fixture(scope="module")
def bybit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BybitSim]:
    sim = BybitSim(tmp_path_factory.mktemp("bybit"))
    try:
        yield sim
    finally:
        assert sim.proc.stop() == 0, sim.proc.stderr_tail()


def through(port: int, method: str, path: str, body: object = None) -> tuple[int, bytes, Any]:
    data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=JSON
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def start(sidecars: Sidecars, sim: BybitSim, *names: str, **extra: Any) -> int:
    proc = sidecars.start(
        {n: sim.service(n, **extra) for n in names}, records={n: sim.records[n] for n in names}
    )
    return int(proc.ready["listen"]["port"])


@pytest.mark.parametrize("service", ["bybit_hmac", "bybit_rsa"])
def test_order_created_read_and_cancelled_through_the_sidecar(
    sidecars: Sidecars, bybit: BybitSim, service: str
) -> None:
    port = start(sidecars, bybit, service)
    route = "/" + service.replace("_", "-")
    link = f"e2e-{service}"
    status, raw, headers = through(
        port, "POST", f"{route}/v5/order/create", ORDER | {"orderLinkId": link}
    )
    body = json.loads(raw)
    assert status == 200 and body["retCode"] == 0, body
    assert VENUES["bybit"].classify(status, raw) is None
    assert headers["X-Bapi-Limit"] == "20"  # the venue's rate-limit headers pass through
    order_id = body["result"]["orderId"]
    status, raw, _ = through(
        port, "GET", f"{route}/v5/order/realtime?category=spot&symbol=BTCUSDT&orderId={order_id}"
    )
    assert json.loads(raw)["result"]["list"][0]["orderLinkId"] == link
    status, raw, _ = through(
        port,
        "POST",
        f"{route}/v5/order/cancel",
        {"category": "spot", "symbol": "BTCUSDT", "orderId": order_id},
    )
    assert json.loads(raw)["retCode"] == 0


def test_revoked_key_is_10003_and_key_rejected(sidecars: Sidecars, bybit: BybitSim) -> None:
    port = start(sidecars, bybit, "bybit_revoked")
    key_id = str(bybit.records["bybit_revoked"]["key_id"])
    assert (
        bybit.direct("DELETE", f"https://127.0.0.1:{bybit.port}/__sim/keys/{key_id}", {})[0] == 200
    )
    status, raw, _ = through(port, "POST", "/bybit-revoked/v5/order/create", ORDER)
    body = json.loads(raw)
    assert (status, body["retCode"], body["retMsg"]) == (200, 10003, "API key is invalid.")
    assert VENUES["bybit"].classify(status, raw) is Rejection.KEY_REJECTED


def _sign_cli(config: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "sign", "--config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("service", ["bybit_hmac", "bybit_rsa"])
def test_sign_dry_run_tampered_body_and_stale_timestamp(
    sidecars: Sidecars, bybit: BybitSim, service: str
) -> None:
    proc = sidecars.start(
        {service: bybit.service(service)}, records={service: bybit.records[service]}
    )
    body = json.dumps(ORDER | {"orderLinkId": f"cli-{service}"}, separators=(",", ":"))
    args = [
        "--service",
        service,
        "--method",
        "POST",
        "--url",
        "/v5/order/create",
        "--body",
        body,
        "--header",
        "Content-Type:application/json",
    ]
    req = _sign_cli(proc.argv[-1], *args)
    assert req["url"] == f"https://127.0.0.1:{bybit.port}/v5/order/create"
    headers = dict(req["headers"])
    assert {"X-BAPI-API-KEY", "X-BAPI-TIMESTAMP", "X-BAPI-RECV-WINDOW", "X-BAPI-SIGN"} <= set(
        headers
    )
    status, raw = bybit.direct("POST", req["url"], headers, req["body"])
    assert status == 200 and json.loads(raw)["retCode"] == 0, raw

    status, raw = bybit.direct(
        "POST", req["url"], headers, req["body"].replace('"qty":"0.01"', '"qty":"9"')
    )
    assert (status, json.loads(raw)["retCode"]) == (200, 10004)
    assert VENUES["bybit"].classify(status, raw) is Rejection.BAD_SIGNATURE

    stale = _sign_cli(proc.argv[-1], *args, "--timestamp", str(int(time.time() * 1000) - 60_000))
    status, raw = bybit.direct("POST", stale["url"], dict(stale["headers"]), stale["body"])
    assert (status, json.loads(raw)["retCode"]) == (200, 10002)
    assert VENUES["bybit"].classify(status, raw) is Rejection.CLOCK_OR_NONCE


@pytest.mark.parametrize("clock_sync", [False, True])
def test_venue_clock_ahead_is_10002_unless_clock_sync(
    sidecars: Sidecars, tmp_path: Path, clock_sync: bool
) -> None:
    """A venue 10 s ahead is outside the 5 s recv_window: 10002 (CLOCK_OR_NONCE) without
    clock sync; with it the offset is measured off ``/v5/market/time`` and accepted."""
    ahead = BybitSim(tmp_path, "--clock-offset-ms", "10000")
    try:
        port = start(sidecars, ahead, "bybit_hmac", clock_sync=clock_sync)
        status, raw, _ = through(port, "GET", "/bybit-hmac/v5/order/realtime?category=spot")
        if clock_sync:
            assert json.loads(raw)["retCode"] == 0, raw
        else:
            assert (status, json.loads(raw)["retCode"]) == (200, 10002)
            assert VENUES["bybit"].classify(status, raw) is Rejection.CLOCK_OR_NONCE
    finally:
        assert ahead.proc.stop() == 0
