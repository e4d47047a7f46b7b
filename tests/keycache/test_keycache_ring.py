from __future__ import annotations

import secrets
from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keycache import (
    KeyMeta,
    KeyRecordError,
    NoUsableKeyError,
    build_ring,
    live_versions,
    parse_record,
)
from keycache.ring import next_liveness_change
from tests.keycache.helpers import T0, hmac_record

H = timedelta(hours=1)
D = timedelta(days=1)
OVERLAP = timedelta(hours=24)


def meta(
    created: datetime, expires: datetime | None = None, activates: datetime | None = None
) -> KeyMeta:
    record = hmac_record(created_at=created, expires_at=expires, activates_at=activates)
    return parse_record(record)[0]


# -- live_versions (pure) -----------------------------------------------------------------


def test_no_versions_none_live() -> None:
    assert live_versions([], T0, OVERLAP) == []


def test_single_version_is_live() -> None:
    assert live_versions([(1, meta(T0))], T0 + 60 * D, OVERLAP) == [1]


def test_previous_version_live_only_during_overlap() -> None:
    versions = [(2, meta(T0 + 30 * D)), (1, meta(T0))]  # any order
    assert live_versions(versions, T0 + 30 * D, OVERLAP) == [1, 2]
    assert live_versions(versions, T0 + 31 * D - timedelta(seconds=1), OVERLAP) == [1, 2]
    assert live_versions(versions, T0 + 31 * D, OVERLAP) == [2]


def test_older_versions_are_never_live() -> None:
    versions = [(1, meta(T0)), (2, meta(T0 + D)), (3, meta(T0 + 2 * D))]
    assert live_versions(versions, T0 + 2 * D + H, timedelta(days=30)) == [2, 3]


def test_previous_stays_while_newest_is_not_active_yet() -> None:
    # The window has closed, but the newest only activates later: dropping the previous
    # key would leave the service with no key at all.
    versions = [(1, meta(T0)), (2, meta(T0 + 30 * D, activates=T0 + 40 * D))]
    assert live_versions(versions, T0 + 35 * D, OVERLAP) == [1, 2]
    assert live_versions(versions, T0 + 40 * D, OVERLAP) == [2]


def test_zero_overlap_drops_previous_at_once() -> None:
    versions = [(1, meta(T0)), (2, meta(T0 + D))]
    assert live_versions(versions, T0 + D, timedelta(0)) == [2]


def test_duplicate_versions_and_negative_overlap_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        live_versions([(1, meta(T0)), (1, meta(T0 + D))], T0, OVERLAP)
    with pytest.raises(ValueError, match="overlap"):
        live_versions([(1, meta(T0))], T0, -H)


_METAS = [meta(T0 + i * 6 * H, T0 + i * 6 * H + 10 * D) for i in range(8)] + [
    meta(T0 + i * 6 * H, T0 + i * 6 * H + 10 * D, T0 + i * 6 * H + 30 * H) for i in range(8)
]


@given(
    entries=st.lists(
        st.tuples(st.integers(1, 10_000), st.sampled_from(_METAS)),
        min_size=1,
        max_size=12,
        unique_by=lambda e: e[0],
    ),
    now_offset_hours=st.integers(-48, 24 * 20),
    overlap_hours=st.integers(0, 72),
)
def test_live_versions_property(
    entries: list[tuple[int, KeyMeta]], now_offset_hours: int, overlap_hours: int
) -> None:
    now = T0 + timedelta(hours=now_offset_hours)
    live = live_versions(entries, now, timedelta(hours=overlap_hours))
    versions = sorted(v for v, _ in entries)
    assert versions[-1] in live  # the newest version is always live
    assert 1 <= len(live) <= 2  # never more than two
    assert live == sorted(live)
    assert live == versions[-len(live) :]  # the newest, or the newest two


# -- rings --------------------------------------------------------------------------------


def _rotation() -> tuple[list[tuple[int, dict[str, object]]], str, str, str]:
    """v1 made at T0; v2 made 30 days later, activating two hours after creation."""
    s1, s2, p2 = secrets.token_urlsafe(32), secrets.token_urlsafe(32), "okx-" + secrets.token_hex(4)
    r1 = hmac_record(secret_key=s1, created_at=T0)
    r2 = hmac_record(
        secret_key=s2, created_at=T0 + 30 * D, activates_at=T0 + 30 * D + 2 * H, passphrase=p2
    )
    return [(1, r1), (2, r2)], s1, s2, p2


