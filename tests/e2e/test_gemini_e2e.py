"""The real sidecar signs for Gemini; the Gemini simulator verifies over TLS, as Gemini.

The engine sends its order as a JSON body; what reaches the venue is an empty body and
the payload headers. Gemini has no timestamp window for these keys: what goes stale is the
nonce, so that is the "stale" case here.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator

import pytest

from proxy.signers import VENUES, Rejection
from tests.e2e.conftest import Sidecars
from tests.e2e.venue_support import Simulator, engine, header_of, key_record, sign_cli

pytestmark = pytest.mark.e2e

GEMINI = VENUES["gemini"]
KEY_ID = "account-e2e" + secrets.token_hex(8)
SECRET = secrets.token_urlsafe(30)
KEYS = {"gemini": [{"api_key": KEY_ID, "algorithm": "hmac-sha384", "secret": SECRET}]}
ORDER = {
    "symbol": "btcusd",
    "amount": "0.5",
    "price": "30000.00",
    "side": "buy",
    "type": "exchange limit",
    "client_order_id": "e2e-1",
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path_factory.mktemp("gemini"), KEYS)
    try:
        yield simulator
    finally:
        simulator.stop()


def start(sidecars: Sidecars, sim: Simulator) -> tuple[int, str]:
    proc = sidecars.start(
        {"gemini_trading": sim.service("gemini", "/gemini")},
        records={"gemini_trading": key_record(KEY_ID, SECRET, "hmac-sha384")},
    )
    return int(proc.ready["listen"]["port"]), proc.argv[-1]


async def test_orders_accepted_then_revoked_key_is_invalid_key(
    sidecars: Sidecars, sim: Simulator
) -> None:
    port, _ = start(sidecars, sim)
    status, _, raw = await engine(port, "POST", "/gemini/v1/order/new", json.dumps(ORDER).encode())
    order = json.loads(raw)
    assert status == 200, order
    assert order["is_live"] is True and order["client_order_id"] == "e2e-1"
    assert GEMINI.classify(status, raw) is None

    status, _, raw = await engine(port, "POST", "/gemini/v1/orders")
    assert [o["order_id"] for o in json.loads(raw)] == [order["order_id"]]
    cancel = json.dumps({"order_id": int(order["order_id"])}).encode()
    status, _, raw = await engine(port, "POST", "/gemini/v1/order/cancel", cancel)
    assert status == 200 and json.loads(raw)["is_cancelled"] is True

    sim.revoke(KEY_ID)
    try:
        status, headers, raw = await engine(port, "POST", "/gemini/v1/orders")
        assert (status, json.loads(raw)["reason"]) == (400, "InvalidApiKey")
        assert "X-Authproxy-Error" not in headers
        assert GEMINI.classify(status, raw) is Rejection.KEY_REJECTED
    finally:
        sim.restore_keys()


async def test_sign_cli_tampered_payload_and_stale_nonce(
    sidecars: Sidecars, sim: Simulator
) -> None:
    port, config = start(sidecars, sim)
    args = ["--service", "gemini_trading", "--method", "POST", "--url", "/v1/order/new"]
    args += ["--body", json.dumps(ORDER | {"client_order_id": "e2e-cli"})]
    signed = sign_cli(config, *args)
    assert signed["body"] == "" and header_of(signed, "Content-Type") == "text/plain"
    payload = json.loads(base64.b64decode(header_of(signed, "X-GEMINI-PAYLOAD")))
    assert payload["request"] == "/v1/order/new" and payload["client_order_id"] == "e2e-cli"
    status, raw = sim.replay(signed)
    assert status == 200, raw

    forged = base64.b64encode(json.dumps(payload | {"amount": "50"}).encode()).decode()
    headers = [[k, forged if k == "X-GEMINI-PAYLOAD" else v] for k, v in signed["headers"]]
    tampered = sim.replay(signed, headers=headers)
    assert (tampered[0], json.loads(tampered[1])["reason"]) == (400, "InvalidSignature")
    assert GEMINI.classify(*tampered) is Rejection.BAD_SIGNATURE

    status, _, raw = await engine(port, "POST", "/gemini/v1/orders")
    assert status == 200, raw
    old = sign_cli(config, *args, "--timestamp", str(int(time.time() * 1000) - 60_000))
    stale = sim.replay(old)
    assert (stale[0], json.loads(stale[1])["reason"]) == (400, "InvalidNonce")
    assert GEMINI.classify(*stale) is Rejection.CLOCK_OR_NONCE
