"""``authproxy keys generate/import/rotate/revoke/verify/schedule`` and ``rotator``, as real
subprocesses, against both stores: the encrypted key file and a real OpenBao."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from keycache.filestore import KeyFile
from keycache.record import make_record, parse_record
from keycache.store import FileStore, KeyStore, VaultStore
from keycache.vault import VaultSource
from proxy.config import load_config
from proxy.demo import binance_service, sidecar_config
from proxy.lifecycle import (
    KEYPAIR_ALGORITHMS,
    new_internal_record,
    rotation_due,
    schedule_report,
)
from tests.proxy.helpers import PERMS, random_hmac_secret

if TYPE_CHECKING:
    from tests.vaultserver import KVSpace

pytest_plugins = ["tests.vaultserver"]

FIXTURE = Path(__file__).parents[1] / "fixtures" / "seed_rotation_schedule.json"
INTERNAL = "risk_engine_service"
VENUE = "binance_spot"
#: Every secret the lifecycle tests make or see, for the no-secret-anywhere check.
SEEN_SECRETS: list[str] = []
#: Every stdout/stderr/audit text the lifecycle tests produced.
OUTPUTS: list[str] = []
#: How many of the race rounds really raced (one loser), per backend.
RACES: list[int] = []


@dataclass
class Env:
    backend: str
    config: Path
    audit: Path
    tmp: Path
    space: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "proxy", *args]
        if args[0] == "keys" and args[1] != "list":
            argv += ["--config", str(self.config), "--audit-log", str(self.audit)]
        out = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=90, check=False
        )
        OUTPUTS.extend((out.stdout, out.stderr))
        return out

    def store(self) -> KeyStore:
        config = load_config(self.config)
        if self.backend == "vault":
            assert config.keystore.vault is not None
            return VaultStore(VaultSource.from_config(config.keystore.vault))
        from proxy.runtime import open_key_file

        assert config.keystore.file is not None
        return FileStore(open_key_file(config.keystore.file, {}))

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        text = self.audit.read_text()
        OUTPUTS.append(text)
        return [json.loads(line) for line in text.splitlines()]


def _config(tmp: Path, backend: str, space: KVSpace | None) -> Path:
    kek = tmp / "kek.key"
    KeyFile.create_kek_file(kek)
    ca = tmp / "ca.pem"
    ca.write_text("")
    internal = {
        "venue": "internal",
        "key_type": "internal_service",
        "upstream": "https://127.0.0.1:443",
        "route": "/risk",
        "ca_file": str(ca),
        "timeout_ms": 2000,
    }
    cfg = sidecar_config(
        tmp / "keys.enc", kek, {VENUE: binance_service(443, str(ca), "/b"), INTERNAL: internal}
    )
    if backend == "vault":
        assert space is not None
        token = tmp / "vault-token"
        token.write_text(space.server.root_token)
        token.chmod(0o600)
        cfg["keystore"] = {
            "backend": "vault",
            "vault": {
                "address": space.server.address,
                "mount_path": "secret",
                "path_prefix": space.prefix,
                "tls_verify": True,
                "tls_ca_cert": str(space.server.ca_file),
                "auth": {"method": "token", "token_file": str(token)},
                "poll_interval_ms": 200,
            },
        }
    path = tmp / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(params=["file", "vault"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    space = request.getfixturevalue("vault") if request.param == "vault" else None
    yield Env(
        request.param,
        _config(tmp_path, request.param, space),
        tmp_path / "audit.log",
        tmp_path,
        space,
    )


def venue_record(key_id: str, *, days: int = 30) -> dict[str, object]:
    secret = random_hmac_secret()
    SEEN_SECRETS.append(secret)
    now = datetime.now(UTC).replace(microsecond=0)
    return make_record(
        key_id, secret, created_at=now, expires_at=now + timedelta(days=days), permissions=PERMS
    )


def _remember_store_secrets(env: Env, service: str) -> None:
    store = env.store()
    try:
        for version, _ in store.live_versions(service):
            record = store.read_record(service, version)
            SEEN_SECRETS.append(str(record["secret_key"]))
    finally:
        store.close()


# -- pure ------------------------------------------------------------------------------


def test_internal_record_is_256_bit_hft_id_policy_validity() -> None:
    config = load_config(_config_only())
    policy = config.api_key_policy.key_types["internal_service"]
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    record = new_internal_record(policy, now)
    meta, secret, _ = parse_record(record)
    assert meta.key_id.startswith("hft_") and len(meta.key_id) == 4 + 32
    assert len(bytes.fromhex(secret)) == 32
    assert meta.expires_at - meta.created_at == timedelta(days=policy.validity_days)
    assert meta.permissions == policy.permissions
    assert new_internal_record(policy, now)["secret_key"] != secret


def _config_only() -> Path:
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    return _config(tmp, "file", None)


def test_rotation_due_by_validity_and_by_cron() -> None:
    config = load_config(_config_only())
    policy = config.api_key_policy
    kt = policy.key_types["internal_service"]
    created = datetime(2026, 11, 23, 3, tzinfo=UTC)  # a Monday; cron is Sunday 02:00
    meta, _, _ = parse_record(new_internal_record(kt, created))
    assert rotation_due(meta, created, policy, created + timedelta(days=1)) is None
    assert rotation_due(meta, created, policy, datetime(2026, 11, 29, 2, tzinfo=UTC)) == "schedule"
    assert rotation_due(meta, created, policy, meta.expires_at - timedelta(hours=1)) == "validity"


def test_schedule_report_on_the_seed_fixture_all_overdue() -> None:
    doc = json.loads(FIXTURE.read_text())
    report = schedule_report(doc, date(2026, 11, 28), {})
    assert [(r["service"], r["status"]) for r in report] == [
        ("binance_spot_trading", "overdue"),
        ("interactive_brokers", "overdue"),
        ("risk_engine_service", "overdue"),
    ]
    assert report[0]["days_overdue"] == (date(2026, 11, 28) - date(2025, 11, 24)).days
    on_day = schedule_report(doc, date(2025, 11, 24), {})
    assert on_day[0]["status"] == "due" and on_day[2]["status"] == "ok"


# -- against both stores ------------------------------------------------------------------


def test_generate_internal_key(env: Env) -> None:
    out = env.cli("keys", "generate", "--service", INTERNAL)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["version"] == 1 and got["key_id"].startswith("hft_")
    _remember_store_secrets(env, INTERNAL)
    # A venue-issued key type cannot be generated without --algorithm.
    refused = env.cli("keys", "generate", "--service", VENUE)
    assert refused.returncode != 0 and "issued by the venue" in refused.stderr
    events = [(e["event"], e["key_id"]) for e in env.audit_lines()]
    assert ("KEY_REGISTERED", got["key_id"]) in events


@pytest.mark.parametrize("algorithm", sorted(KEYPAIR_ALGORITHMS))
def test_generate_keypair_is_staged_and_prints_only_the_public_key(
    env: Env, algorithm: str
) -> None:
    first = venue_record("venue-key-1")
    assert env.cli("keys", "import", "--service", VENUE, stdin=json.dumps(first)).returncode == 0
    out = env.cli("keys", "generate", "--service", VENUE, "--algorithm", algorithm)
    assert out.returncode == 0, out.stderr
    head, _, pem = out.stdout.partition("\n")
    info = json.loads(head)
    assert info["staged"] is True and info["version"] == 2
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    serialization.load_pem_public_key(pem.encode())
    assert "PRIVATE" not in out.stdout + out.stderr
    store = env.store()
    try:
        versions = store.live_versions(VENUE)
        staged = versions[-1][1]
        assert staged.activates_at is not None and staged.activates_at > datetime.now(UTC)
        SEEN_SECRETS.append(str(store.read_record(VENUE, versions[-1][0])["secret_key"]))
    finally:
        store.close()
    # Activation under the venue's key id: the staged version goes, the live one signs now.
    act = env.cli("keys", "activate", "--service", VENUE, "--key-id", "venue-key-2")
    assert act.returncode == 0, act.stderr
    store = env.store()
    try:
        ids = [m.key_id for _, m in store.live_versions(VENUE)]
        assert ids == ["venue-key-1", "venue-key-2"]
        assert store.live_versions(VENUE)[-1][1].activates_at is None
    finally:
        store.close()


def test_import_rotate_keeps_old_key_through_overlap(env: Env) -> None:
    for n in (1, 2):
        out = env.cli(
            "keys", "import", "--service", VENUE, stdin=json.dumps(venue_record(f"venue-{n}"))
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["version"] == n
    rot = env.cli(
        "keys",
        "rotate",
        "--service",
        VENUE,
        "--from-stdin",
        stdin=json.dumps(venue_record("venue-3")),
    )
    assert rot.returncode == 0, rot.stderr
    got = json.loads(rot.stdout)
    assert got["version"] == 3 and got["revoked"] == [] and got["overlap_hours"] == 24
    store = env.store()
    try:
        assert [m.key_id for _, m in store.live_versions(VENUE)] == [
            "venue-1",
            "venue-2",
            "venue-3",
        ]
    finally:
        store.close()
    events = [e["event"] for e in env.audit_lines()]
    assert events[-3:] == ["KEY_ROTATION_STARTED", "KEY_REGISTERED", "KEY_ROTATION_COMPLETED"]
    listed = env.cli("keys", "list", "--config", str(env.config))
    assert listed.returncode == 0, listed.stderr
    assert [(k["version"], k["key_id"]) for k in json.loads(listed.stdout)] == [
        (1, "venue-1"),
        (2, "venue-2"),
        (3, "venue-3"),
    ]
    # Internal keys rotate without input.
    assert env.cli("keys", "generate", "--service", INTERNAL).returncode == 0
    rot = env.cli("keys", "rotate", "--service", INTERNAL)
    assert rot.returncode == 0, rot.stderr
    assert json.loads(rot.stdout)["version"] == 2
    _remember_store_secrets(env, INTERNAL)


def test_emergency_rotation_revokes_old_at_once(env: Env) -> None:
    assert env.cli("keys", "generate", "--service", INTERNAL).returncode == 0
    _remember_store_secrets(env, INTERNAL)
    store = env.store()
    try:
        old = store.live_versions(INTERNAL)[0][1].key_id
    finally:
        store.close()
    rot = env.cli("keys", "rotate", "--service", INTERNAL, "--emergency")
    assert rot.returncode == 0, rot.stderr
    got = json.loads(rot.stdout)
    assert got["revoked"] == [old] and got["overlap_hours"] == 0
    # No sidecar runs (admin port 0): a warning, not a failure.
    assert "sidecar not told" in rot.stderr
    _remember_store_secrets(env, INTERNAL)
    store = env.store()
    try:
        assert [m.key_id for _, m in store.live_versions(INTERNAL)] == [got["key_id"]]
        assert old in store.revoked()
    finally:
        store.close()
    events = [(e["event"], e["key_id"]) for e in env.audit_lines()]
    assert ("KEY_REVOKED", old) in events and ("KEY_ARCHIVED", old) in events


def test_revoke_removes_lists_and_refuses_reimport(env: Env) -> None:
    rec1, rec2 = venue_record("leaky-1"), venue_record("leaky-2")
    for rec in (rec1, rec2):
        assert env.cli("keys", "import", "--service", VENUE, stdin=json.dumps(rec)).returncode == 0
    out = env.cli("keys", "revoke", "--service", VENUE, "--key-id", "leaky-1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["removed_versions"] == [1]
    assert "warning" in out.stderr and "sidecar" in out.stderr
    again = env.cli("keys", "import", "--service", VENUE, stdin=json.dumps(rec1))
    assert again.returncode == 3 and "revoked" in again.stderr
    store = env.store()
    try:
        assert [m.key_id for _, m in store.live_versions(VENUE)] == ["leaky-2"]
        assert store.revoked() == frozenset({"leaky-1"})
    finally:
        store.close()
    if env.backend == "vault":
        # Destroyed, not only deleted: the data of version 1 is gone for good.
        meta = env.space.metadata(VENUE)
        assert meta["versions"]["1"]["destroyed"] is True
        # The revocation list's documented home.
        status, body = env.space.server.call("GET", f"secret/data/{env.space.prefix}/_revoked")
        assert status == 200 and body["data"]["data"] == {"key_ids": ["leaky-1"]}


def test_verify_checks_policy_and_expiry(env: Env) -> None:
    assert env.cli("keys", "generate", "--service", INTERNAL).returncode == 0
    _remember_store_secrets(env, INTERNAL)
    # Venue key expiring in 3 days (inside the 7-day warning) is a warning, not an error.
    assert (
        env.cli(
            "keys", "import", "--service", VENUE, stdin=json.dumps(venue_record("v-1", days=3))
        ).returncode
        == 0
    )
    ok = env.cli("keys", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = {e["service"]: e for e in json.loads(ok.stdout)}
    assert report[VENUE]["warnings"] and not report[VENUE]["errors"]
    # A key with a permission the policy does not grant fails verification.
    now = datetime.now(UTC).replace(microsecond=0)
    bad = make_record(
        "v-2",
        random_hmac_secret(),
        created_at=now,
        expires_at=now + timedelta(days=10),
        permissions=[*PERMS, "withdraw"],
    )
    SEEN_SECRETS.append(str(bad["secret_key"]))
    assert env.cli("keys", "import", "--service", VENUE, stdin=json.dumps(bad)).returncode == 0
    failed = env.cli("keys", "verify")
    assert failed.returncode == 5
    report = {e["service"]: e for e in json.loads(failed.stdout)}
    assert any("withdraw" in e for e in report[VENUE]["errors"])


def test_race_two_rotations_exactly_one_wins(env: Env) -> None:
    assert env.cli("keys", "generate", "--service", INTERNAL).returncode == 0
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "keys",
        "rotate",
        "--service",
        INTERNAL,
        "--config",
        str(env.config),
        "--audit-log",
        str(env.audit),
    ]
    rounds = 3
    raced = 0
    for _ in range(rounds):
        procs = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = [(p.wait(timeout=90), *p.communicate()) for p in procs]
        for _, out, err in results:
            OUTPUTS.extend((out, err))
        codes = sorted(code for code, _, _ in results)
        # Either they raced (one wins, one reports the winner and exits 4) or one finished
        # before the other started (both win, on different versions): never two writes
        # based on the same version.
        if codes == [0, 4]:
            raced += 1
            loser = next(err for code, _, err in results if code == 4)
            winner = next(json.loads(out) for code, out, _ in results if code == 0)
            assert f"version {winner['version']}" in loser
        else:
            assert codes == [0, 0]
    store = env.store()
    try:
        versions = [v for v, _ in store.live_versions(INTERNAL)]
        current = store.current_version(INTERNAL)
    finally:
        store.close()
    starts = [e for e in env.audit_lines() if e["event"] == "KEY_ROTATION_STARTED"]
    completed = [e for e in env.audit_lines() if e["event"] == "KEY_ROTATION_COMPLETED"]
    bases = [e["detail"]["from_version"] for e in completed]
    # Exactly one new version per base version.
    assert len(set(bases)) == len(bases)
    assert current == 1 + len(completed) and versions[-1] == current
    assert len(starts) == 2 * rounds
    RACES.append(raced)
    _remember_store_secrets(env, INTERNAL)


def test_schedule_command_reports_overdue_and_store_agreement(env: Env) -> None:
    out = env.cli("keys", "schedule", str(FIXTURE), "--today", "2026-11-28")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {r["service"]: r["status"] for r in report} == {
        "binance_spot_trading": "overdue",
        "interactive_brokers": "overdue",
        "risk_engine_service": "overdue",
    }
    # The store has no key for these yet: agreement unknown.
    assert report[2]["store_agrees"] is None
    assert env.cli("keys", "generate", "--service", INTERNAL).returncode == 0
    _remember_store_secrets(env, INTERNAL)
    report = json.loads(env.cli("keys", "schedule", str(FIXTURE)).stdout)
    # The store's key was made today, not on the fixture's last_rotation: they disagree.
    assert report[2]["store_agrees"] is False


def test_rotator_once_rotates_due_internal_keys_only(env: Env) -> None:
    old = datetime.now(UTC).replace(microsecond=0) - timedelta(days=29, hours=12)
    config = load_config(env.config)
    kt = config.api_key_policy.key_types["internal_service"]
    record = new_internal_record(kt, old)
    SEEN_SECRETS.append(str(record["secret_key"]))
    store = env.store()
    try:
        store.write(INTERNAL, record, 0)
        store.write(VENUE, venue_record("venue-x", days=2), 0)
    finally:
        store.close()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "rotator",
            "--config",
            str(env.config),
            "--once",
            "--audit-log",
            str(env.audit),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    OUTPUTS.extend((out.stdout, out.stderr))
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [(r["service"], r["reason"]) for r in results] == [(INTERNAL, "validity")]
    _remember_store_secrets(env, INTERNAL)
    # The new internal key signs only once every verifier has had two polls to read it.
    store = env.store()
    try:
        newest = store.read_record(INTERNAL, store.live_versions(INTERNAL)[-1][0])
    finally:
        store.close()
    written = datetime.fromisoformat(str(newest["created_at"]))
    activates = datetime.fromisoformat(str(newest["activates_at"]))
    vault = config.keystore.vault
    lead_ms = 2 * vault.poll_interval_ms if env.backend == "vault" and vault else 0
    assert activates >= written + timedelta(milliseconds=lead_ms)
    assert activates <= written + timedelta(milliseconds=lead_ms, seconds=2)
    events = [(e["event"], e["service"]) for e in env.audit_lines()]
    assert ("KEY_EXPIRY_WARNING", VENUE) in events
    assert ("KEY_ROTATION_COMPLETED", INTERNAL) in events
    # A second pass (another rotator of the fleet) finds nothing due.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "rotator",
            "--config",
            str(env.config),
            "--once",
            "--audit-log",
            str(env.audit),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    OUTPUTS.extend((again.stdout, again.stderr))
    assert json.loads(again.stdout) == []


class _NoSidecar:
    def revoke(self, service: str, key_id: str) -> str | None:
        return "no sidecar in this test"

    def keys(self) -> list[dict[str, object]] | None:
        return None


def test_race_forced_both_read_same_version_exactly_one_new_version(env: Env) -> None:
    """Two rotators that both read version 1 before either writes (a barrier makes it
    certain): exactly one new version, the loser gets the winner's version."""
    import threading

    from keycache.errors import KeyStoreConflict
    from proxy.audit import AuditLog
    from proxy.lifecycle import Context, rotate

    assert env.cli("keys", "generate", "--service", INTERNAL).returncode == 0
    config = load_config(env.config)
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]

    def rotator(i: int) -> None:
        store = env.store()
        try:
            base = store.current_version(INTERNAL)
            barrier.wait(timeout=30)
            ctx = Context(config, store, AuditLog(env.audit), _NoSidecar())
            try:
                results[i] = rotate(ctx, INTERNAL, expected=base)
            except KeyStoreConflict as exc:
                results[i] = exc
        finally:
            store.close()

    threads = [threading.Thread(target=rotator, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    wins = [r for r in results if isinstance(r, dict)]
    losses = [r for r in results if isinstance(r, KeyStoreConflict)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].current_version == wins[0]["version"] == 2
    store = env.store()
    try:
        assert store.current_version(INTERNAL) == 2
        assert len(store.live_versions(INTERNAL)) == 2
    finally:
        store.close()
    _remember_store_secrets(env, INTERNAL)


def test_zzz_no_secret_in_any_output_or_audit_line() -> None:
    """Runs last in this module: every stdout, stderr and audit line above, against every
    secret those tests made or stored."""
    assert SEEN_SECRETS and OUTPUTS
    text = "\n".join(OUTPUTS)
    for secret in SEEN_SECRETS:
        assert secret not in text
        # PEM private keys: their base64 body lines must not appear either.
        for line in secret.splitlines():
            if len(line) > 20 and "-----" not in line:
                assert line not in text
