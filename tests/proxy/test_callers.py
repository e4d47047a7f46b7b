"""Who may call: unix-socket peers by uid/gid (SO_PEERCRED), and client tokens."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from loadtests.hotpath import FakeTransport
from proxy.server import Client, peer_allowed
from tests.proxy.listener_harness import Listener

ORDER = b"POST /binance/api/v3/order?symbol=BTCUSDT HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_peer_credentials_of_a_unix_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        me, my_group = os.getuid(), os.getgid()
        assert peer_allowed(a, None, None)
        assert peer_allowed(a, frozenset({me}), None)
        assert peer_allowed(a, None, frozenset({my_group}))
        assert not peer_allowed(a, frozenset({me + 4242}), None)
        assert not peer_allowed(a, frozenset({me + 4242}), frozenset({my_group + 4242}))


class UnixTransport(FakeTransport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default


def test_a_peer_under_another_uid_is_refused_before_anything_is_read(
    loop: asyncio.AbstractEventLoop,
) -> None:
    from proxy.server import ClientConnection

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        listener = Listener(loop, allow_uids=frozenset({os.getuid() + 4242}))
        conn = ClientConnection(listener.router)
        transport = UnixTransport(a)
        conn.connection_made(transport)  # type: ignore[arg-type]
        out = b"".join(transport.written)
        assert out.startswith(b"HTTP/1.1 403") and transport.closed
        conn.data_received(ORDER + b"\r\n")
        assert listener.answer_all() == []
        allowed = Listener(loop, allow_uids=frozenset({os.getuid()}))
        conn = ClientConnection(allowed.router)
        transport = UnixTransport(a)
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(ORDER + b"\r\n")
        assert len(allowed.answer_all()) == 1


def test_client_tokens_and_the_services_each_may_use(loop: asyncio.AbstractEventLoop) -> None:
    clients = {
        b"t-risk": Client("risk", frozenset({"other"})),
        b"t-trader": Client("trader", frozenset({"fuzz"})),
    }
    listener = Listener(loop, clients=clients)
    conn, transport = listener.connect()
    conn.data_received(
        ORDER
        + b"\r\n"  # no token
        + ORDER
        + b"X-Authproxy-Token: nope\r\n\r\n"
        + ORDER
        + b"X-Authproxy-Token: t-risk\r\n\r\n"  # not this service
        + ORDER
        + b"X-Authproxy-Token: t-trader\r\n\r\n"
    )
    (sent,) = listener.answer_all()
    assert b"t-trader" not in sent and b"x-authproxy-token" not in sent.lower()
    answers = b"".join(transport.written).split(b"HTTP/1.1 ")[1:]
    codes = [
        (int(a[:3]), json.loads(a.partition(b"\r\n\r\n")[2]).get("error", {}).get("code"))
        for a in answers
    ]
    assert codes == [(401, "unauthorized"), (401, "unauthorized"), (403, "forbidden"), (200, None)]


def test_a_token_file_others_can_read_is_refused(tmp_path: Any) -> None:
    from proxy.config import ClientConfig
    from proxy.runtime import StartupError, load_clients

    token = tmp_path / "t"
    token.write_text("x" * 32)
    token.chmod(0o644)

    class Cfg:
        clients = (ClientConfig("risk", token, ("svc",)),)

    with pytest.raises(StartupError, match="owner only"):
        load_clients(Cfg())  # type: ignore[arg-type]
    token.chmod(0o600)
    clients = load_clients(Cfg())  # type: ignore[arg-type]
    assert clients == {b"x" * 32: Client("risk", frozenset({"svc"}))}
    token.write_text("short")
    with pytest.raises(StartupError, match="16 bytes"):
        load_clients(Cfg())  # type: ignore[arg-type]
