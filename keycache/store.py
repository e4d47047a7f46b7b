"""One small interface over the two key stores, for the key lifecycle commands.

:class:`FileStore` adapts :class:`~keycache.filestore.KeyFile`, :class:`VaultStore` adapts
:class:`~keycache.vault.VaultSource`. Both give the same check-and-set semantics: a write
names the version it was based on and loses (KeyStoreConflict carrying the winner's
version) if the service has moved on. The file gets them from an exclusive ``flock`` on
``<key file>.lock`` held across read-check-write; Vault from KV v2 ``cas``.

Revocation list: file - the ``revoked`` list inside the encrypted file; Vault - the KV
secret ``<mount>/data/<prefix>/_revoked`` whose data is ``{"key_ids": [...]}`` (written with
check-and-set too). A revoked key id is refused by :meth:`KeyStore.write`.

Everything here blocks (file I/O, scrypt, HTTP): never call it on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from keycache.errors import KeyRecordError, KeyStoreConflict, KeyStoreNotFound
from keycache.filestore import KeyFile
from keycache.record import KeyMeta, parse_record, scrub_record

if TYPE_CHECKING:  # hvac and requests load only where Vault is used (resident memory)
    from keycache.vault import VaultSource

__all__ = ["FileStore", "KeyStore", "StoredVersion", "VaultStore"]

#: (version, public metadata) of one live version.
StoredVersion = tuple[int, KeyMeta]


class KeyStore(Protocol):
    """What the lifecycle commands need from a store. All methods block."""

    def live_versions(self, service: str) -> list[StoredVersion]:
        """Live (readable) versions of ``service``, ascending; [] if none. Records that
        fail validation raise KeyRecordError naming the version."""
        ...

    def current_version(self, service: str) -> int:
        """The service's newest version number (0 if it has none)."""
        ...

    def read_record(self, service: str, version: int) -> dict[str, object]:
        """One version's record, secret included: the caller clears it after use."""
        ...

    def write(self, service: str, record: dict[str, object], expected: int) -> int:
        """Write ``record`` as the next version if the current version is ``expected``
        (KeyStoreConflict otherwise); refuse a revoked key id (KeyRecordError). Returns
        the new version."""
        ...

    def remove(self, service: str, version: int) -> None:
        """Remove one version for good (file: drop it; Vault: delete and destroy)."""
        ...

    def revoked(self) -> frozenset[str]:
        """The revocation list."""
        ...

    def add_revoked(self, key_id: str) -> None:
        """Add ``key_id`` to the revocation list (idempotent)."""
        ...

    def close(self) -> None:
        """Release the store's resources (wipes the file KEK)."""
        ...


class FileStore:
    """The encrypted key file with an exclusive lock file beside it."""

    def __init__(self, keyfile: KeyFile) -> None:
        self._file = keyfile
        self._lock_path = keyfile.path.with_name(keyfile.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _entries(self, service: str) -> list[tuple[int, dict[str, object]]]:
        if not self._file.exists():
            return []
        return self._file.load().get(service, [])

    def live_versions(self, service: str) -> list[StoredVersion]:
        out: list[StoredVersion] = []
        for version, record in self._entries(service):
            try:
                meta, _, _ = parse_record(record)
            except KeyRecordError as exc:
                raise KeyRecordError(f"{service} version {version}: {exc}") from None
            out.append((version, meta))
        return out

    def current_version(self, service: str) -> int:
        entries = self._entries(service)
        return entries[-1][0] if entries else 0

    def read_record(self, service: str, version: int) -> dict[str, object]:
        for v, record in self._entries(service):
            if v == version:
                return dict(record)
        raise KeyStoreNotFound(f"{service} version {version}: not in the key file")

    def write(self, service: str, record: dict[str, object], expected: int) -> int:
        with self._locked():
            current = self.current_version(service)
            if current != expected:
                raise KeyStoreConflict(
                    f"{service}: check-and-set failed: expected version {expected}, "
                    f"store holds {current}",
                    current,
                )
            return self._file.add_version(service, record)

    def remove(self, service: str, version: int) -> None:
        with self._locked():
            self._file.remove_versions(service, [version])

    def revoked(self) -> frozenset[str]:
        return frozenset(self._file.load_revoked())

    def add_revoked(self, key_id: str) -> None:
        with self._locked():
            current = self._file.load_revoked()
            if key_id not in current:
                self._file.save_revoked([*current, key_id])

    def close(self) -> None:
        self._file.close()


class VaultStore:
    """Vault/OpenBao KV v2 through :class:`~keycache.vault.VaultSource`."""

    #: Retries of the revocation-list check-and-set when two revokers race.
    REVOKED_CAS_RETRIES = 5

    def __init__(self, source: VaultSource) -> None:
        self._source = source

    def live_versions(self, service: str) -> list[StoredVersion]:
        try:
            meta = self._source.read_metadata(service)
        except KeyStoreNotFound:
            return []
        out: list[StoredVersion] = []
        now = datetime.now(UTC)
        for info in meta.versions:
            if not info.present(now):
                continue
            record = self._source.read_version(service, info.version)
            try:
                parsed, _, _ = parse_record(record)
            except KeyRecordError as exc:
                raise KeyRecordError(f"{service} version {info.version}: {exc}") from None
            finally:
                scrub_record(record)
            out.append((info.version, parsed))
        return out

    def current_version(self, service: str) -> int:
        try:
            return self._source.read_metadata(service).current_version
        except KeyStoreNotFound:
            return 0

    def read_record(self, service: str, version: int) -> dict[str, object]:
        return self._source.read_version(service, version)

    def write(self, service: str, record: dict[str, object], expected: int) -> int:
        meta, _, _ = parse_record(record)
        if meta.key_id in self.revoked():
            raise KeyRecordError(f"key_id: {meta.key_id} is revoked and cannot be used again")
        return self._source.write_version(service, record, cas=expected)

    def remove(self, service: str, version: int) -> None:
        self._source.delete_version(service, version)
        self._source.destroy_version(service, version)

    def revoked(self) -> frozenset[str]:
        ids, _ = self._source.read_revoked()
        return frozenset(ids)

    def add_revoked(self, key_id: str) -> None:
        for _ in range(self.REVOKED_CAS_RETRIES):
            ids, version = self._source.read_revoked()
            if key_id in ids:
                return
            try:
                self._source.write_revoked([*ids, key_id], cas=version)
                return
            except KeyStoreConflict:
                continue
        raise KeyStoreConflict("revocation list: too many concurrent writers", None)

    def close(self) -> None:
        self._source.close()
