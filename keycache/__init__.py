"""keycache: API keys in locked memory, their records, rings and stores.

Never imports :mod:`proxy`. Public names are re-exported here; see each module for its
contract (what may run on the event loop and what must run in a thread).
"""

from __future__ import annotations

from keycache.errors import (
    KeyCacheError,
    KeyFileError,
    KeyRecordError,
    MemoryLockError,
    NoUsableKeyError,
)
from keycache.filestore import KeyFile, KeyFileData, derive_kek, load_kek_file
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
from keycache.ring import KeyRing, LiveKey, build_ring, live_versions, next_liveness_change
from keycache.securemem import SecureBuffer, make_process_non_dumpable, wipe_bytearray

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "HMAC_ALGORITHMS",
    "PEM_ALGORITHMS",
    "Algorithm",
    "KeyCacheError",
    "KeyFile",
    "KeyFileData",
    "KeyFileError",
    "KeyMeta",
    "KeyRecordError",
    "KeyRing",
    "LiveKey",
    "MemoryLockError",
    "NoUsableKeyError",
    "SecureBuffer",
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
    "wipe_bytearray",
]
