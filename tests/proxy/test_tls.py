"""The venue-side TLS transport (proxy.tls) over real loopback TLS, on uvloop as in the
sidecar: verification at the handshake, ordered writes that wait for a slow reader, end of
stream, abort, and connection_lost exactly once from its own callback."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.runtime import new_event_loop
from proxy.simulator.tlsca import TlsMaterial, make_tls_material
from proxy.tls import TLSTransport, open_tls
from proxy.upstream import make_ssl_context


class Recorder(asyncio.Protocol):
    """Records what the transport calls, and in which callback depth."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.inside = False  # set while data_received runs
        self.lost = asyncio.Event()
        self.lost_inside: bool | None = None

    def connection_made(self, transport: Any) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.inside = True
        try:
            self.data += data
            self.events.append("data")
        finally:
            self.inside = False

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost_inside = self.inside
        self.lost.set()


def _run(main: Callable[[], Awaitable[None]]) -> None:
    loop = new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 30))
        loop.run_until_complete(asyncio.sleep(0.1))  # let the servers' closes finish
    finally:
        loop.close()


def _server_context(material: TlsMaterial, tmp: Path) -> ssl.SSLContext:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    cert.write_bytes(material.server_cert_pem)
    key.write_bytes(material.server_key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def _client_context(material: TlsMaterial, tmp: Path) -> ssl.SSLContext:
    ca = tmp / "ca.pem"
    ca.write_bytes(material.ca_cert_pem)
    return make_ssl_context(str(ca))


@pytest.fixture(scope="module")
def material() -> TlsMaterial:
    return make_tls_material(dns_names=("localhost",), ip_addresses=("127.0.0.1",))


def test_round_trip_and_close_from_the_venue(material: TlsMaterial, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            writer.write(b"echo " + line)
            await writer.drain()
            writer.close()  # the venue ends the connection after answering

        server = await asyncio.start_server(
            serve, "127.0.0.1", 0, ssl=_server_context(material, tmp_path)
        )
        port = server.sockets[0].getsockname()[1]
        sock = await open_tls(loop, "127.0.0.1", port, _client_context(material, tmp_path))
        proto = Recorder()
        transport = TLSTransport(loop, sock, proto)
        assert transport.get_extra_info("socket") is sock
        assert transport.get_extra_info("peername")[0] == "127.0.0.1"
        transport.write(b"order 1\n")
        await proto.lost.wait()
        assert bytes(proto.data) == b"echo order 1\n"
        assert proto.events[0] == "made" and proto.events[-2:] == ["eof", "lost"]
        assert proto.events.count("lost") == 1
        assert transport.is_closing()
        server.close()
        await server.wait_closed()

    _run(main)


def test_writes_wait_for_a_slow_reader_and_keep_their_order(
    material: TlsMaterial, tmp_path: Path
) -> None:
    """More than the socket buffers hold, to a venue that does not read for a while: the
    write returns at once, nothing is lost or reordered, and later writes queue behind."""
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB
    tail = b"and the next request\n"
    expected = hashlib.sha256(big + tail).hexdigest()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        received: asyncio.Future[str] = loop.create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(0.3)  # let the client's buffers fill
            digest = hashlib.sha256(await reader.readexactly(len(big) + len(tail)))
            received.set_result(digest.hexdigest())
            writer.write(b"ok")
            await writer.drain()

        server = await asyncio.start_server(
            serve, "127.0.0.1", 0, ssl=_server_context(material, tmp_path)
        )
        port = server.sockets[0].getsockname()[1]
        sock = await open_tls(loop, "127.0.0.1", port, _client_context(material, tmp_path))
        proto = Recorder()
        transport = TLSTransport(loop, sock, proto)
        transport.write(big)
        assert transport._pending, "the 8 MiB write should have had to wait"
        transport.write(tail)
        assert await received == expected
        while bytes(proto.data) != b"ok":
            await asyncio.sleep(0.01)
        assert not transport._pending
        transport.close()
        await proto.lost.wait()
        assert proto.events.count("lost") == 1
        server.close()
        await server.wait_closed()

    _run(main)


def test_abort_drops_waiting_writes_and_reports_once_outside_the_callback(
    material: TlsMaterial, tmp_path: Path
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hold = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"x")
            await writer.drain()
            await hold.wait()
            writer.close()

        server = await asyncio.start_server(
            serve, "127.0.0.1", 0, ssl=_server_context(material, tmp_path)
        )
        port = server.sockets[0].getsockname()[1]
        sock = await open_tls(loop, "127.0.0.1", port, _client_context(material, tmp_path))

        class AbortsOnData(Recorder):
            def data_received(self, data: bytes) -> None:
                self.inside = True
                try:
                    transport.abort()  # as UpstreamConnection does on unasked-for bytes
                    transport.abort()
                finally:
                    self.inside = False

        proto = AbortsOnData()
        transport = TLSTransport(loop, sock, proto)
        transport.write(b"y" * (8 << 20))  # waits: the server does not read
        await proto.lost.wait()
        await asyncio.sleep(0.05)
        assert proto.events.count("lost") == 1
        assert proto.lost_inside is False
        assert not transport._pending
        transport.write(b"after")  # ignored, no error
        hold.set()
        server.close()
        await server.wait_closed()

    _run(main)


def test_open_tls_verifies_the_certificate_and_the_name(
    material: TlsMaterial, tmp_path: Path
) -> None:
    other = make_tls_material(dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    # signed by the right CA, but for another name than the one dialled
    misnamed = make_tls_material(dns_names=("venue.example",), ip_addresses=())

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        for served, trusted, why in (
            (material, other, "a CA that did not sign the venue's certificate"),
            (misnamed, misnamed, "a certificate for another name"),
        ):
            with tempfile.TemporaryDirectory() as d:
                server = await asyncio.start_server(
                    serve, "127.0.0.1", 0, ssl=_server_context(served, Path(d))
                )
                port = server.sockets[0].getsockname()[1]
                with pytest.raises(ssl.SSLCertVerificationError):
                    await open_tls(loop, "127.0.0.1", port, _client_context(trusted, Path(d)))
                    pytest.fail(why)
                server.close()
                await server.wait_closed()
        # and the right CA and name pass
        server = await asyncio.start_server(
            serve, "127.0.0.1", 0, ssl=_server_context(material, tmp_path)
        )
        port = server.sockets[0].getsockname()[1]
        sock = await open_tls(loop, "127.0.0.1", port, _client_context(material, tmp_path))
        sock.close()
        server.close()
        await server.wait_closed()

    _run(main)


def test_open_tls_gives_up_when_the_handshake_never_comes(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # TCP accepted, never a TLS byte

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        material = make_tls_material(dns_names=("localhost",), ip_addresses=("127.0.0.1",))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                open_tls(loop, "127.0.0.1", port, _client_context(material, tmp_path)), 0.3
            )
        for w in accepted:
            w.close()
        await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed()

    _run(main)
