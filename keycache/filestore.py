"""The encrypted key file: the embedded default key store.

File layout (all integers one byte)::

    magic  b"AUTHPXK1"                      8 bytes
    kdf    1 = KEK file, 2 = scrypt(passphrase)
    salt   16 bytes  (zeros for a KEK file)
    log2n, r, p      (zeros for a KEK file)   3 bytes
    nonce  random, fresh on every save     12 bytes
    body   AES-256-GCM(plaintext JSON), the 40-byte header as associated data

Plaintext: ``{"format": 1, "services": {"<service>": [{"version": 1, "record": {...}}]},
"revoked": ["<key id>", ...]}`` with versions strictly increasing per service; each record
is a key record (:mod:`keycache.record`). ``revoked`` (optional) is the revocation list:
key ids that ``authproxy keys revoke`` removed and that may never be imported again.

Everything here is blocking file I/O (and scrypt is deliberately slow): it must not run on
the event loop; call it in a thread. Errors are KeyFileError (file, KEK, permissions,
decryption) or KeyRecordError (a record or service name given to :meth:`KeyFile.add_version`
is invalid); messages name the path and the reason, never key material.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keycache import secretjson
from keycache.errors import KeyFileError, KeyRecordError
from keycache.record import KeyMeta, parse_record
from keycache.securemem import wipe_bytearray, wipe_str

__all__ = [
    "FORMAT_VERSION",
    "HEADER_LEN",
    "KDF_KEK_FILE",
    "KDF_SCRYPT",
    "KEK_LEN",
    "MAGIC",
    "SCRYPT_LOG2_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "KeyFile",
    "KeyFileData",
    "derive_kek",
    "load_kek_file",
]

MAGIC: Final = b"AUTHPXK1"
KDF_KEK_FILE: Final = 1
KDF_SCRYPT: Final = 2
#: 128-bit salt: RFC 7914 / NIST SP 800-132 ask for at least 128 random bits.
SALT_LEN: Final = 16
#: 96-bit nonce, the GCM native size (NIST SP 800-38D); random per save. Saves happen a
#: handful of times per key rotation, far below the 2**32 random-nonce limit per key.
NONCE_LEN: Final = 12
#: GCM authentication tag appended by AESGCM.
TAG_LEN: Final = 16
#: AES-256 key: the KEK file holds exactly this many bytes (or twice as many hex digits).
KEK_LEN: Final = 32
_HEADER: Final = struct.Struct(f">{len(MAGIC)}sB{SALT_LEN}sBBB{NONCE_LEN}s")
HEADER_LEN: Final = _HEADER.size
FORMAT_VERSION: Final = 1

#: scrypt cost: n = 2**15, r = 8, p = 1 uses 32 MiB and ~0.1 s per derivation. The key is
#: derived once per process start or CLI run, so this is affordable while making each
#: offline passphrase guess cost the same 32 MiB and 0.1 s (RFC 7914 section 2 guidance).
SCRYPT_LOG2_N: Final = 15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
#: Upper bounds accepted from a file header. The header is only authenticated after the
#: key is derived, so a tampered header must not make us spend unbounded memory or time.
MAX_SCRYPT_MEMORY: Final = 1 << 30  # 1 GiB = 128 * r * n
MAX_SCRYPT_P: Final = 16

#: Thousands of key records fit in well under 1 MiB; refuse anything absurd before reading.
MAX_KEY_FILE_BYTES: Final = 16 * 1024 * 1024
#: Read size for the (ciphertext) key file.
READ_CHUNK: Final = 64 * 1024
#: 64 hex digits plus generous whitespace; anything longer is not a KEK file.
MAX_KEK_FILE_BYTES: Final = 256
#: Modes a KEK file may have: readable by its owner only.
KEK_FILE_MODES: Final = frozenset((0o400, 0o600))
#: Key file and temp files are written owner read/write only.
KEY_FILE_MODE: Final = 0o600
#: Service names become Vault path segments and metric label values; keep them tame.
SERVICE_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

_WHITESPACE: Final = frozenset(b" \t\r\n\v\f")
_HEX_VALUES: Final[dict[int, int]] = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}

#: service -> [(version, record)] in increasing version order.
KeyFileData = dict[str, list[tuple[int, dict[str, object]]]]


@dataclass(frozen=True, slots=True)
class _Header:
    kdf: int
    salt: bytes
    log2_n: int
    r: int
    p: int
    nonce: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.kdf, self.salt, self.log2_n, self.r, self.p, self.nonce)

    @property
    def scrypt_params(self) -> tuple[bytes, int, int, int]:
        return (self.salt, self.log2_n, self.r, self.p)


def _check_scrypt_params(log2_n: int, r: int, p: int) -> bool:
    return (
        1 <= log2_n <= 63
        and r >= 1
        and 1 <= p <= MAX_SCRYPT_P
        and 128 * r * (1 << log2_n) <= MAX_SCRYPT_MEMORY
    )


def derive_kek(
    passphrase: bytes | bytearray,
    salt: bytes,
    *,
    log2_n: int = SCRYPT_LOG2_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
) -> bytearray:
    """Derive a 32-byte AES key from ``passphrase`` with scrypt; return it as a bytearray
    the caller wipes (:func:`keycache.securemem.wipe_bytearray`).

    Raises KeyFileError for an empty passphrase or out-of-range parameters. Slow by design
    (~0.1 s at the defaults): call in a thread, never on the event loop.
    """
    if not passphrase:
        raise KeyFileError("passphrase: is empty")
    if len(salt) != SALT_LEN:
        raise KeyFileError(f"scrypt salt: must be {SALT_LEN} bytes")
    if not _check_scrypt_params(log2_n, r, p):
        raise KeyFileError(f"scrypt parameters out of range (log2 n={log2_n}, r={r}, p={p})")
    out = bytearray(KEK_LEN)
    try:
        Scrypt(salt=salt, length=KEK_LEN, n=1 << log2_n, r=r, p=p).derive_into(passphrase, out)
    except (ValueError, MemoryError) as exc:
        wipe_bytearray(out)
        raise KeyFileError(f"scrypt derivation failed: {type(exc).__name__}") from None
    return out


def _read_limited(fd: int, limit: int) -> tuple[bytearray, int]:
    """Read at most ``limit + 1`` bytes from ``fd``; return (buffer, bytes read).

    The buffer is allocated once and never resized: shrinking a bytearray may move it and
    leave the old, unwiped block on the heap. ``limit + 1`` lets the caller detect "too
    large".
    """
    buf = bytearray(limit + 1)
    got = 0
    with memoryview(buf) as view:
        while got < len(buf):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
    return buf, got


def load_kek_file(path: Path) -> bytearray:
    """Read a KEK file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).

    Returns the key as a bytearray the caller owns and wipes (``KeyFile`` does on
    ``close()``). Raises KeyFileError, naming the path, if the file is missing or
    unreadable, its mode is not 0400 or 0600, it is not owned by the effective uid, or its
    content is neither form. Blocking I/O: call in a thread.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: KEK file does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open KEK file: {exc.strerror}") from None
    try:
        # fstat the open descriptor, not the path: no window to swap the file in between.
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: KEK file is not a regular file")
        if mode not in KEK_FILE_MODES:
            raise KeyFileError(f"{path}: KEK file mode is {mode:04o}; it must be 0400 or 0600")
        euid = os.geteuid()
        if st.st_uid != euid:
            raise KeyFileError(
                f"{path}: KEK file is owned by uid {st.st_uid}, not the current uid {euid}"
            )
        try:
            buf, size = _read_limited(fd, MAX_KEK_FILE_BYTES)
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read KEK file: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return _decode_kek(path, buf, size)
    finally:
        wipe_bytearray(buf)


