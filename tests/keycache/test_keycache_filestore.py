from __future__ import annotations

import json
import os
import secrets
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycache import KeyFile, KeyFileError, KeyRecordError, derive_kek, load_kek_file
from keycache.filestore import HEADER_LEN, KDF_KEK_FILE, KDF_SCRYPT, MAGIC
from tests.keycache.helpers import T0, hmac_record

# Cheap scrypt for tests (the production default costs ~0.1 s and 32 MiB per derivation).
FAST_LOG2_N = 10


def _pw_file(path: Path, passphrase: bytes) -> KeyFile:
    return KeyFile(path, passphrase=passphrase, scrypt_log2_n=FAST_LOG2_N, scrypt_r=8, scrypt_p=1)


@pytest.fixture
def kek_path(tmp_path: Path) -> Path:
    path = tmp_path / "kek.key"
    KeyFile.create_kek_file(path)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _kek_file(tmp_path: Path) -> KeyFile:
    path = tmp_path / "kek.key"
    if not path.exists():
        KeyFile.create_kek_file(path)
    return KeyFile(tmp_path / "keys.enc", kek=load_kek_file(path))


# -- KEK files ----------------------------------------------------------------------------


def test_create_kek_file_is_0600_random_and_never_overwritten(tmp_path: Path) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.key"
    KeyFile.create_kek_file(a)
    KeyFile.create_kek_file(b)
    assert _mode(a) == 0o600
    assert len(a.read_bytes()) == 32
    assert a.read_bytes() != b.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        KeyFile.create_kek_file(a)


def test_kek_file_raw_and_hex_forms(tmp_path: Path) -> None:
    raw = secrets.token_bytes(32)
    raw_path = tmp_path / "raw.key"
    raw_path.write_bytes(raw)
    raw_path.chmod(0o400)
    assert load_kek_file(raw_path) == bytearray(raw)

    hex_path = tmp_path / "hex.key"
    text = raw.hex()
    hex_path.write_text(f"  {text[:60]}\n{text[60:].upper()}\n")  # like `xxd -p`
    hex_path.chmod(0o600)
    assert load_kek_file(hex_path) == bytearray(raw)


@pytest.mark.parametrize("content", [b"", b"short", b"z" * 64, b"ab" * 33, b"0" * 300])
def test_kek_file_with_bad_content_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "kek.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"must hold 32 raw bytes or 64 hex digits") as info:
        load_kek_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700, 0o200])
def test_kek_file_with_loose_mode_is_refused(kek_path: Path, mode: int) -> None:
    kek_path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_kek_file(kek_path)
    message = str(info.value)
    assert str(kek_path) in message
    assert f"{mode:04o}" in message


