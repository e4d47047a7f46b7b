"""Key rings: the live key versions of one service, held in one locked buffer.

A :class:`KeyRing` is immutable once built. A rotation or revocation builds a new ring and
swaps one reference; the old ring is retired (wiped) by its owner once no request can still
be using it. Choosing the signing key is a pure, synchronous, constant-time lookup over
at most two keys, safe on the event loop; :func:`build_ring` parses PEMs and copies
secrets, so it belongs off the hot path (it does no I/O).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise

from keycache.errors import KeyRecordError, NoUsableKeyError
from keycache.record import PEM_ALGORITHMS, KeyMeta, check_private_key, parse_record, pem_body
from keycache.securemem import SecureBuffer, utf8_len

__all__ = [
    "KeyRing",
    "LiveKey",
    "build_ring",
    "live_versions",
    "next_liveness_change",
    "previous_stays_live",
]

#: How many versions a ring holds at most: the newest (*next*) and, during the overlap
#: window, the one before it (*current*). DESIGN.md "Vault layout".
MAX_LIVE_VERSIONS = 2


@dataclass(frozen=True, slots=True, eq=False)
class LiveKey:
    """One live key version. ``secret`` (and ``passphrase``) are read-only views into the
    ring's locked buffer; they are released when the ring is retired. For a PEM key
    (``ed25519``, ``rsa-pkcs1-sha256``, ``es256``) ``der`` is its PKCS#8 DER, decoded
    into the same buffer: signers load the key from it (``load_der_private_key``), which
    leaves no decoded copy behind as parsing the PEM does. None for HMAC keys.

    The secret never appears in ``repr``; ``eq=False`` keeps equality and hashing by
    identity, so comparing or hashing a LiveKey never touches (or leaks timing about) the
    secret bytes.
    """

    service: str
    version: int
    meta: KeyMeta
    secret: memoryview = field(repr=False)
    passphrase: memoryview | None = field(repr=False, default=None)
    der: memoryview | None = field(repr=False, default=None)

    @property
    def key_id(self) -> str:
        """The key id the venue knows (public)."""
        return self.meta.key_id


@dataclass(frozen=True, slots=True, eq=False)
class KeyRing:
    """The live keys of one service, oldest to newest, and the buffer that holds them.

    ``rebuild_at`` is the next moment the set of live versions changes by the passage of
    time alone (the overlap window closing), or None; the owner rebuilds the ring then.
    Methods are synchronous and O(number of keys) with at most two keys: safe on the loop.
    """

    service: str
    keys: tuple[LiveKey, ...]
    buffer: SecureBuffer
    rebuild_at: datetime | None = None

    def signing_key(self, now: datetime) -> LiveKey:
        """Return the newest key that is activated and not expired at ``now`` (aware).

        Raises NoUsableKeyError if there is none or the ring was retired.
        """
        if self.buffer.wiped:
            raise NoUsableKeyError(f"{self.service}: key ring was retired")
        for key in reversed(self.keys):
            if key.meta.usable(now):
                return key
        raise NoUsableKeyError(self._why_unusable(now))

    def fallback_key(self, used: LiveKey, now: datetime) -> LiveKey | None:
        """Return the other usable key of the overlap pair (the newest usable key whose
        version differs from ``used``), or None. Never raises."""
        if self.buffer.wiped:
            return None
        for key in reversed(self.keys):
            if key.version != used.version and key.meta.usable(now):
                return key
        return None

    def key_ids(self) -> tuple[str, ...]:
        """Key ids of the live keys, oldest to newest (public values)."""
        return tuple(key.meta.key_id for key in self.keys)

    def retire(self) -> None:
        """Wipe the buffer: every secret view of this ring is zeroed and released.
        Idempotent. Call only once no request can still sign with this ring."""
        self.buffer.wipe()

    def _why_unusable(self, now: datetime) -> str:
        if not self.keys:
            return f"{self.service}: no key versions"
        if all(key.meta.expired(now) for key in self.keys):
            return f"{self.service}: every live key has expired"
        return f"{self.service}: no live key is activated yet"


def previous_stays_live(newest: KeyMeta, now: datetime, overlap: timedelta) -> bool:
    """True if the version before ``newest`` is still live at ``now``: the overlap window
    (``newest.created_at + overlap``) is open, or ``newest`` is not usable (not activated
    yet, or expired). The rule :func:`live_versions` applies; exposed so a caller that
    has only the newest version's public metadata (the Vault watcher) can decide whether
    it needs the previous version's secret at all. Pure."""
    return now < newest.created_at + overlap or not newest.usable(now)


def live_versions(
    versions_meta: Sequence[tuple[int, KeyMeta]], now: datetime, overlap: timedelta
) -> list[int]:
    """Return the live versions, ascending, among ``versions_meta`` (the versions that are
    not deleted or destroyed).

    The newest version is always live. The version before it stays live while the overlap
    window is open (``now < newest.created_at + overlap``) and also, so that a rotation
    never leaves a service without a key, while the newest is not usable yet (its
    ``activates_at`` is in the future) or no longer usable (expired). Older versions are
    never live. Raises ValueError on duplicate versions or a negative overlap.
    """
    if overlap < timedelta(0):
        raise ValueError("overlap must not be negative")
    if not versions_meta:
        return []
    ordered = sorted(versions_meta, key=lambda vm: vm[0])
    for (a, _), (b, _) in pairwise(ordered):
        if a == b:
            raise ValueError(f"duplicate key version {a}")
    newest_version, newest = ordered[-1]
    if len(ordered) == 1:
        return [newest_version]
    previous_version = ordered[-2][0]
    if previous_stays_live(newest, now, overlap):
        return [previous_version, newest_version]
    return [newest_version]


