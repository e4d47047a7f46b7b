"""The real sidecar signs for Coinbase Advanced Trade (CDP JWTs with ES256 and Ed25519
keys, legacy HMAC keys), the real simulator verifies over TLS, as Coinbase would."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keycache.record import make_record
from proxy.procs import Proc, simulator_argv
from proxy.signers import VENUES, Rejection
from tests.e2e.conftest import Sidecars

pytestmark = pytest.mark.e2e

PERMISSIONS = ["read_market_data", "place_orders", "cancel_orders", "read_account_info"]
JSON = {"Content-Type": "application/json"}


def order(client_order_id: str) -> dict[str, object]:
    return {
        "client_order_id": client_order_id,
        "product_id": "BTC-USD",
        "side": "BUY",
        "order_configuration": {
            "limit_limit_gtc": {"base_size": "0.001", "limit_price": "30000", "post_only": False}
        },
    }


def _pems(private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> tuple[str, str]:
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return pem, public


class CoinbaseSim:
    """A simulator process with Coinbase keys, and the sidecar key records that match them.

    ``coinbase_es256`` uses an ``organizations/.../apiKeys/...`` key name; the Ed25519 keys
    use bare UUID ids (newer CDP keys), which ``DELETE /__sim/keys/{id}`` can address.
    """

    def __init__(self, run_dir: Path, *extra: str) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        self.times = {"created_at": now - timedelta(days=1), "expires_at": now + timedelta(days=30)}
        self.records: dict[str, dict[str, object]] = {}
        venue_keys: list[dict[str, str]] = []
        for service, algorithm in (
            ("coinbase_es256", "es256"),
            ("coinbase_ed25519", "ed25519"),
            ("coinbase_revoked", "ed25519"),
        ):
            private = (
                ec.generate_private_key(ec.SECP256R1())
                if algorithm == "es256"
                else ed25519.Ed25519PrivateKey.generate()
            )
            pem, public = _pems(private)
            key_id = (
                f"organizations/{uuid.uuid4()}/apiKeys/{uuid.uuid4()}"
                if algorithm == "es256"
                else str(uuid.uuid4())
            )
            self.records[service] = make_record(
                key_id, pem, algorithm=algorithm, permissions=PERMISSIONS, **self.times
            )
            venue_keys.append({"api_key": key_id, "algorithm": algorithm, "public_key": public})
        legacy_id, legacy_secret = uuid.uuid4().hex[:16], uuid.uuid4().hex
        self.records["coinbase_legacy"] = make_record(
            legacy_id, legacy_secret, permissions=PERMISSIONS, **self.times
        )
        venue_keys.append(
            {"api_key": legacy_id, "algorithm": "hmac-sha256", "secret": legacy_secret}
        )
        keys_file = run_dir / "coinbase-keys.json"
        keys_file.write_text(json.dumps({"coinbase": venue_keys}))
        self.proc = Proc(
            simulator_argv(keys_file, run_dir / "state", *extra), stderr_path=run_dir / "sim.log"
        )

    @property
    def port(self) -> int:
        return int(self.proc.ready["port"])

    def service(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "venue": "coinbase",
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

    def log(self) -> list[dict[str, Any]]:
        status, raw = self.direct("GET", f"https://127.0.0.1:{self.port}/__sim/log", {})
        assert status == 200
        return json.loads(raw)["entries"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def coinbase(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoinbaseSim]:
    sim = CoinbaseSim(tmp_path_factory.mktemp("coinbase"))
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


def start(sidecars: Sidecars, sim: CoinbaseSim, *names: str, **extra: Any) -> int:
    proc = sidecars.start(
        {n: sim.service(n, **extra) for n in names}, records={n: sim.records[n] for n in names}
    )
    return int(proc.ready["listen"]["port"])


@pytest.mark.parametrize("service", ["coinbase_es256", "coinbase_ed25519", "coinbase_legacy"])
def test_order_created_read_and_cancelled_through_the_sidecar(
    sidecars: Sidecars, coinbase: CoinbaseSim, service: str
) -> None:
    port = start(sidecars, coinbase, service)
    route = "/" + service.replace("_", "-")
    status, raw = through(port, "POST", f"{route}/api/v3/brokerage/orders", order(f"e2e-{service}"))
    body = json.loads(raw)
    assert status == 200 and body["success"] is True, raw
    assert VENUES["coinbase"].classify(status, raw) is None
    order_id = body["success_response"]["order_id"]
    status, raw = through(
        port, "GET", f"{route}/api/v3/brokerage/orders/historical/{order_id}?limit=1"
    )
    assert status == 200 and json.loads(raw)["order"]["client_order_id"] == f"e2e-{service}"
    status, raw = through(
        port, "POST", f"{route}/api/v3/brokerage/orders/batch_cancel", {"order_ids": [order_id]}
    )
    assert status == 200 and json.loads(raw)["results"][0]["success"] is True


def test_revoked_key_is_a_bare_401_classified_key_rejected(
    sidecars: Sidecars, coinbase: CoinbaseSim
) -> None:
    port = start(sidecars, coinbase, "coinbase_revoked")
    key_id = str(coinbase.records["coinbase_revoked"]["key_id"])
    assert (
        coinbase.direct("DELETE", f"https://127.0.0.1:{coinbase.port}/__sim/keys/{key_id}", {})[0]
        == 200
    )
    status, raw = through(
        port, "POST", "/coinbase-revoked/api/v3/brokerage/orders", order("revoked-1")
    )
    assert (status, raw) == (401, b"Unauthorized\n")
    assert VENUES["coinbase"].classify(status, raw) is Rejection.KEY_REJECTED
    assert coinbase.log()[-1]["verdict"] == "unknown_key"


def test_key_unknown_to_coinbase_falls_back_to_the_previous_key(
    sidecars: Sidecars, coinbase: CoinbaseSim
) -> None:
    """Why a bare 401 is KEY_REJECTED: during a rotation the newest key may not be known to
    Coinbase yet; the sidecar re-signs once with the previous key and the order goes in."""
    known = coinbase.records["coinbase_ed25519"]
    pem, _ = _pems(ed25519.Ed25519PrivateKey.generate())
    newer = make_record(
        str(uuid.uuid4()),
        pem,
        algorithm="ed25519",
        permissions=PERMISSIONS,
        created_at=datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1),
        expires_at=coinbase.times["expires_at"],
    )
    proc = sidecars.start(
        {"coinbase_ed25519": coinbase.service("coinbase_ed25519")},
        records={"coinbase_ed25519": [known, newer]},
    )
    status, raw = through(
        int(proc.ready["listen"]["port"]),
        "POST",
        "/coinbase-ed25519/api/v3/brokerage/orders",
        order("fallback-1"),
    )
    assert status == 200 and json.loads(raw)["success"] is True, raw
    events = [json.loads(line) for line in proc.stderr_tail(100_000).splitlines()]
    (fallback,) = [e for e in events if e.get("event") == "key_fallback"]
    assert (fallback["refused_key_id"], fallback["retried_key_id"]) == (
        newer["key_id"],
        known["key_id"],
    )
    last_two = [(e["status"], e["verdict"]) for e in coinbase.log()[-2:]]
    assert last_two == [(401, "unknown_key"), (200, "ok")]


def _sign_cli(config: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "sign", "--config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("service", ["coinbase_es256", "coinbase_legacy"])
def test_sign_dry_run_tampered_and_stale(
    sidecars: Sidecars, coinbase: CoinbaseSim, service: str
) -> None:
    proc = sidecars.start(
        {service: coinbase.service(service)}, records={service: coinbase.records[service]}
    )
    body = json.dumps(order(f"cli-{service}"), separators=(",", ":"))
    args = [
        "--service",
        service,
        "--method",
        "POST",
        "--url",
        "/api/v3/brokerage/orders",
        "--body",
        body,
        "--header",
        "Content-Type:application/json",
    ]
    req = _sign_cli(proc.argv[-1], *args)
    assert req["url"] == f"https://127.0.0.1:{coinbase.port}/api/v3/brokerage/orders"
    headers = dict(req["headers"])
    status, raw = coinbase.direct("POST", req["url"], headers, req["body"])
    assert status == 200 and json.loads(raw)["success"] is True, raw

    if service == "coinbase_legacy":
        # The HMAC covers the body: a tampered body is refused (a bare 401).
        status, raw = coinbase.direct(
            "POST", req["url"], headers, req["body"].replace("0.001", "9")
        )
        assert (status, raw) == (401, b"Unauthorized\n")
        assert coinbase.log()[-1]["verdict"] == "bad_signature"
    else:
        # A JWT binds method, host and path, not the body: replaying it on another path fails.
        other = req["url"].replace("/orders", "/orders/batch_cancel")
        status, raw = coinbase.direct("POST", other, headers, '{"order_ids":[]}')
        assert (status, raw) == (401, b"Unauthorized\n")
        assert coinbase.log()[-1]["verdict"] == "uri_mismatch"
        head, claims, sig = headers["Authorization"].removeprefix("Bearer ").split(".")
        forged = {**headers, "Authorization": f"Bearer {head}.{claims}.{sig[:-4]}AAAA"}
        status, raw = coinbase.direct("POST", req["url"], forged, req["body"])
        assert (status, raw) == (401, b"Unauthorized\n")
        assert coinbase.log()[-1]["verdict"] == "bad_signature"
    # Coinbase cannot tell a bad signature from a bad key: documented choice, KEY_REJECTED.
    assert VENUES["coinbase"].classify(status, raw) is Rejection.KEY_REJECTED

    stale = _sign_cli(proc.argv[-1], *args, "--timestamp", str(int(time.time() * 1000) - 180_000))
    status, raw = coinbase.direct("POST", stale["url"], dict(stale["headers"]), stale["body"])
    assert status == 401
    assert coinbase.log()[-1]["verdict"] == "expired"
    expected = Rejection.CLOCK_OR_NONCE if service == "coinbase_legacy" else Rejection.KEY_REJECTED
    assert VENUES["coinbase"].classify(status, raw) is expected


@pytest.mark.parametrize("clock_sync", [False, True])
def test_venue_clock_ahead_expires_the_jwt_unless_clock_sync(
    sidecars: Sidecars, tmp_path: Path, clock_sync: bool
) -> None:
    """A venue 150 s ahead sees every JWT (exp = nbf + 120) as expired: a bare 401 without
    clock sync; with it the offset is measured off ``/api/v3/brokerage/time``."""
    ahead = CoinbaseSim(tmp_path, "--clock-offset-ms", "150000")
    try:
        port = start(sidecars, ahead, "coinbase_es256", clock_sync=clock_sync)
        status, raw = through(
            port, "POST", "/coinbase-es256/api/v3/brokerage/orders", order(f"clock-{clock_sync}")
        )
        if clock_sync:
            assert status == 200 and json.loads(raw)["success"] is True, raw
        else:
            assert (status, raw) == (401, b"Unauthorized\n")
            assert ahead.log()[-1]["verdict"] == "expired"
            assert VENUES["coinbase"].classify(status, raw) is Rejection.KEY_REJECTED
    finally:
        assert ahead.proc.stop() == 0
