"""keycache: API keys in locked memory, their records, rings and stores.

Never imports :mod:`proxy`. Public names are re-exported here; see each module for its
contract (what may run on the event loop and what must run in a thread).

The Vault source is not re-exported: ``from keycache.vault import VaultSource`` imports
hvac (and requests), which a sidecar on the file store never needs to load.
"""

from __future__ import annotations

from keycache.errors import (
    HealthTransitionError,
    KeyCacheError,
    KeyFileError,
    KeyRecordError,
    KeyStoreConflict,
    KeyStoreError,
    KeyStoreForbidden,
    KeyStoreNotFound,
    KeyStoreSealed,
    KeyStoreUnavailable,
    MemoryLockError,
    NoUsableKeyError,
)
from keycache.filestore import KeyFile, KeyFileData, derive_kek, load_kek_file
from keycache.health import HealthEvent, HealthMachine, HealthSnapshot, HealthState
from keycache.record import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    HMAC_ALGORITHMS,
    PEM_ALGORITHMS,
    Algorithm,
    KeyMeta,
    compute_checksum,
    format_timestamp,
    make_record,
    new_key_id,
    parse_record,
)
from keycache.ring import (
    KeyRing,
    LiveKey,
    build_ring,
    live_versions,
    next_liveness_change,
    previous_stays_live,
)
from keycache.securemem import SecureBuffer, make_process_non_dumpable, wipe_bytearray
from keycache.vaultauth import AuthStatus, AuthTiming, VaultAuthSettings
from keycache.watcher import (
    KeySource,
    KeyWatcher,
    SecretMetadata,
    ServiceStatus,
    VersionInfo,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "HMAC_ALGORITHMS",
    "PEM_ALGORITHMS",
    "Algorithm",
    "AuthStatus",
    "AuthTiming",
    "HealthEvent",
    "HealthMachine",
    "HealthSnapshot",
    "HealthState",
    "HealthTransitionError",
    "KeyCacheError",
    "KeyFile",
    "KeyFileData",
    "KeyFileError",
    "KeyMeta",
    "KeyRecordError",
    "KeyRing",
    "KeySource",
    "KeyStoreConflict",
    "KeyStoreError",
    "KeyStoreForbidden",
    "KeyStoreNotFound",
    "KeyStoreSealed",
    "KeyStoreUnavailable",
    "KeyWatcher",
    "LiveKey",
    "MemoryLockError",
    "NoUsableKeyError",
    "SecretMetadata",
    "SecureBuffer",
    "ServiceStatus",
    "VaultAuthSettings",
    "VersionInfo",
    "build_ring",
    "compute_checksum",
    "derive_kek",
    "format_timestamp",
    "live_versions",
    "load_kek_file",
    "make_process_non_dumpable",
    "make_record",
    "new_key_id",
    "next_liveness_change",
    "parse_record",
    "previous_stays_live",
    "wipe_bytearray",
]
