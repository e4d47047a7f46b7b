"""The one exception tree of :mod:`keycache`.

Grouped by what the caller does about it, each class carries a stable machine ``code`` and
an HTTP ``status`` hint (the h11 ``error_status_hint`` idea), so the proxy can map any
keycache failure to its JSON error body without a lookup table of its own.

Contract for every message: it names the field, path or reason, and never contains secret
bytes (no secret, passphrase, KEK or derived key, not even a prefix or a length hint
beyond what the record's public fields already say).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "KeyCacheError",
    "KeyFileError",
    "KeyRecordError",
    "MemoryLockError",
    "NoUsableKeyError",
]


class KeyCacheError(Exception):
    """Base of every error :mod:`keycache` raises on purpose.

    ``code`` is stable (engines and dashboards match on it); ``status`` is the HTTP status
    the proxy should answer with if the error reaches a request.
    """

    code: ClassVar[str] = "keycache_error"
    status: ClassVar[int] = 500


class KeyRecordError(KeyCacheError):
    """A key record is malformed: a missing, unknown or ill-typed field, or its checksum
    does not match. The caller rejects that record (bad input, not a broken process)."""

    code: ClassVar[str] = "invalid_key_record"
    status: ClassVar[int] = 400


class KeyFileError(KeyCacheError):
    """The key file or the KEK cannot be used: unreadable, undecryptable, malformed, or
    with unsafe permissions. The caller keeps its last good keys and reports the store as
    unhealthy."""

    code: ClassVar[str] = "key_file_error"
    status: ClassVar[int] = 500


class MemoryLockError(KeyCacheError):
    """Locked memory was required (``require_lock=True``) and ``mlock`` failed, usually
    because ``RLIMIT_MEMLOCK`` is too low and the process lacks ``CAP_IPC_LOCK``."""

    code: ClassVar[str] = "memory_lock_failed"
    status: ClassVar[int] = 500


class NoUsableKeyError(KeyCacheError):
    """No key of a service may sign right now: none is both activated and unexpired, or
    the ring was retired. The proxy answers 503 and keeps serving other services."""

    code: ClassVar[str] = "no_usable_key"
    status: ClassVar[int] = 503
