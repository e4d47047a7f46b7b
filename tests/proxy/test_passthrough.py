"""When a venue's response may go to the engine byte for byte, and what happens otherwise."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.upstream import is_passthrough
from tests.proxy.test_fallback import REQUEST, busy, setup

BODY = b'{"orderId":1}'


def head_of(*lines: bytes, status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status + b"".join(b"\r\n" + ln for ln in lines) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("lines", "status", "body_len", "expected"),
    [
        ((b"Content-Length: 13",), b"HTTP/1.1 200 OK", 13, True),
        ((b"Content-Length: 13", b"Connection: keep-alive"), b"HTTP/1.1 200 OK", 13, True),
        ((b"Content-Length: 13", b"CONNECTION:  Keep-Alive "), b"HTTP/1.1 200 OK", 13, True),
        ((b"Content-Length: 13", b"Connection: close"), b"HTTP/1.1 200 OK", 13, False),
        ((b"Content-Length: 13", b"Connection: keep-alive, X-Foo"), b"HTTP/1.1 200 OK", 13, False),
        ((b"Content-Length: 13", b"Keep-Alive: timeout=5"), b"HTTP/1.1 200 OK", 13, False),
        ((b"Content-Length: 13", b"X-Authproxy-Error: spoof"), b"HTTP/1.1 200 OK", 13, False),
        ((b"Content-Length: 13",), b"HTTP/1.0 200 OK", 13, False),
        ((b"Transfer-Encoding: chunked",), b"HTTP/1.1 200 OK", 13, False),  # raw != body
    ],
)
def test_is_passthrough(
    lines: tuple[bytes, ...], status: bytes, body_len: int, expected: bool
) -> None:
    head = head_of(*lines, status=status)
    raw = head + (b"d\r\n" + BODY + b"\r\n0\r\n\r\n" if b"chunked" in head else BODY)
    assert is_passthrough(raw, len(head) - 4, body_len) is expected


def test_chunked_venue_answer_is_reframed_with_content_length() -> None:
    loop = asyncio.new_event_loop()
    try:
        client, conns, ct, _, _ = setup(loop)
        client.data_received(REQUEST)
        busy(conns).data_received(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n"
            b'X-MBX-USED-WEIGHT-1M: 7\r\n\r\n5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n'
        )
        (answer,) = ct.written
        head, _, body = answer.partition(b"\r\n\r\n")
        assert json.loads(body) == {"a": 1}
        assert b"Content-Length: 8" in head
        assert b"X-MBX-USED-WEIGHT-1M: 7" in head
        assert b"Transfer-Encoding" not in head and b"Keep-Alive" not in head
        assert all(c.exchange is None for c in conns)
        assert len(client.router.routes[b"/b"].pool.idle) == 2  # type: ignore[union-attr]
    finally:
        loop.close()


def test_plain_answer_is_forwarded_byte_for_byte() -> None:
    loop = asyncio.new_event_loop()
    try:
        client, conns, ct, _, _ = setup(loop)
        client.data_received(REQUEST)
        raw = head_of(b"Content-Length: 13", b"Connection: keep-alive", b"X-Odd:  spacing ") + BODY
        busy(conns).data_received(raw[:20])
        busy(conns).data_received(raw[20:])
        assert ct.written == [raw]
    finally:
        loop.close()
