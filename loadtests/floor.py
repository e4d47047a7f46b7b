"""The stack's floor: the least a proxy on the sidecar's stack can add, for the benchmark.

A bare forwarder on the same parts as the sidecar's hot path (CPython, uvloop Protocols,
the httptools parser, a warm keep-alive TLS connection to the upstream with certificate
verification) that does nothing else: no routing table, no signing, no key, no rate
limit, no metrics, no checks beyond what framing needs. ``make bench`` runs it as the
``floor`` path beside nginx and the sidecar, so every run shows how much of the sidecar's
added latency is the stack (this path) and how much is the sidecar's own work (the
difference). It is a measuring instrument, never a product path: it forwards whatever
it is sent, unsigned.

    python -m loadtests.floor --upstream 127.0.0.1:PORT --ca-file CA --route /venue

It listens on ``--listen`` (default 127.0.0.1, a free port), prints one JSON line
``{"event": "ready", "port": N}`` on stdout, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import signal
import socket
import ssl
import sys
from collections import deque
from pathlib import Path
from typing import IO

import httptools
import uvloop

WARM_CONNECTIONS = 64  # opened at start: more than the benchmark's 32 engines


def command(upstream: str, ca_file: Path, route: str, *extra: str) -> list[str]:
    """The arguments, after a Python executable, that start the floor (for the tools
    that run it: ``loadtests.bench``, ``loadtests.instructions``)."""
    return [
        "-m",
        "loadtests.floor",
        "--upstream",
        upstream,
        "--ca-file",
        str(ca_file),
        "--route",
        route,
        *extra,
    ]


def read_ready(stdout: IO[bytes], timeout_s: float) -> int | None:
    """The port on the floor's ready line, read from its ``stdout`` within ``timeout_s``;
    None when no well-formed line came."""
    ready, _, _ = select.select([stdout], [], [], timeout_s)
    line = stdout.readline() if ready else b""
    try:
        return int(json.loads(line)["port"])
    except (ValueError, KeyError, TypeError):
        return None


# Hop-by-hop or re-framed: never copied from one side to the other.
DROP = frozenset({b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"host"})


class _Message(asyncio.Protocol):
    """What both sides collect of a message: its end-to-end header lines and its body."""

    def __init__(self) -> None:
        self.head: list[bytes] = []
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.head = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in DROP:
            self.head.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


class Upstream(_Message):
    """One warm TLS connection to the upstream, lent to one engine connection at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        client, self.client = self.client, None
        if client is not None and client.upstream is self:
            client.upstream_lost()

    def on_message_complete(self) -> None:
        client = self.client
        if client is None:
            return
        body = b"".join(self.body)
        status = self.parser.get_status_code()
        client.answer(
            b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (status, REASONS.get(status, b"Unknown"), b"".join(self.head), len(body), body)
        )


REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}


class Client(_Message):
    """One engine connection: requests parsed, forwarded one at a time, answered in order."""

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.forwarder = forwarder
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.queue: deque[bytes] = deque()
        self.busy = False
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.attach()

    def attach(self) -> None:
        """Take a warm upstream connection, or open one (requests queue meanwhile)."""
        up = self.forwarder.take()
        if up is None:
            self.forwarder.connect_for(self)
            return
        self.upstream = up
        up.client = self
        self.send_next()

    def upstream_lost(self) -> None:
        self.upstream = None
        if self.transport is None:
            return
        if self.busy:
            self.transport.close()  # an answer was owed on it
        else:
            self.attach()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None:
            self.upstream.client = None
            if not self.busy and self.upstream.transport is not None:
                self.forwarder.give_back(self.upstream)
            elif self.upstream.transport is not None:
                self.upstream.transport.close()  # an answer is owed on it: not reusable
            self.upstream = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        fw = self.forwarder
        url = self.url[len(fw.route) :] if self.url.startswith(fw.route) else self.url
        body = b"".join(self.body)
        self.queue.append(
            b"%s %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n%s"
            % (self.parser.get_method(), url, fw.host_line, b"".join(self.head), len(body), body)
        )
        if not self.busy:
            self.send_next()

    def send_next(self) -> None:
        up = self.upstream
        if self.queue and up is not None and up.transport is not None:
            self.busy = True
            up.transport.write(self.queue.popleft())
        else:
            self.busy = False

    def answer(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
        self.send_next()


class Forwarder:
    """The warm upstream connections and what every engine connection shares."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, route: bytes) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.route = route
        self.host_line = b"Host: %s:%d\r\n" % (host.encode(), port)
        self.idle: list[Upstream] = []
        self.tasks: set[asyncio.Future[None]] = set()

    async def warm(self, count: int) -> None:
        for _ in range(count):
            self.idle.append(await self._connect())

    async def _connect(self) -> Upstream:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(
            Upstream, self.host, self.port, ssl=self.context, server_hostname=self.host
        )
        return up

    def connect_for(self, client: Client) -> None:
        async def connect() -> None:
            try:
                up = await self._connect()
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            if client.transport is None:
                self.idle.append(up)
                return
            client.upstream = up
            up.client = client
            client.send_next()

        task = asyncio.ensure_future(connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def take(self) -> Upstream | None:
        while self.idle:
            up = self.idle.pop()
            if up.transport is not None:
                return up
        return None

    def give_back(self, up: Upstream) -> None:
        self.idle.append(up)


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    context = ssl.create_default_context(cafile=args.ca_file)
    forwarder = Forwarder(host, int(port), context, args.route.encode())
    await forwarder.warm(args.connections)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(forwarder), args.listen, args.port)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "ready", "port": bound}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.floor", description=__doc__)
    p.add_argument("--upstream", required=True, help="HOST:PORT of the TLS upstream")
    p.add_argument("--ca-file", required=True, help="the CA that signs the upstream's cert")
    p.add_argument("--route", default="/venue", help="path prefix removed before forwarding")
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--connections", type=int, default=WARM_CONNECTIONS)
    args = p.parse_args(argv)
    uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
