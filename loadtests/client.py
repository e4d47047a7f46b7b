"""Send paths and connections to them: what the load generator and the probes talk to.

A `Target` is one send path (where to connect, the exact request bytes). `open_socket`
makes the connection both users share (TCP_NODELAY, TLS verified against the run's CA);
`Connection` is the blocking keep-alive connection of `probe`, and `loadtests.openloop`
drives the same sockets non-blocking. Response framing is `httpwire.response_end`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass

from loadtests.httpwire import (
    UNTIL_CLOSE,
    HttpWireError,
    dechunk,
    parse_response_head,
    response_end,
)

RECV_BYTES = 65536


@dataclass(frozen=True, slots=True)
class Target:
    """One send path: where to connect and the exact request bytes to send each time."""

    name: str
    host: str
    port: int
    request: bytes
    tls_ca_file: str | None = None  # None: plain HTTP
    tls_server_hostname: str | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        """A client context verifying the chain against the run's CA (None: plain HTTP)."""
        if self.tls_ca_file is None:
            return None
        return ssl.create_default_context(cafile=self.tls_ca_file)


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response, for probes and diagnostics (the load loop keeps only the status)."""

    status: int
    head: bytes
    body: bytes


class PeerClosedError(ConnectionError):
    """The server closed the connection before a whole response arrived."""


def open_socket(target: Target, ctx: ssl.SSLContext | None, io_timeout_s: float) -> socket.socket:
    """Connect (and complete the TLS handshake) to `target`; a blocking socket.

    Blocking with kernel SO_RCVTIMEO/SO_SNDTIMEO instead of `settimeout`, because a
    Python-level timeout adds a poll() to every recv. Raises OSError (an `ssl.SSLError`
    is one) on failure.
    """
    sock = socket.create_connection((target.host, target.port), timeout=io_timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=target.tls_server_hostname)
        sock.settimeout(None)
        seconds = int(io_timeout_s)
        timeval = struct.pack("ll", seconds, int((io_timeout_s - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except BaseException:
        sock.close()
        raise
    return sock


class Connection:
    """One blocking keep-alive HTTP/1.1 connection, optionally TLS.

    I/O errors surface as OSError or HttpWireError; the caller closes and reconnects.
    """

    __slots__ = ("_buf", "_ctx", "_io_timeout_s", "_sock", "target")

    def __init__(self, target: Target, io_timeout_s: float) -> None:
        self.target = target
        self._io_timeout_s = io_timeout_s
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ctx = target.tls_context()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Open the TCP (and TLS) connection; raises OSError on failure."""
        self.close()
        self._sock = open_socket(self.target, self._ctx, self._io_timeout_s)
        self._buf = b""

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buf = b""
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def exchange(self) -> Response:
        """Send the target's request (connecting if needed); return the whole response."""
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        sock.sendall(self.target.request)
        buf = self._buf
        while (framed := response_end(buf)) is None:
            chunk = sock.recv(RECV_BYTES)
            if not chunk:
                return self._until_close(buf)
            buf += chunk
        head, start, end = framed
        body = buf[start:end]
        if head.content_length < 0:
            body = dechunk(body)
        self._buf = buf[end:]
        if not head.keep_alive:
            self.close()
        return Response(status=head.status, head=buf[: start - 4], body=body)

    def _until_close(self, buf: bytes) -> Response:
        """EOF before `response_end` framed a response: whole only if read-until-close."""
        self.close()
        cut = buf.find(b"\r\n\r\n")
        if cut >= 0:
            head = parse_response_head(buf[:cut])
            if head.content_length == UNTIL_CLOSE:
                return Response(status=head.status, head=buf[:cut], body=buf[cut + 4 :])
        raise PeerClosedError("closed before a whole response")


def probe(target: Target, io_timeout_s: float) -> Response:
    """Send one request on a fresh connection and return the whole response.

    Raises OSError or HttpWireError when the path does not answer.
    """
    conn = Connection(target, io_timeout_s)
    try:
        return conn.exchange()
    finally:
        conn.close()


__all__ = [
    "Connection",
    "HttpWireError",
    "PeerClosedError",
    "Response",
    "Target",
    "open_socket",
    "probe",
]
