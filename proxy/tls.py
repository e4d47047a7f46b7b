"""The venue side's TLS: a client transport on a non-blocking ``ssl.SSLSocket``, driven by
the loop's readiness callbacks.

Why not the loop's own TLS (``create_connection(ssl=...)``): uvloop runs OpenSSL over
memory BIOs, with Python-level calls (``SSLObject.read``, ``pending``, ``write``) and a
buffer copy on every record, each way. Measured on the 2-core development machine, one
keep-alive connection, a small request and answer per round trip, the client's CPU per
round trip was about 82 µs that way and about 50 µs on an ``SSLSocket``
(``docs/performance.md``). Here a read is one C call (the kernel read and the decryption) and a
write is one (the encryption and the kernel write).

What is kept: certificate and host-name verification (the context's, checked during the
handshake), the protocol interface ``UpstreamConnection`` already speaks
(``connection_made``, ``data_received``, ``eof_received``, ``connection_lost``, called on
the loop, ``connection_lost`` always from a fresh callback), writes that never block (a
write the socket cannot take now waits, in order, for the socket to drain).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from typing import Any

READ_SIZE = 256 * 1024  # more than one TLS record (16 KiB): one call reads what is there
_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


class TLSTransport:
    """One TLS connection to a venue (the subset of ``asyncio.Transport`` the upstream pool
    uses: ``write``, ``close``, ``abort``, ``is_closing``, ``get_extra_info``)."""

    __slots__ = ("_closing", "_fd", "_loop", "_pending", "_protocol", "_sock", "_writer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.Protocol
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._closing = False
        self._pending: deque[bytes] = deque()  # writes waiting for the socket, in order
        self._writer = False  # a writability callback is registered
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(self._fd, self._on_readable)

    # asyncio.Transport, as far as the pool uses it
    def write(self, data: bytes) -> None:
        if self._closing:
            return
        if self._pending:
            self._pending.append(data)  # behind what is already waiting
            return
        try:
            # CPython's _ssl does not enable partial writes: all of it goes, or none and
            # the same bytes must be offered again (they are, from _pending).
            self._sock.send(data)
        except _WOULD_BLOCK:
            self._pending.append(data)
            self._want_write()
        except OSError as exc:  # ssl.SSLError included
            self._lose(exc)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close after what is waiting to be written has gone."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._pending:
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        """Close at once; what is waiting to be written is dropped."""
        if self._closing and not self._pending:
            return
        self._lose(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("socket", "ssl_object"):
            return self._sock
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        return default

    # readiness callbacks
    def _on_readable(self) -> None:
        sock = self._sock
        while True:
            try:
                data = sock.recv(READ_SIZE)
            except _WOULD_BLOCK:
                # Nothing whole yet (or a TLS 1.3 ticket, handled inside). A write OpenSSL
                # needs for reading (never with renegotiation off) would show as
                # SSLWantWriteError: the socket being readable again retries it.
                return
            except OSError as exc:
                self._lose(exc)
                return
            if not data:
                self._end_of_stream()
                return
            try:
                self._protocol.data_received(data)
            except Exception as exc:
                self._lose(exc)
                raise
            # One recv reads one record; more already decrypted inside OpenSSL is read now
            # (what is still in the kernel makes the socket readable again).
            if self._closing or not sock.pending():
                return

    def _on_writable(self) -> None:
        pending = self._pending
        while pending:
            try:
                self._sock.send(pending[0])
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                self._lose(exc)
                return
            pending.popleft()
        self._loop.remove_writer(self._fd)
        self._writer = False
        if self._closing:
            self._loop.call_soon(self._finish, None)

    def _want_write(self) -> None:
        if not self._writer:
            self._writer = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _end_of_stream(self) -> None:
        keep_open = self._protocol.eof_received()
        if keep_open:
            self._loop.remove_reader(self._fd)  # half-open: writes may still go
        else:
            self.close()

    def _lose(self, exc: BaseException | None) -> None:
        was_closing = self._closing
        self._closing = True
        self._pending.clear()
        if not was_closing:
            self._loop.remove_reader(self._fd)
        if self._writer:
            self._writer = False
            self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._finish, exc)  # once: _finish ignores a second call

    def _finish(self, exc: BaseException | None) -> None:
        if self._fd < 0:
            return  # already finished
        self._fd = -1
        try:
            self._protocol.connection_lost(exc if isinstance(exc, Exception) else None)
        finally:
            self._sock.close()


async def open_tls(
    loop: asyncio.AbstractEventLoop, host: str, port: int, context: ssl.SSLContext
) -> ssl.SSLSocket:
    """Connect to ``host:port`` and complete the TLS handshake (certificate and host name
    verified by ``context``) without blocking the loop. The caller bounds the time."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    if not infos:
        raise OSError(f"no address for {host}")
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        break
    else:
        assert error is not None
        raise error
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _ready(loop, tls.fileno(), writing=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, tls.fileno(), writing=True)
    except BaseException:
        tls.close()
        raise


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, writing: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    if writing:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await done
    finally:
        if writing:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
