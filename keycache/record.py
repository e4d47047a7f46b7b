"""The key record: one JSON object per key version (DESIGN.md "Key record").

The same object lives in the key file, arrives on ``authproxy keys import``'s stdin and is
the data of a Vault KV v2 version. :func:`parse_record` is the single validator: strict
(unknown fields refused), naming the failing field in every error, and never putting a
secret in a message. It is pure and may run anywhere, including the event loop, except
that validating a PEM parses an RSA/EC/Ed25519 key (well under a millisecond, but do it
off the hot path anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, get_args

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keycache.errors import KeyRecordError
from keycache.securemem import SecureBuffer, wipe_str

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "HMAC_ALGORITHMS",
    "PEM_ALGORITHMS",
    "SECRET_FIELDS",
    "TIMESTAMP_FORMAT",
    "Algorithm",
    "KeyMeta",
    "check_private_key",
    "compute_checksum",
    "format_timestamp",
    "make_record",
    "new_key_id",
    "parse_record",
    "pem_body",
    "scrub_record",
]

Algorithm = Literal[
    "hmac-sha256", "hmac-sha384", "hmac-sha512", "ed25519", "rsa-pkcs1-sha256", "es256"
]
ALGORITHMS: Final[tuple[Algorithm, ...]] = get_args(Algorithm)
HMAC_ALGORITHMS: Final[frozenset[Algorithm]] = frozenset(
    ("hmac-sha256", "hmac-sha384", "hmac-sha512")
)
PEM_ALGORITHMS: Final[frozenset[Algorithm]] = frozenset(("ed25519", "rsa-pkcs1-sha256", "es256"))
#: DESIGN.md: "hmac-sha256 unless the venue's scheme fixes another".
DEFAULT_ALGORITHM: Final[Algorithm] = "hmac-sha256"

#: The seed's formatTimestamp (``std::put_time(gmtime, "%Y-%m-%dT%H:%M:%SZ")``).
TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

#: Venue API key strings are at most ~128 characters; the key id goes into a request
#: header on every request, so an absurd one is refused rather than forwarded.
MAX_KEY_ID_LEN: Final = 256
#: A 4096-bit RSA PKCS#8 PEM is about 3.3 kB; anything past 16 kB is not a key.
MAX_SECRET_LEN: Final = 16 * 1024
#: OKX passphrases are at most 32 characters; generous bound, still refuses junk.
MAX_PASSPHRASE_LEN: Final = 256
#: Permission names are short tokens (``trade``, ``read``); bound each and their count.
MAX_PERMISSION_LEN: Final = 128
MAX_PERMISSIONS: Final = 64
#: NIST SP 800-131A: RSA keys below 2048 bits are disallowed for signatures.
MIN_RSA_BITS: Final = 2048
#: The PEM label of an unencrypted PKCS#8 private key (RFC 7468 section 10). The
#: traditional "RSA PRIVATE KEY" / "EC PRIVATE KEY" forms are refused: the contract is
#: PKCS#8, and one format means one code path in every signer.
PKCS8_PEM_HEADER: Final = "-----BEGIN PRIVATE KEY-----"
PKCS8_PEM_FOOTER: Final = "-----END PRIVATE KEY-----"

_REQUIRED: Final = ("key_id", "secret_key", "created_at", "expires_at", "permissions", "checksum")
_OPTIONAL: Final = ("algorithm", "passphrase", "activates_at")
_KNOWN: Final = frozenset(_REQUIRED + _OPTIONAL)
_KEY_TYPE_NAMES: Final[dict[Algorithm, str]] = {
    "ed25519": "an Ed25519",
    "rsa-pkcs1-sha256": "an RSA",
    "es256": "a P-256 (secp256r1) EC",
}


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """Everything public about one key version; holds nothing secret.

    ``created_at_raw`` / ``expires_at_raw`` are the exact strings of the record, which the
    checksum covers (re-serialise with them, not by reformatting the datetimes).
    """

    key_id: str
    algorithm: Algorithm
    created_at: datetime
    expires_at: datetime
    activates_at: datetime | None
    permissions: tuple[str, ...]
    checksum: str
    has_passphrase: bool
    created_at_raw: str
    expires_at_raw: str

    def activated(self, now: datetime) -> bool:
        """True if the key may sign as far as activation goes (``activates_at`` passed or
        absent). ``now`` must be timezone-aware."""
        return self.activates_at is None or self.activates_at <= now

    def expired(self, now: datetime) -> bool:
        """True once ``now`` has reached ``expires_at``. ``now`` must be timezone-aware."""
        return now >= self.expires_at

    def usable(self, now: datetime) -> bool:
        """True if the key is activated and not expired at ``now``."""
        return self.activated(now) and not self.expired(now)


def compute_checksum(
    key_id: str, created_at: str, expires_at: str, permissions: Sequence[str]
) -> str:
    """Return the seed's ``generateChecksum``: lowercase hex SHA-256 of the UTF-8 bytes of
    ``key_id + created_at + expires_at + "".join(permissions)``, using the strings exactly
    as they appear in the record."""
    data = key_id + created_at + expires_at + "".join(permissions)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def format_timestamp(value: datetime, field: str = "timestamp") -> str:
    """Format an aware datetime as the seed does (``2026-11-28T00:00:00Z``, seconds
    precision, UTC). Raises KeyRecordError naming ``field`` if ``value`` is naive."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise KeyRecordError(f"{field}: must be timezone-aware")
    return value.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def new_key_id() -> str:
    """Return a fresh key id in the format of the keys we generate: ``hft_<32 hex>``."""
    return "hft_" + secrets.token_hex(16)


