from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from keycache import KeyMeta, KeyRecordError, compute_checksum, make_record, parse_record
from tests.keycache.helpers import T0, RecordFactory

KEY_ID = "hft_00112233445566778899aabbccddeeff"
CREATED = "2026-11-28T00:00:00Z"
EXPIRES = "2027-02-26T00:00:00Z"


def test_checksum_is_the_seeds_generate_checksum() -> None:
    # generateChecksum: sha256(key_id + created_at + expires_at + each permission), hex.
    by_hand = hashlib.sha256(
        (KEY_ID + CREATED + EXPIRES + "trade" + "read").encode("utf-8")
    ).hexdigest()
    assert compute_checksum(KEY_ID, CREATED, EXPIRES, ["trade", "read"]) == by_hand
    # Pinned so a change of either side is noticed.
    assert by_hand == "6bb7ab388594be0a871653799b92fbb0356887fcd073dbff8f2b940a5540de69"


def test_checksum_uses_the_raw_timestamp_strings() -> None:
    created = "2026-11-28T00:00:00+00:00"
    record: dict[str, object] = {
        "key_id": KEY_ID,
        "secret_key": secrets.token_urlsafe(32),
        "created_at": created,
        "expires_at": EXPIRES,
        "permissions": ["trade"],
        "checksum": compute_checksum(KEY_ID, created, EXPIRES, ["trade"]),
    }
    meta, _, _ = parse_record(record)
    assert meta.created_at == T0
    assert meta.created_at_raw == created
    # The same instant written with "Z" is a different string, so a different checksum.
    record["checksum"] = compute_checksum(KEY_ID, CREATED, EXPIRES, ["trade"])
    with pytest.raises(KeyRecordError, match=r"^checksum: the checksum does not match"):
        parse_record(record)


def test_make_record_roundtrip(make_hmac_record: RecordFactory) -> None:
    secret = secrets.token_urlsafe(32)
    activates = T0 + timedelta(hours=1)
    record = make_hmac_record(
        key_id=KEY_ID,
        secret_key=secret,
        activates_at=activates,
        passphrase="okx-pass",
        algorithm="hmac-sha512",
    )
    assert record["created_at"] == CREATED
    assert record["expires_at"] == EXPIRES
    assert record["activates_at"] == "2026-11-28T01:00:00Z"
    meta, got_secret, got_pass = parse_record(record)
    assert got_secret == secret
    assert got_pass == "okx-pass"
    assert meta.key_id == KEY_ID
    assert meta.algorithm == "hmac-sha512"
    assert meta.created_at == T0
    assert meta.expires_at == T0 + timedelta(days=90)
    assert meta.activates_at == activates
    assert meta.permissions == ("trade", "read")
    assert meta.has_passphrase
    assert meta.checksum == record["checksum"]


def test_algorithm_defaults_to_hmac_sha256(make_hmac_record: RecordFactory) -> None:
    record = make_hmac_record()
    del record["algorithm"]  # not covered by the checksum
    meta, _, passphrase = parse_record(record)
    assert meta.algorithm == "hmac-sha256"
    assert passphrase is None
    assert not meta.has_passphrase


def test_uppercase_checksum_accepted(make_hmac_record: RecordFactory) -> None:
    record = make_hmac_record()
    record["checksum"] = str(record["checksum"]).upper()
    parse_record(record)


def test_keymeta_holds_nothing_secret(make_hmac_record: RecordFactory) -> None:
    secret = secrets.token_urlsafe(32)
    meta, _, _ = parse_record(make_hmac_record(secret_key=secret, passphrase="p4ss-phrase"))
    names = {f.name for f in dataclasses.fields(KeyMeta)}
    assert not names & {"secret_key", "secret", "passphrase"}
    assert secret not in repr(meta)
    assert "p4ss-phrase" not in repr(meta)


def _set(field: str, value: object) -> Callable[[dict[str, object]], None]:
    def mutate(record: dict[str, object]) -> None:
        record[field] = value

    return mutate


