"""USD-M futures end to end: the real sidecar (``venue: binance_usdm``) signs, the
simulator's ``/fapi`` routes verify as Binance futures would, and every refusal is
classified by ``VENUES["binance_usdm"].classify`` the way the fallback logic needs."""

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keycache.record import make_record
from proxy.demo import PERMISSIONS
from proxy.demo import random_key_id as binance_like_key_id
from proxy.procs import Proc, simulator_argv
from proxy.signers import VENUES, Rejection
from tests.e2e.conftest import Sidecars

pytestmark = pytest.mark.e2e

CLASSIFY = VENUES["binance_usdm"].classify
ORDER = (
    "/fapi/v1/order?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.010&price=30000"
)


@dataclass
class Futures:
    proc: Proc
    records: dict[str, dict[str, object]]  # service -> key record for the sidecar

    @property
    def port(self) -> int:
        return int(self.proc.ready["port"])

    @property
    def ca_file(self) -> str:
        return str(self.proc.ready["ca_file"])

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def service(self, route: str, **extra: Any) -> dict[str, Any]:
        return {
            "venue": "binance_usdm",
            "key_type": "exchange_api",
            "upstream": f"https://127.0.0.1:{self.port}",
            "route": route,
            "ca_file": self.ca_file,
            "timeout_ms": 2000,
            **extra,
        }


def make_keys() -> tuple[dict[str, dict[str, object]], list[dict[str, str]]]:
    """Sidecar records per service, and the venue's keys document entries."""
    now = datetime.now(UTC).replace(microsecond=0)
    dates = {"created_at": now - timedelta(days=1), "expires_at": now + timedelta(days=30)}
    records: dict[str, dict[str, object]] = {}
    entries: list[dict[str, str]] = []
    for service in ("usdm_hmac", "usdm_revoked", "usdm_stale"):
        kid, secret = binance_like_key_id(), secrets.token_urlsafe(48)
        records[service] = make_record(kid, secret, permissions=PERMISSIONS, **dates)
        entries.append({"api_key": kid, "algorithm": "hmac-sha256", "secret": secret})
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    kid = binance_like_key_id()
    records["usdm_ed25519"] = make_record(
        kid, pem, algorithm="ed25519", permissions=PERMISSIONS, **dates
    )
    entries.append({"api_key": kid, "algorithm": "ed25519", "public_key": public})
    return records, entries


def start_futures(run_dir: Path, *extra: str) -> Futures:
    records, entries = make_keys()
    keys_file = run_dir / "futures-keys.json"
    keys_file.write_text(json.dumps({"binance_usdm": entries}))
    proc = Proc(
        simulator_argv(keys_file, run_dir / "state", *extra), stderr_path=run_dir / "sim.log"
    )
    return Futures(proc, records)


@pytest.fixture(scope="module")
def futures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Futures]:
    venue = start_futures(tmp_path_factory.mktemp("usdm"))
    try:
        yield venue
    finally:
        assert venue.proc.stop() == 0, venue.proc.stderr_tail()


def http(
    method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any, Any]:
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, **kw) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def classify(status: int, body: Any) -> Rejection | None:
    return CLASSIFY(status, json.dumps(body).encode())


def start_sidecar(sidecars: Sidecars, futures: Futures, service: str, **extra: Any) -> Proc:
    return sidecars.start(
        {service: futures.service("/" + service, **extra)},
        records={service: futures.records[service]},
    )