def _decode_kek(path: Path, buf: bytearray, size: int) -> bytearray:
    """Decode the first ``size`` bytes of ``buf`` (raw or hex) into a new bytearray."""
    out = bytearray(KEK_LEN)
    if size == KEK_LEN:
        with memoryview(buf) as view:
            out[:] = view[:KEK_LEN]
        return out
    bad = KeyFileError(
        f"{path}: KEK file must hold {KEK_LEN} raw bytes or {2 * KEK_LEN} hex digits"
    )
    # Whitespace anywhere is skipped, so `head -c 32 /dev/urandom | xxd -p` (two lines)
    # works. Hex is decoded by hand into preallocated bytearrays: bytes.fromhex, or a
    # growing bytearray, would leave unwipeable copies of the key on the heap.
    digits = bytearray(2 * KEK_LEN)
    count = 0
    try:
        for i in range(size):
            b = buf[i]
            if b in _WHITESPACE:
                continue
            if count == len(digits) or b not in _HEX_VALUES:
                raise bad
            digits[count] = b
            count += 1
        if count != len(digits):
            raise bad
        for i in range(KEK_LEN):
            out[i] = (_HEX_VALUES[digits[2 * i]] << 4) | _HEX_VALUES[digits[2 * i + 1]]
    except BaseException:
        wipe_bytearray(out)
        raise
    finally:
        wipe_bytearray(digits)
    return out


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_new_file(path: Path, data: bytes | bytearray) -> None:
    """Create ``path`` (must not exist) with mode 0600, write ``data`` and fsync it."""
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, KEY_FILE_MODE
    )
    try:
        # The umask can only have removed bits; set the exact mode regardless.
        os.fchmod(fd, KEY_FILE_MODE)
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _reject_duplicate_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateNameError(name)
        out[name] = value
    return out


