"""The Kraken simulator: verification (pure and over HTTP), orders, rate limit, key control.

Requests are signed here with hashlib/hmac from Kraken's documentation, never with the
sidecar's signer nor the simulator's own helper.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.simulator import make_app
from proxy.simulator.base import KeySetError
from proxy.simulator.kraken import KrakenAccepted, KrakenVenue, parse_kraken_keys, verify_kraken
from tests.simulator.support import NOW_MS, FakeClock

Client = TestClient[web.Request, web.Application]

# Kraken's published example key and request (docs: spot-rest-auth).
DOC_SECRET = (
    "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg=="
)
DOC_BODY = b"nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"
DOC_SIGN = (
    "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
)

API_KEY = "kraken-sim-key-0001"
SECRET = base64.b64encode(b"simulator test secret, 64 bytes long .......................").decode()
OTHER_KEY = "kraken-sim-key-0002"
OTHER_SECRET = base64.b64encode(secrets.token_bytes(64)).decode()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def keys_doc() -> dict[str, list[dict[str, str]]]:
    return {
        "kraken": [
            {"api_key": API_KEY, "algorithm": "hmac-sha512", "secret": SECRET},
            {"api_key": OTHER_KEY, "algorithm": "hmac-sha512", "secret": OTHER_SECRET},
            {"api_key": "doc", "algorithm": "hmac-sha512", "secret": DOC_SECRET},
        ]
    }


KEYS = parse_kraken_keys(keys_doc()["kraken"])


def sign(path: str, body: bytes, secret: str = SECRET) -> str:
    nonce = body.split(b"&")[0].split(b"=")[1]
    message = path.encode() + hashlib.sha256(nonce + body).digest()
    return base64.b64encode(
        hmac.new(base64.b64decode(secret), message, hashlib.sha512).digest()
    ).decode()


def verify(
    body: bytes, *, api_key: str | None = API_KEY, sign_with: str = SECRET, last: int = 0, **kw: Any
) -> KrakenAccepted | str:
    path = kw.pop("path", "/0/private/AddOrder")
    return verify_kraken(
        api_key=api_key,
        api_sign=kw.pop("api_sign", sign(path, body, sign_with)),
        path=path.encode(),
        body=body,
        keys=KEYS,
        last_nonces={API_KEY: last},
    )


def test_published_example_verifies() -> None:
    result = verify_kraken(
        api_key="doc",
        api_sign=DOC_SIGN,
        path=b"/0/private/AddOrder",
        body=DOC_BODY,
        keys=KEYS,
        last_nonces={},
    )
    assert isinstance(result, KrakenAccepted)
    assert result.nonce == 1616492376594
    assert result.params["pair"] == "XBTUSD" and "nonce" not in result.params


def test_each_rejection() -> None:
    body = b"nonce=%d&pair=XBTUSD" % NOW_MS
    assert isinstance(verify(body), KrakenAccepted)
    assert verify(body, api_key=None) == "EAPI:Invalid key"
    assert verify(body, api_key="unknown") == "EAPI:Invalid key"
    assert verify(body, sign_with=OTHER_SECRET) == "EAPI:Invalid signature"
    assert verify(body, api_sign=None) == "EAPI:Invalid signature"
    assert verify(body, path="/0/private/Balance", api_sign=sign("/0/private/AddOrder", body)) == (
        "EAPI:Invalid signature"
    )
    assert verify(body, last=NOW_MS) == "EAPI:Invalid nonce"  # equal is not greater
    assert verify(body, last=NOW_MS - 1) != "EAPI:Invalid nonce"
    assert verify(b"pair=XBTUSD", api_sign="x") == "EAPI:Invalid nonce"
    assert verify(b"nonce=abc&pair=XBTUSD", api_sign="x") == "EAPI:Invalid nonce"
    assert verify(b"nonce=%d" % (1 << 64), api_sign="x") == "EAPI:Invalid nonce"


def test_key_documents_are_validated() -> None:
    with pytest.raises(KeySetError, match=r"kraken\[0\]\.algorithm"):
        parse_kraken_keys([{"api_key": "a", "algorithm": "hmac-sha256", "secret": SECRET}])
    with pytest.raises(KeySetError, match=r"kraken\[0\]\.secret"):
        parse_kraken_keys([{"api_key": "a", "algorithm": "hmac-sha512", "secret": "not b64!"}])


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    return await aiohttp_client(make_app(keys_doc(), clock=clock))  # type: ignore[no-any-return]


class Nonces:
    def __init__(self) -> None:
        self.value = NOW_MS

    def __call__(self) -> int:
        self.value += 1
        return self.value


NONCE = Nonces()


async def private(
    client: Client,
    endpoint: str,
    params: str = "",
    *,
    api_key: str = API_KEY,
    secret: str = SECRET,
    nonce: int | None = None,
) -> tuple[int, Any]:
    path = f"/0/private/{endpoint}"
    body = b"nonce=%d" % (NONCE() if nonce is None else nonce)
    if params:
        body += b"&" + params.encode()
    headers = {**FORM, "API-Key": api_key, "API-Sign": sign(path, body, secret)}
    async with client.post(path, data=body, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


LIMIT = "ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25&cl_ord_id=e2e-1"


async def test_order_lifecycle(client: Client) -> None:
    status, body = await private(client, "AddOrder", LIMIT)
    assert status == 200 and body["error"] == []
    assert body["result"]["descr"] == {"order": "buy 1.25000000 XBTUSD @ limit 37500"}
    (txid,) = body["result"]["txid"]
    assert len(txid) == 19 and txid.count("-") == 2

    _, body = await private(client, "OpenOrders")
    order = body["result"]["open"][txid]
    assert order["status"] == "open" and order["vol"] == "1.25000000"
    assert order["descr"]["pair"] == "XBTUSD" and order["cl_ord_id"] == "e2e-1"

    _, body = await private(client, "CancelOrder", f"txid={txid}")
    assert body == {"error": [], "result": {"count": 1}}
    _, body = await private(client, "CancelOrder", f"txid={txid}")
    assert body == {"error": ["EOrder:Unknown order"]}
    _, body = await private(client, "OpenOrders")
    assert body["result"]["open"] == {}
    _, body = await private(client, "Balance")
    assert "ZUSD" in body["result"]


async def test_rejections_are_http_200_with_kraken_errors(client: Client) -> None:
    status, body = await private(client, "Balance", api_key="nobody")
    assert (status, body) == (200, {"error": ["EAPI:Invalid key"]})
    status, body = await private(client, "Balance", secret=OTHER_SECRET)
    assert (status, body) == (200, {"error": ["EAPI:Invalid signature"]})
    assert (await private(client, "Balance"))[1]["error"] == []
    status, body = await private(client, "Balance", nonce=NOW_MS - 10**6)
    assert (status, body) == (200, {"error": ["EAPI:Invalid nonce"]})
    _, body = await private(client, "AddOrder", "ordertype=limit&pair=NOPE&type=buy&volume=1")
    assert body == {"error": ["EQuery:Unknown asset pair"]}
    _, body = await private(client, "AddOrder", "ordertype=limit&pair=XBTUSD&type=buy")
    assert body == {"error": ["EGeneral:Invalid arguments"]}

    log = await (await client.get("/__sim/log")).json()
    verdicts = [e["verdict"] for e in log["entries"]]
    assert verdicts[:4] == [
        "EAPI:Invalid key",
        "EAPI:Invalid signature",
        "ok",
        "EAPI:Invalid nonce",
    ]


async def test_revoked_key_is_refused_at_once(client: Client) -> None:
    assert (await private(client, "Balance"))[1]["error"] == []
    resp = await client.delete(f"/__sim/keys/{API_KEY}")
    assert resp.status == 200 and (await resp.json())["venues"] == ["kraken"]
    assert (await private(client, "Balance"))[1] == {"error": ["EAPI:Invalid key"]}


async def test_time_follows_the_simulator_clock(client: Client, clock: FakeClock) -> None:
    clock.now = 1_688_669_448_123
    body = await (await client.get("/0/public/Time")).json()
    assert body["error"] == [] and body["result"]["unixtime"] == 1_688_669_448
    assert body["result"]["rfc1123"] == "Thu, 06 Jul 2023 18:50:48 GMT"


async def test_api_counter_rate_limit(aiohttp_client: Any, clock: FakeClock) -> None:
    venue = KrakenVenue(clock=clock, keys=KEYS, counter_max=3, counter_decay_per_s=1)
    app = web.Application()
    app.router.add_routes(venue.routes())
    client: Client = await aiohttp_client(app)
    results = [(await private(client, "Balance"))[1]["error"] for _ in range(4)]
    assert results == [[], [], [], ["EAPI:Rate limit exceeded"]]
    # Trading calls have their own counter and do not spend this one.
    assert (await private(client, "AddOrder", LIMIT))[1]["error"] == []
    clock.now += 1000  # one second decays one unit
    assert (await private(client, "Balance"))[1]["error"] == []


@settings(max_examples=200, deadline=None)
@given(
    api_key=st.none() | st.sampled_from([API_KEY, "x"]),
    api_sign=st.none() | st.text(max_size=100),
    path=st.binary(max_size=30),
    body=st.binary(max_size=80),
)
def test_verifier_never_raises_on_junk(
    api_key: str | None, api_sign: str | None, path: bytes, body: bytes
) -> None:
    result = verify_kraken(
        api_key=api_key, api_sign=api_sign, path=path, body=body, keys=KEYS, last_nonces={}
    )
    assert isinstance(result, (str, KrakenAccepted))