def test_signing_key_follows_activation_and_overlap() -> None:
    versions, s1, s2, p2 = _rotation()

    # v2 exists but is not active yet: v1 signs, and there is no other key to fall back to.
    now = T0 + 30 * D + H
    ring = build_ring("svc", versions, now=now, overlap=OVERLAP)
    assert [k.version for k in ring.keys] == [1, 2]
    key = ring.signing_key(now)
    assert key.version == 1
    assert key.secret.tobytes() == s1.encode()
    assert key.passphrase is None
    assert ring.fallback_key(key, now) is None

    # v2 active, window open: v2 signs, v1 is the fallback (and vice versa).
    now = T0 + 30 * D + 3 * H
    key = ring.signing_key(now)
    assert key.version == 2
    assert key.secret.tobytes() == s2.encode()
    assert key.passphrase is not None and key.passphrase.tobytes() == p2.encode()
    fallback = ring.fallback_key(key, now)
    assert fallback is not None and fallback.version == 1
    other = ring.fallback_key(fallback, now)
    assert other is not None and other.version == 2
    assert ring.rebuild_at == T0 + 31 * D
    ring.retire()

    # Window closed: a ring built now holds only v2.
    now = T0 + 31 * D + H
    ring = build_ring("svc", versions, now=now, overlap=OVERLAP)
    assert [k.version for k in ring.keys] == [2]
    assert ring.signing_key(now).version == 2
    assert ring.fallback_key(ring.keys[0], now) is None
    assert ring.rebuild_at is None
    ring.retire()


def test_expiry_leaves_no_usable_key() -> None:
    record = hmac_record(created_at=T0, expires_at=T0 + D)
    ring = build_ring("svc", [(1, record)], now=T0, overlap=OVERLAP)
    assert ring.signing_key(T0 + D - timedelta(seconds=1)).version == 1
    with pytest.raises(NoUsableKeyError, match="expired") as info:
        ring.signing_key(T0 + D)
    assert info.value.status == 503
    ring.retire()


def test_not_yet_active_leaves_no_usable_key() -> None:
    record = hmac_record(created_at=T0, activates_at=T0 + H)
    ring = build_ring("svc", [(1, record)], now=T0, overlap=OVERLAP)
    with pytest.raises(NoUsableKeyError, match="no live key is activated yet"):
        ring.signing_key(T0)
    assert ring.signing_key(T0 + H).version == 1
    ring.retire()


def test_fallback_skips_an_expired_previous_key() -> None:
    r1 = hmac_record(created_at=T0, expires_at=T0 + 30 * D + H)
    r2 = hmac_record(created_at=T0 + 30 * D)
    now = T0 + 30 * D + 2 * H  # inside the window, but v1 has expired
    ring = build_ring("svc", [(1, r1), (2, r2)], now=now, overlap=OVERLAP)
    key = ring.signing_key(now)
    assert key.version == 2
    assert ring.fallback_key(key, now) is None
    ring.retire()


def test_only_live_secrets_are_copied() -> None:
    secrets_by_version = {v: secrets.token_urlsafe(20 + v) for v in (1, 2, 3)}
    versions = [
        (v, hmac_record(secret_key=s, created_at=T0 + v * D)) for v, s in secrets_by_version.items()
    ]
    now = T0 + 3 * D + H
    ring = build_ring("svc", versions, now=now, overlap=OVERLAP)
    assert [k.version for k in ring.keys] == [2, 3]
    assert ring.buffer.used == len(secrets_by_version[2]) + len(secrets_by_version[3])
    assert ring.key_ids() == tuple(str(r["key_id"]) for _, r in versions[1:])
    ring.retire()


def test_pem_secret_is_copied_verbatim(pems: dict[str, str]) -> None:
    record = hmac_record(secret_key=pems["ed25519"], algorithm="ed25519")
    ring = build_ring("svc", [(1, record)], now=T0, overlap=OVERLAP)
    assert ring.signing_key(T0).secret.tobytes() == pems["ed25519"].encode()
    ring.retire()


