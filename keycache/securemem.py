"""Locked, dump-excluded memory for secret bytes.

One :class:`SecureBuffer` is one anonymous private ``mmap`` region, ``mlock``-ed (so the
kernel never writes it to swap) and advised ``MADV_DONTDUMP`` (so a core dump leaves it
out). Secrets are copied in once and handed out as *read-only* memoryviews; ``wipe()``
zeroes the region, unlocks it, releases every view it handed out and unmaps it.

Limits of what Python allows, stated once: immutable ``bytes`` cannot be wiped, and a
``str`` only by :func:`wipe_str` (CPython's layout, checked at import, and only a string
the caller solely owns); this module guarantees that the copy that lives for the lifetime
of a key is locked, excluded from dumps and zeroed on retirement. ``store_text`` and
``store_base64`` fill the buffer without the usual temporary ``bytes`` copy (ASCII text;
base64 such as a PEM body decoded straight into the buffer). What is left elsewhere is
measured by ``tests/e2e/test_coredump.py`` (see THREAT_MODEL.md).

Not thread-safe: the owner (a key ring) fills the buffer before publishing it and wipes it
after it can no longer be reached by readers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
import sys
from typing import Final

from keycache.errors import MemoryLockError

__all__ = [
    "PAGE_SIZE",
    "SecureBuffer",
    "disable_core_dumps",
    "lock_all_memory",
    "make_process_non_dumpable",
    "utf8_len",
    "wipe_bytearray",
    "wipe_str",
]

#: mlock/munlock work on whole pages; the region is sized in pages so no other data shares
#: a locked page and so ``size`` matches what ``/proc/<pid>/maps`` shows.
PAGE_SIZE: Final[int] = mmap.PAGESIZE


#: Standard base64 (RFC 4648 section 4): the value of each byte, 0xFF where it is not a
#: base64 digit; decoding by table needs no temporary copy of the secret.
_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64: Final = 0xFF
_B64_VALUES: Final = bytes(
    _B64_ALPHABET.index(c) if c in _B64_ALPHABET else _NOT_B64 for c in range(256)
)
_PAD: Final = ord("=")
_WHITESPACE: Final = frozenset(b" \t\r\n\v\f")


def _load_libc() -> ctypes.CDLL | None:
    """Return libc with errno capture, or None where it cannot be loaded (then memory
    works unlocked, exactly as if ``mlock`` had failed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        for name in ("mlock", "munlock"):
            fn = getattr(libc, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int
        if hasattr(libc, "prctl"):
            libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
            libc.prctl.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()

#: <linux/prctl.h>: PR_SET_DUMPABLE takes 0 (no core dumps, no ptrace attach by non-root,
#: /proc/<pid>/mem and friends owned by root).
PR_SET_DUMPABLE: Final = 4


def make_process_non_dumpable() -> bool:
    """Mark the whole process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): no core dump is
    written and other non-root processes of the same user cannot ptrace it or read its
    memory. Return True on success, False where unsupported (the caller logs that).

    Call once at start-up, before secrets are loaded; it is inherited across fork and
    reset by exec. Not called on import: tests and tools decide for themselves.
    """
    if _LIBC is None:
        return False
    try:
        return int(_LIBC.prctl(PR_SET_DUMPABLE, 0)) == 0
    except AttributeError:
        return False


def disable_core_dumps() -> bool:
    """Set the core-file size limit (soft and hard) to 0, so that even a process made
    dumpable again (exec, a debugger run as root) writes no core. Return True on success."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        return False
    return True


#: <sys/mman.h>: lock every page mapped now and every page mapped later.
MCL_CURRENT: Final = 1
MCL_FUTURE: Final = 2


def lock_all_memory() -> bool:
    """``mlockall(MCL_CURRENT | MCL_FUTURE)``: no page of the process may be swapped out,
    so no copy of a secret Python or OpenSSL leaves on the heap reaches swap. Return True on
    success, False when refused (RLIMIT_MEMLOCK, no CAP_IPC_LOCK) or unsupported; the
    caller decides whether that is fatal. Call once at start-up, before secrets load."""
    if _LIBC is None or not hasattr(_LIBC, "mlockall"):
        return False
    return int(_LIBC.mlockall(MCL_CURRENT | MCL_FUTURE)) == 0


def wipe_bytearray(b: bytearray) -> None:
    """Overwrite ``b`` with zeros in place (same length, no reallocation).

    Use it on every temporary mutable copy of a secret once it is no longer needed.
    """
    n = len(b)
    if n:
        # Equal-length slice assignment is an in-place memcpy; the buffer is not moved.
        b[:] = bytes(n)


def utf8_len(text: str) -> int:
    """Return the length of ``text`` encoded as UTF-8, without encoding ASCII text (which
    would leave an unwipeable ``bytes`` copy of a secret on the heap)."""
    if text.isascii():
        return len(text)
    tmp = bytearray(text, "utf-8")
    n = len(tmp)
    wipe_bytearray(tmp)
    return n


def _header_sizes() -> tuple[int, int] | None:
    """Offsets of the character data in CPython's compact strings: (ASCII, other).
    None if this interpreter's layout is not the one we can check (then nothing is
    wiped)."""
    if sys.implementation.name != "cpython":
        return None
    ascii_header = sys.getsizeof("ab") - 3  # two characters plus the NUL terminator
    other_header = sys.getsizeof("\xe9\xe9") - 3  # same, one byte per character (latin-1)
    # Fresh, non-interned probes: their bytes must sit where we think.
    probe = "".join(["w", "i", "p", "e"])
    wide = "".join(["\u0101", "b"])  # two bytes per character
    if ctypes.string_at(id(probe) + ascii_header, 4) != b"wipe":
        return None
    if ctypes.string_at(id(wide) + other_header, 4) != wide.encode("utf-16-le"):
        return None
    return ascii_header, other_header


_HEADERS: Final = _header_sizes()
#: Strings of 0 or 1 characters are shared singletons in CPython: never touch them.
_MIN_WIPE_LEN: Final = 2


def wipe_str(text: str) -> bool:
    """Overwrite the characters of ``text`` with NULs in place; return True if done.

    Only for a ``str`` the caller created and solely owns (a value json just decoded
    from a Vault response): every holder of the object sees the zeros. Done only for
    CPython's compact strings of 2+ characters (the layout is checked at import, and the
    object's size must match it exactly); anything else is left alone and False
    returned. The cached hash, if any, goes stale: such a string must only be dropped.
    """
    if _HEADERS is None or type(text) is not str:
        return False
    n = len(text)
    if n < _MIN_WIPE_LEN:
        return False
    size = sys.getsizeof(text)
    ascii_header, other_header = _HEADERS
    layouts = ((ascii_header, 1),) if text.isascii() else ((other_header, k) for k in (1, 2, 4))
    for header, kind in layouts:
        if size == header + (n + 1) * kind:
            ctypes.memset(id(text) + header, 0, n * kind)
            return True
    return False  # not a compact string (a subclass, or a cached UTF-8 copy attached)


class SecureBuffer:
    """One locked, dump-excluded memory region that hands out read-only views.

    ``SecureBuffer(size, require_lock=False)`` maps at least ``size`` bytes (rounded up to
    whole pages). If ``mlock`` fails (``RLIMIT_MEMLOCK``, no ``CAP_IPC_LOCK``):
    ``require_lock=True`` raises :class:`MemoryLockError`; otherwise the buffer works
    unlocked and ``locked`` is False (the caller logs that; keycache does not log).
    ``dump_excluded`` says whether ``MADV_DONTDUMP`` took effect.

    Views returned by :meth:`store` are valid until :meth:`wipe`, which releases them; a
    view that the holder sliced further (``view[a:b]``) keeps the mapping alive, but the
    bytes it shows are zero after ``wipe``.

    Not for use on multiple threads at once; none of the methods block.
    """

    __slots__ = (
        "_address",
        "_closed",
        "_dump_excluded",
        "_locked",
        "_mm",
        "_size",
        "_unreleased",
        "_used",
        "_views",
        "_wiped",
    )

    def __init__(self, size: int, *, require_lock: bool = False) -> None:
        if size <= 0:
            raise ValueError(f"SecureBuffer size must be positive, got {size}")
        rounded = -(-size // PAGE_SIZE) * PAGE_SIZE
        # Private + anonymous: no file backs it, and a fork() does not share it writable.
        mm = mmap.mmap(
            -1,
            rounded,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        anchor = ctypes.c_char.from_buffer(mm)
        address = ctypes.addressof(anchor)
        # The ctypes object holds a buffer export on the mmap; drop it at once or close()
        # would later fail with "exported pointers exist".
        del anchor

        self._mm = mm
        self._address = address
        self._size = rounded
        self._used = 0
        self._views: list[memoryview] = []
        self._wiped = False
        self._closed = False
        self._unreleased = 0
        self._dump_excluded = self._advise_dontdump()
        self._locked = self._mlock()
        if require_lock and not self._locked:
            err = ctypes.get_errno()
            reason = os.strerror(err) if err else "mlock unavailable"
            self._mm.close()
            self._closed = True
            self._wiped = True
            raise MemoryLockError(
                f"mlock of {rounded} bytes failed: {reason}; raise RLIMIT_MEMLOCK "
                "(ulimit -l) or grant CAP_IPC_LOCK"
            )

    def _advise_dontdump(self) -> bool:
        advice = getattr(mmap, "MADV_DONTDUMP", None)
        if advice is None:
            return False
        try:
            self._mm.madvise(advice)
        except OSError:
            return False
        return True

    def _mlock(self) -> bool:
        if _LIBC is None:
            return False
        ctypes.set_errno(0)
        return int(_LIBC.mlock(self._address, self._size)) == 0

    @property
    def address(self) -> int:
        """Start address of the region (as in ``/proc/<pid>/maps``)."""
        return self._address

    @property
    def size(self) -> int:
        """Size of the region in bytes, a whole number of pages."""
        return self._size

    @property
    def used(self) -> int:
        """Bytes already handed out by :meth:`store`."""
        return self._used

    @property
    def locked(self) -> bool:
        """True while the region is ``mlock``-ed (False after :meth:`wipe`)."""
        return self._locked

    @property
    def dump_excluded(self) -> bool:
        """True if ``MADV_DONTDUMP`` was applied to the region."""
        return self._dump_excluded

    @property
    def wiped(self) -> bool:
        """True once :meth:`wipe` ran; the views handed out are then released."""
        return self._wiped

    @property
    def unreleased_views(self) -> int:
        """How many handed-out views :meth:`wipe` could not release (each was re-exported
        by its holder); their bytes read as zero."""
        return self._unreleased

    def _reserve(self, n: int) -> int:
        if self._wiped:
            raise ValueError("SecureBuffer is wiped")
        if n > self._size - self._used:
            raise ValueError(
                f"SecureBuffer full: {n} bytes requested, {self._size - self._used} free"
            )
        off = self._used
        self._used += n
        return off

    def _view(self, off: int, n: int) -> memoryview:
        with memoryview(self._mm) as whole:
            view = whole[off : off + n].toreadonly()
        self._views.append(view)
        return view

    def store(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Copy ``data`` into the next free bytes; return a read-only view of exactly them.

        Raises ValueError if the buffer is full or wiped (a sizing bug in the caller).
        """
        with memoryview(data) as src:
            n = src.nbytes
            off = self._reserve(n)
            if n:
                self._mm[off : off + n] = src
        return self._view(off, n)

    def store_text(self, text: str) -> memoryview:
        """Copy ``text`` encoded as UTF-8 into the buffer; return a read-only view of it.

        ASCII text (every HMAC secret and PEM we accept) is copied code point by code point,
        so no temporary ``bytes`` copy of the secret is created; other text goes through a
        bytearray that is wiped afterwards. Raises ValueError if full or wiped.
        """
        if not text.isascii():
            tmp = bytearray(text, "utf-8")
            try:
                return self.store(tmp)
            finally:
                wipe_bytearray(tmp)
        n = len(text)
        off = self._reserve(n)
        mm = self._mm
        for i, ch in enumerate(text, start=off):
            mm[i] = ord(ch)
        return self._view(off, n)

    def store_base64(self, src: bytes | bytearray | memoryview) -> memoryview:
        """Decode standard base64 text ``src`` (ASCII whitespace anywhere is skipped, as in
        a PEM body) straight into the buffer; return a read-only view of the decoded bytes.

        Decoded byte by byte: ``base64.b64decode`` would return the decoded secret as an
        immutable ``bytes`` copy that could never be wiped. Raises ValueError, naming no
        byte of the input, if it is not canonical base64, or if the buffer is full or wiped.
        """
        with memoryview(src) as text:
            digits = 0
            pad = 0
            for c in text:
                if c in _WHITESPACE:
                    continue
                if c == _PAD:
                    pad += 1
                    continue
                if pad or _B64_VALUES[c] == _NOT_B64:
                    raise ValueError("not base64 (bad character or padding)")
                digits += 1
            if (digits + pad) % 4 or pad > 2 or (digits + pad == 0):
                raise ValueError("not base64 (length is not a multiple of 4)")
            n = (digits + pad) // 4 * 3 - pad
            off = self._reserve(n)
            mm = self._mm
            acc = bits = 0
            pos = off
            for c in text:
                if c in _WHITESPACE or c == _PAD:
                    continue
                acc = (acc << 6 | _B64_VALUES[c]) & 0xFFFFFF
                bits += 6
                if bits >= 8:
                    bits -= 8
                    mm[pos] = (acc >> bits) & 0xFF
                    pos += 1
            if acc & ((1 << bits) - 1):
                # Non-canonical: the padding's unused bits must be zero.
                ctypes.memset(self._address + off, 0, n)
                raise ValueError("not base64 (non-zero padding bits)")
        return self._view(off, n)

    def wipe(self) -> None:
        """Zero the whole region, ``munlock`` it, release every view handed out and unmap
        it. Idempotent; never raises.

        If a holder re-exported a view (sliced it, or handed it to an object that keeps the
        buffer), that view cannot be released and the mapping stays until it is garbage
        collected; it is already zeroed and unlocked, so it holds nothing secret.
        """
        if self._wiped:
            self._try_close()
            return
        self._wiped = True
        # memset through the raw address: the mapping is still valid (not yet closed) and
        # this writes in place, with no temporary zero buffer of the region's size.
        ctypes.memset(self._address, 0, self._size)
        if self._locked and _LIBC is not None:
            _LIBC.munlock(self._address, self._size)
        self._locked = False
        for view in self._views:
            try:
                view.release()
            except BufferError:
                self._unreleased += 1
        self._views.clear()
        self._try_close()

    def _try_close(self) -> None:
        if self._closed:
            return
        try:
            self._mm.close()
        except BufferError:
            # Live sub-views still reference the mapping; it is zeroed, so leaving it to
            # the garbage collector is safe.
            return
        self._closed = True

    def __repr__(self) -> str:
        return (
            f"SecureBuffer(size={self._size}, used={self._used}, locked={self._locked}, "
            f"wiped={self._wiped})"
        )
