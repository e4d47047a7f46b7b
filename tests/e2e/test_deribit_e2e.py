"""The real sidecar signs for Deribit; the Deribit simulator verifies over TLS, as Deribit."""

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

DERIBIT = VENUES["deribit"]
CLIENT_ID = "drb" + secrets.token_hex(6)
SECRET = secrets.token_urlsafe(32)
KEYS = {"deribit": [{"api_key": CLIENT_ID, "algorithm": "hmac-sha256", "secret": SECRET}]}
BUY = "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=30000&label=e2e"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path_factory.mktemp("deribit"), KEYS)
    try:
        yield simulator
    finally:
        simulator.stop()


def start(sidecars: Sidecars, sim: Simulator, **extra: object) -> tuple[int, str]:
    proc = sidecars.start(
        {"deribit_trading": sim.service("deribit", "/deribit", **extra)},
        records={"deribit_trading": key_record(CLIENT_ID, SECRET, "hmac-sha256")},
    )
    return int(proc.ready["listen"]["port"]), proc.argv[-1]


async def test_orders_accepted_then_revoked_key_is_invalid_credentials(
    sidecars: Sidecars, sim: Simulator
) -> None:
    port, _ = start(sidecars, sim)
    status, _, raw = await engine(port, "GET", "/deribit" + BUY)
    body = json.loads(raw)
    assert status == 200, body
    order = body["result"]["order"]
    assert order["order_state"] == "open" and order["label"] == "e2e"
    assert DERIBIT.classify(status, raw) is None

    rpc = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "private/sell",
        "params": {
            "instrument_name": "BTC-PERPETUAL",
            "amount": 5,
            "type": "limit",
            "price": 31000,
        },
    }
    status, _, raw = await engine(
        port,
        "POST",
        "/deribit/api/v2/private/sell",
        json.dumps(rpc).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and json.loads(raw)["id"] == 9, raw
    status, _, raw = await engine(
        port, "GET", f"/deribit/api/v2/private/cancel?order_id={order['order_id']}"
    )
    assert json.loads(raw)["result"]["order_state"] == "cancelled"

    sim.revoke(CLIENT_ID)
    try:
        status, headers, raw = await engine(port, "GET", "/deribit" + BUY)
        assert (status, json.loads(raw)["error"]) == (
            400,
            {"message": "invalid_credentials", "code": 13004},
        )
        assert "X-Authproxy-Error" not in headers
        assert DERIBIT.classify(status, raw) is Rejection.KEY_REJECTED
    finally:
        sim.restore_keys()


async def test_sign_cli_tampered_query_and_stale_timestamp(
    sidecars: Sidecars, sim: Simulator
) -> None:
    _, config = start(sidecars, sim)
    args = ["--service", "deribit_trading", "--method", "GET", "--url", BUY]
    signed = sign_cli(config, *args)
    assert signed["url"] == sim.base + BUY
    status, raw = sim.replay(signed)
    assert status == 200, raw

    tampered = sim.replay(signed, url=signed["url"].replace("amount=10", "amount=90"))
    assert tampered[0] == 400
    assert json.loads(tampered[1])["error"]["code"] == 13009
    assert DERIBIT.classify(*tampered) is Rejection.BAD_SIGNATURE

    old = sign_cli(config, *args, "--timestamp", str(int(time.time() * 1000) - 120_000))
    stale = sim.replay(old)
    assert json.loads(stale[1])["error"] == {
        "message": "unauthorized",
        "code": 13009,
        "data": {"reason": "timestamp_expired"},
    }
    assert DERIBIT.classify(*stale) is Rejection.CLOCK_OR_NONCE


async def test_venue_clock_ahead(sidecars: Sidecars, tmp_path: Path) -> None:
    """A venue clock two minutes ahead: with clock sync off the sidecar's timestamps are
    stale; with it on (the default) the offset read from public/get_time corrects them."""
    ahead = Simulator(tmp_path / "ahead", KEYS, "--clock-offset-ms", "120000")
    try:
        proc = sidecars.start(
            {
                "deribit_nosync": ahead.service("deribit", "/nosync", clock_sync=False),
                "deribit_synced": ahead.service("deribit", "/synced"),
            },
            records={
                s: key_record(CLIENT_ID, SECRET, "hmac-sha256")
                for s in ("deribit_nosync", "deribit_synced")
            },
        )
        port = int(proc.ready["listen"]["port"])
        status, _, raw = await engine(port, "GET", "/nosync" + BUY)
        assert json.loads(raw)["error"]["data"] == {"reason": "timestamp_expired"}
        assert DERIBIT.classify(status, raw) is Rejection.CLOCK_OR_NONCE
        status, _, raw = await engine(port, "GET", "/synced" + BUY)
        assert status == 200, raw
    finally:
        ahead.stop()
