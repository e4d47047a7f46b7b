"""The real sidecar signs for OKX, the real simulator verifies over TLS, as OKX would."""

from __future__ import annotations

import json
import secrets
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

from keycache.record import make_record
from proxy.procs import Proc, simulator_argv
from proxy.signers import VENUES, Rejection
from tests.e2e.conftest import Sidecars

pytestmark = pytest.mark.e2e

PERMISSIONS = ["read_market_data", "place_orders", "cancel_orders", "read_account_info"]
JSON = {"Content-Type": "application/json"}
ORDER = {
    "instId": "BTC-USDT",
    "tdMode": "cash",
    "side": "buy",
    "ordType": "limit",
    "px": "30000",
    "sz": "0.01",
}


class OkxSim:
    """A simulator process with OKX keys, and the sidecar key records that match them."""

    def __init__(self, run_dir: Path, *extra: str) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        self.records: dict[str, dict[str, object]] = {}
        venue_keys = []
        for service in ("okx_main", "okx_revoked"):
            key_id, secret = f"{service}-{secrets.token_hex(8)}", secrets.token_urlsafe(32)
            passphrase = "Sim-" + secrets.token_urlsafe(8)
            self.records[service] = make_record(
                key_id,
                secret,
                created_at=now - timedelta(days=1),
                expires_at=now + timedelta(days=30),
                permissions=PERMISSIONS,
                passphrase=passphrase,
            )
            venue_keys.append(
                {
                    "api_key": key_id,
                    "algorithm": "hmac-sha256",
                    "secret": secret,
                    "passphrase": passphrase,
                }
            )
        keys_file = run_dir / "okx-keys.json"
        keys_file.write_text(json.dumps({"okx": venue_keys}))
        self.proc = Proc(
            simulator_argv(keys_file, run_dir / "state", *extra), stderr_path=run_dir / "sim.log"
        )

    @property
    def port(self) -> int:
        return int(self.proc.ready["port"])

    def service(self, name: str) -> dict[str, Any]:
        return {
            "venue": "okx",
            "key_type": "exchange_api",
            "upstream": f"https://127.0.0.1:{self.port}",
            "route": "/" + name.replace("_", "-"),
            "ca_file": self.proc.ready["ca_file"],
            "timeout_ms": 2000,
        }

    def direct(
        self, method: str, url: str, headers: dict[str, str], body: str = ""
    ) -> tuple[int, bytes]:
        import ssl

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
def okx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OkxSim]:
    sim = OkxSim(tmp_path_factory.mktemp("okx"))
    try:
        yield sim
    finally:
        assert sim.proc.stop() == 0, sim.proc.stderr_tail()