def test_repr_hides_secrets() -> None:
    versions, s1, s2, p2 = _rotation()
    ring = build_ring("svc", versions, now=T0 + 30 * D + 3 * H, overlap=OVERLAP)
    for text in (repr(ring), repr(ring.keys[0]), repr(ring.keys[1]), str(ring.keys[1])):
        assert s1 not in text
        assert s2 not in text
        assert p2 not in text
    assert "secret" not in repr(ring.keys[1])
    assert ring.keys[1].key_id in repr(ring.keys[1])  # the public id is shown
    ring.retire()


def test_retire_wipes_and_refuses_to_sign() -> None:
    versions, *_ = _rotation()
    now = T0 + 30 * D + 3 * H
    ring = build_ring("svc", versions, now=now, overlap=OVERLAP)
    key = ring.signing_key(now)
    ring.retire()
    ring.retire()  # idempotent
    assert ring.buffer.wiped
    with pytest.raises(ValueError, match="released"):
        key.secret.tobytes()
    with pytest.raises(NoUsableKeyError, match="retired"):
        ring.signing_key(now)
    assert ring.fallback_key(key, now) is None


def test_invalid_record_names_service_version_and_field() -> None:
    secret = secrets.token_urlsafe(32)
    good = hmac_record(created_at=T0 + D)
    bad = hmac_record(secret_key=secret, created_at=T0)
    bad["permissions"] = ["trade", "withdraw"]  # checksum no longer matches
    # The bad record is an old, non-live version: every record is still validated.
    with pytest.raises(KeyRecordError, match=r"^svc version 1: checksum: ") as info:
        build_ring("svc", [(1, bad), (2, good)], now=T0 + 5 * D, overlap=OVERLAP)
    assert secret not in str(info.value)


def test_duplicate_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate key version 1"):
        build_ring("svc", [(1, hmac_record()), (1, hmac_record())], now=T0, overlap=OVERLAP)


def test_empty_ring_has_no_usable_key() -> None:
    ring = build_ring("svc", [], now=T0, overlap=OVERLAP)
    assert ring.keys == ()
    with pytest.raises(NoUsableKeyError, match="no key versions"):
        ring.signing_key(T0)
    ring.retire()


def test_next_liveness_change() -> None:
    v1, v2 = meta(T0), meta(T0 + D, activates=T0 + D + 30 * H)
    # Window closes at T0 + 2 days, but v2 only activates later: that is when v1 goes.
    assert next_liveness_change([(1, v1), (2, v2)], T0 + D, OVERLAP) == T0 + D + 30 * H
    assert next_liveness_change([(1, v1)], T0, OVERLAP) is None
    assert next_liveness_change([(1, v1), (2, meta(T0 + D))], T0 + 3 * D, OVERLAP) is None


def test_pem_keys_carry_their_der_in_the_same_locked_buffer(pems: dict[str, str]) -> None:
    from cryptography.hazmat.primitives import serialization

    record = hmac_record(secret_key=pems["rsa"], algorithm="rsa-pkcs1-sha256")
    ring = build_ring("svc", [(1, record)], now=T0, overlap=OVERLAP)
    key = ring.signing_key(T0)
    private = serialization.load_pem_private_key(pems["rsa"].encode(), password=None)
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert key.der is not None and key.der.readonly and key.der.tobytes() == der
    # Carried into the next ring (a rotation or revocation), the DER comes along.
    carried = build_ring("svc", [], now=T0, overlap=OVERLAP, carried=[key])
    assert carried.keys[0].der is not None and carried.keys[0].der.tobytes() == der
    ring.retire()
    assert carried.keys[0].der.tobytes() == der
    carried.retire()
    hmac_ring = build_ring("svc", [(1, hmac_record())], now=T0, overlap=OVERLAP)
    assert hmac_ring.keys[0].der is None
    hmac_ring.retire()


def test_a_pem_that_does_not_load_is_refused_naming_service_and_version(
    pems: dict[str, str],
) -> None:
    lines = pems["ed25519"].splitlines()
    body = lines[1]
    broken = "\n".join([lines[0], body[:-4] + "!!!!", *lines[2:]])
    for secret in (broken, pems["p256"]):
        # The checksum does not cover the secret: swap it into a valid record.
        record = hmac_record(secret_key=pems["ed25519"], algorithm="ed25519")
        record["secret_key"] = secret
        with pytest.raises(KeyRecordError, match=r"^svc version 7: secret_key: ") as info:
            build_ring("svc", [(7, record)], now=T0, overlap=OVERLAP)
        assert body not in str(info.value)