@pytest.mark.parametrize("service", ["usdm_hmac", "usdm_ed25519"])
def test_futures_orders_are_signed_and_accepted(
    sidecars: Sidecars, futures: Futures, service: str
) -> None:
    sc = start_sidecar(sidecars, futures, service)
    base = f"http://127.0.0.1:{sc.ready['listen']['port']}/{service}"
    status, headers, body = http("POST", f"{base}{ORDER}&newClientOrderId={service}-q")
    assert status == 200, body
    assert (body["clientOrderId"], body["status"], body["positionSide"]) == (
        f"{service}-q",
        "NEW",
        "BOTH",
    )
    assert headers["X-MBX-ORDER-COUNT-1M"]  # the venue's headers pass through
    assert headers["X-MBX-USED-WEIGHT-1M"]
    assert classify(status, body) is None

    # Parameters in a form body, as ccxt sends them for futures.
    status, _, body = http(
        "POST",
        f"{base}/fapi/v1/order",
        b"symbol=ETHUSDT&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.100&price=3600"
        b"&newClientOrderId=" + service.encode() + b"-b",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200, body
    order_id = body["orderId"]
    status, _, body = http("GET", f"{base}/fapi/v1/order?symbol=ETHUSDT&orderId={order_id}")
    assert (status, body["status"]) == (200, "NEW")
    status, _, body = http("DELETE", f"{base}/fapi/v1/order?symbol=ETHUSDT&orderId={order_id}")
    assert (status, body["status"]) == (200, "CANCELED")
    status, _, body = http("GET", f"{base}/fapi/v3/account")
    assert status == 200, body
    assert body["assets"][0]["asset"] == "USDT"


def test_revoked_key_is_2015_and_key_rejected(sidecars: Sidecars, futures: Futures) -> None:
    sc = start_sidecar(sidecars, futures, "usdm_revoked")
    url = f"http://127.0.0.1:{sc.ready['listen']['port']}/usdm_revoked{ORDER}"
    assert http("POST", url)[0] == 200
    kid = futures.records["usdm_revoked"]["key_id"]
    status, _, _ = http(
        "DELETE",
        f"https://127.0.0.1:{futures.port}/__sim/keys/{kid}",
        context=futures.ssl_context(),
    )
    assert status == 200
    status, _, body = http("POST", url)
    assert status == 401
    assert body["code"] == -2015
    assert body["msg"].startswith("Invalid API-key, IP, or permissions for action, request ip: ")
    assert classify(status, body) is Rejection.KEY_REJECTED


def sign_cli(config: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "sign", "--config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def send_signed(futures: Futures, req: dict[str, Any]) -> tuple[int, Any]:
    status, _, body = http(
        req["method"],
        req["url"],
        req["body"].encode(),
        {k: v for k, v in req["headers"] if k.lower() != "host"},
        context=futures.ssl_context(),
    )
    return status, body


def test_sign_dry_run_tampered_body_and_stale_timestamp(
    sidecars: Sidecars, futures: Futures
) -> None:
    sc = start_sidecar(sidecars, futures, "usdm_hmac")
    args = [
        "--service",
        "usdm_hmac",
        "--method",
        "POST",
        "--url",
        "/fapi/v1/order?symbol=BTCUSDT&side=BUY",
        "--body",
        "type=LIMIT&timeInForce=GTC&quantity=0.010&price=30000",
        "--header",
        "Content-Type: application/x-www-form-urlencoded",
    ]
    req = sign_cli(sc.argv[-1], *args)
    assert req["url"] == f"https://127.0.0.1:{futures.port}/fapi/v1/order?symbol=BTCUSDT&side=BUY"
    assert "&recvWindow=5000&timestamp=" in req["body"] and "&signature=" in req["body"]
    assert ["X-MBX-APIKEY", futures.records["usdm_hmac"]["key_id"]] in req["headers"]
    status, body = send_signed(futures, req)
    assert status == 200, body

    tampered = dict(req, body=req["body"].replace("quantity=0.010", "quantity=0.020"))
    status, body = send_signed(futures, tampered)
    assert (status, body) == (
        400,
        {"code": -1022, "msg": "Signature for this request is not valid."},
    )
    assert classify(status, body) is Rejection.BAD_SIGNATURE

    stale = sign_cli(sc.argv[-1], *args, "--timestamp", str(int(time.time() * 1000) - 60_000))
    status, body = send_signed(futures, stale)
    assert (status, body["code"]) == (400, -1021)
    assert classify(status, body) is Rejection.CLOCK_OR_NONCE


@pytest.mark.parametrize("clock_sync", [False, True])
def test_futures_clock_ahead(sidecars: Sidecars, tmp_path: Path, clock_sync: bool) -> None:
    """A futures venue 30 s ahead: stale (-1021) without clock sync; with it the sidecar
    measures the offset off ``/fapi/v1/time`` and the order is accepted."""
    ahead = start_futures(tmp_path, "--clock-offset-ms", "30000")
    try:
        sc = start_sidecar(sidecars, ahead, "usdm_stale", clock_sync=clock_sync)
        status, _, body = http(
            "POST", f"http://127.0.0.1:{sc.ready['listen']['port']}/usdm_stale{ORDER}"
        )
        if clock_sync:
            assert status == 200, body
        else:
            assert (status, body["code"]) == (400, -1021)
            assert classify(status, body) is Rejection.CLOCK_OR_NONCE
    finally:
        assert ahead.proc.stop() == 0
