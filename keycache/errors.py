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
    "HealthTransitionError",
    "KeyCacheError",
    "KeyFileError",
    "KeyRecordError",
    "KeyStoreConflict",
    "KeyStoreError",
    "KeyStoreForbidden",
    "KeyStoreNotFound",
    "KeyStoreSealed",
    "KeyStoreUnavailable",
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


class KeyStoreError(KeyCacheError):
    """The key store (Vault/OpenBao) refused or could not answer a request. Base of the
    store errors below; raised as is for a request the store rejected as malformed.

    The watcher keeps serving the keys it holds on every KeyStoreError and reports the
    store as unhealthy; an admin call (``keys rotate``) reports it to its caller. Messages
    name the operation, the service and the reason, never a secret or the Vault token.
    """

    code: ClassVar[str] = "key_store_error"
    status: ClassVar[int] = 502


class KeyStoreUnavailable(KeyStoreError):
    """The store is down, unreachable, timed out, answered 5xx/429 or an unexpected
    redirect, or failed TLS verification. Transient: retry with backoff."""

    code: ClassVar[str] = "key_store_unavailable"
    status: ClassVar[int] = 503


class KeyStoreSealed(KeyStoreUnavailable):
    """The store answered 503 *sealed*: it is up but cannot serve until an operator
    unseals it. Retry with backoff; alert a human."""

    code: ClassVar[str] = "key_store_sealed"
    status: ClassVar[int] = 503


class KeyStoreForbidden(KeyStoreError):
    """The store refused our identity: 401/403 on a data path, a login refused, or no
    usable credential (token file missing). Needs a policy or credential fix; retrying
    faster does not help."""

    code: ClassVar[str] = "key_store_forbidden"
    status: ClassVar[int] = 502


class KeyStoreNotFound(KeyStoreError):
    """The path or version does not exist in the store (never written, deleted or
    destroyed)."""

    code: ClassVar[str] = "key_store_not_found"
    status: ClassVar[int] = 404


class KeyStoreConflict(KeyStoreError):
    """A check-and-set write lost the race: the service's current version is not the one
    the writer based its change on. ``current_version`` is the version the store holds now
    (None if it could not be read back); re-read, decide again, retry with it."""

    code: ClassVar[str] = "key_store_conflict"
    status: ClassVar[int] = 409

    def __init__(self, message: str, current_version: int | None) -> None:
        super().__init__(message)
        self.current_version = current_version


class HealthTransitionError(KeyCacheError):
    """An event the key-store health table has no row for (a bug in the caller, e.g. an
    event after the watcher stopped). Never caused by the store itself."""

    code: ClassVar[str] = "invalid_health_transition"
    status: ClassVar[int] = 500
