"""Key lifecycle: the decisions (pure) and the commands over any key store.

The CLI parses arguments and picks the store; everything here takes its seams as
parameters: the store (:class:`keycache.store.KeyStore`), the audit log, the clock and the
sidecar's admin API (:class:`Sidecar`). The commands block (store I/O, HTTP): never call
them on the event loop.

Decisions made here (README "Rotating a key"):

- **Keys we issue** are the key types in :data:`ISSUED_KEY_TYPES` (internal service keys):
  a 256-bit secret from the OS CSPRNG (``secrets``), key id ``hft_<32 hex>``,
  ``hmac-sha256``, validity and permissions from the key type's policy.
- **Client-made key pairs** (Binance Ed25519/RSA, Coinbase CDP es256, Bybit RSA): the pair
  is made here and the private key stored as a **staged** version: key id
  ``staged_<32 hex>`` (the venue's API key string is not known until the public key is
  registered) and ``activates_at`` one second before ``expires_at``, so the sidecar never
  signs with it (and keeps the previous key live, ``keycache.ring.live_versions``) until
  ``keys activate`` rewrites it under the venue's key id.
- **Rotation** writes the next version with check-and-set on the version it read, so of
  two racing rotators exactly one wins; the loser raises KeyStoreConflict carrying the
  winner's version. ``emergency`` then removes every older version at once and revokes
  their key ids.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final, Literal, Protocol

from cronsim import CronSim, CronSimError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keycache.errors import KeyRecordError, KeyStoreConflict
from keycache.record import KeyMeta, format_timestamp, make_record, new_key_id
from keycache.store import KeyStore
from proxy.audit import AuditLog
from proxy.config import ApiKeyPolicy, Config, KeyTypePolicy
from proxy.errors import ConfigError, ProxyError
from proxy.signers.internal import activation_time

__all__ = [
    "ISSUED_KEY_TYPES",
    "KEYPAIR_ALGORITHMS",
    "AdminSidecar",
    "LifecycleError",
    "Sidecar",
    "activate",
    "generate",
    "import_record",
    "new_internal_record",
    "new_keypair",
    "revoke",
    "rotate",
    "rotation_due",
    "run_rotator_once",
    "schedule_report",
    "verify",
]

#: Key types whose keys we make ourselves (the venue does not issue them).
ISSUED_KEY_TYPES: Final = frozenset({"internal_service"})
#: 256 bits, the seed's minimum_key_length, from the OS CSPRNG.
SECRET_BYTES: Final = 32
#: RSA modulus for client-made venue key pairs (Binance and Bybit accept 2048+).
RSA_BITS: Final = 2048
#: CLI --algorithm -> record algorithm.
KEYPAIR_ALGORITHMS: Final[dict[str, str]] = {
    "ed25519": "ed25519",
    "rsa": "rsa-pkcs1-sha256",
    "es256": "es256",
}
STAGED_PREFIX: Final = "staged_"
#: How long an admin API call may take before the command says the sidecar did not answer.
ADMIN_TIMEOUT_S: Final = 3.0

Status = Literal["ok", "due", "overdue"]


class LifecycleError(ProxyError):
    """A lifecycle command cannot do what was asked (unknown service, wrong key type,
    nothing to activate, verification failed)."""

    def __init__(self, message: str, code: str = "lifecycle") -> None:
        super().__init__(message, code=code)


# -- pure: new records ------------------------------------------------------------------


def _validity(policy: KeyTypePolicy, now: datetime) -> tuple[datetime, datetime]:
    created = now.replace(microsecond=0)
    return created, created + timedelta(days=policy.validity_days)


def new_internal_record(
    policy: KeyTypePolicy, now: datetime, activates_at: datetime | None = None
) -> dict[str, object]:
    """A fresh key we issue ourselves: 256-bit CSPRNG secret (hex), ``hft_<32 hex>``.
    ``activates_at``: when it starts signing (None: at once)."""
    created, expires = _validity(policy, now)
    return make_record(
        new_key_id(),
        secrets.token_hex(SECRET_BYTES),
        created_at=created,
        expires_at=expires,
        permissions=policy.permissions,
        activates_at=activates_at,
    )


def new_keypair(
    algorithm: str, policy: KeyTypePolicy, now: datetime
) -> tuple[dict[str, object], str]:
    """Make a key pair; return (staged record holding the PKCS#8 private key, public key
    as the venue's registration page asks for it: PEM SubjectPublicKeyInfo)."""
    if algorithm not in KEYPAIR_ALGORITHMS:
        raise LifecycleError(f"--algorithm must be one of {', '.join(KEYPAIR_ALGORITHMS)}")
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    created, expires = _validity(policy, now)
    record = make_record(
        STAGED_PREFIX + secrets.token_hex(16),
        pem,
        algorithm=KEYPAIR_ALGORITHMS[algorithm],
        created_at=created,
        expires_at=expires,
        activates_at=expires - timedelta(seconds=1),
        permissions=policy.permissions,
    )
    return record, public


# -- the sidecar's admin API --------------------------------------------------------------


class Sidecar(Protocol):
    """The running sidecar, as far as the lifecycle needs it."""

    def revoke(self, service: str, key_id: str) -> str | None:
        """Tell it to drop ``key_id`` now; return None on success, else why not."""
        ...

    def keys(self) -> list[dict[str, object]] | None:
        """Its live keys (service, key_id, checksum), or None if it does not answer."""
        ...


@dataclass(frozen=True)
class AdminSidecar:
    """The admin API over HTTP: ``POST /keys/revoke``, ``GET /keys``, bearer token."""

    address: str
    port: int
    token_file: Path | None

    def _request(self, method: str, path: str, body: object | None) -> tuple[int, bytes] | str:
        if self.port == 0:
            return "admin.port is 0 (no fixed admin address to reach)"
        headers = {"Content-Type": "application/json"}
        if self.token_file is not None:
            try:
                headers["Authorization"] = (
                    "Bearer " + self.token_file.read_text(encoding="utf-8").strip()
                )
            except OSError as exc:
                return f"cannot read admin.token_file: {exc.strerror}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://{self.address}:{self.port}{path}", data=data, headers=headers, method=method
        )
        try:
            # http:// + the configured admin address only: never a file: or custom scheme.
            with urllib.request.urlopen(req, timeout=ADMIN_TIMEOUT_S) as resp:  # noqa: S310
                return int(resp.status), bytes(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            return f"sidecar answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"sidecar not reachable at {self.address}:{self.port} ({reason})"

    def revoke(self, service: str, key_id: str) -> str | None:
        got = self._request("POST", "/keys/revoke", {"service": service, "key_id": key_id})
        return got if isinstance(got, str) else None

    def keys(self) -> list[dict[str, object]] | None:
        got = self._request("GET", "/keys", None)
        if isinstance(got, str):
            return None
        try:
            doc = json.loads(got[1])
        except ValueError:
            return None
        return _key_entries(doc)


def _key_entries(doc: object) -> list[dict[str, object]]:
    """Flatten the admin API's ``GET /keys`` answer (``{"services": {service: {"keys":
    [entry, ...]}}}``, also accepted without the ``services`` wrapper) into entries with
    ``service``, ``key_id``, ``checksum`` and ``checksum_ok`` (None where not given)."""
    out: list[dict[str, object]] = []
    if isinstance(doc, dict) and isinstance(doc.get("services"), dict):
        doc = doc["services"]  # {"backend": ..., "services": {...}}
    if not isinstance(doc, dict):
        return out
    for service, value in doc.items():
        keys = value.get("keys") if isinstance(value, dict) else value
        if not isinstance(keys, list):
            continue
        out.extend(
            {
                "service": service,
                "key_id": item["key_id"],
                "checksum": item.get("checksum"),
                "checksum_ok": item.get("checksum_ok"),
            }
            for item in keys
            if isinstance(item, dict) and isinstance(item.get("key_id"), str)
        )
    return out


# -- commands -------------------------------------------------------------------------------


@dataclass
class Context:
    """What every command needs: config, store, audit log, clock, sidecar."""

    config: Config
    store: KeyStore
    audit: AuditLog
    sidecar: Sidecar
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    warnings: list[str] | None = None

    def warn(self, message: str) -> None:
        if self.warnings is None:
            self.warnings = []
        self.warnings.append(message)

    def key_type(self, service: str) -> tuple[str, KeyTypePolicy]:
        svc = self.config.services.get(service)
        if svc is None:
            raise ConfigError("services", f"no service named {service}")
        policy = self.config.api_key_policy.key_types.get(svc.key_type)
        if policy is None:
            raise ConfigError(f"services.{service}.key_type", f"unknown key type {svc.key_type}")
        return svc.key_type, policy

    @property
    def poll_hint(self) -> str:
        if self.config.keystore.backend == "vault":
            return "the sidecar drops it at its next Vault poll"
        return "the sidecar drops it at its next restart"


def _write(ctx: Context, service: str, record: dict[str, object], expected: int) -> int:
    key_id = str(record["key_id"])
    try:
        return ctx.store.write(service, record, expected)
    except KeyStoreConflict as exc:
        ctx.audit.record(
            "KEY_ROTATION_FAILED",
            service,
            key_id,
            "failure",
            reason="check_and_set_lost",
            expected_version=expected,
            winner_version=exc.current_version,
        )
        raise


def generate(ctx: Context, service: str, algorithm: str | None) -> dict[str, object]:
    """``keys generate``: a key we issue (internal key types) or a staged client-made key
    pair (``algorithm``). Returns the public result (never the secret)."""
    key_type, policy = ctx.key_type(service)
    now = ctx.clock()
    public: str | None = None
    if algorithm is None:
        if key_type not in ISSUED_KEY_TYPES:
            raise LifecycleError(
                f"{service}: key type {key_type} is issued by the venue; import it with "
                "`keys import`, or make a key pair with --algorithm"
            )
        record = new_internal_record(policy, now)
    else:
        record, public = new_keypair(algorithm, policy, now)
    expected = ctx.store.current_version(service)
    version = _write(ctx, service, record, expected)
    key_id = str(record["key_id"])
    ctx.audit.record("KEY_REGISTERED", service, key_id, version=version, staged=public is not None)
    out: dict[str, object] = {
        "service": service,
        "version": version,
        "key_id": key_id,
        "expires_at": record["expires_at"],
        "checksum": record["checksum"],
    }
    if public is not None:
        out["staged"] = True
        out["public_key"] = public
    return out


def import_record(ctx: Context, service: str, record: dict[str, object]) -> dict[str, object]:
    """``keys import``: add a venue-issued record as the next version (refuses a revoked
    key id, a duplicate, an invalid record)."""
    ctx.key_type(service)
    expected = ctx.store.current_version(service)
    version = _write(ctx, service, record, expected)
    ctx.audit.record("KEY_REGISTERED", service, str(record.get("key_id")), version=version)
    return {"service": service, "version": version, "key_id": record.get("key_id")}


def activate(ctx: Context, service: str, venue_key_id: str) -> dict[str, object]:
    """``keys activate``: turn the newest staged key pair into a live key under the key id
    the venue gave for its public key. The staged version is removed first (so the
    previous key keeps its overlap window), then the live record is written with
    check-and-set."""
    versions = ctx.store.live_versions(service)
    if not versions or not versions[-1][1].key_id.startswith(STAGED_PREFIX):
        raise LifecycleError(f"{service}: the newest version is not a staged key pair")
    if venue_key_id in ctx.store.revoked():
        raise KeyRecordError(f"key_id: {venue_key_id} is revoked and cannot be used again")
    staged_version, staged = versions[-1]
    record = _read_record(ctx, service, staged_version)
    try:
        now = ctx.clock().replace(microsecond=0)
        live = make_record(
            venue_key_id,
            str(record["secret_key"]),
            algorithm=staged.algorithm,
            created_at=now,
            expires_at=staged.expires_at,
            permissions=staged.permissions,
        )
    finally:
        record.clear()
    ctx.store.remove(service, staged_version)
    version = _write(ctx, service, live, ctx.store.current_version(service))
    ctx.audit.record("KEY_ARCHIVED", service, staged.key_id, version=staged_version)
    ctx.audit.record("KEY_ROTATION_COMPLETED", service, venue_key_id, version=version)
    return {"service": service, "version": version, "key_id": venue_key_id}


def _read_record(ctx: Context, service: str, version: int) -> dict[str, object]:
    return ctx.store.read_record(service, version)


def rotate(
    ctx: Context,
    service: str,
    *,
    emergency: bool = False,
    record: dict[str, object] | None = None,
    expected: int | None = None,
) -> dict[str, object]:
    """``keys rotate``: write the next version with check-and-set on the version read
    (or ``expected``). Internal key types get a fresh key; venue-issued ones need the
    venue's new ``record``. ``emergency`` removes and revokes every older version at
    once. Raises KeyStoreConflict (with the winner's version) if another rotation won."""
    key_type, policy = ctx.key_type(service)
    if record is None:
        if key_type not in ISSUED_KEY_TYPES:
            raise LifecycleError(
                f"{service}: key type {key_type} is issued by the venue; pass the venue's new "
                "key record on stdin (--from-stdin)"
            )
        now = ctx.clock()
        # Verifiers (ingress) accept the new key as soon as their watcher reads it; it
        # signs only two poll intervals later, so no call is signed with a key a verifier
        # has not seen (docs/ingress.md). An emergency signs at once: the old key is gone.
        vault = ctx.config.keystore.vault
        poll = vault.poll_interval_ms if ctx.config.keystore.backend == "vault" and vault else None
        record = new_internal_record(policy, now, None if emergency else activation_time(now, poll))
    before = ctx.store.live_versions(service)
    base = ctx.store.current_version(service) if expected is None else expected
    old_id = before[-1][1].key_id if before else None
    ctx.audit.record(
        "KEY_ROTATION_STARTED", service, old_id, from_version=base, emergency=emergency
    )
    version = _write(ctx, service, record, base)
    new_id = str(record["key_id"])
    ctx.audit.record("KEY_REGISTERED", service, new_id, version=version)
    revoked: list[str] = []
    if emergency:
        for old_version, meta in before:
            _revoke_one(ctx, service, old_version, meta.key_id, reason="emergency_rotation")
            revoked.append(meta.key_id)
    ctx.audit.record(
        "KEY_ROTATION_COMPLETED",
        service,
        new_id,
        version=version,
        from_version=base,
        emergency=emergency,
    )
    return {
        "service": service,
        "version": version,
        "key_id": new_id,
        "previous_version": base,
        "emergency": emergency,
        "revoked": revoked,
        "overlap_hours": 0
        if emergency
        else ctx.config.api_key_policy.global_settings.rotation_overlap_hours,
    }


def _revoke_one(ctx: Context, service: str, version: int, key_id: str, *, reason: str) -> None:
    # Revocation list first: from here on the key id can never come back, even if the
    # removal below fails half way.
    ctx.store.add_revoked(key_id)
    ctx.store.remove(service, version)
    ctx.audit.record("KEY_REVOKED", service, key_id, version=version, reason=reason)
    ctx.audit.record("KEY_ARCHIVED", service, key_id, version=version)
    problem = ctx.sidecar.revoke(service, key_id)
    if problem is not None:
        ctx.warn(f"{service} {key_id}: sidecar not told ({problem}); {ctx.poll_hint}")


def revoke(ctx: Context, service: str, key_id: str) -> dict[str, object]:
    """``keys revoke``: revocation list, remove every version holding ``key_id``, tell the
    sidecar. A key id not in the store is still added to the list (it may be a leaked
    key that was never imported)."""
    ctx.key_type(service)
    versions = [v for v, meta in ctx.store.live_versions(service) if meta.key_id == key_id]
    if not versions:
        ctx.store.add_revoked(key_id)
        ctx.audit.record("KEY_REVOKED", service, key_id, "warning", reason="not_in_store")
        problem = ctx.sidecar.revoke(service, key_id)
        if problem is not None:
            ctx.warn(f"{service} {key_id}: sidecar not told ({problem}); {ctx.poll_hint}")
    for version in versions:
        _revoke_one(ctx, service, version, key_id, reason="revoked")
    return {"service": service, "key_id": key_id, "removed_versions": versions}


def check_meta(
    meta: KeyMeta, policy: KeyTypePolicy, warning_days: int, now: datetime
) -> list[tuple[Literal["error", "warning"], str]]:
    """Pure: what is wrong with one version against the policy at ``now``."""
    problems: list[tuple[Literal["error", "warning"], str]] = []
    if meta.expired(now):
        problems.append(("error", f"expired at {format_timestamp(meta.expires_at)}"))
    elif meta.expires_at - now <= timedelta(days=warning_days):
        problems.append(("warning", f"expires at {format_timestamp(meta.expires_at)}"))
    extra = sorted(set(meta.permissions) - set(policy.permissions))
    if extra:
        problems.append(("error", f"permissions not in the policy: {', '.join(extra)}"))
    if meta.expires_at - meta.created_at > timedelta(days=policy.validity_days):
        problems.append(("error", f"validity longer than the policy's {policy.validity_days} days"))
    return problems


def verify(ctx: Context) -> tuple[bool, list[dict[str, object]]]:
    """``keys verify``: every configured service's live versions against the policy
    (checksum and structure by ``parse_record``, expiry, permissions) and, if a sidecar
    answers, that it holds the store's newest version. Returns (all good, report)."""
    now = ctx.clock()
    warning_days = ctx.config.api_key_policy.rotation.pre_rotation_warning_days
    live = ctx.sidecar.keys()
    ok = True
    report: list[dict[str, object]] = []
    for service in sorted(ctx.config.services):
        _, policy = ctx.key_type(service)
        entry: dict[str, object] = {"service": service}
        problems: list[tuple[str, str]] = []
        try:
            versions = ctx.store.live_versions(service)
        except KeyRecordError as exc:
            versions = []
            problems.append(("error", str(exc)))
        if not versions and not problems:
            problems.append(("error", "no key in the store"))
        for version, meta in versions:
            for level, text in check_meta(meta, policy, warning_days, now):
                problems.append((level, f"version {version} ({meta.key_id}): {text}"))
        if versions:
            newest = versions[-1][1]
            entry["version"] = versions[-1][0]
            entry["key_id"] = newest.key_id
            entry["checksum"] = newest.checksum
            if live is not None:
                held = [e for e in live if e.get("service") == service]
                match = any(
                    e["key_id"] == newest.key_id
                    and e.get("checksum") in (None, newest.checksum)
                    and e.get("checksum_ok") is not False
                    for e in held
                )
                entry["sidecar_matches"] = match
                if not match:
                    problems.append(
                        ("error", "the running sidecar does not hold the newest version")
                    )
        errors = [t for level, t in problems if level == "error"]
        entry["errors"] = errors
        entry["warnings"] = [t for level, t in problems if level == "warning"]
        ok = ok and not errors
        key_id = str(entry.get("key_id")) if "key_id" in entry else None
        if errors:
            ctx.audit.record("KEY_VERIFY_FAILED", service, key_id, "failure", errors=len(errors))
        else:
            ctx.audit.record("KEY_VERIFIED", service, key_id)
        report.append(entry)
    if live is None:
        ctx.warn("no sidecar answered on the admin port: live versions not compared")
    return ok, report


# -- scheduled rotation ------------------------------------------------------------------


def rotation_due(
    meta: KeyMeta, created_time: datetime, policy: ApiKeyPolicy, now: datetime
) -> str | None:
    """Pure: why the newest key is due for scheduled rotation at ``now``, or None.

    Due once its expiry minus the overlap window is reached (so the overlap ends at the
    validity limit, never after it), or once the policy's cron ``rotation.schedule`` has
    fired since the key was created."""
    overlap = timedelta(hours=policy.global_settings.rotation_overlap_hours)
    if now >= meta.expires_at - overlap:
        return "validity"
    if policy.rotation.schedule:
        try:
            tick = next(CronSim(policy.rotation.schedule, created_time.astimezone(UTC)))
        except (CronSimError, StopIteration):
            return None
        if tick <= now:
            return "schedule"
    return None


def run_rotator_once(ctx: Context) -> list[dict[str, object]]:
    """One pass of ``authproxy rotator``: warn about keys near expiry, rotate the auto-
    rotated keys we issue that are due. A lost check-and-set means another rotator of the
    fleet did it: reported as ``skipped``."""
    now = ctx.clock()
    policy = ctx.config.api_key_policy
    warning = timedelta(days=policy.rotation.pre_rotation_warning_days)
    results: list[dict[str, object]] = []
    for service in sorted(ctx.config.services):
        key_type, kt = ctx.key_type(service)
        versions = ctx.store.live_versions(service)
        if not versions:
            continue
        version, meta = versions[-1]
        if meta.expires_at - now <= warning:
            ctx.audit.record(
                "KEY_EXPIRY_WARNING",
                service,
                meta.key_id,
                "warning",
                expires_at=format_timestamp(meta.expires_at),
            )
        if key_type not in ISSUED_KEY_TYPES or not kt.auto_rotate:
            continue
        reason = rotation_due(meta, meta.created_at, policy, now)
        if reason is None:
            continue
        try:
            out = rotate(ctx, service, expected=version)
        except KeyStoreConflict as exc:
            results.append(
                {"service": service, "outcome": "skipped", "winner": exc.current_version}
            )
            continue
        out["reason"] = reason
        results.append(out)
    return results


# -- the seed's rotation-schedule JSON ---------------------------------------------------


def _day(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise ConfigError(where, "must be an ISO-8601 timestamp")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(where, "must be an ISO-8601 timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def schedule_report(
    doc: object, today: date, store_created: Mapping[str, datetime | None]
) -> list[dict[str, object]]:
    """Pure: per service of the seed's ``rotation_schedule`` JSON, last and next rotation,
    status against ``today`` (``overdue`` past next_rotation, ``due`` on its day, else
    ``ok``) and whether the store agrees: its newest version was created on the
    last_rotation day (None when the store has no key for that service)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rotation_schedule"), dict):
        raise ConfigError("rotation_schedule", "missing")
    services = doc["rotation_schedule"].get("services")
    if not isinstance(services, list):
        raise ConfigError("rotation_schedule.services", "must be a list")
    out: list[dict[str, object]] = []
    for i, item in enumerate(services):
        where = f"rotation_schedule.services[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("service_name"), str):
            raise ConfigError(where, "must be an object with service_name")
        last = _day(item.get("last_rotation"), f"{where}.last_rotation")
        nxt = _day(item.get("next_rotation"), f"{where}.next_rotation")
        status: Status
        if today > nxt.date():
            status = "overdue"
        elif today == nxt.date():
            status = "due"
        else:
            status = "ok"
        name = item["service_name"]
        created = store_created.get(name)
        out.append(
            {
                "service": name,
                "last_rotation": format_timestamp(last),
                "next_rotation": format_timestamp(nxt),
                "status": status,
                "days_overdue": max(0, (today - nxt.date()).days),
                "store_last_rotation": format_timestamp(created) if created else None,
                "store_agrees": None if created is None else created.date() == last.date(),
            }
        )
    return out


def store_created_times(store: KeyStore, services: Sequence[str]) -> dict[str, datetime | None]:
    """The newest version's created_at per service (None if none or not configured)."""
    out: dict[str, datetime | None] = {}
    for name in services:
        versions = store.live_versions(name)
        out[name] = versions[-1][1].created_at if versions else None
    return out
