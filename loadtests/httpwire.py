"""Minimal HTTP/1.1 wire helpers for the benchmark client: pure functions over bytes.

Just enough of RFC 9112 to drive one keep-alive connection: build a request, parse a
response head, and find where a Content-Length, chunked or read-until-close body ends. No
sockets here, so the framing can be checked without a server.
"""

from __future__ import annotations

from dataclasses import dataclass

# Body framing markers for `ResponseHead.content_length`.
CHUNKED = -1
UNTIL_CLOSE = -2
# Statuses that never carry a body (RFC 9112 section 6.3); this client never sends HEAD.
_NO_BODY_STATUSES = frozenset({204, 304})
HEAD_END = b"\r\n\r\n"
# Upper bound on a response head; a bigger one means we are not talking to the server we
# think we are, so fail fast instead of buffering without limit.
MAX_HEAD_BYTES = 64 * 1024


class HttpWireError(Exception):
    """The peer sent something that is not a well-formed HTTP/1.1 response."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What the client needs from a response head to frame the body and reuse the socket."""

    status: int
    content_length: int  # >= 0, or CHUNKED, or UNTIL_CLOSE
    keep_alive: bool


def build_request(
    method: str, target: str, host: str, body: bytes = b"", content_type: str | None = None
) -> bytes:
    """Return the complete request bytes (head and body), built once and sent as-is."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a response head (status line and header lines, without the final CRLFCRLF).

    Raises HttpWireError on a malformed status line, header line or Content-Length.
    """
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status_text = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(status_text) != 3:
        raise HttpWireError(f"bad status line {lines[0][:80]!r}")
    if not status_text.isdigit():
        raise HttpWireError(f"bad status code {status_text!r}")
    status = int(status_text)
    content_length: int | None = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise HttpWireError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        if name == b"content-length":
            text = value.strip()
            if not text.isdigit():
                raise HttpWireError(f"bad Content-Length {text[:40]!r}")
            length = int(text)
            if content_length is not None and content_length != length:
                raise HttpWireError("conflicting Content-Length headers")
            content_length = length
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens:
                close = False
    if status < 200 or status in _NO_BODY_STATUSES:
        framing = 0
    elif chunked:  # Transfer-Encoding wins over Content-Length (RFC 9112 section 6.3)
        framing = CHUNKED
    elif content_length is not None:
        framing = content_length
    else:
        framing = UNTIL_CLOSE
        close = True
    return ResponseHead(status=status, content_length=framing, keep_alive=not close)


def chunked_body_end(buf: bytes, pos: int) -> int | None:
    """Return the offset just past a chunked body that starts at `pos`, or None if `buf`
    does not hold all of it yet. Trailers are skipped. Raises HttpWireError if malformed."""
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size_text = buf[pos:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpWireError(f"bad chunk size {size_text[:20]!r}") from None
        pos = line_end + 2
        if size == 0:
            while True:  # trailer section, ended by an empty line
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                if line_end == pos:
                    return pos + 2
                pos = line_end + 2
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise HttpWireError("chunk not followed by CRLF")
        pos += size + 2


def dechunk(body: bytes) -> bytes:
    """Return the payload of a complete chunked body (for diagnostics, not the hot path)."""
    out = bytearray()
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return bytes(out)
        size = int(body[pos:line_end].split(b";", 1)[0].strip(), 16)
        if size == 0:
            return bytes(out)
        pos = line_end + 2
        out += body[pos : pos + size]
        pos += size + 2
