"""The simulated internal service verifies HFT-AUTH-V1 as docs/internal-auth.md says.

Requests are signed here with hashlib/hmac directly, from the document, never with the
sidecar's signer nor the simulator's own code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.simulator import make_app
from proxy.simulator.base import KeySetError
from proxy.simulator.internal import NonceCache, RateCounter, parse_internal_keys
from tests.simulator.support import NOW_MS, FakeClock, Reply, read_reply

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]

KEY = "hft_5e1f0000aaaa1111bbbb2222cccc3333"
SECRET = "simtest-internal-secret-7f3a"
OTHER = "hft_0ddba11c0ffee0ddba11c0ffee0ddba1"
OTHER_SECRET = "simtest-internal-other-secret-41"
LIMITED = "hft_1111111111111111111111111111111f"


def keys_document() -> dict[str, Any]:
    return {
        "internal": [
            {"api_key": KEY, "algorithm": "hmac-sha256", "secret": SECRET, "account": "desk-a"},
            {"api_key": OTHER, "algorithm": "hmac-sha256", "secret": OTHER_SECRET},
            {
                "api_key": LIMITED,
                "algorithm": "hmac-sha256",
                "secret": SECRET,
                "rate_limit_per_minute": 3,
            },
        ]
    }


def auth_headers(
    method: str,
    target: str,
    body: bytes,
    *,
    key: str = KEY,
    secret: str = SECRET,
    timestamp: int = NOW_MS,
    nonce: str | None = None,
) -> dict[str, str]:
    """The five headers, per docs/internal-auth.md."""
    nonce = nonce or secrets.token_hex(16)
    path, _, query = target.partition("?")
    content = hashlib.sha256(body).hexdigest()
    canonical = "\n".join(["HFT-AUTH-V1", method, path, query, str(timestamp), nonce, content])
    signature = hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return {
        "X-Auth-Key-Id": key,
        "X-Auth-Timestamp": str(timestamp),
        "X-Auth-Nonce": nonce,
        "X-Auth-Content-SHA256": content,
        "X-Auth-Signature": signature,
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: Any, clock: FakeClock) -> Client:
    factory: ClientFactory = aiohttp_client
    return await factory(make_app(keys_document(), clock=clock))


async def call(
    client: Client,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
) -> Reply:
    url = URL(f"{client.make_url('')}".rstrip("/") + target, encoded=True)
    async with client.session.request(method, url, data=body or None, headers=headers) as resp:
        return await read_reply(resp)


async def signed_call(
    client: Client, method: str, target: str, body: bytes = b"", **kw: Any
) -> Reply:
    return await call(client, method, target, body, auth_headers(method, target, body, **kw))


ECHO = "/internal/v1/echo?account=main&tag=a%2Fb"


# ----- acceptance


async def test_signed_echo_is_accepted_and_echoed(client: Client) -> None:
    body = json.dumps({"symbol": "BTCUSDT", "note": "café"}, ensure_ascii=False).encode()
    reply = await signed_call(client, "POST", ECHO, body)
    assert reply.status == 200, reply.body
    assert reply.body["key_id"] == KEY
    assert reply.body["account"] == "desk-a"
    assert reply.body["path"] == "/internal/v1/echo"
    assert reply.body["query"] == "account=main&tag=a%2Fb"
    assert reply.body["body"] == {"symbol": "BTCUSDT", "note": "café"}
    assert reply.body["received_at"] == NOW_MS


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_echo_answers_any_method(client: Client, method: str) -> None:
    reply = await signed_call(client, method, "/internal/v1/echo")
    assert reply.status == 200, reply.body
    assert reply.body["method"] == method
    assert reply.body["body"] is None


async def test_positions_read(client: Client) -> None:
    reply = await signed_call(
        client, "GET", "/internal/v1/positions", key=OTHER, secret=OTHER_SECRET
    )
    assert reply.status == 200, reply.body
    assert reply.body["account"] == "main"
    assert {p["symbol"] for p in reply.body["positions"]} == {"BTCUSDT", "ETHUSDT"}


async def test_documented_worked_example_is_accepted(aiohttp_client: Any) -> None:
    """The first example of docs/internal-auth.md, at its own instant."""
    from tests.proxy.test_internal_signer import doc_examples

    e = doc_examples()[0]
    app = make_app(
        {"internal": [{"api_key": e["key_id"], "algorithm": "hmac-sha256", "secret": e["secret"]}]},
        clock=FakeClock(int(e["timestamp"])),
    )
    client: Client = await aiohttp_client(app)
    headers = {
        "X-Auth-Key-Id": e["key_id"],
        "X-Auth-Timestamp": e["timestamp"],
        "X-Auth-Nonce": e["nonce"],
        "X-Auth-Content-SHA256": e["content_sha256"],
        "X-Auth-Signature": e["signature"],
    }
    reply = await call(client, e["method"], e["target"], e["body"].encode(), headers)
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("skew", [-30_000, 30_000])
async def test_edge_of_the_window_is_accepted(client: Client, skew: int) -> None:
    reply = await signed_call(client, "GET", "/internal/v1/positions", timestamp=NOW_MS + skew)
    assert reply.status == 200, reply.body


# ----- refusals


def assert_refused(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert reply.body["error"]["code"] == code
    assert isinstance(reply.body["error"]["message"], str)
    assert reply.headers["Content-Type"].startswith("application/json")
    if status == 401:
        assert reply.headers["WWW-Authenticate"] == "HFT-AUTH-V1"


async def test_unknown_key(client: Client) -> None:
    reply = await signed_call(
        client, "GET", "/internal/v1/positions", key="hft_" + "9" * 32, secret="whatever"
    )
    assert_refused(reply, 401, "unknown_key")


async def test_revoked_key_is_told_apart_from_unknown(client: Client) -> None:
    async with client.delete(f"/__sim/keys/{OTHER}") as resp:
        assert resp.status == 200
    reply = await signed_call(
        client, "GET", "/internal/v1/positions", key=OTHER, secret=OTHER_SECRET
    )
    assert_refused(reply, 401, "revoked_key")
    # Registering it again un-revokes it.
    async with client.post("/__sim/keys", json=keys_document()) as resp:
        assert resp.status == 200
    reply = await signed_call(
        client, "GET", "/internal/v1/positions", key=OTHER, secret=OTHER_SECRET
    )
    assert reply.status == 200


@pytest.mark.parametrize("skew", [-30_001, 30_001, -3_600_000])
async def test_stale_timestamp(client: Client, skew: int) -> None:
    reply = await signed_call(client, "GET", "/internal/v1/positions", timestamp=NOW_MS + skew)
    assert_refused(reply, 401, "stale_timestamp")


async def test_stale_wins_over_a_bad_signature(client: Client) -> None:
    headers = auth_headers("GET", "/internal/v1/positions", b"", timestamp=NOW_MS - 60_000)
    headers["X-Auth-Signature"] = "0" * 64
    assert_refused(
        await call(client, "GET", "/internal/v1/positions", b"", headers), 401, "stale_timestamp"
    )


async def test_tampered_body_is_a_bad_signature(client: Client) -> None:
    headers = auth_headers("POST", ECHO, b'{"qty":"1"}')
    reply = await call(client, "POST", ECHO, b'{"qty":"9"}', headers)
    assert_refused(reply, 401, "bad_signature")
    assert "Content-SHA256" in reply.body["error"]["message"]


@pytest.mark.parametrize(
    "sent",
    [
        "/internal/v1/echo?account=main&tag=a%2Fc",  # query changed
        "/internal/v1/echo?tag=a%2Fb&account=main",  # same parameters, another order
        "/internal/v1/echo?account=main&tag=a/b",  # decoded: not the bytes that were signed
        "/internal/v1/echo",  # query dropped
    ],
)
async def test_any_change_to_the_target_is_a_bad_signature(client: Client, sent: str) -> None:
    headers = auth_headers("POST", ECHO, b"{}")
    assert_refused(await call(client, "POST", sent, b"{}", headers), 401, "bad_signature")


async def test_method_is_signed(client: Client) -> None:
    headers = auth_headers("GET", "/internal/v1/echo", b"")
    assert_refused(
        await call(client, "DELETE", "/internal/v1/echo", b"", headers), 401, "bad_signature"
    )


async def test_signature_with_another_keys_secret(client: Client) -> None:
    reply = await signed_call(client, "GET", "/internal/v1/positions", secret=OTHER_SECRET)
    assert_refused(reply, 401, "bad_signature")


async def test_replayed_nonce(client: Client) -> None:
    headers = auth_headers("POST", ECHO, b"{}")
    first = await call(client, "POST", ECHO, b"{}", headers)
    assert first.status == 200
    assert_refused(await call(client, "POST", ECHO, b"{}", headers), 401, "replayed_nonce")
    # The same nonce under another key is that key's own nonce (scoped per key id).
    again = await signed_call(
        client, "POST", ECHO, b"{}", key=OTHER, secret=OTHER_SECRET, nonce=headers["X-Auth-Nonce"]
    )
    assert again.status == 200


async def test_unsigned_junk_does_not_burn_a_nonce(client: Client) -> None:
    headers = auth_headers("POST", ECHO, b"{}")
    junk = dict(headers, **{"X-Auth-Signature": "f" * 64})
    assert_refused(await call(client, "POST", ECHO, b"{}", junk), 401, "bad_signature")
    assert (await call(client, "POST", ECHO, b"{}", headers)).status == 200


def _without(name: str) -> dict[str, str]:
    headers = auth_headers("GET", "/internal/v1/positions", b"")
    del headers[name]
    return headers


@pytest.mark.parametrize(
    "headers",
    [
        _without("X-Auth-Key-Id"),
        _without("X-Auth-Timestamp"),
        _without("X-Auth-Nonce"),
        _without("X-Auth-Content-SHA256"),
        _without("X-Auth-Signature"),
        {**auth_headers("GET", "/internal/v1/positions", b""), "X-Auth-Timestamp": f"0{NOW_MS}"},
        {**auth_headers("GET", "/internal/v1/positions", b""), "X-Auth-Timestamp": f"+{NOW_MS}"},
        {**auth_headers("GET", "/internal/v1/positions", b""), "X-Auth-Nonce": "ab" * 8},
        {**auth_headers("GET", "/internal/v1/positions", b""), "X-Auth-Nonce": "AB" * 16},
        {**auth_headers("GET", "/internal/v1/positions", b""), "X-Auth-Key-Id": "hft_XYZ"},
    ],
)
async def test_malformed_headers(client: Client, headers: dict[str, str]) -> None:
    reply = await call(client, "GET", "/internal/v1/positions", b"", headers)
    assert_refused(reply, 400, "malformed_auth")


async def test_uppercase_signature_is_malformed(client: Client) -> None:
    headers = auth_headers("GET", "/internal/v1/positions", b"")
    headers["X-Auth-Signature"] = headers["X-Auth-Signature"].upper()
    assert_refused(
        await call(client, "GET", "/internal/v1/positions", b"", headers), 400, "malformed_auth"
    )


async def test_repeated_header_is_malformed(client: Client) -> None:
    headers = list(auth_headers("GET", "/internal/v1/positions", b"").items())
    headers.append(("X-Auth-Signature", "0" * 64))
    assert_refused(
        await call(client, "GET", "/internal/v1/positions", b"", headers), 400, "malformed_auth"
    )


async def test_rate_limit_after_verification(client: Client, clock: FakeClock) -> None:
    clock.now = NOW_MS - NOW_MS % 60_000 + 10_000  # 50 s left in the minute window
    for _ in range(3):
        reply = await signed_call(
            client, "GET", "/internal/v1/positions", key=LIMITED, timestamp=clock.now
        )
        assert reply.status == 200
    reply = await signed_call(
        client, "GET", "/internal/v1/positions", key=LIMITED, timestamp=clock.now
    )
    assert_refused(reply, 429, "rate_limited")
    assert reply.headers["Retry-After"] == "50"
    clock.now += 50_000
    reply = await signed_call(
        client, "GET", "/internal/v1/positions", key=LIMITED, timestamp=clock.now
    )
    assert reply.status == 200


async def test_non_json_echo_body(client: Client) -> None:
    reply = await signed_call(client, "POST", "/internal/v1/echo", b"not json")
    assert_refused(reply, 400, "bad_json")


async def test_log_records_key_and_verdict(client: Client) -> None:
    await signed_call(client, "GET", "/internal/v1/positions")
    await signed_call(client, "GET", "/internal/v1/positions", timestamp=NOW_MS - 99_999)
    async with client.get("/__sim/log") as resp:
        entries = (await resp.json())["entries"]
    assert [(e["api_key"], e["verdict"], e["algorithm"]) for e in entries] == [
        (KEY, "ok", "hmac-sha256"),
        (KEY, "stale_timestamp", "hmac-sha256"),
    ]


# ----- the pure parts


def test_nonce_cache_expires_by_time() -> None:
    cache = NonceCache(window_ms=1000, capacity=10)
    assert cache.claim("k", "n1", 1000, now_ms=1000) is None
    assert cache.claim("k", "n1", 1000, now_ms=2000) is not None  # still within the window
    assert cache.claim("k", "n2", 1500, now_ms=2001) is None  # n1 (ts 1000) now expires
    assert len(cache) == 1
    assert cache.floor_ms == -1


def test_nonce_cache_bounded_by_count_raises_the_floor() -> None:
    cache = NonceCache(window_ms=60_000, capacity=3)
    for i, ts in enumerate([100, 300, 200]):
        assert cache.claim("k", f"n{i}", ts, now_ms=400) is None
    # Full: the oldest (ts 100) leaves, and ts <= 100 is refused from now on.
    assert cache.claim("k", "n3", 400, now_ms=400) is None
    assert len(cache) == 3
    assert cache.floor_ms == 100
    refused = cache.claim("k", "n0", 100, now_ms=400)  # the evicted nonce, replayed
    assert refused is not None and refused.code == "stale_timestamp"
    assert cache.claim("k", "n1", 300, now_ms=400) is not None  # still remembered
    # A new request older than everything kept would evict above its own timestamp.
    late = cache.claim("k", "n9", 150, now_ms=400)
    assert late is not None and late.code == "stale_timestamp"
    assert cache.floor_ms == 200


async def test_floor_is_enforced_by_the_service(aiohttp_client: Any, clock: FakeClock) -> None:
    from proxy.simulator.internal import InternalVenue
    from proxy.simulator.server import SIMULATOR_KEY

    app = make_app(keys_document(), clock=clock)
    venue = app[SIMULATOR_KEY].venues["internal"]
    assert isinstance(venue, InternalVenue)
    venue.nonces = NonceCache(capacity=2)
    client: Client = await aiohttp_client(app)
    for ts in (NOW_MS - 3, NOW_MS - 2, NOW_MS - 1):
        assert (
            await signed_call(client, "GET", "/internal/v1/positions", timestamp=ts)
        ).status == 200
    reply = await signed_call(client, "GET", "/internal/v1/positions", timestamp=NOW_MS - 3)
    assert_refused(reply, 401, "stale_timestamp")


def test_rate_counter_windows() -> None:
    counter = RateCounter(1000)
    assert counter.add("k", 1500) == (1, 500)
    assert counter.add("k", 1999) == (2, 1)
    assert counter.add("k", 2000) == (1, 1000)


@pytest.mark.parametrize(
    ("entries", "path"),
    [
        ({}, "internal"),
        ([{"api_key": "abc", "algorithm": "hmac-sha256", "secret": "s"}], "internal[0].api_key"),
        ([{"api_key": KEY, "algorithm": "ed25519", "secret": "s"}], "internal[0].algorithm"),
        ([{"api_key": KEY, "algorithm": "hmac-sha256", "secret": ""}], "internal[0].secret"),
        (
            [
                {
                    "api_key": KEY,
                    "algorithm": "hmac-sha256",
                    "secret": "s",
                    "rate_limit_per_minute": 0,
                }
            ],
            "internal[0].rate_limit_per_minute",
        ),
        (
            [
                {"api_key": KEY, "algorithm": "hmac-sha256", "secret": "s"},
                {"api_key": KEY, "algorithm": "hmac-sha256", "secret": "t"},
            ],
            "internal[1].api_key",
        ),
    ],
)
def test_bad_key_documents_name_the_field(entries: object, path: str) -> None:
    with pytest.raises(KeySetError) as info:
        parse_internal_keys(entries)
    assert info.value.path == path