def next_liveness_change(
    versions_meta: Sequence[tuple[int, KeyMeta]], now: datetime, overlap: timedelta
) -> datetime | None:
    """Return the earliest moment after ``now`` at which :func:`live_versions` would drop
    the previous version by time alone, or None if it will not (nothing to drop)."""
    if len(live_versions(versions_meta, now, overlap)) < MAX_LIVE_VERSIONS:
        return None
    newest = max(versions_meta, key=lambda vm: vm[0])[1]
    candidates = [newest.created_at + overlap]
    if newest.activates_at is not None:
        candidates.append(newest.activates_at)
    # The previous version is dropped once the window has closed AND the newest is usable.
    moment = max(candidates)
    if moment <= now or moment >= newest.expires_at:
        # Kept only because the newest has expired: time alone will not change that.
        return None
    return moment


def _store_der(buffer: SecureBuffer, pem: str, pem_view: memoryview, where: str) -> memoryview:
    """Decode the base64 body of ``pem`` (already stored as ``pem_view``) into ``buffer``;
    return the view of the DER. The body is read from the locked copy, not from the str."""
    start, end = pem_body(pem)
    try:
        return buffer.store_base64(pem_view[start:end])
    except ValueError:
        raise KeyRecordError(f"{where}: secret_key: PEM body is not base64") from None


def build_ring(
    service: str,
    versions: Sequence[tuple[int, Mapping[str, object]]],
    *,
    now: datetime,
    overlap: timedelta,
    require_lock: bool = False,
    created_times: Mapping[int, datetime] | None = None,
    carried: Sequence[LiveKey] = (),
) -> KeyRing:
    """Validate every record, choose the live versions (:func:`live_versions`) and copy
    their secrets and passphrases into one fresh :class:`SecureBuffer`.

    ``versions`` are ``(version, record)`` pairs in any order. Secrets of versions that
    are not live are never copied. Raises KeyRecordError (naming service, version and
    field) for any invalid record, ValueError for duplicate versions, MemoryLockError if
    ``require_lock`` and the buffer cannot be locked. No I/O; not for the hot path.

    Two optional inputs serve the Vault watcher (the file store passes neither):

    - ``created_times`` maps a version to the moment the *store* created it (Vault's
      ``created_time`` metadata). Where given, it replaces the record's ``created_at``
      when deciding liveness and ``rebuild_at`` (DESIGN.md: the overlap window runs from
      the new version's Vault ``created_time``); the keys keep their record metadata.
    - ``carried`` are keys of a live ring, already validated, whose secrets are copied
      buffer to buffer (no ``str`` copy) instead of being read again from the store. Their
      ring must not be retired during the call (a released view raises ValueError).
    """
    parsed: dict[int, tuple[KeyMeta, str, str | None]] = {}
    for version, record in versions:
        try:
            # The PEM is parsed below, from locked memory, not here (copies).
            parsed_record = parse_record(record, load_key=False)
        except KeyRecordError as exc:
            raise KeyRecordError(f"{service} version {version}: {exc}") from None
        if version in parsed:
            raise ValueError(f"{service}: duplicate key version {version}")
        parsed[version] = parsed_record
    held: dict[int, LiveKey] = {}
    for key in carried:
        if key.version in parsed or key.version in held:
            raise ValueError(f"{service}: duplicate key version {key.version}")
        held[key.version] = key
    times = created_times or {}
    metas = [(version, p[0]) for version, p in parsed.items()]
    metas += [(version, key.meta) for version, key in held.items()]
    liveness = [
        (version, replace(meta, created_at=times[version]) if version in times else meta)
        for version, meta in metas
    ]
    live = live_versions(liveness, now, overlap)

    total = 0
    for version in live:
        if version in held:
            key = held[version]
            for view in (key.secret, key.passphrase, key.der):
                total += view.nbytes if view is not None else 0
            continue
        meta, secret, passphrase = parsed[version]
        total += utf8_len(secret)
        if meta.algorithm in PEM_ALGORITHMS:
            total += len(secret) * 3 // 4 + 3  # the DER: at most 3 bytes per 4 of base64
        if passphrase is not None:
            total += utf8_len(passphrase)
    # SecureBuffer needs a positive size; an empty ring still owns one (unused) page so
    # retire() and the memory-lock status behave the same for every ring.
    buffer = SecureBuffer(max(total, 1), require_lock=require_lock)
    try:
        keys: list[LiveKey] = []
        for version in live:
            if version in held:
                old = held[version]
                secret_view = buffer.store(old.secret)
                pass_view = buffer.store(old.passphrase) if old.passphrase is not None else None
                der_view = buffer.store(old.der) if old.der is not None else None
                keys.append(LiveKey(service, version, old.meta, secret_view, pass_view, der_view))
                continue
            meta, secret, passphrase = parsed[version]
            secret_view = buffer.store_text(secret)
            pass_view = buffer.store_text(passphrase) if passphrase is not None else None
            der_view = None
            if meta.algorithm in PEM_ALGORITHMS:
                der_view = _store_der(buffer, secret, secret_view, f"{service} version {version}")
                try:
                    check_private_key(meta.algorithm, der_view)
                except KeyRecordError as exc:
                    raise KeyRecordError(f"{service} version {version}: {exc}") from None
            keys.append(LiveKey(service, version, meta, secret_view, pass_view, der_view))
    except BaseException:
        buffer.wipe()
        raise
    finally:
        # Drop our references to the secret strings at once; the str objects themselves
        # are wiped by the caller that owns the records (keycache.vault.scrub_record).
        parsed.clear()
    return KeyRing(
        service=service,
        keys=tuple(keys),
        buffer=buffer,
        rebuild_at=next_liveness_change(liveness, now, overlap),
    )