class _DuplicateNameError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _decode_document(path: Path, doc: object) -> KeyFileData:
    """Check the plaintext document's structure (not the records themselves)."""

    def bad(where: str, why: str) -> KeyFileError:
        return KeyFileError(f"{path}: {where}: {why}")

    if not isinstance(doc, dict):
        raise bad("document", "must be a JSON object")
    unknown = set(doc) - {"format", "services", "revoked"}
    if unknown:
        raise bad(sorted(unknown)[0], "unknown field")
    fmt = doc.get("format")
    if type(fmt) is not int or fmt != FORMAT_VERSION:
        raise bad("format", f"unsupported key file format (expected {FORMAT_VERSION})")
    services = doc.get("services")
    if not isinstance(services, dict):
        raise bad("services", "must be a JSON object")
    revoked = doc.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(k, str) for k in revoked):
        raise bad("revoked", "must be a list of key ids")
    out: KeyFileData = {}
    for service, entries in services.items():
        where = f"services.{service}"
        if not SERVICE_NAME_RE.fullmatch(service):
            raise bad("services", f"invalid service name {service!r}")
        if not isinstance(entries, list):
            raise bad(where, "must be a list of versions")
        versions: list[tuple[int, dict[str, object]]] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != {"version", "record"}:
                raise bad(f"{where}[{i}]", 'must be {"version": int, "record": {...}}')
            version = entry["version"]
            record = entry["record"]
            if type(version) is not int or version < 1:
                raise bad(f"{where}[{i}].version", "must be a positive integer")
            if versions and version <= versions[-1][0]:
                raise bad(f"{where}[{i}].version", "versions must increase")
            if not isinstance(record, dict):
                raise bad(f"{where}[{i}].record", "must be a JSON object")
            versions.append((version, record))
        out[service] = versions
    return out


def _encode_document(
    data: Mapping[str, Sequence[tuple[int, Mapping[str, object]]]],
    revoked: Sequence[str] = (),
) -> object:
    services: dict[str, object] = {}
    for service, entries in data.items():
        if not SERVICE_NAME_RE.fullmatch(service):
            raise ValueError(f"invalid service name {service!r}")
        previous = 0
        encoded: list[object] = []
        for version, record in entries:
            if type(version) is not int or version <= previous:
                raise ValueError(f"{service}: versions must be increasing positive integers")
            previous = version
            encoded.append({"version": version, "record": dict(record)})
        services[service] = encoded
    doc: dict[str, object] = {"format": FORMAT_VERSION, "services": services}
    if revoked:
        doc["revoked"] = sorted(set(revoked))
    return doc