def through(port: int, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=JSON
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def start(sidecars: Sidecars, okx: OkxSim, *names: str) -> int:
    proc = sidecars.start(
        {n: okx.service(n) for n in names}, records={n: okx.records[n] for n in names}
    )
    return int(proc.ready["listen"]["port"])


def test_order_placed_read_and_cancelled_through_the_sidecar(
    sidecars: Sidecars, okx: OkxSim
) -> None:
    port = start(sidecars, okx, "okx_main")
    status, raw = through(port, "POST", "/okx-main/api/v5/trade/order", ORDER | {"clOrdId": "e2e1"})
    body = json.loads(raw)
    assert status == 200 and body["code"] == "0", body
    assert VENUES["okx"].classify(status, raw) is None
    ord_id = body["data"][0]["ordId"]
    status, raw = through(
        port, "GET", f"/okx-main/api/v5/trade/order?instId=BTC-USDT&ordId={ord_id}"
    )
    assert status == 200 and json.loads(raw)["data"][0]["clOrdId"] == "e2e1"
    status, raw = through(
        port, "POST", "/okx-main/api/v5/trade/cancel-order", {"instId": "BTC-USDT", "ordId": ord_id}
    )
    assert status == 200 and json.loads(raw)["data"][0]["sCode"] == "0"


def test_revoked_key_is_50111_and_key_rejected(sidecars: Sidecars, okx: OkxSim) -> None:
    port = start(sidecars, okx, "okx_revoked")
    key_id = str(okx.records["okx_revoked"]["key_id"])
    assert okx.direct("DELETE", f"https://127.0.0.1:{okx.port}/__sim/keys/{key_id}", {})[0] == 200
    status, raw = through(port, "POST", "/okx-revoked/api/v5/trade/order", ORDER)
    assert (status, json.loads(raw)) == (401, {"msg": "Invalid OK-ACCESS-KEY.", "code": "50111"})
    assert VENUES["okx"].classify(status, raw) is Rejection.KEY_REJECTED


def _sign_cli(config: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "sign", "--config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_sign_dry_run_tampered_body_and_stale_timestamp(sidecars: Sidecars, okx: OkxSim) -> None:
    proc = sidecars.start(
        {"okx_main": okx.service("okx_main")}, records={"okx_main": okx.records["okx_main"]}
    )
    body = json.dumps(ORDER | {"clOrdId": "cli1"}, separators=(",", ":"))
    args = [
        "--service",
        "okx_main",
        "--method",
        "POST",
        "--url",
        "/api/v5/trade/order",
        "--body",
        body,
        "--header",
        "Content-Type:application/json",
    ]
    req = _sign_cli(proc.argv[-1], *args)
    assert req["url"] == f"https://127.0.0.1:{okx.port}/api/v5/trade/order"
    headers = {k: v for k, v in req["headers"] if k.lower() != "host"}
    assert {
        "OK-ACCESS-KEY",
        "OK-ACCESS-SIGN",
        "OK-ACCESS-TIMESTAMP",
        "OK-ACCESS-PASSPHRASE",
    } <= set(headers)
    status, raw = okx.direct("POST", req["url"], headers, req["body"])
    assert status == 200 and json.loads(raw)["code"] == "0", raw

    status, raw = okx.direct(
        "POST", req["url"], headers, req["body"].replace('"sz":"0.01"', '"sz":"9"')
    )
    assert (status, json.loads(raw)["code"]) == (401, "50113")
    assert VENUES["okx"].classify(status, raw) is Rejection.BAD_SIGNATURE

    stale = _sign_cli(proc.argv[-1], *args, "--timestamp", str(int(time.time() * 1000) - 60_000))
    status, raw = okx.direct(
        "POST",
        stale["url"],
        {k: v for k, v in stale["headers"] if k.lower() != "host"},
        stale["body"],
    )
    assert (status, json.loads(raw)["code"]) == (401, "50102")
    assert VENUES["okx"].classify(status, raw) is Rejection.CLOCK_OR_NONCE


@pytest.mark.parametrize("clock_sync", [False, True])
def test_venue_clock_ahead_is_50102_unless_clock_sync(
    sidecars: Sidecars, tmp_path: Path, clock_sync: bool
) -> None:
    """OKX allows 30 s. A venue 45 s ahead: without clock sync the sidecar's timestamps are
    expired (50102, classified CLOCK_OR_NONCE); with it, the offset is measured off
    ``/api/v5/public/time`` and the request is accepted."""
    ahead = OkxSim(tmp_path, "--clock-offset-ms", "45000")
    try:
        svc = ahead.service("okx_main") | {"clock_sync": clock_sync}
        proc = sidecars.start({"okx_main": svc}, records={"okx_main": ahead.records["okx_main"]})
        status, raw = through(
            int(proc.ready["listen"]["port"]), "GET", "/okx-main/api/v5/trade/orders-pending"
        )
        if clock_sync:
            assert (status, json.loads(raw)["code"]) == (200, "0"), raw
            events = [json.loads(line) for line in proc.stderr_tail(100_000).splitlines()]
            offsets = [e["offset_ms"] for e in events if e.get("event") == "clock_offset"]
            assert offsets and abs(offsets[0] - 45_000) < 1000
        else:
            assert (status, json.loads(raw)["code"]) == (401, "50102")
            assert VENUES["okx"].classify(status, raw) is Rejection.CLOCK_OR_NONCE
    finally:
        assert ahead.proc.stop() == 0