def _drop(field: str) -> Callable[[dict[str, object]], None]:
    def mutate(record: dict[str, object]) -> None:
        del record[field]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_drop("key_id"), "key_id"),
        (_set("key_id", ""), "key_id"),
        (_set("key_id", 42), "key_id"),
        (_set("key_id", "has space"), "key_id"),
        (_set("key_id", "caf\u00e9"), "key_id"),
        (_set("key_id", "x" * 300), "key_id"),
        (_drop("secret_key"), "secret_key"),
        (_set("secret_key", ""), "secret_key"),
        (_set("secret_key", b"bytes"), "secret_key"),
        (_set("secret_key", "trailing-newline\n"), "secret_key"),
        (_set("algorithm", "md5"), "algorithm"),
        (_set("algorithm", None), "algorithm"),
        (_set("passphrase", ""), "passphrase"),
        (_set("passphrase", 7), "passphrase"),
        (_drop("created_at"), "created_at"),
        (_set("created_at", "yesterday"), "created_at"),
        (_set("created_at", 1700000000), "created_at"),
        (_set("created_at", "2026-11-28T00:00:00"), "created_at"),
        (_set("created_at", "2026-11-28T00:00:00+01:00"), "created_at"),
        (_drop("expires_at"), "expires_at"),
        (_set("expires_at", "2026-11-27T00:00:00Z"), "expires_at"),
        (_set("expires_at", CREATED), "expires_at"),
        (_set("activates_at", "soon"), "activates_at"),
        (_set("activates_at", "2028-01-01T00:00:00Z"), "activates_at"),
        (_drop("permissions"), "permissions"),
        (_set("permissions", "trade"), "permissions"),
        (_set("permissions", [""]), "permissions[0]"),
        (_set("permissions", ["trade", 3]), "permissions[1]"),
        (_set("permissions", ["trade", "with space"]), "permissions[1]"),
        (_drop("checksum"), "checksum"),
        (_set("checksum", "abc"), "checksum"),
        (_set("checksum", None), "checksum"),
        (_set("note", "hello"), "note"),
        (_set("secretKey", "x"), "secretKey"),
    ],
)
def test_each_validation_error_names_its_field(
    make_hmac_record: RecordFactory,
    mutate: Callable[[dict[str, object]], None],
    field: str,
) -> None:
    secret = secrets.token_urlsafe(32)
    record = make_hmac_record(key_id=KEY_ID, secret_key=secret)
    mutate(record)
    with pytest.raises(KeyRecordError) as info:
        parse_record(record)
    message = str(info.value)
    assert message.startswith(f"{field}: "), message
    assert secret not in message
    assert info.value.code == "invalid_key_record"


def test_unknown_field_is_refused_even_when_otherwise_valid(
    make_hmac_record: RecordFactory,
) -> None:
    record = make_hmac_record()
    record["comment"] = "rotated by ops"
    with pytest.raises(KeyRecordError, match=r"^comment: unknown field$"):
        parse_record(record)


def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(KeyRecordError, match=r"^record: "):
        parse_record(["not", "an", "object"])  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["key_id", "created_at", "expires_at", "permissions"])
def test_tampered_checksummed_field_is_refused(make_hmac_record: RecordFactory, field: str) -> None:
    record = make_hmac_record(key_id=KEY_ID)
    tampered: dict[str, object] = {
        "key_id": "hft_ffffffffffffffffffffffffffffffff",
        "created_at": "2026-11-28T00:00:01Z",
        "expires_at": "2027-02-26T00:00:01Z",
        "permissions": ["trade", "read", "withdraw"],
    }
    record[field] = tampered[field]
    with pytest.raises(KeyRecordError, match=r"^checksum: the checksum does not match"):
        parse_record(record)


def test_tampered_checksum_is_refused(make_hmac_record: RecordFactory) -> None:
    record = make_hmac_record()
    checksum = str(record["checksum"])
    record["checksum"] = ("0" if checksum[0] != "0" else "1") + checksum[1:]
    with pytest.raises(KeyRecordError, match=r"^checksum: the checksum does not match"):
        parse_record(record)


def test_make_record_refuses_naive_datetimes() -> None:
    with pytest.raises(KeyRecordError, match=r"^created_at: must be timezone-aware"):
        make_record(
            KEY_ID,
            "s3cret",
            created_at=datetime(2026, 1, 1),
            expires_at=T0,
            permissions=[],
        )


