"""JSON parsing that leaves no stray copies of string values on the heap.

``json.loads`` decodes a string value that holds escapes (every PEM in a key record: its
line breaks are ``\\n``) with a growing buffer: each time it grows, the old buffer is freed
holding a prefix of the value, and freed memory is not wiped. Measured on the RSA key of
``tests/e2e/test_coredump.py``: one to two stray copies of a PEM line per parse, left in
the heap a core dump includes. :func:`loads` is ``json.loads`` with one difference: each
string value is decoded into one preallocated ``bytearray`` (wiped afterwards) and made
into its ``str`` in a single allocation, so the only copy left is the value itself, which
the caller can wipe (:func:`keycache.securemem.wipe_str`) once the secret is in locked
memory. Object keys (field names) go through json's own decoder: they are not secret.

Slower than the C decoder (pure Python): meant for key records, a few kB each, read on a
rotation or at start, never on the hot path. Pure; errors are ``json.JSONDecodeError``
exactly where ``json.loads`` raises one (whose ``.doc`` holds the whole text: callers must
not let it reach a log or a traceback).
"""

from __future__ import annotations

import json
import json.scanner
import re
from collections.abc import Callable
from typing import Any, Final

from keycache.securemem import wipe_bytearray

__all__ = ["loads"]

_ESCAPES: Final[dict[str, int]] = {
    '"': 0x22,
    "\\": 0x5C,
    "/": 0x2F,
    "b": 0x08,
    "f": 0x0C,
    "n": 0x0A,
    "r": 0x0D,
    "t": 0x09,
}
_CONTROL: Final = re.compile(r"[\x00-\x1f]")
_HEX4: Final = re.compile(r"[0-9A-Fa-f]{4}")
#: UTF-8 takes at most 4 bytes per code point; an escape never decodes to more bytes than
#: its own characters, so 4 bytes per character of the JSON text bounds the output.
_MAX_UTF8: Final = 4


def _error(msg: str, doc: str, pos: int) -> json.JSONDecodeError:
    return json.JSONDecodeError(msg, doc, pos)


def _string_end(s: str, end: int) -> int:
    """Index of the quote that closes the string whose first character is ``s[end]``."""
    i = end
    while True:
        q = s.find('"', i)
        if q < 0:
            raise _error("Unterminated string starting at", s, end - 1)
        k = q - 1
        while k >= end and s[k] == "\\":
            k -= 1
        if (q - 1 - k) % 2 == 0:  # an even number of backslashes: the quote is not escaped
            return q
        i = q + 1


def _put_utf8(out: bytearray, n: int, cp: int) -> int:
    """Write code point ``cp`` as UTF-8 at ``out[n]`` (surrogates as their 3-byte form,
    as ``surrogatepass`` does); return the new length."""
    if cp < 0x80:
        out[n] = cp
        return n + 1
    if cp < 0x800:
        out[n] = 0xC0 | cp >> 6
        out[n + 1] = 0x80 | cp & 0x3F
        return n + 2
    if cp < 0x10000:
        out[n] = 0xE0 | cp >> 12
        out[n + 1] = 0x80 | cp >> 6 & 0x3F
        out[n + 2] = 0x80 | cp & 0x3F
        return n + 3
    out[n] = 0xF0 | cp >> 18
    out[n + 1] = 0x80 | cp >> 12 & 0x3F
    out[n + 2] = 0x80 | cp >> 6 & 0x3F
    out[n + 3] = 0x80 | cp & 0x3F
    return n + 4


def _hex4(s: str, pos: int, q: int) -> int:
    if pos + 4 > q or not _HEX4.fullmatch(s, pos, pos + 4):
        raise _error("Invalid \\uXXXX escape", s, pos - 1)
    value = 0
    for i in range(pos, pos + 4):
        value = value * 16 + int(s[i], 16)
    return value


def scan_string(s: str, end: int, strict: bool = True) -> tuple[str, int]:
    """Decode the JSON string starting after the quote at ``s[end - 1]``; return (value,
    index after the closing quote). The contract of ``json.decoder.scanstring``."""
    q = _string_end(s, end)
    if strict and (bad := _CONTROL.search(s, end, q)) is not None:
        raise _error("Invalid control character at", s, bad.start())
    if s.find("\\", end, q) < 0:
        return s[end:q], q + 1  # no escape: one slice, one allocation
    out = bytearray(_MAX_UTF8 * (q - end))
    n = 0
    try:
        i = end
        while i < q:
            ch = s[i]
            if ch != "\\":
                n = _put_utf8(out, n, ord(ch))
                i += 1
                continue
            esc = s[i + 1]
            if esc != "u":
                if esc not in _ESCAPES:
                    raise _error("Invalid \\escape", s, i)
                out[n] = _ESCAPES[esc]
                n += 1
                i += 2
                continue
            cp = _hex4(s, i + 2, q)
            i += 6
            # A high surrogate followed by an escaped low one is one code point (as json).
            if 0xD800 <= cp <= 0xDBFF and s.startswith("\\u", i) and i + 6 <= q:
                low = _hex4(s, i + 2, q)
                if 0xDC00 <= low <= 0xDFFF:
                    cp = 0x10000 + ((cp - 0xD800) << 10 | (low - 0xDC00))
                    i += 6
            n = _put_utf8(out, n, cp)
        with memoryview(out) as view:
            # ASCII (every secret we accept) decodes into one str of the exact size.
            value = str(view[:n], "utf-8", "surrogatepass")
    finally:
        wipe_bytearray(out)
    return value, q + 1


def loads(
    text: str,
    *,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """``json.loads(text, object_pairs_hook=...)`` whose string values leave no stray
    partial copies on the heap (module docstring). Raises ``json.JSONDecodeError``."""
    decoder = json.JSONDecoder(object_pairs_hook=object_pairs_hook)
    # The pure-Python scanner calls ``parse_string`` for every string value; the C
    # scanner (the default) would ignore it. Both hooks are stable since Python 3.1.
    decoder.parse_string = scan_string  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder.decode(text)
