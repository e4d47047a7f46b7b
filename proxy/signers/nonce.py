"""Strictly increasing per-key nonces for venues that demand them (Kraken, Gemini).

A venue such as Kraken refuses any nonce not greater than the last one it accepted for the
key ("EAPI:Invalid nonce"), and it remembers across *our* restarts. A nonce here is a
time-based integer (milliseconds since the epoch, on the clock the signer is given: the
wall clock for Kraken and Gemini, which register no time endpoint) made monotonic
in-process: ``max(now_ms, last + 1)``. That alone is safe across a restart as long as
every nonce issued so far was at most the wall clock, which holds unless we issued more
than one nonce per millisecond (a burst runs ahead of the clock) or the clock stepped back
(NTP, a VM restore).

To cover those two cases a ``NonceSource`` with a state file keeps a *high-water mark* on
disk that is always ahead of every nonce it issued, reserved a block at a time:

- at construction (start-up, off the hot path) it reads the mark and synchronously
  persists ``max(mark, wall clock) + BLOCK`` before issuing anything;
- when an issued nonce passes the middle of the reserved block it reserves the next block
  (``nonce + BLOCK``) and hands the write to a background thread, so no request waits on
  file I/O; the old reservation still covers the next ``BLOCK / 2`` nonces meanwhile;
- only if a nonce would pass the *durable* mark while running ahead of the clock (the
  writer fell ``BLOCK / 2`` behind, which needs a burst of ~30 000 requests in one write)
  is the write done synchronously before that nonce is issued.

After a crash the next process starts above the last durable mark, so it never repeats a
nonce; the cost is that its first nonces run up to ``BLOCK`` ms ahead of the clock, which
Kraken does not mind (it checks order, not time). With ``state_dir`` None the sequence is
kept in memory only (still monotonic for the life of the process).

One process per key: two processes sharing a key (and a state file) would race. Sources
are process-wide per (state file, key id), so a signer rebuilt on rotation or config reload
continues the same sequence.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from proxy.errors import SigningError

# 60 s of millisecond nonces per reserved block: a re-persist every ~30 s of traffic, and
# after a crash the next process starts at most 60 s of nonces ahead of the clock.
BLOCK_MS = 60_000
_MAX_NONCE = (1 << 64) - 1  # Kraken: "unsigned 64-bit integer"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class NonceSource:
    """Issues strictly increasing nonces for one key. ``next`` is thread-safe and O(1).

    ``path`` is the state file (None: in memory only). Raises SigningError at construction
    if the state file exists but is unreadable or corrupt (guessing could repeat a nonce),
    or if the first reservation cannot be written.
    """

    __slots__ = (
        "_durable",
        "_flushing",
        "_io_lock",
        "_last",
        "_lock",
        "_reserved",
        "error",
        "path",
    )

    def __init__(self, path: Path | None, *, wall_ms: int | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._flushing = False
        self.error: OSError | None = None  # the last background write failure, if any
        if path is None:
            self._last = 0
            self._reserved = self._durable = _MAX_NONCE
            return
        mark = _read_mark(path)
        self._last = mark
        self._reserved = max(mark, wall_ms if wall_ms is not None else _now_ms()) + BLOCK_MS
        try:
            _write_mark(path, self._reserved)
        except OSError as exc:
            raise SigningError(f"cannot persist the nonce high-water mark in {path}") from exc
        self._durable = self._reserved

    @property
    def last(self) -> int:
        """The last nonce issued (0 before the first, or the persisted mark at start)."""
        return self._last

    @property
    def durable(self) -> int:
        """The high-water mark known to be on disk."""
        return self._durable

    def next(self, now_ms: int) -> int:
        """The next nonce: ``max(now_ms, last + 1)``. Raises SigningError only if a nonce
        would run ahead of both the clock and the durable mark and the mark cannot be
        written."""
        with self._lock:
            nonce = now_ms if now_ms > self._last else self._last + 1
            if nonce > self._reserved - BLOCK_MS // 2:
                self._reserved = nonce + BLOCK_MS
                if nonce > self._durable and nonce > now_ms:
                    self._flush_now()  # rare: the background writer fell behind a burst
                elif not self._flushing:
                    self._flushing = True
                    threading.Thread(
                        target=self._flush_loop, name="nonce-mark", daemon=True
                    ).start()
            self._last = nonce
            return nonce

    # Lock order: ``_lock`` (the sequence) may be held while taking ``_io_lock`` (the file),
    # never the reverse. Only ``_io_lock`` holders write the file or ``_durable``, so the
    # file never goes back to an older mark and ``_durable`` never claims more than it holds.

    def _flush_now(self) -> None:
        """Write the reservation before returning; called with ``_lock`` held."""
        assert self.path is not None
        with self._io_lock:
            target = self._reserved
            if target <= self._durable:
                return
            try:
                _write_mark(self.path, target)
            except OSError as exc:
                self.error = exc
                raise SigningError(
                    f"cannot persist the nonce high-water mark in {self.path}"
                ) from exc
            self._durable = target

    def _flush_loop(self) -> None:
        """Background writer: persist the newest reservation until none is pending."""
        assert self.path is not None
        while True:
            with self._io_lock:
                target = self._reserved  # an int read: atomic, at worst a little stale
                if target > self._durable:
                    try:
                        _write_mark(self.path, target)
                    except OSError as exc:
                        self.error = exc
                        target = -1
                    else:
                        self._durable = target
                        self.error = None
            with self._lock:
                if target < 0 or self._reserved <= self._durable:
                    self._flushing = False  # ``next`` starts a new writer when needed
                    return

    def wait_durable(self, timeout: float = 5.0) -> bool:
        """Block until no background write is pending (tests, shutdown); True if so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._flushing:
                    return True
            time.sleep(0.001)
        return False


def _read_mark(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise SigningError(f"cannot read the nonce high-water mark {path}") from exc
    value = text.strip()
    if not value.isdigit() or int(value) > _MAX_NONCE:
        raise SigningError(
            f"nonce high-water mark {path} is corrupt; restore it or remove it only if the "
            "key has never been used ahead of the clock"
        )
    return int(value)


def _write_mark(path: Path, value: int) -> None:
    """Replace ``path`` atomically and durably with ``value`` (temp file, fsync, rename)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"%d\n" % value)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_SOURCES: dict[tuple[str | None, str], NonceSource] = {}
_SOURCES_LOCK = threading.Lock()


def state_file(state_dir: Path, venue: str, key_id: str) -> Path:
    """The state file of one key: named by a hash of the key id (any characters are safe)."""
    digest = hashlib.sha256(key_id.encode("utf-8")).hexdigest()[:32]
    return state_dir / f"{venue}-nonce-{digest}"


def nonce_source(venue: str, key_id: str, state_dir: Path | None) -> NonceSource:
    """The process-wide nonce source of ``key_id`` (created, and its file read, once)."""
    path = None if state_dir is None else state_file(state_dir, venue, key_id)
    ident = (None if path is None else str(path.resolve()), f"{venue}\0{key_id}")
    with _SOURCES_LOCK:
        source = _SOURCES.get(ident)
        if source is None:
            source = NonceSource(path)
            _SOURCES[ident] = source
        return source