def _is_printable_token(value: str) -> bool:
    # Printable ASCII without space: safe in a header value and in a log line.
    return all("!" <= ch <= "~" for ch in value)


def _parse_time(field: str, value: object) -> datetime:
    if not isinstance(value, str) or not value:
        raise KeyRecordError(f"{field}: must be an ISO-8601 UTC timestamp string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise KeyRecordError(
            f"{field}: not an ISO-8601 timestamp (expected e.g. 2026-11-28T00:00:00Z)"
        ) from None
    offset = parsed.utcoffset()
    if offset is None:
        raise KeyRecordError(f"{field}: must carry a UTC offset (Z or +00:00)")
    if offset != timedelta(0):
        raise KeyRecordError(f"{field}: must be UTC (Z or +00:00)")
    return parsed.astimezone(UTC)


def _check_pem(algorithm: Algorithm, secret: str, *, load: bool) -> None:
    """Check that ``secret`` is an unencrypted PKCS#8 PEM holding the key type of
    ``algorithm`` (the key itself is parsed only if ``load``). Errors never echo the PEM."""
    # Where the text starts, found without lstrip(): that would return a copy of the PEM.
    start = 0
    while start < len(secret) and secret[start].isspace():
        start += 1
    if not secret.startswith(PKCS8_PEM_HEADER, start):
        raise KeyRecordError(f"secret_key: must be a PKCS#8 PEM for algorithm {algorithm}")
    if not secret.isascii():
        raise KeyRecordError(f"secret_key: PEM for algorithm {algorithm} must be ASCII")
    if not load:
        return
    # Parsed from a scratch locked buffer, PEM text and DER both, wiped at once: loading
    # ``secret.encode()`` with load_pem_private_key would leave the PEM bytes and the
    # decoded DER in freed memory (measured by tests/e2e/test_coredump.py).
    body_start, body_end = pem_body(secret)
    scratch = SecureBuffer(len(secret) * 2)
    try:
        pem_view = scratch.store_text(secret)
        try:
            der = scratch.store_base64(pem_view[body_start:body_end])
        except ValueError:
            raise KeyRecordError(
                f"secret_key: must be a PKCS#8 PEM for algorithm {algorithm} (does not load)"
            ) from None
        check_private_key(algorithm, der)
    finally:
        scratch.wipe()


def pem_body(secret: str) -> tuple[int, int]:
    """Where the base64 body of a PKCS#8 PEM is in ``secret``: ``(start, end)`` indices
    (the characters between the BEGIN and END lines). ``secret`` must have passed
    :func:`parse_record`, so it is ASCII and character indices are byte offsets. Raises
    KeyRecordError if the END line is missing."""
    start = secret.find(PKCS8_PEM_HEADER)
    end = secret.find(PKCS8_PEM_FOOTER, start + len(PKCS8_PEM_HEADER)) if start >= 0 else -1
    if end < 0:
        raise KeyRecordError("secret_key: PEM has no -----END PRIVATE KEY----- line")
    return start + len(PKCS8_PEM_HEADER), end


