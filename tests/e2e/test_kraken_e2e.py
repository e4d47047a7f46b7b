"""The real sidecar signs for Kraken; the Kraken simulator verifies over TLS, as Kraken.

Kraken has no timestamp window: what goes stale is the nonce (a request signed with an
older nonce than one already accepted), so that is the "stale" case here.
"""

from __future__ import annotations

import base64
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

KRAKEN = VENUES["kraken"]
KEY_ID = "kraken-e2e-" + secrets.token_hex(8)
SECRET = base64.b64encode(secrets.token_bytes(64)).decode()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ORDER = b"ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    keys = {"kraken": [{"api_key": KEY_ID, "algorithm": "hmac-sha512", "secret": SECRET}]}
    simulator = Simulator(tmp_path_factory.mktemp("kraken"), keys)
    try:
        yield simulator
    finally:
        simulator.stop()


def start(sidecars: Sidecars, sim: Simulator) -> tuple[int, str]:
    proc = sidecars.start(
        {"kraken_spot": sim.service("kraken", "/kraken")},
        records={"kraken_spot": key_record(KEY_ID, SECRET, "hmac-sha512")},
    )
    return int(proc.ready["listen"]["port"]), proc.argv[-1]


async def test_orders_accepted_then_revoked_key_is_invalid_key(
    sidecars: Sidecars, sim: Simulator
) -> None:
    port, _ = start(sidecars, sim)
    status, _, raw = await engine(port, "POST", "/kraken/0/private/AddOrder", ORDER, FORM)
    body = json.loads(raw)
    assert (status, body["error"]) == (200, []), body
    assert body["result"]["descr"]["order"] == "buy 1.25000000 XBTUSD @ limit 37500"
    assert KRAKEN.classify(status, raw) is None
    (txid,) = body["result"]["txid"]

    # A private call with no parameters at all: the body is the signer's nonce alone.
    status, _, raw = await engine(port, "POST", "/kraken/0/private/OpenOrders")
    assert txid in json.loads(raw)["result"]["open"]
    status, _, raw = await engine(
        port, "POST", "/kraken/0/private/CancelOrder", f"txid={txid}".encode(), FORM
    )
    assert json.loads(raw) == {"error": [], "result": {"count": 1}}

    sim.revoke(KEY_ID)
    try:
        status, headers, raw = await engine(port, "POST", "/kraken/0/private/Balance")
        assert (status, json.loads(raw)) == (200, {"error": ["EAPI:Invalid key"]})
        assert "X-Authproxy-Error" not in headers  # the venue's answer, passed through
        assert KRAKEN.classify(status, raw) is Rejection.KEY_REJECTED
    finally:
        sim.restore_keys()


async def test_sign_cli_tampered_body_and_stale_nonce(sidecars: Sidecars, sim: Simulator) -> None:
    port, config = start(sidecars, sim)
    args = ["--service", "kraken_spot", "--method", "POST", "--url", "/0/private/AddOrder"]
    args += ["--body", ORDER.decode(), "--header", "Content-Type:application/x-www-form-urlencoded"]
    signed = sign_cli(config, *args)
    assert signed["url"] == f"{sim.base}/0/private/AddOrder"
    assert signed["body"].startswith("nonce=") and signed["body"].endswith(ORDER.decode())

    status, raw = sim.replay(signed)
    assert (status, json.loads(raw)["error"]) == (200, [])

    tampered = sim.replay(signed, body=signed["body"].replace("volume=1.25", "volume=9"))
    assert json.loads(tampered[1]) == {"error": ["EAPI:Invalid signature"]}
    assert KRAKEN.classify(*tampered) is Rejection.BAD_SIGNATURE

    # The sidecar's next nonce is above the one just accepted ...
    status, _, raw = await engine(port, "POST", "/kraken/0/private/Balance")
    assert json.loads(raw)["error"] == []
    # ... and a request signed a minute ago carries an older one.
    old = sign_cli(config, *args, "--timestamp", str(int(time.time() * 1000) - 60_000))
    stale = sim.replay(old)
    assert json.loads(stale[1]) == {"error": ["EAPI:Invalid nonce"]}
    assert KRAKEN.classify(*stale) is Rejection.CLOCK_OR_NONCE