def _check_service_name(service: str) -> None:
    if not SERVICE_NAME_RE.fullmatch(service):
        raise KeyRecordError(
            "service: must be 1-128 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )


class KeyFile:
    """An AES-256-GCM encrypted key file, keyed by a KEK file or a passphrase.

    ``KeyFile(path, kek=...)`` or ``KeyFile(path, passphrase=...)`` (exactly one). The
    ``kek`` bytearray is taken over and wiped by :meth:`close`; a passphrase is copied and
    the copy wiped on close. The constructor does no I/O and reads no environment
    variable: the CLI passes the secret in. ``scrypt_*`` set the cost for a new file (tests
    lower it); an existing file's own parameters are used to read it and kept on save.

    All methods do blocking I/O (and scrypt): never call them on the event loop.
    """

    __slots__ = (
        "_closed",
        "_derived",
        "_derived_for",
        "_kek",
        "_passphrase",
        "_path",
        "_revoked",
        "_scrypt",
    )

    def __init__(
        self,
        path: Path,
        *,
        kek: bytearray | None = None,
        passphrase: bytes | bytearray | None = None,
        scrypt_log2_n: int = SCRYPT_LOG2_N,
        scrypt_r: int = SCRYPT_R,
        scrypt_p: int = SCRYPT_P,
    ) -> None:
        try:
            if (kek is None) == (passphrase is None):
                raise ValueError("KeyFile needs exactly one of kek= or passphrase=")
            if kek is not None and len(kek) != KEK_LEN:
                raise KeyFileError(f"{path}: KEK must be {KEK_LEN} bytes")
            if passphrase is not None and not passphrase:
                raise KeyFileError("passphrase: is empty")
            if not _check_scrypt_params(scrypt_log2_n, scrypt_r, scrypt_p):
                raise ValueError("scrypt parameters out of range")
        except BaseException:
            # The KEK was handed over (often straight from load_kek_file): wipe it even
            # when refusing it, since no one else holds it to wipe.
            if kek is not None:
                wipe_bytearray(kek)
            raise
        self._path = Path(path)
        self._kek = kek
        self._passphrase = bytearray(passphrase) if passphrase is not None else None
        self._scrypt = (scrypt_log2_n, scrypt_r, scrypt_p)
        self._derived: bytearray | None = None
        self._derived_for: tuple[bytes, int, int, int] | None = None
        self._revoked: tuple[str, ...] = ()
        self._closed = False

    @property
    def path(self) -> Path:
        """The key file's path."""
        return self._path

    def __repr__(self) -> str:
        mode = "kek" if self._kek is not None else "passphrase"
        return f"KeyFile(path={str(self._path)!r}, mode={mode!r}, closed={self._closed})"

    def __enter__(self) -> KeyFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wipe the KEK, the passphrase copy and any derived key. Idempotent."""
        for buf in (self._kek, self._passphrase, self._derived):
            if buf is not None:
                wipe_bytearray(buf)
        self._derived = None
        self._derived_for = None
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("KeyFile is closed")

    def exists(self) -> bool:
        """True if the key file exists (blocking stat)."""
        return self._path.exists()

    # -- crypto ---------------------------------------------------------------------------

    def _key_for(self, header: _Header) -> bytearray:
        if header.kdf == KDF_KEK_FILE:
            if self._kek is None:
                raise KeyFileError(
                    f"{self._path}: encrypted with a KEK file; configure kek_file, not a passphrase"
                )
            return self._kek
        if self._passphrase is None:
            raise KeyFileError(
                f"{self._path}: encrypted with a passphrase; configure passphrase_env, "
                "not a KEK file"
            )
        if self._derived is None or self._derived_for != header.scrypt_params:
            derived = derive_kek(
                self._passphrase, header.salt, log2_n=header.log2_n, r=header.r, p=header.p
            )
            if self._derived is not None:
                wipe_bytearray(self._derived)
            self._derived = derived
            self._derived_for = header.scrypt_params
        return self._derived

    def _new_header(self) -> _Header:
        nonce = secrets.token_bytes(NONCE_LEN)
        if self._kek is not None:
            return _Header(KDF_KEK_FILE, bytes(SALT_LEN), 0, 0, 0, nonce)
        if self._derived_for is not None:
            # Keep the salt (and cost) of the file we read: no new scrypt run per save.
            salt, log2_n, r, p = self._derived_for
        else:
            salt = secrets.token_bytes(SALT_LEN)
            log2_n, r, p = self._scrypt
        return _Header(KDF_SCRYPT, salt, log2_n, r, p, nonce)

    def _parse_header(self, raw: bytes) -> _Header:
        if len(raw) < HEADER_LEN + TAG_LEN:
            raise KeyFileError(f"{self._path}: too short to be a key file")
        magic, kdf, salt, log2_n, r, p, nonce = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise KeyFileError(f"{self._path}: not an authproxy key file (bad magic)")
        if kdf == KDF_KEK_FILE:
            if salt != bytes(SALT_LEN) or (log2_n, r, p) != (0, 0, 0):
                raise KeyFileError(f"{self._path}: malformed header (KEK file mode)")
        elif kdf == KDF_SCRYPT:
            if not _check_scrypt_params(log2_n, r, p):
                raise KeyFileError(
                    f"{self._path}: scrypt parameters in the header are out of range"
                )
        else:
            raise KeyFileError(f"{self._path}: unknown KDF id {kdf}")
        return _Header(kdf, salt, log2_n, r, p, nonce)

    # -- file I/O -------------------------------------------------------------------------

    def _read_raw(self) -> bytes:
        path = self._path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyFileError(f"{path}: key file does not exist") from None
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot open key file: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"{path}: key file is not a regular file")
            if mode & 0o077:
                raise KeyFileError(
                    f"{path}: key file mode is {mode:04o}, open to group/other; "
                    f"it must be 0600 or 0400"
                )
            if st.st_size > MAX_KEY_FILE_BYTES:
                raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes")
            # Ciphertext only: plain bytes are fine here, nothing secret to wipe.
            chunks: list[bytes] = []
            total = 0
            try:
                while total <= MAX_KEY_FILE_BYTES:
                    chunk = os.read(fd, READ_CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
            except OSError as exc:
                raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from None
        finally:
            os.close(fd)
        if total > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes")
        return b"".join(chunks)

    def load(self) -> KeyFileData:
        """Read, decrypt and structurally check the key file; return service ->
        [(version, record)] in increasing version order.

        Records are returned as stored, not re-validated (``build_ring`` validates each
        service's records, so one bad record cannot take down other services). Raises
        KeyFileError if the file is missing, open to group/other, malformed, or cannot be
        decrypted (wrong key or corrupted file).
        """
        self._check_open()
        raw = self._read_raw()
        header = self._parse_header(raw)
        key = self._key_for(header)
        body = memoryview(raw)[HEADER_LEN:]
        plain = bytearray(len(body) - TAG_LEN)
        try:
            try:
                AESGCM(key).decrypt_into(header.nonce, body, raw[:HEADER_LEN], plain)
            except InvalidTag:
                raise KeyFileError(
                    f"{self._path}: cannot be decrypted: wrong key or corrupted file"
                ) from None
            doc, problem = _parse_json(plain)
        finally:
            wipe_bytearray(plain)
            body.release()
        if problem is not None:
            # Raised outside the except block: json's exception holds the whole plaintext
            # (.doc), so it must not even be reachable as __context__.
            raise KeyFileError(f"{self._path}: decrypted content {problem}")
        data = _decode_document(self._path, doc)
        self._revoked = tuple(doc.get("revoked", ())) if isinstance(doc, dict) else ()
        return data

    def load_revoked(self) -> tuple[str, ...]:
        """The revocation list kept inside the encrypted file (key ids, sorted); empty if
        the file does not exist. Raises KeyFileError as :meth:`load`. Blocking."""
        self._check_open()
        if not self.exists():
            return ()
        self.load()
        return self._revoked

    def save_revoked(self, revoked: Sequence[str]) -> None:
        """Replace the revocation list, keeping every key version as it is. Blocking."""
        self._check_open()
        data = self.load() if self.exists() else {}
        self.save(data, revoked=revoked)

    def remove_versions(self, service: str, versions: Sequence[int]) -> None:
        """Drop the given versions of ``service`` (absent ones are ignored) and save; the
        revocation list is kept. Blocking."""
        self._check_open()
        data = self.load()
        gone = set(versions)
        data[service] = [(v, r) for v, r in data.get(service, []) if v not in gone]
        if not data[service]:
            del data[service]
        self.save(data)

    def save(
        self,
        data: Mapping[str, Sequence[tuple[int, Mapping[str, object]]]],
        *,
        revoked: Sequence[str] | None = None,
    ) -> None:
        """Encrypt ``data`` (service -> [(version, record)], versions increasing) with a
        fresh nonce and replace the key file atomically (temp file 0600 in the same
        directory, fsync, rename, fsync the directory).

        Refuses (KeyFileError) to overwrite an existing file this key cannot decrypt, so a
        wrong passphrase can never destroy a key store. Raises ValueError for malformed
        ``data``. Records are not validated here (``add_version`` does that).
        ``revoked`` replaces the revocation list; None keeps the one in the file.
        """
        self._check_open()
        if self.exists():
            try:
                self.load()
            except KeyFileError as exc:
                raise KeyFileError(f"refusing to overwrite: {exc}") from None
        else:
            self._revoked = ()
        document = _encode_document(data, self._revoked if revoked is None else revoked)
        header = self._new_header()
        key = self._key_for(header)
        header_bytes = header.pack()
        plain = bytearray(json.dumps(document, separators=(",", ":")), "utf-8")
        try:
            body = AESGCM(key).encrypt(header.nonce, plain, header_bytes)
        finally:
            wipe_bytearray(plain)
        directory = self._path.parent
        tmp = directory / f".{self._path.name}.{secrets.token_hex(8)}.tmp"
        try:
            _write_new_file(tmp, header_bytes + body)
            os.replace(tmp, self._path)
            _fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise KeyFileError(f"{self._path}: cannot write key file: {exc.strerror}") from None

    def add_version(self, service: str, record: Mapping[str, object]) -> int:
        """Validate ``record`` (KeyRecordError names the field), refuse a key_id already
        present for ``service`` (KeyRecordError), append it as the service's next version,
        save, and return that version number. Creates the file if it does not exist."""
        self._check_open()
        _check_service_name(service)
        meta, _, _ = parse_record(record)
        data = self.load() if self.exists() else {}
        if self.exists() and meta.key_id in self._revoked:
            raise KeyRecordError(f"key_id: {meta.key_id} is revoked and cannot be used again")
        entries = data.setdefault(service, [])
        for version, existing in entries:
            if existing.get("key_id") == meta.key_id:
                raise KeyRecordError(
                    f"key_id: {meta.key_id} is already version {version} of {service}"
                )
        new_version = entries[-1][0] + 1 if entries else 1
        entries.append((new_version, dict(record)))
        self.save(data)
        return new_version

    def list_meta(self) -> dict[str, list[tuple[int, KeyMeta]]]:
        """Return service -> [(version, KeyMeta)] for every record; nothing secret.
        Raises KeyFileError as :meth:`load`, KeyRecordError (naming service and version)
        for an invalid record."""
        out: dict[str, list[tuple[int, KeyMeta]]] = {}
        for service, entries in self.load().items():
            metas: list[tuple[int, KeyMeta]] = []
            for version, record in entries:
                try:
                    meta, _, _ = parse_record(record)
                except KeyRecordError as exc:
                    raise KeyRecordError(f"{service} version {version}: {exc}") from None
                metas.append((version, meta))
            out[service] = metas
        return out

    @staticmethod
    def create_kek_file(path: Path) -> None:
        """Write a new KEK file of 32 random bytes with mode 0600 (O_CREAT|O_EXCL: an
        existing file is never overwritten; KeyFileError then). Blocking I/O."""
        kek = bytearray(KEK_LEN)
        try:
            with open("/dev/urandom", "rb", buffering=0) as rng:
                got = 0
                with memoryview(kek) as view:
                    while got < KEK_LEN:
                        n = rng.readinto(view[got:])
                        if not n:
                            raise KeyFileError("cannot read /dev/urandom")
                        got += n
            _write_new_file(Path(path), kek)
            _fsync_dir(Path(path).parent)
        except FileExistsError:
            raise KeyFileError(f"{path}: already exists; refusing to overwrite a KEK") from None
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot write KEK file: {exc.strerror}") from None
        finally:
            wipe_bytearray(kek)


def _parse_json(plain: bytearray) -> tuple[object, str | None]:
    """Parse the decrypted document; return (document, None) or (None, problem).

    Never raises: json's exceptions carry the document text, which holds secrets.
    """
    # Decoded once from the buffer (json.loads(bytes) would make a text copy it cannot
    # wipe), parsed with secretjson (no stray partial copies of escaped values such as a
    # PEM), and the text zeroed before it is dropped.
    text: str | None = None
    try:
        with memoryview(plain) as view:
            text = str(view, "utf-8")
        return secretjson.loads(text, object_pairs_hook=_reject_duplicate_names), None
    except _DuplicateNameError as exc:
        return None, f"has a duplicate field {exc.name!r}"
    except (ValueError, RecursionError):
        return None, "is not valid JSON"
    finally:
        if text is not None:
            wipe_str(text)
        del text
