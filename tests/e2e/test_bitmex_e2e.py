"""The real sidecar signs for BitMEX; the BitMEX simulator verifies over TLS, as BitMEX."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.signers import VENUES, Rejection
from tests.e2e.conftest import Sidecars
from tests.e2e.venue_support import Simulator, engine, key_record, sign_cli

pytestmark = pytest.mark.e2e

BITMEX = VENUES["bitmex"]
KEY_ID = "bmx" + secrets.token_hex(10)
SECRET = secrets.token_urlsafe(36)
KEYS = {"bitmex": [{"api_key": KEY_ID, "algorithm": "hmac-sha256", "secret": SECRET}]}
JSON = {"Content-Type": "application/json"}
ORDER = b'{"symbol":"XBTUSD","side":"Buy","orderQty":100,"price":30000,"ordType":"Limit"}'


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path_factory.mktemp("bitmex"), KEYS)
    try:
        yield simulator
    finally:
        simulator.stop()


def start(sidecars: Sidecars, sim: Simulator) -> tuple[int, str]:
    proc = sidecars.start(
        {"bitmex_trading": sim.service("bitmex", "/bitmex")},
        records={"bitmex_trading": key_record(KEY_ID, SECRET, "hmac-sha256")},
    )
    return int(proc.ready["listen"]["port"]), proc.argv[-1]


async def test_orders_accepted_then_revoked_key_is_invalid_key(
    sidecars: Sidecars, sim: Simulator
) -> None:
    port, _ = start(sidecars, sim)
    status, headers, raw = await engine(port, "POST", "/bitmex/api/v1/order", ORDER, JSON)
    order = json.loads(raw)
    assert status == 200, order
    assert order["ordStatus"] == "New" and order["orderQty"] == 100
    assert int(headers["x-ratelimit-remaining"]) < int(headers["x-ratelimit-limit"])
    assert BITMEX.classify(status, raw) is None

    query = "/bitmex/api/v1/order?filter=%7B%22open%22%3A+true%7D&symbol=XBTUSD"
    status, _, raw = await engine(port, "GET", query)
    assert order["orderID"] in [o["orderID"] for o in json.loads(raw)]
    body = json.dumps({"orderID": order["orderID"]}).encode()
    status, _, raw = await engine(port, "DELETE", "/bitmex/api/v1/order", body, JSON)
    assert status == 200 and json.loads(raw)[0]["ordStatus"] == "Canceled"

    sim.revoke(KEY_ID)
    try:
        status, headers, raw = await engine(port, "POST", "/bitmex/api/v1/order", ORDER, JSON)
        assert (status, json.loads(raw)["error"]["message"]) == (401, "Invalid API Key.")
        assert "X-Authproxy-Error" not in headers
        assert BITMEX.classify(status, raw) is Rejection.KEY_REJECTED
    finally:
        sim.restore_keys()


async def test_sign_cli_tampered_body_and_stale_timestamp(
    sidecars: Sidecars, sim: Simulator
) -> None:
    _, config = start(sidecars, sim)
    args = ["--service", "bitmex_trading", "--method", "POST", "--url", "/api/v1/order"]
    args += ["--body", ORDER.decode(), "--header", "Content-Type:application/json"]
    signed = sign_cli(config, *args)
    assert signed["url"] == f"{sim.base}/api/v1/order" and signed["body"] == ORDER.decode()
    status, raw = sim.replay(signed)
    assert status == 200, raw

    tampered = sim.replay(signed, body=signed["body"].replace("100", "900"))
    assert (tampered[0], json.loads(tampered[1])["error"]["message"]) == (
        401,
        "Signature not valid.",
    )
    assert BITMEX.classify(*tampered) is Rejection.BAD_SIGNATURE

    old = sign_cli(config, *args, "--timestamp", str(int(time.time() * 1000) - 60_000))
    stale = sim.replay(old)
    assert stale[0] == 400
    assert json.loads(stale[1])["error"]["message"].startswith(
        "This request has expired - `expires` is in the past. Current time: "
    )
    assert BITMEX.classify(*stale) is Rejection.CLOCK_OR_NONCE


async def test_venue_clock_ahead_expires_the_sidecars_requests(
    sidecars: Sidecars, tmp_path: Path
) -> None:
    """BitMEX documents no time endpoint, so the sidecar cannot correct for a venue clock
    a minute ahead: its api-expires is already past when the request arrives."""
    ahead = Simulator(tmp_path / "ahead", KEYS, "--clock-offset-ms", "60000")
    try:
        port, _ = start(sidecars, ahead)
        status, _, raw = await engine(port, "POST", "/bitmex/api/v1/order", ORDER, JSON)
        assert status == 400
        assert json.loads(raw)["error"]["message"].startswith("This request has expired")
        assert BITMEX.classify(status, raw) is Rejection.CLOCK_OR_NONCE
    finally:
        ahead.stop()
