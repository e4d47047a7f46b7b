"""The real sidecar signs, the real simulator verifies over TLS, as Binance would."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Sidecars, Venue

pytestmark = pytest.mark.e2e

ORDER = "/api/v3/order?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000"


async def _post(port: int, route: str, path: str = ORDER, **kw: Any) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{route}{path}", **kw) as resp,
    ):
        body = await resp.read()
        return resp.status, resp.headers, json.loads(body) if body else None


@pytest.mark.parametrize("route", ["/hmac", "/ed25519", "/rsa"])
async def test_orders_signed_with_each_key_type_are_accepted(
    sidecars: Sidecars, route: str
) -> None:
    sc = sidecars.start()
    port = sc.ready["listen"]["port"]
    for n in range(3):
        status, _, body = await _post(port, route, ORDER + f"&newClientOrderId=e2e-{route[1:]}-{n}")
        assert status == 200, body
        assert body["clientOrderId"] == f"e2e-{route[1:]}-{n}"
        assert body["status"] == "NEW"


async def test_key_unknown_to_the_venue_is_rejected_with_2015(sidecars: Sidecars) -> None:
    sc = sidecars.start()
    status, headers, body = await _post(sc.ready["listen"]["port"], "/unregistered")
    assert status == 401
    assert body == {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}
    assert "X-Authproxy-Error" not in headers  # the venue's own answer, passed through


async def test_form_body_is_signed_and_accepted(sidecars: Sidecars) -> None:
    sc = sidecars.start()
    status, _, body = await _post(
        sc.ready["listen"]["port"],
        "/hmac",
        "/api/v3/order?symbol=BTCUSDT&side=SELL",
        data="type=LIMIT&timeInForce=GTC&quantity=0.5&price=31000",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200, body
    assert body["side"] == "SELL"


def _sign_cli(config: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "sign", "--config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _send_to_venue(venue: Venue, req: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        req["url"],
        data=req["body"].encode() or None,
        method=req["method"],
        headers={k: v for k, v in req["headers"] if k.lower() != "host"},
    )
    try:
        with urllib.request.urlopen(request, context=venue.ssl_context(), timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_sign_dry_run_tampered_body_and_stale_timestamp(sidecars: Sidecars, venue: Venue) -> None:
    sc = sidecars.start()
    config = sc.argv[-1]
    args = [
        "--service",
        "binance_hmac",
        "--method",
        "POST",
        "--url",
        "/api/v3/order?symbol=BTCUSDT&side=BUY",
        "--body",
        "type=LIMIT&timeInForce=GTC&quantity=1&price=100",
    ]
    req = _sign_cli(config, *args)
    assert req["url"].startswith(f"https://127.0.0.1:{venue.port}/api/v3/order?symbol=BTCUSDT")
    assert "signature=" in req["body"]
    status, body = _send_to_venue(venue, req)
    assert status == 200, body

    tampered = dict(req, body=req["body"].replace("quantity=1", "quantity=9"))
    status, body = _send_to_venue(venue, tampered)
    assert (status, body["code"]) == (400, -1022)

    stale = _sign_cli(config, *args, "--timestamp", str(int(time.time() * 1000) - 60_000))
    status, body = _send_to_venue(venue, stale)
    assert (status, body["code"]) == (400, -1021)


@pytest.mark.parametrize("clock_sync", [False, True])
def test_venue_clock_ahead_is_corrected_by_clock_sync(
    sidecars: Sidecars, venue: Venue, tmp_path: Any, clock_sync: bool
) -> None:
    """A venue whose clock runs 30 s ahead: without clock sync the sidecar's timestamps
    are stale (-1021); with it (the default) the sidecar measures the offset off the
    venue's time endpoint and the order is accepted."""
    from proxy.demo import binance_service
    from proxy.procs import Proc, simulator_argv

    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"binance": [v for _, v in venue.keys.values() if v]}))
    ahead = Proc(
        simulator_argv(keys_file, tmp_path / "ahead", "--clock-offset-ms", "30000"),
        stderr_path=tmp_path / "ahead.log",
    )
    try:
        svc = binance_service(ahead.ready["port"], ahead.ready["ca_file"], "/hmac")
        svc["clock_sync"] = clock_sync
        sc = sidecars.start({"binance_hmac": svc})
        req = urllib.request.Request(
            f"http://127.0.0.1:{sc.ready['listen']['port']}/hmac{ORDER}", method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, body = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            status, body = err.code, json.loads(err.read())
        if clock_sync:
            assert status == 200, body
            events = [json.loads(line) for line in sc.stderr_tail(100_000).splitlines()]
            offsets = [e["offset_ms"] for e in events if e.get("event") == "clock_offset"]
            assert offsets and abs(offsets[0] - 30000) < 1000
        else:
            assert (status, body["code"]) == (400, -1021)
    finally:
        assert ahead.stop() == 0


def test_https_only_to_verified_venue(venue: Venue) -> None:
    """The simulator's certificate does not verify without its CA: verification is real."""
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen(f"https://127.0.0.1:{venue.port}/api/v3/ping", timeout=5)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)


async def test_key_rejected_falls_back_to_the_other_key_of_the_overlap(
    sidecars: Sidecars, venue: Venue
) -> None:
    """The newest key is not (yet) accepted by the venue: the sidecar re-signs the same
    order with the previous key, once, and the order goes through."""
    from datetime import UTC, datetime, timedelta

    from keycache.record import make_record
    from proxy.demo import PERMISSIONS, binance_service, random_key_id

    known, _ = venue.keys["binance_hmac"]
    now = datetime.now(UTC).replace(microsecond=0)
    newer = make_record(
        random_key_id(),
        "not-registered-at-the-venue",
        created_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(days=30),
        permissions=PERMISSIONS,
    )
    sc = sidecars.start(
        {"binance_hmac": binance_service(venue.port, venue.ca_file, "/hmac")},
        records={"binance_hmac": [known, newer]},
    )
    status, _, body = await _post(
        sc.ready["listen"]["port"], "/hmac", ORDER + "&newClientOrderId=fallback-1"
    )
    assert status == 200, body
    assert body["clientOrderId"] == "fallback-1"
    events = [json.loads(line) for line in sc.stderr_tail(100_000).splitlines()]
    (fallback,) = [e for e in events if e.get("event") == "key_fallback"]
    assert fallback["refused_key_id"] == newer["key_id"]
    assert fallback["retried_key_id"] == known["key_id"]

    # The venue saw exactly two attempts: the refused key, then the other one.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{venue.port}/__sim/log", ssl=venue.ssl_context()) as resp,
    ):
        log = (await resp.json())["entries"]
    tried = [e["api_key"] for e in log if "newClientOrderId=fallback-1" in e["query"]]
    assert tried == [newer["key_id"], known["key_id"]]


def _status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith(field))


def test_lock_all_locks_the_whole_process(sidecars: Sidecars, venue: Venue) -> None:
    """memory.lock_all: every page of the process is locked, seen from outside."""
    from proxy.demo import binance_service

    service = {"binance_hmac": binance_service(venue.port, venue.ca_file, "/hmac")}
    plain = sidecars.start(service, name="plain")
    locked = sidecars.start(service, name="all", memory={"lock_all": True})
    rss = _status_kb(locked.pid, "VmRSS:")
    assert _status_kb(locked.pid, "VmLck:") >= rss * 0.9  # (nearly) all resident is locked
    # Without it only the key buffers are locked.
    assert _status_kb(plain.pid, "VmLck:") < _status_kb(locked.pid, "VmLck:") / 4
