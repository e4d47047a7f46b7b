from __future__ import annotations

import pytest

from keycache import (
    KeyCacheError,
    KeyFileError,
    KeyRecordError,
    MemoryLockError,
    NoUsableKeyError,
)


@pytest.mark.parametrize(
    ("cls", "code", "status"),
    [
        (KeyRecordError, "invalid_key_record", 400),
        (KeyFileError, "key_file_error", 500),
        (MemoryLockError, "memory_lock_failed", 500),
        (NoUsableKeyError, "no_usable_key", 503),
    ],
)
def test_codes_and_status_hints(cls: type[KeyCacheError], code: str, status: int) -> None:
    err = cls("why")
    assert isinstance(err, KeyCacheError)
    assert err.code == code
    assert err.status == status
    assert str(err) == "why"


def test_codes_are_distinct() -> None:
    classes = [KeyRecordError, KeyFileError, MemoryLockError, NoUsableKeyError]
    assert len({c.code for c in classes}) == len(classes)
