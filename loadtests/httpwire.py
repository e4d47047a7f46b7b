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
# Responses here are tens of bytes; anything this big is a misbehaving peer.
MAX_BODY_BYTES = 16 * 1024 * 1024


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

    Checks the status line and reads only the framing fields (Content-Length,
    Transfer-Encoding, Connection), by search rather than line by line: this runs once
    per response in the load generator, where a per-line loop cost ~10 us. Raises
    HttpWireError on a malformed status line or Content-Length, or conflicting lengths.
    """
    line_end = head.find(b"\r\n")
    if line_end < 0:
        line_end = len(head)
    version = head[:8]
    status_text = head[9:12]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or head[8:9] != b" " or line_end < 12:
        raise HttpWireError(f"bad status line {head[: min(line_end, 80)]!r}")
    if not status_text.isdigit():
        raise HttpWireError(f"bad status code {status_text!r}")
    status = int(status_text)
    fields = head[line_end:].lower()  # b"" or b"\r\nname: value\r\n..."
    content_length: int | None = None
    for text in _field_values(fields, b"\r\ncontent-length:"):
        if not text.isdigit():
            raise HttpWireError(f"bad Content-Length {text[:40]!r}")
        length = int(text)
        if content_length is not None and content_length != length:
            raise HttpWireError("conflicting Content-Length headers")
        content_length = length
    chunked = any(v.endswith(b"chunked") for v in _field_values(fields, b"\r\ntransfer-encoding:"))
    close = version == b"HTTP/1.0"
    for value in _field_values(fields, b"\r\nconnection:"):
        tokens = {t.strip() for t in value.split(b",")}
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


def _field_values(fields: bytes, prefix: bytes) -> list[bytes]:
    """Stripped values of every `prefix` (b"\r\n" + lowercase name + b":") in `fields`."""
    out = []
    pos = fields.find(prefix)
    while pos >= 0:
        start = pos + len(prefix)
        end = fields.find(b"\r\n", start)
        if end < 0:
            end = len(fields)
        out.append(fields[start:end].strip())
        pos = fields.find(prefix, end)
    return out


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


def response_end(buf: bytes) -> tuple[ResponseHead, int, int] | None:
    """Frame the first final response in `buf`: (its head, body start, body end), or None
    while `buf` does not hold all of it yet. 1xx interim responses are skipped.

    A read-until-close body (no Content-Length, not chunked) is never complete here: the
    caller decides at EOF. Raises HttpWireError on a malformed or oversized response.
    """
    pos = 0
    while True:
        end = buf.find(HEAD_END, pos)
        if end < 0:
            if len(buf) - pos > MAX_HEAD_BYTES:
                raise HttpWireError("response head too large")
            return None
        head = parse_response_head(buf[pos:end])
        pos = end + 4
        if head.status >= 200:
            break
    length = head.content_length
    if length > MAX_BODY_BYTES or len(buf) - pos > MAX_BODY_BYTES:
        raise HttpWireError("response body too large")
    if length >= 0:
        if len(buf) < pos + length:
            return None
        return head, pos, pos + length
    if length == CHUNKED:
        found = chunked_body_end(buf, pos)
        return None if found is None else (head, pos, found)
    return None