def check_private_key(algorithm: Algorithm, der: memoryview) -> None:
    """Check that ``der`` (a PKCS#8 DER, typically a view into locked memory) loads as a
    private key of ``algorithm``'s type. Parsing DER from the caller's buffer leaves no
    decoded copy of the key behind (parsing a PEM leaves the base64-decoded DER in freed
    memory). Raises KeyRecordError naming the field, never echoing key bytes."""
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyRecordError(
            f"secret_key: must be a PKCS#8 PEM for algorithm {algorithm} (does not load)"
        ) from None
    _check_key_type(algorithm, key)


def _check_key_type(algorithm: Algorithm, key: object) -> None:
    ok: bool
    if algorithm == "ed25519":
        ok = isinstance(key, ed25519.Ed25519PrivateKey)
    elif algorithm == "rsa-pkcs1-sha256":
        ok = isinstance(key, rsa.RSAPrivateKey)
        if ok and isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
            raise KeyRecordError(
                f"secret_key: RSA key of {key.key_size} bits is too small (minimum {MIN_RSA_BITS})"
            )
    else:
        ok = isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    if not ok:
        raise KeyRecordError(
            f"secret_key: algorithm {algorithm} needs {_KEY_TYPE_NAMES[algorithm]} "
            "private key; the PEM holds another key type"
        )


def parse_record(
    obj: Mapping[str, object], *, load_key: bool = True
) -> tuple[KeyMeta, str, str | None]:
    """Validate one key record; return ``(meta, secret_key, passphrase)``.

    Strict: every field of DESIGN.md's record is checked, unknown fields are refused, and
    the checksum must match. Raises KeyRecordError whose message starts with the field
    path (``secret_key: ...``) and never contains a secret. Pure; no I/O.

    ``load_key=False`` checks a PEM's form but does not parse the key: for a caller that
    parses it itself from locked memory (:func:`keycache.ring.build_ring` with
    :func:`check_private_key`), since parsing it here leaves copies in freed memory.
    """
    if not isinstance(obj, Mapping):
        raise KeyRecordError("record: must be a JSON object")
    for name in obj:
        if not isinstance(name, str):
            raise KeyRecordError("record: field names must be strings")
        if name not in _KNOWN:
            raise KeyRecordError(f"{name}: unknown field")
    for name in _REQUIRED:
        if name not in obj:
            raise KeyRecordError(f"{name}: required field is missing")

    key_id = obj["key_id"]
    if not isinstance(key_id, str) or not key_id:
        raise KeyRecordError("key_id: must be a non-empty string")
    if len(key_id) > MAX_KEY_ID_LEN:
        raise KeyRecordError(f"key_id: longer than {MAX_KEY_ID_LEN} characters")
    if not _is_printable_token(key_id):
        raise KeyRecordError("key_id: must be printable ASCII without whitespace")

    raw_algorithm = obj.get("algorithm", DEFAULT_ALGORITHM)
    if raw_algorithm not in ALGORITHMS:
        raise KeyRecordError(f"algorithm: must be one of {', '.join(ALGORITHMS)}")
    algorithm: Algorithm = next(a for a in ALGORITHMS if a == raw_algorithm)

    secret = obj["secret_key"]
    if not isinstance(secret, str) or not secret:
        raise KeyRecordError("secret_key: must be a non-empty string")
    if len(secret) > MAX_SECRET_LEN:
        raise KeyRecordError(f"secret_key: longer than {MAX_SECRET_LEN} characters")
    if algorithm in HMAC_ALGORITHMS:
        # A copy-paste artefact (trailing newline) yields signatures the venue rejects with
        # no hint why; no venue issues secrets with surrounding whitespace.
        if secret != secret.strip():
            raise KeyRecordError("secret_key: has leading or trailing whitespace")
    else:
        _check_pem(algorithm, secret, load=load_key)

    passphrase: str | None = None
    if "passphrase" in obj:
        raw_pass = obj["passphrase"]
        if not isinstance(raw_pass, str) or not raw_pass:
            raise KeyRecordError("passphrase: must be a non-empty string when present")
        if len(raw_pass) > MAX_PASSPHRASE_LEN:
            raise KeyRecordError(f"passphrase: longer than {MAX_PASSPHRASE_LEN} characters")
        passphrase = raw_pass

    created_raw = obj["created_at"]
    expires_raw = obj["expires_at"]
    created_at = _parse_time("created_at", created_raw)
    expires_at = _parse_time("expires_at", expires_raw)
    assert isinstance(created_raw, str)
    assert isinstance(expires_raw, str)
    if expires_at <= created_at:
        raise KeyRecordError("expires_at: must be after created_at")
    activates_at: datetime | None = None
    if "activates_at" in obj:
        activates_at = _parse_time("activates_at", obj["activates_at"])
        if activates_at >= expires_at:
            raise KeyRecordError("activates_at: must be before expires_at")

    raw_perms = obj["permissions"]
    if not isinstance(raw_perms, list | tuple):
        raise KeyRecordError("permissions: must be a list of strings")
    if len(raw_perms) > MAX_PERMISSIONS:
        raise KeyRecordError(f"permissions: more than {MAX_PERMISSIONS} entries")
    permissions: list[str] = []
    for i, perm in enumerate(raw_perms):
        if not isinstance(perm, str) or not perm:
            raise KeyRecordError(f"permissions[{i}]: must be a non-empty string")
        if len(perm) > MAX_PERMISSION_LEN or not _is_printable_token(perm):
            raise KeyRecordError(
                f"permissions[{i}]: must be printable ASCII without whitespace, "
                f"at most {MAX_PERMISSION_LEN} characters"
            )
        permissions.append(perm)

    checksum = obj["checksum"]
    if not isinstance(checksum, str) or len(checksum) != 64:
        raise KeyRecordError("checksum: must be 64 hex characters (SHA-256)")
    expected = compute_checksum(key_id, created_raw, expires_raw, permissions)
    if not hmac.compare_digest(checksum.lower().encode("ascii", "replace"), expected.encode()):
        raise KeyRecordError(
            "checksum: the checksum does not match sha256(key_id + created_at + "
            "expires_at + permissions)"
        )

    meta = KeyMeta(
        key_id=key_id,
        algorithm=algorithm,
        created_at=created_at,
        expires_at=expires_at,
        activates_at=activates_at,
        permissions=tuple(permissions),
        checksum=expected,
        has_passphrase=passphrase is not None,
        created_at_raw=created_raw,
        expires_at_raw=expires_raw,
    )
    return meta, secret, passphrase