async def test_clock_offset_does_not_matter_to_kraken(sidecars: Sidecars, tmp_path: Path) -> None:
    """A venue clock 2 minutes ahead: Kraken checks nonce order, not time, so the sidecar's
    orders are still accepted."""
    keys = {"kraken": [{"api_key": KEY_ID, "algorithm": "hmac-sha512", "secret": SECRET}]}
    ahead = Simulator(tmp_path / "ahead", keys, "--clock-offset-ms", "120000")
    try:
        port, _ = start(sidecars, ahead)
        status, _, raw = await engine(port, "POST", "/kraken/0/private/AddOrder", ORDER, FORM)
        assert (status, json.loads(raw)["error"]) == (200, [])
    finally:
        ahead.stop()


@pytest.mark.parametrize("persist", [True, False])
async def test_nonce_high_water_mark_survives_a_restart(
    sidecars: Sidecars, tmp_path: Path, persist: bool
) -> None:
    """A previous run issued nonces up to its reservation, then died. A sidecar restarted
    with the same state_dir starts above it (accepted); one without state_dir restarts
    from the clock, below what Kraken already saw (refused as an invalid nonce)."""
    import hashlib
    import hmac
    import ssl
    import urllib.request

    import yaml

    from proxy.signers.nonce import state_file

    key_id = "kraken-restart-" + secrets.token_hex(6)
    secret = base64.b64encode(secrets.token_bytes(64)).decode()
    sim = Simulator(
        tmp_path / "sim",
        {"kraken": [{"api_key": key_id, "algorithm": "hmac-sha512", "secret": secret}]},
    )
    state = tmp_path / "state"
    try:
        records = {"kraken_spot": key_record(key_id, secret, "hmac-sha512")}
        first = sidecars.start(
            {"kraken_spot": sim.service("kraken", "/kraken")}, records=records, name="first"
        )
        cfg_path = Path(first.argv[-1])
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["state_dir"] = str(state)
        cfg_path.write_text(yaml.safe_dump(cfg))
        first.stop()
        sidecars.started.remove(first)
        from proxy.procs import Proc, sidecar_argv

        run1 = Proc(sidecar_argv(cfg_path), stderr_path=tmp_path / "run1.log")
        status, _, raw = await engine(
            int(run1.ready["listen"]["port"]), "POST", "/kraken/0/private/Balance", b"", FORM
        )
        assert status == 200 and json.loads(raw)["error"] == [], raw
        assert run1.stop() == 0
        mark = int(state_file(state, "kraken", key_id).read_text().split()[0])
        assert mark > time.time() * 1000 + 30_000  # a block reserved ahead of the clock

        # Run 1 "issued" nonces up to its reservation before dying: Kraken saw mark - 1.
        nonce = mark - 1
        post = f"nonce={nonce}".encode()
        path = b"/0/private/Balance"
        sig = base64.b64encode(
            hmac.new(
                base64.b64decode(secret),
                path + hashlib.sha256(str(nonce).encode() + post).digest(),
                hashlib.sha512,
            ).digest()
        )
        req = urllib.request.Request(
            f"https://127.0.0.1:{sim.port}/0/private/Balance",
            data=post,
            headers={"API-Key": key_id, "API-Sign": sig.decode(), **FORM},
        )
        ctx = ssl.create_default_context(cafile=sim.ca_file)
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            assert json.loads(resp.read())["error"] == []

        if not persist:
            cfg.pop("state_dir")
            cfg_path.write_text(yaml.safe_dump(cfg))
        run2 = Proc(sidecar_argv(cfg_path), stderr_path=tmp_path / "run2.log")
        try:
            status, _, raw = await engine(
                int(run2.ready["listen"]["port"]), "POST", "/kraken/0/private/Balance", b"", FORM
            )
        finally:
            assert run2.stop() == 0
        errors = json.loads(raw)["error"]
        if persist:
            assert errors == [], raw
        else:
            assert errors == ["EAPI:Invalid nonce"]
            assert KRAKEN.classify(status, raw) is Rejection.CLOCK_OR_NONCE
    finally:
        sim.stop()
