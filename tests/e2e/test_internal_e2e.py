"""HFT-AUTH-V1 end to end: the real sidecar signs, the simulated internal service verifies.

Every refusal is checked twice: as the service sends it (docs/internal-auth.md) and as
``VENUES["internal"].classify`` reads it, since that decides the sidecar's key fallback.
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keycache.record import make_record, new_key_id
from proxy.demo import PERMISSIONS
from proxy.procs import Proc, simulator_argv
from proxy.signers import VENUES, Rejection
from tests.e2e.conftest import Sidecars

pytestmark = pytest.mark.e2e

CLASSIFY = VENUES["internal"].classify


@dataclass
class Caller:
    """One internal caller key: the record the sidecar holds, the entry the service holds."""

    record: dict[str, object]
    entry: dict[str, str]

    @property
    def key_id(self) -> str:
        return str(self.record["key_id"])


def make_caller(age: timedelta = timedelta(days=1)) -> Caller:
    now = datetime.now(UTC).replace(microsecond=0)
    key_id, secret = new_key_id(), secrets.token_urlsafe(32)
    record = make_record(
        key_id,
        secret,
        created_at=now - age,
        expires_at=now + timedelta(days=30),
        permissions=PERMISSIONS,
    )
    return Caller(record, {"api_key": key_id, "algorithm": "hmac-sha256", "secret": secret})


@dataclass
class Service:
    proc: Proc
    callers: dict[str, Caller]

    @property
    def port(self) -> int:
        return int(self.proc.ready["port"])

    @property
    def ca_file(self) -> str:
        return str(self.proc.ready["ca_file"])

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def config(self, route: str) -> dict[str, Any]:
        return {
            "venue": "internal",
            "key_type": "internal_service",
            "upstream": f"https://127.0.0.1:{self.port}",
            "route": route,
            "ca_file": self.ca_file,
            "timeout_ms": 2000,
        }


def start_service(run_dir: Path, callers: dict[str, Caller], *extra: str) -> Service:
    keys_file = run_dir / "internal-keys.json"
    keys_file.write_text(json.dumps({"internal": [c.entry for c in callers.values()]}))
    proc = Proc(
        simulator_argv(keys_file, run_dir / "state", *extra), stderr_path=run_dir / "sim.log"
    )
    return Service(proc, callers)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    callers = {name: make_caller() for name in ("risk", "revoked", "stale")}
    svc = start_service(tmp_path_factory.mktemp("internal"), callers)
    try:
        yield svc
    finally:
        assert svc.proc.stop() == 0, svc.proc.stderr_tail()


def http(
    method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, **kw) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def classify(status: int, body: Any) -> Rejection | None:
    return CLASSIFY(status, json.dumps(body).encode())


def start_sidecar(sidecars: Sidecars, service: Service, name: str, **kw: Any) -> Proc:
    return sidecars.start(
        {name: service.config("/" + name)},
        records={name: service.callers[name].record},
        **kw,
    )


def test_signed_calls_are_accepted(sidecars: Sidecars, service: Service) -> None:
    sc = start_sidecar(sidecars, service, "risk")
    base = f"http://127.0.0.1:{sc.ready['listen']['port']}/risk"
    body = json.dumps({"symbol": "BTCUSDT", "qty": "0.5", "note": "café"}, ensure_ascii=False)
    for n in range(3):
        status, echoed = http(
            "POST",
            f"{base}/internal/v1/echo?account=main&n={n}",
            body.encode(),
            {"Content-Type": "application/json", "X-Auth-Signature": "engine-must-not-set-this"},
        )
        assert status == 200, echoed
        assert echoed["key_id"] == service.callers["risk"].key_id
        assert echoed["query"] == f"account=main&n={n}"
        assert echoed["body"] == {"symbol": "BTCUSDT", "qty": "0.5", "note": "café"}
    status, positions = http("GET", f"{base}/internal/v1/positions")
    assert status == 200, positions
    assert positions["positions"]


def test_revoked_key_is_refused_and_classified(sidecars: Sidecars, service: Service) -> None:
    caller = service.callers["revoked"]
    sc = start_sidecar(sidecars, service, "revoked")
    url = f"http://127.0.0.1:{sc.ready['listen']['port']}/revoked/internal/v1/positions"
    assert http("GET", url)[0] == 200
    status, _ = http(
        "DELETE",
        f"https://127.0.0.1:{service.port}/__sim/keys/{caller.key_id}",
        context=service.ssl_context(),
    )
    assert status == 200
    status, body = http("GET", url)
    assert (status, body["error"]["code"]) == (401, "revoked_key")
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


def send_signed(service: Service, req: dict[str, Any]) -> tuple[int, Any]:
    return http(
        req["method"],
        req["url"],
        req["body"].encode(),
        {k: v for k, v in req["headers"] if k.lower() != "host"},
        context=service.ssl_context(),
    )


def test_sign_dry_run_replay_and_tampered_body(sidecars: Sidecars, service: Service) -> None:
    sc = start_sidecar(sidecars, service, "risk")
    args = [
        "--service",
        "risk",
        "--method",
        "POST",
        "--url",
        "/internal/v1/echo?account=main",
        "--body",
        '{"qty":"1"}',
        "--header",
        "Content-Type: application/json",
    ]
    req = sign_cli(sc.argv[-1], *args)
    names = {k for k, _ in req["headers"]}
    assert {
        "X-Auth-Key-Id",
        "X-Auth-Timestamp",
        "X-Auth-Nonce",
        "X-Auth-Content-SHA256",
        "X-Auth-Signature",
    } <= names
    assert req["url"] == f"https://127.0.0.1:{service.port}/internal/v1/echo?account=main"
    status, body = send_signed(service, req)
    assert status == 200, body
    assert classify(status, body) is None

    status, body = send_signed(service, req)  # the same bytes again
    assert (status, body["error"]["code"]) == (401, "replayed_nonce")
    assert classify(status, body) is Rejection.CLOCK_OR_NONCE

    fresh = sign_cli(sc.argv[-1], *args)
    tampered = dict(fresh, body='{"qty":"9"}')
    status, body = send_signed(service, tampered)
    assert (status, body["error"]["code"]) == (401, "bad_signature")
    assert classify(status, body) is Rejection.BAD_SIGNATURE

    # The body hash header rewritten to match the tampered body: the signature still fails.
    import hashlib

    rehashed = dict(
        tampered,
        headers=[
            [k, hashlib.sha256(b'{"qty":"9"}').hexdigest() if k == "X-Auth-Content-SHA256" else v]
            for k, v in fresh["headers"]
        ],
    )
    status, body = send_signed(service, rehashed)
    assert (status, body["error"]["code"]) == (401, "bad_signature")


def test_service_clock_ahead_gives_stale_timestamp(
    sidecars: Sidecars, service: Service, tmp_path: Path
) -> None:
    """No time endpoint: a service whose clock is 60 s ahead refuses the sidecar's stamps."""
    ahead = start_service(
        tmp_path, {"stale": service.callers["stale"]}, "--clock-offset-ms", "60000"
    )
    try:
        sc = start_sidecar(sidecars, ahead, "stale")
        status, body = http(
            "GET", f"http://127.0.0.1:{sc.ready['listen']['port']}/stale/internal/v1/positions"
        )
        assert (status, body["error"]["code"]) == (401, "stale_timestamp")
        assert classify(status, body) is Rejection.CLOCK_OR_NONCE
    finally:
        assert ahead.proc.stop() == 0


def test_rotation_overlap_falls_back_to_the_key_the_service_knows(
    sidecars: Sidecars, service: Service
) -> None:
    """The next key is not registered at the service yet: ``unknown_key`` is definitive,
    so the sidecar re-signs once with the current key (fresh timestamp and nonce)."""
    known = service.callers["risk"]
    newer = make_caller(age=timedelta(minutes=1))  # inside the overlap window
    sc = sidecars.start(
        {"risk": service.config("/risk")}, records={"risk": [known.record, newer.record]}
    )
    status, body = http(
        "POST",
        f"http://127.0.0.1:{sc.ready['listen']['port']}/risk/internal/v1/echo?rotation=1",
        b'{"order":"fallback-1"}',
        {"Content-Type": "application/json"},
    )
    assert status == 200, body
    assert body["key_id"] == known.key_id
    status, log = http(
        "GET", f"https://127.0.0.1:{service.port}/__sim/log", context=service.ssl_context()
    )
    tried = [(e["api_key"], e["verdict"]) for e in log["entries"] if e["query"] == "rotation=1"]
    assert tried == [(newer.key_id, "unknown_key"), (known.key_id, "ok")]