def test_kek_file_owned_by_someone_else_is_refused(kek_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(kek_path, 4242, -1)
    with pytest.raises(KeyFileError, match="owned by uid 4242") as info:
        load_kek_file(kek_path)
    assert str(kek_path) in str(info.value)


def test_missing_kek_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_kek_file(tmp_path / "nope")


# -- key file roundtrips --------------------------------------------------------------------


def test_roundtrip_with_kek_file(tmp_path: Path, kek_path: Path) -> None:
    r1 = hmac_record(created_at=T0)
    r2 = hmac_record(created_at=T0 + timedelta(days=1), passphrase="pp")
    r3 = hmac_record()
    with KeyFile(tmp_path / "keys.enc", kek=load_kek_file(kek_path)) as kf:
        assert not kf.exists()
        assert kf.add_version("binance_spot", r1) == 1
        assert kf.add_version("binance_spot", r2) == 2
        assert kf.add_version("kraken", r3) == 1
        assert kf.exists()
    # A fresh handle (fresh KEK read) sees the same data.
    with KeyFile(tmp_path / "keys.enc", kek=load_kek_file(kek_path)) as kf:
        data = kf.load()
        assert data == {"binance_spot": [(1, r1), (2, r2)], "kraken": [(1, r3)]}
        metas = kf.list_meta()
    assert [(v, m.key_id) for v, m in metas["binance_spot"]] == [
        (1, r1["key_id"]),
        (2, r2["key_id"]),
    ]
    assert metas["binance_spot"][1][1].has_passphrase


def test_roundtrip_with_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "keys.enc"
    record = hmac_record()
    with _pw_file(path, b"correct horse battery staple") as kf:
        kf.add_version("svc", record)
    raw = path.read_bytes()
    assert raw[: len(MAGIC)] == MAGIC
    assert raw[len(MAGIC)] == KDF_SCRYPT
    assert raw[len(MAGIC) + 1 + 16 : len(MAGIC) + 1 + 16 + 3] == bytes([10, 8, 1])
    with KeyFile(path, passphrase=bytearray(b"correct horse battery staple")) as kf:
        # The file's own scrypt parameters are used to read it.
        assert kf.load() == {"svc": [(1, record)]}
    wrong = _pw_file(path, b"wrong horse")
    with wrong, pytest.raises(KeyFileError, match="cannot be decrypted: wrong key or corrupted"):
        wrong.load()


def test_scrypt_salt_is_kept_and_nonce_is_fresh_on_every_save(tmp_path: Path) -> None:
    path = tmp_path / "keys.enc"
    with _pw_file(path, b"pw") as kf:
        kf.add_version("svc", hmac_record())
        first = path.read_bytes()
        kf.add_version("svc", hmac_record())
        second = path.read_bytes()
    salt = slice(len(MAGIC) + 1, len(MAGIC) + 1 + 16)
    nonce = slice(HEADER_LEN - 12, HEADER_LEN)
    assert first[salt] == second[salt]
    assert first[nonce] != second[nonce]


def test_kek_header_is_fixed_size_with_zero_salt(tmp_path: Path) -> None:
    kf = _kek_file(tmp_path)
    kf.add_version("svc", hmac_record())
    kf.close()
    raw = (tmp_path / "keys.enc").read_bytes()
    assert HEADER_LEN == 40
    assert raw[len(MAGIC)] == KDF_KEK_FILE
    assert raw[len(MAGIC) + 1 : HEADER_LEN - 12] == bytes(19)


def test_plaintext_format(tmp_path: Path, kek_path: Path) -> None:
    record = hmac_record()
    kek = load_kek_file(kek_path)
    with KeyFile(tmp_path / "keys.enc", kek=bytearray(kek)) as kf:
        kf.add_version("svc", record)
    raw = (tmp_path / "keys.enc").read_bytes()
    plain = AESGCM(bytes(kek)).decrypt(
        raw[HEADER_LEN - 12 : HEADER_LEN], raw[HEADER_LEN:], raw[:HEADER_LEN]
    )
    assert json.loads(plain) == {
        "format": 1,
        "services": {"svc": [{"version": 1, "record": record}]},
    }
    assert str(record["secret_key"]).encode() not in raw


def test_default_scrypt_parameters_derive(tmp_path: Path) -> None:
    # One run at the production cost, to prove the memory limits allow it.
    key = derive_kek(b"pw", b"s" * 16)
    assert len(key) == 32
    assert key != derive_kek(b"pw", b"t" * 16)


# -- refusals -----------------------------------------------------------------------------


def test_wrong_kek_is_refused(tmp_path: Path) -> None:
    kf = _kek_file(tmp_path)
    kf.add_version("svc", hmac_record())
    kf.close()
    other = tmp_path / "other.key"
    KeyFile.create_kek_file(other)
    with KeyFile(tmp_path / "keys.enc", kek=load_kek_file(other)) as wrong:
        with pytest.raises(
            KeyFileError, match="cannot be decrypted: wrong key or corrupted file"
        ) as info:
            wrong.load()
        assert str(tmp_path / "keys.enc") in str(info.value)
        # ... and it will not overwrite what it cannot read.
        with pytest.raises(KeyFileError, match="refusing to overwrite"):
            wrong.save({})


@pytest.mark.parametrize("where", ["ciphertext", "tag", "header_nonce", "header_salt"])
def test_flipped_byte_is_refused(tmp_path: Path, where: str) -> None:
    kf = _kek_file(tmp_path)
    kf.add_version("svc", hmac_record())
    path = tmp_path / "keys.enc"
    raw = bytearray(path.read_bytes())
    index = {
        "ciphertext": HEADER_LEN + 5,
        "tag": len(raw) - 1,
        "header_nonce": HEADER_LEN - 1,
        "header_salt": len(MAGIC) + 1,  # first salt byte: must be zero in KEK mode
    }[where]
    raw[index] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(KeyFileError, match=r"cannot be decrypted|malformed header"):
        kf.load()
    kf.close()


def test_not_a_key_file(tmp_path: Path, kek_path: Path) -> None:
    path = tmp_path / "keys.enc"
    for content, why in [(b"short", "too short"), (b"X" * 100, "bad magic")]:
        path.write_bytes(content)
        path.chmod(0o600)
        kf = KeyFile(path, kek=load_kek_file(kek_path))
        with kf, pytest.raises(KeyFileError, match=why):
            kf.load()


def test_kek_file_used_on_passphrase_file_and_back(tmp_path: Path, kek_path: Path) -> None:
    path = tmp_path / "keys.enc"
    with _pw_file(path, b"pw") as kf:
        kf.add_version("svc", hmac_record())
    kf = KeyFile(path, kek=load_kek_file(kek_path))
    with kf, pytest.raises(KeyFileError, match="encrypted with a passphrase"):
        kf.load()


def test_key_file_with_loose_mode_is_refused(tmp_path: Path) -> None:
    kf = _kek_file(tmp_path)
    kf.add_version("svc", hmac_record())
    path = tmp_path / "keys.enc"
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        kf.load()
    assert str(path) in str(info.value)
    assert "0644" in str(info.value)
    kf.close()


def test_atomic_write_leaves_mode_0600_and_no_temp_files(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        kf = _kek_file(tmp_path)
        kf.add_version("svc", hmac_record())
        kf.add_version("svc", hmac_record())
        kf.close()
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "keys.enc") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek.key", "keys.enc"]


def test_atomic_write_replaces_the_inode(tmp_path: Path) -> None:
    kf = _kek_file(tmp_path)
    kf.add_version("svc", hmac_record())
    before = (tmp_path / "keys.enc").stat().st_ino
    kf.add_version("svc", hmac_record())
    assert (tmp_path / "keys.enc").stat().st_ino != before
    kf.close()


def test_duplicate_key_id_is_refused(tmp_path: Path) -> None:
    kf = _kek_file(tmp_path)
    first = hmac_record()
    kf.add_version("svc", first)
    again = hmac_record(key_id=str(first["key_id"]))
    with pytest.raises(KeyRecordError, match=r"^key_id: .* already version 1 of svc"):
        kf.add_version("svc", again)
    assert kf.add_version("other", again) == 1  # a different service may reuse it
    assert [v for v, _ in kf.load()["svc"]] == [1]
    kf.close()


def test_add_version_validates_record_and_service(tmp_path: Path) -> None:
    kf = _kek_file(tmp_path)
    record = hmac_record()
    record["checksum"] = "0" * 64
    with pytest.raises(KeyRecordError, match=r"^checksum: "):
        kf.add_version("svc", record)
    with pytest.raises(KeyRecordError, match=r"^service: "):
        kf.add_version("bad/name", hmac_record())
    assert not kf.exists()
    kf.close()


def test_malformed_document_names_the_path(tmp_path: Path, kek_path: Path) -> None:
    kek = load_kek_file(kek_path)
    path = tmp_path / "keys.enc"
    record = hmac_record()
    doc = {
        "format": 1,
        "services": {"svc": [{"version": 2, "record": record}, {"version": 1, "record": record}]},
    }
    header = MAGIC + bytes([KDF_KEK_FILE]) + bytes(19) + secrets.token_bytes(12)
    body = AESGCM(bytes(kek)).encrypt(header[-12:], json.dumps(doc).encode(), header)
    path.write_bytes(header + body)
    path.chmod(0o600)
    with (
        KeyFile(path, kek=kek) as kf,
        pytest.raises(KeyFileError, match=r"services\.svc\[1\]\.version: versions must increase"),
    ):
        kf.load()


def test_invalid_json_error_carries_no_plaintext(tmp_path: Path, kek_path: Path) -> None:
    kek = load_kek_file(kek_path)
    path = tmp_path / "keys.enc"
    secret = secrets.token_urlsafe(16)
    header = MAGIC + bytes([KDF_KEK_FILE]) + bytes(19) + secrets.token_bytes(12)
    plaintext = ('{"format": 1, "services": {"secret_key": "' + secret + '" oops').encode()
    path.write_bytes(header + AESGCM(bytes(kek)).encrypt(header[-12:], plaintext, header))
    path.chmod(0o600)
    kf = KeyFile(path, kek=kek)
    with kf, pytest.raises(KeyFileError, match="not valid JSON") as info:
        kf.load()
    assert secret not in str(info.value)
    assert info.value.__context__ is None
    assert info.value.__cause__ is None


def test_close_wipes_the_kek(tmp_path: Path, kek_path: Path) -> None:
    kek = load_kek_file(kek_path)
    assert kek != bytearray(32)
    kf = KeyFile(tmp_path / "keys.enc", kek=kek)
    kf.close()
    assert kek == bytearray(32)
    with pytest.raises(ValueError, match="closed"):
        kf.load()
    assert "kek" in repr(kf) and str(kek_path.read_bytes()) not in repr(kf)


def test_constructor_needs_exactly_one_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KeyFile(tmp_path / "k")
    with pytest.raises(ValueError, match="exactly one"):
        KeyFile(tmp_path / "k", kek=bytearray(32), passphrase=b"x")
    short = bytearray(b"\x01" * 16)
    with pytest.raises(KeyFileError, match="32 bytes"):
        KeyFile(tmp_path / "k", kek=short)
    assert short == bytearray(16)  # handed over, so wiped even when refused
    with pytest.raises(KeyFileError, match="empty"):
        KeyFile(tmp_path / "k", passphrase=b"")


def test_missing_key_file(tmp_path: Path) -> None:
    kf = _kek_file(tmp_path)
    with pytest.raises(KeyFileError, match="does not exist"):
        kf.load()
    kf.close()


def test_oversized_scrypt_header_is_refused_before_deriving(tmp_path: Path) -> None:
    path = tmp_path / "keys.enc"
    with _pw_file(path, b"pw") as kf:
        kf.add_version("svc", hmac_record())
    raw = bytearray(path.read_bytes())
    raw[len(MAGIC) + 1 + 16] = 40  # log2 n = 40: terabytes of memory
    path.write_bytes(bytes(raw))
    kf = KeyFile(path, passphrase=b"pw")
    with kf, pytest.raises(KeyFileError, match="out of range"):
        kf.load()
