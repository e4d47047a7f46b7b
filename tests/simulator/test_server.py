"""Shared plumbing: request log, /__sim/ test endpoints, gzip, latency, TLS material."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gzip
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography import x509
from yarl import URL

from proxy.simulator import make_app, system_clock
from proxy.simulator.server import LOG_CAPACITY, LogEntry, RequestLog
from proxy.simulator.tlsca import make_tls_material, server_ssl_context, write_ca_file
from tests.simulator.support import (
    ED25519_API_KEY,
    HMAC_API_KEY,
    NOW_MS,
    FakeClock,
    keys_document,
    send,
    signed,
)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


@pytest.fixture
async def client(aiohttp_client: Any) -> Client:
    factory: ClientFactory = aiohttp_client
    return await factory(make_app(keys_document(), clock=FakeClock()))


# ----- request log


async def test_log_records_verdicts_and_clears(client: Client) -> None:
    await send(client, "GET", "/api/v3/account", query=signed(f"timestamp={NOW_MS}"))
    await send(
        client,
        "GET",
        "/api/v3/account",
        query=signed(f"timestamp={NOW_MS}", ED25519_API_KEY),
        api_key=ED25519_API_KEY,
    )
    await send(client, "GET", "/api/v3/account", query=f"timestamp={NOW_MS}&signature=00")
    await send(client, "GET", "/api/v3/account", query="timestamp=1", api_key="ghost")
    await send(client, "GET", "/nowhere")

    log = await send(client, "GET", "/__sim/log")
    entries = log.body["entries"]
    assert [(e["path"], e["verdict"], e["algorithm"]) for e in entries] == [
        ("/api/v3/account", "ok", "hmac-sha256"),
        ("/api/v3/account", "ok", "ed25519"),
        ("/api/v3/account", -1022, "hmac-sha256"),
        ("/api/v3/account", -2015, None),
        ("/nowhere", 404, None),
    ]
    assert entries[0]["api_key"] == HMAC_API_KEY
    assert entries[0]["method"] == "GET"
    assert entries[0]["query"].startswith(f"timestamp={NOW_MS}&signature=")
    assert entries[0]["time"] == NOW_MS
    assert entries[3]["api_key"] == "ghost"

    cleared = await send(client, "DELETE", "/__sim/log")
    assert cleared.body == {"cleared": 5}
    assert (await send(client, "GET", "/__sim/log")).body == {"entries": []}


async def test_log_never_holds_a_secret(client: Client) -> None:
    await send(client, "POST", "/api/v3/order", body=signed(f"symbol=BTCUSDT&timestamp={NOW_MS}"))
    text = json.dumps((await send(client, "GET", "/__sim/log")).body)
    for entry in keys_document()["binance"]:
        if "secret" in entry:
            assert entry["secret"] not in text


def test_request_log_is_bounded() -> None:
    log = RequestLog()
    for i in range(LOG_CAPACITY + 5):
        log.append(LogEntry(i, "GET", "/", "", None, "ok", None, 200))
    entries = log.entries()
    assert len(entries) == LOG_CAPACITY
    assert entries[0].time_ms == 5


# ----- /__sim/ test endpoints


async def test_echo_returns_exactly_what_was_received(client: Client) -> None:
    body = b"a=1&b=%2F+x\x00\xff"
    url = URL(f"{client.make_url('/__sim/echo')}?q=%7e+1&q2=%2F", encoded=True)
    async with client.session.post(
        url,
        data=body,
        headers={"X-Custom": "Value", "Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        echo = await resp.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/__sim/echo"
    assert echo["query"] == "q=%7e+1&q2=%2F"
    assert base64.b64decode(echo["body"]) == body
    assert ["X-Custom", "Value"] in echo["headers"]
    names = [name.lower() for name, _ in echo["headers"]]
    assert "content-length" in names


async def test_reset_closes_the_connection_without_an_answer(client: Client) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with client.session.get(client.make_url("/__sim/reset")) as resp:
            await resp.read()
    log = await send(client, "GET", "/__sim/log")
    assert log.body["entries"][-1]["verdict"] == "reset"


async def test_slow_answers_no_sooner_than_asked(client: Client) -> None:
    started = time.monotonic()
    reply = await send(client, "GET", "/__sim/slow", query="ms=150")
    assert reply.body == {"slept_ms": 150}
    assert time.monotonic() - started >= 0.14
    bad = await send(client, "GET", "/__sim/slow", query="ms=-1")
    assert bad.status == 400


async def test_slow_can_outlast_a_client_timeout(client: Client) -> None:
    timeout = aiohttp.ClientTimeout(total=0.05)
    with pytest.raises(asyncio.TimeoutError):
        async with client.session.get(
            client.make_url("/__sim/slow?ms=2000"), timeout=timeout
        ) as resp:
            await resp.read()


async def test_gzip_endpoint_always_sends_gzip(client: Client) -> None:
    async with client.session.get(client.make_url("/__sim/gzip"), auto_decompress=False) as resp:
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["gzip"] is True


async def test_gzip_flag_compresses_json_when_accepted(aiohttp_client: Any) -> None:
    factory: ClientFactory = aiohttp_client
    client = await factory(make_app(keys_document(), clock=FakeClock(), gzip=True))
    async with client.session.get(
        client.make_url("/api/v3/time"), headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as resp:
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw)) == {"serverTime": NOW_MS}
    async with client.session.get(
        client.make_url("/api/v3/time"), skip_auto_headers=["Accept-Encoding"]
    ) as resp:
        assert "Content-Encoding" not in resp.headers
        assert await resp.json() == {"serverTime": NOW_MS}


async def test_without_gzip_flag_json_is_identity(client: Client) -> None:
    async with client.session.get(
        client.make_url("/api/v3/time"), headers={"Accept-Encoding": "gzip"}
    ) as resp:
        assert "Content-Encoding" not in resp.headers


async def test_latency_delays_venue_answers(aiohttp_client: Any) -> None:
    factory: ClientFactory = aiohttp_client
    client = await factory(make_app(None, clock=FakeClock(), latency_ms=100))
    started = time.monotonic()
    assert (await send(client, "GET", "/api/v3/ping")).status == 200
    assert time.monotonic() - started >= 0.09


def test_latency_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        make_app(None, latency_ms=-1)


# ----- TLS material


def test_server_certificate_names_loopback_and_is_short_lived() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    material = make_tls_material(now=now)
    cert = x509.load_pem_x509_certificate(material.server_cert_pem)
    ca = x509.load_pem_x509_certificate(material.ca_cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert cert.not_valid_before_utc == now - dt.timedelta(hours=1)
    assert cert.not_valid_after_utc == now + dt.timedelta(days=1)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.issuer == ca.subject
    assert b"PRIVATE KEY" not in material.ca_cert_pem
    assert "server_key_pem" not in repr(material)


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_https_verifies_against_the_written_ca(tmp_path: Path) -> None:
    material = make_tls_material()
    ca_file = write_ca_file(material, tmp_path / "state")
    server_ctx = server_ssl_context(material, tmp_path / "state")
    # Only the CA certificate is left on disk: the server key went through a removed temp file.
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["ca.pem"]
    assert ca_file.is_absolute()

    runner = web.AppRunner(make_app(None), access_log=None)
    await runner.setup()
    try:
        hosts = ["127.0.0.1"] + (["::1"] if _ipv6_loopback_available() else [])
        sites = [web.TCPSite(runner, host, 0, ssl_context=server_ctx) for host in hosts]
        for site in sites:
            await site.start()
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        async with aiohttp.ClientSession() as session:
            for address in runner.addresses:
                host, port = address[0], address[1]
                names = ["localhost"] if host == "127.0.0.1" else []
                for name in [host if ":" not in host else f"[{host}]", *names]:
                    async with session.get(
                        f"https://{name}:{port}/api/v3/ping", ssl=client_ctx
                    ) as resp:
                        assert resp.status == 200
            # A client that does not trust the throwaway CA must fail verification.
            port = runner.addresses[0][1]
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(
                    f"https://127.0.0.1:{port}/api/v3/ping", ssl=ssl.create_default_context()
                ):
                    pass
    finally:
        await runner.cleanup()


def test_system_clock_applies_the_offset() -> None:
    skewed = system_clock(30_000)()
    assert abs(skewed - (time.time() * 1000 + 30_000)) < 5_000