def test_make_record_normalises_other_timezones_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    record = make_record(
        KEY_ID,
        "s3cret",
        created_at=datetime(2026, 11, 28, 2, 0, tzinfo=plus2),
        expires_at=datetime(2027, 1, 1, tzinfo=UTC),
        permissions=["read"],
    )
    assert record["created_at"] == CREATED


# -- PEM algorithms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "pem_name"),
    [("ed25519", "ed25519"), ("rsa-pkcs1-sha256", "rsa"), ("es256", "p256")],
)
def test_pem_of_the_right_type_is_accepted(
    make_hmac_record: RecordFactory, pems: dict[str, str], algorithm: str, pem_name: str
) -> None:
    record = make_hmac_record(secret_key=pems[pem_name], algorithm=algorithm)
    meta, secret, _ = parse_record(record)
    assert meta.algorithm == algorithm
    assert secret == pems[pem_name]


@pytest.mark.parametrize(
    ("algorithm", "pem_name"),
    [
        ("ed25519", "rsa"),
        ("ed25519", "p256"),
        ("rsa-pkcs1-sha256", "ed25519"),
        ("es256", "rsa"),
        ("es256", "p384"),  # EC, but not P-256
    ],
)
def test_pem_of_the_wrong_type_is_refused(
    make_hmac_record: RecordFactory, pems: dict[str, str], algorithm: str, pem_name: str
) -> None:
    record = make_hmac_record()
    record["secret_key"] = pems[pem_name]
    record["algorithm"] = algorithm
    with pytest.raises(KeyRecordError, match=rf"^secret_key: algorithm {algorithm} needs") as info:
        parse_record(record)
    _assert_no_pem_in(str(info.value), pems[pem_name])


def _assert_no_pem_in(message: str, pem: str) -> None:
    for line in pem.splitlines():
        if "-----" not in line:
            assert line not in message


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa-pkcs1-sha256", "es256"])
def test_non_pem_secret_is_refused(make_hmac_record: RecordFactory, algorithm: str) -> None:
    record = make_hmac_record()
    record["algorithm"] = algorithm
    with pytest.raises(
        KeyRecordError, match=rf"^secret_key: must be a PKCS#8 PEM for algorithm {algorithm}$"
    ):
        parse_record(record)


def test_corrupt_pem_is_refused(make_hmac_record: RecordFactory, pems: dict[str, str]) -> None:
    lines = pems["ed25519"].splitlines()
    body = lines[1]
    lines[1] = body[:10] + ("A" if body[10] != "A" else "B") + body[11:] + "!!"
    record = make_hmac_record()
    record["secret_key"] = "\n".join(lines) + "\n"
    record["algorithm"] = "ed25519"
    with pytest.raises(KeyRecordError, match=r"^secret_key: must be a PKCS#8 PEM") as info:
        parse_record(record)
    _assert_no_pem_in(str(info.value), str(record["secret_key"]))
    # No parser exception (which might describe key bytes) is chained.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_traditional_rsa_pem_is_refused(make_hmac_record: RecordFactory) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    traditional = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    assert traditional.startswith("-----BEGIN RSA PRIVATE KEY-----")
    record = make_hmac_record()
    record["secret_key"] = traditional
    record["algorithm"] = "rsa-pkcs1-sha256"
    with pytest.raises(KeyRecordError, match=r"^secret_key: must be a PKCS#8 PEM"):
        parse_record(record)


def test_encrypted_pkcs8_is_refused(make_hmac_record: RecordFactory) -> None:
    encrypted = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
        .decode()
    )
    record = make_hmac_record()
    record["secret_key"] = encrypted
    record["algorithm"] = "ed25519"
    with pytest.raises(KeyRecordError, match=r"^secret_key: must be a PKCS#8 PEM"):
        parse_record(record)


def test_small_rsa_key_is_refused(make_hmac_record: RecordFactory) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = small.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    record = make_hmac_record()
    record["secret_key"] = pem
    record["algorithm"] = "rsa-pkcs1-sha256"
    with pytest.raises(KeyRecordError, match=r"^secret_key: RSA key of 1024 bits is too small"):
        parse_record(record)