#: The fields of a key record that hold secrets.
SECRET_FIELDS: Final = ("secret_key", "passphrase")


def scrub_record(record: dict[str, object]) -> None:
    """Zero the secret strings of a record that was parsed from JSON (a Vault answer, the
    decrypted key file; see :func:`keycache.securemem.wipe_str`) and empty the dict. Call
    once the secret is in a ring; the record is unusable afterwards. Only for records
    whose strings nobody else holds (not one a caller built from its own strings).
    Never raises."""
    for name in SECRET_FIELDS:
        value = record.get(name)
        if isinstance(value, str):
            wipe_str(value)
    record.clear()


def make_record(
    key_id: str,
    secret_key: str,
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    created_at: datetime,
    expires_at: datetime,
    permissions: Sequence[str],
    activates_at: datetime | None = None,
    passphrase: str | None = None,
) -> dict[str, object]:
    """Build a valid key record (checksum included) from its parts.

    Timestamps must be timezone-aware and are written as ``%Y-%m-%dT%H:%M:%SZ`` (seconds
    precision, as the seed does). The result is checked with :func:`parse_record`, so
    invalid parts raise KeyRecordError naming the field. Used by tests and by ``authproxy
    keys generate``.
    """
    created_raw = format_timestamp(created_at, "created_at")
    expires_raw = format_timestamp(expires_at, "expires_at")
    perms = list(permissions)
    record: dict[str, object] = {
        "key_id": key_id,
        "secret_key": secret_key,
        "algorithm": algorithm,
        "created_at": created_raw,
        "expires_at": expires_raw,
        "permissions": perms,
    }
    if activates_at is not None:
        record["activates_at"] = format_timestamp(activates_at, "activates_at")
    if passphrase is not None:
        record["passphrase"] = passphrase
    record["checksum"] = compute_checksum(key_id, created_raw, expires_raw, perms)
    parse_record(record)
    return record
