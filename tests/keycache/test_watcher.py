"""KeyWatcher against a real OpenBao dev server: rotation, revocation, outages.

Polls every 200 ms. "Within N polls" is asserted by counting the watcher's polls, not by
timing (STYLE: timing belongs in loadtests/); the waits below only bound a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from keycache.errors import KeyStoreNotFound, NoUsableKeyError
from keycache.health import HealthEvent, HealthState
from keycache.ring import KeyRing
from keycache.vault import VaultSource
from keycache.vaultauth import AuthTiming, VaultAuthSettings
from keycache.watcher import KeyWatcher, SecretMetadata
from tests.keycache.helpers import hmac_record

if TYPE_CHECKING:
    from tests.vaultserver import KVSpace, VaultServer

pytest_plugins = ["tests.vaultserver"]

POLL = timedelta(milliseconds=200)
OVERLAP = timedelta(hours=1)
FAST_AUTH = AuthTiming(
    min_attempt_interval_s=0.1, backoff_base_s=0.2, backoff_cap_s=1.0, forbidden_recheck_s=0.5
)
WAIT_S = 10.0  # only bounds a hang; the assertions count polls


class Clock:
    """Wall time plus an offset the test can advance (the overlap window is an hour)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


class CheckedSource:
    """The real VaultSource, asserting that no call runs on the event loop's thread."""

    def __init__(self, inner: VaultSource, loop_thread: int) -> None:
        self.inner = inner
        self.loop_thread = loop_thread
        self.metadata_reads = 0
        self.version_reads: list[int] = []
        self.discarded = 0

    def read_metadata(self, service: str) -> SecretMetadata:
        assert threading.get_ident() != self.loop_thread, "store call on the event loop"
        self.metadata_reads += 1
        return self.inner.read_metadata(service)

    def read_version(self, service: str, version: int) -> dict[str, object]:
        assert threading.get_ident() != self.loop_thread, "store call on the event loop"
        self.version_reads.append(version)
        return self.inner.read_version(service, version)

    def discard_record(self, record: dict[str, object]) -> None:
        self.discarded += 1
        self.inner.discard_record(record)


@dataclass
class Harness:
    watcher: KeyWatcher
    source: CheckedSource
    clock: Clock
    token_file: Path
    changes: list[tuple[KeyRing, KeyRing | None]] = field(default_factory=list)
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    @property
    def ring(self) -> KeyRing:
        ring = self.watcher.ring("svc")
        assert ring is not None
        return ring

    def versions(self) -> list[int]:
        return [k.version for k in self.ring.keys]

    def polls(self) -> int:
        return self.watcher.status("svc").polls

    def state(self) -> HealthState:
        return self.watcher.health("svc").state

    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]

    async def until(self, cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not cond():
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def watching(
    server: VaultServer,
    prefix: str,
    tmp_path: Path,
    *,
    token: str | None = None,
    timeout_s: float = 2.0,
) -> AsyncIterator[Harness]:
    """A loaded, running watcher of service "svc" under ``prefix``."""
    token_file = tmp_path / "token"
    token_file.write_text((token or server.create_token(["test-kv-read"])) + "\n")
    loop_thread = threading.get_ident()
    inner = VaultSource(
        server.address,
        auth=VaultAuthSettings("token", token_file=token_file),
        path_prefix=prefix,
        verify=server.ca_file,
        timeout_s=timeout_s,
        auth_timing=FAST_AUTH,
    )
    source = CheckedSource(inner, loop_thread)
    clock = Clock()
    harness: Harness

    def on_ring(service: str, ring: KeyRing, retired: KeyRing | None) -> None:
        assert threading.get_ident() == loop_thread, "on_ring must run on the loop"
        assert service == "svc"
        harness.changes.append((ring, retired))
        if retired is not None:
            retired.retire()  # what the proxy does once no request uses it

    watcher = KeyWatcher(
        source,
        ["svc"],
        overlap=OVERLAP,
        poll_interval=POLL,
        require_lock=False,
        clock=clock,
        on_ring=on_ring,
        on_event=lambda name, fields: harness.events.append((name, fields)),
        max_backoff=timedelta(seconds=1),
    )
    harness = Harness(watcher, source, clock, token_file)
    await watcher.load_all()
    task = asyncio.create_task(watcher.run())
    try:
        yield harness
    finally:
        watcher.stop()
        await task
        for ring, _ in harness.changes[-1:]:
            ring.retire()
        inner.close()


def secret_of(record: dict[str, object]) -> bytes:
    value = record["secret_key"]
    assert isinstance(value, str)
    return value.encode()


# -- rotation ------------------------------------------------------------------------------


async def test_new_version_is_served_within_two_polls(vault: KVSpace, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    v1 = hmac_record(created_at=now - timedelta(days=2))
    vault.write("svc", v1)
    async with watching(vault.server, vault.prefix, tmp_path) as h:
        first = h.ring
        assert h.versions() == [1]
        assert bytes(first.signing_key(h.clock()).secret) == secret_of(v1)
        assert h.state() is HealthState.IN_SYNC
        assert h.watcher.status("svc").last_sync is not None

        v2 = hmac_record(created_at=now)
        await asyncio.to_thread(vault.write, "svc", v2)
        polls_at_write = h.polls()
        await h.until(lambda: h.versions() == [1, 2])
        assert h.polls() <= polls_at_write + 2
        # The new version signs; the previous one is the fallback during the overlap.
        key = h.ring.signing_key(h.clock())
        assert (key.version, bytes(key.secret)) == (2, secret_of(v2))
        fallback = h.ring.fallback_key(key, h.clock())
        assert fallback is not None and bytes(fallback.secret) == secret_of(v1)
        # The old ring was handed back for retirement; only v2's record was read again.
        assert h.changes[-1][1] is first and first.buffer.wiped
        assert h.source.version_reads == [1, 2]
        assert h.source.discarded == 2  # every record read was handed back to be zeroed
        assert "key_ring_changed" in h.event_names()


async def test_next_key_signs_only_once_activated(vault: KVSpace, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    vault.write("svc", hmac_record(created_at=now - timedelta(days=2)))
    async with watching(vault.server, vault.prefix, tmp_path) as h:
        vault.write("svc", hmac_record(created_at=now, activates_at=now + timedelta(minutes=5)))
        await h.until(lambda: h.versions() == [1, 2])
        assert h.ring.signing_key(h.clock()).version == 1
        h.clock.offset = timedelta(minutes=5)
        assert h.ring.signing_key(h.clock()).version == 2


async def test_overlap_window_closing_drops_the_previous_key_without_reading_it(
    vault: KVSpace, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    vault.write("svc", hmac_record(created_at=now - timedelta(days=2)))
    vault.write("svc", hmac_record(created_at=now))
    async with watching(vault.server, vault.prefix, tmp_path) as h:
        assert h.versions() == [1, 2]
        created = datetime.fromisoformat(vault.metadata("svc")["versions"]["2"]["created_time"])
        # The window runs from Vault's created_time of v2, not the record's created_at.
        rebuild_at = h.ring.rebuild_at
        assert rebuild_at is not None
        assert abs(rebuild_at - (created + OVERLAP)) < timedelta(milliseconds=1)
        reads = list(h.source.version_reads)
        h.clock.offset = OVERLAP + timedelta(seconds=1)
        await h.until(lambda: h.versions() == [2])
        assert h.source.version_reads == reads  # v2 was copied from the old ring


# -- revocation ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["destroy", "delete"])
async def test_a_revoked_version_leaves_memory_by_the_next_poll(
    vault: KVSpace, tmp_path: Path, how: str
) -> None:
    now = datetime.now(UTC)
    vault.write("svc", hmac_record(created_at=now - timedelta(days=2)))
    v2 = hmac_record(created_at=now)
    vault.write("svc", v2)
    async with watching(vault.server, vault.prefix, tmp_path) as h:
        held = h.ring
        assert h.versions() == [1, 2]
        view = held.keys[1].secret
        assert bytes(view) == secret_of(v2)
        revoke = vault.destroy if how == "destroy" else vault.delete
        await asyncio.to_thread(revoke, "svc", 2)
        polls_at_revoke = h.polls()  # includes a poll that may have begun before
        await h.until(lambda: h.versions() == [1])
        assert h.polls() <= polls_at_revoke + 1
        assert h.ring.signing_key(h.clock()).version == 1
        assert held.buffer.wiped
        with pytest.raises(ValueError, match="released"):
            bytes(view)  # the revoked secret's view is gone with its buffer
        assert h.state() is HealthState.IN_SYNC


async def test_revoke_now_drops_a_key_at_once_and_for_good(vault: KVSpace, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    vault.write("svc", hmac_record(created_at=now - timedelta(days=2)))
    v2 = hmac_record(created_at=now)
    vault.write("svc", v2)
    async with watching(vault.server, vault.prefix, tmp_path) as h:
        assert h.versions() == [1, 2]
        key_id = str(v2["key_id"])
        assert await h.watcher.revoke_now("svc", key_id) is True
        assert h.versions() == [1]  # at once, before any poll
        assert key_id in h.watcher.status("svc").revoked_key_ids
        polls = h.polls()
        await h.until(lambda: h.polls() >= polls + 3)
        assert h.versions() == [1]  # Vault still holds v2; it stays out
        assert await h.watcher.revoke_now("svc", "hft_" + "0" * 32) is False
        assert "key_revoked" in h.event_names()


# -- bad input ---------------------------------------------------------------------------------


async def test_a_bad_new_version_is_refused_and_the_old_ring_keeps_serving(
    vault: KVSpace, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    vault.write("svc", hmac_record(created_at=now - timedelta(days=2)))
    async with watching(vault.server, vault.prefix, tmp_path) as h:
        ring = h.ring
        bad = hmac_record(created_at=now)
        bad["checksum"] = "f" * 64
        vault.write("svc", bad)
        await h.until(lambda: h.state() is HealthState.DEGRADED)
        polls = h.polls()
        await h.until(lambda: h.polls() >= polls + 2)
        assert h.ring is ring and h.versions() == [1]
        health = h.watcher.health("svc")
        assert health.reason is HealthEvent.INVALID_RECORD
        refused = [f for name, f in h.events if name == "key_version_refused"]
        assert len(refused) == 1 and refused[0]["version"] == 2
        assert "checksum" in str(refused[0]["reason"])
        assert str(bad["secret_key"]) not in repr(h.events)
        assert h.source.version_reads.count(2) == 1  # refused once, not re-read every poll
        assert h.source.discarded == len(h.source.version_reads)
        # A good version after it is taken, and the store is in sync again.
        vault.write("svc", hmac_record(created_at=now))
        await h.until(lambda: h.versions() == [1, 3])
        assert h.state() is HealthState.IN_SYNC


async def test_load_all_fails_for_a_service_missing_from_the_store(
    vault: KVSpace, tmp_path: Path
) -> None:
    with pytest.raises(KeyStoreNotFound, match=r"read_metadata\(svc\)"):
        async with watching(vault.server, vault.prefix, tmp_path):
            pass


# -- outages ----------------------------------------------------------------------------------


async def test_store_stopped_keeps_serving_and_resumes_by_itself(
    own_vault: VaultServer, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    v1 = hmac_record(created_at=now - timedelta(days=2), expires_at=now + timedelta(hours=3))
    v2 = hmac_record(created_at=now)
    own_vault.write_version("p/svc", v1)
    own_vault.write_version("p/svc", v2)
    # The root token: a restarted dev server recreates it with the same id.
    async with watching(own_vault, "p", tmp_path, token=own_vault.root_token) as h:
        ring = h.ring
        assert h.versions() == [1, 2]
        await asyncio.to_thread(own_vault.stop)
        await h.until(lambda: h.state() is HealthState.DEGRADED)
        assert h.watcher.health("svc").reason is HealthEvent.UNREACHABLE
        assert h.ring is ring
        assert h.ring.signing_key(h.clock()).version == 2  # still signing
        # Polls back off (max_backoff 1 s here): a handful, not one per 200 ms.
        polls = h.polls()
        await asyncio.sleep(2.0)
        assert h.polls() - polls <= 6
        # Time passes during the outage: the overlap window closes without the store.
        h.clock.offset = OVERLAP + timedelta(seconds=1)
        await h.until(lambda: h.versions() == [2])
        assert h.state() is HealthState.DEGRADED
        # The store comes back (a dev server restarts empty: re-seed it) - no restart of
        # the watcher needed.
        h.clock.offset = timedelta(0)
        await asyncio.to_thread(own_vault.start)
        own_vault.write_version("p/svc", v1)
        own_vault.write_version("p/svc", v2)
        own_vault.write_version("p/svc", hmac_record(created_at=now))
        await h.until(lambda: h.state() is HealthState.IN_SYNC and h.versions() == [2, 3])
        assert h.watcher.health("svc").error_counts[HealthEvent.UNREACHABLE] >= 1


async def test_store_hanging_times_out_keeps_serving_and_resumes(
    own_vault: VaultServer, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    own_vault.write_version("p/svc", hmac_record(created_at=now - timedelta(days=2)))
    async with watching(own_vault, "p", tmp_path, timeout_s=0.3) as h:
        ring = h.ring
        own_vault.pause()  # accepts connections, answers nothing
        try:
            await h.until(lambda: h.state() is HealthState.DEGRADED)
            assert h.ring is ring and h.ring.signing_key(h.clock()).version == 1
            assert "timed out" in str(h.events[-1][1].get("message", ""))
        finally:
            own_vault.resume()
        own_vault.write_version("p/svc", hmac_record(created_at=now))
        await h.until(lambda: h.state() is HealthState.IN_SYNC and h.versions() == [1, 2])


async def test_sealed_store_keeps_serving_and_resumes(
    own_vault: VaultServer, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    own_vault.write_version("p/svc", hmac_record(created_at=now - timedelta(days=2)))
    async with watching(own_vault, "p", tmp_path) as h:
        ring = h.ring
        await asyncio.to_thread(own_vault.seal)
        await h.until(lambda: h.state() is HealthState.SEALED)
        assert h.ring is ring and h.ring.signing_key(h.clock()).version == 1
        assert h.watcher.overall_health() is HealthState.SEALED
        await asyncio.to_thread(own_vault.unseal)
        own_vault.write_version("p/svc", hmac_record(created_at=now))
        await h.until(lambda: h.state() is HealthState.IN_SYNC and h.versions() == [1, 2])


async def test_forbidden_keeps_serving_and_resumes(vault: KVSpace, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    vault.write("svc", hmac_record(created_at=now - timedelta(days=2)))
    async with watching(vault.server, vault.prefix, tmp_path) as h:
        ring = h.ring
        good = h.token_file.read_text()
        # The token file now holds a valid token whose policy cannot read the keys.
        h.token_file.write_text(vault.server.create_token(["test-nothing"]) + "\n")
        await h.until(lambda: h.state() is HealthState.FORBIDDEN)
        assert h.ring is ring and h.ring.signing_key(h.clock()).version == 1
        assert h.watcher.overall_health() is HealthState.FORBIDDEN
        assert h.watcher.health("svc").ready
        h.token_file.write_text(good)
        await h.until(lambda: h.state() is HealthState.IN_SYNC)


async def test_an_expired_key_is_not_usable_while_the_store_is_down(
    own_vault: VaultServer, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    own_vault.write_version(
        "p/svc",
        hmac_record(created_at=now - timedelta(days=2), expires_at=now + timedelta(hours=1)),
    )
    async with watching(own_vault, "p", tmp_path, token=own_vault.root_token) as h:
        await asyncio.to_thread(own_vault.stop)
        await h.until(lambda: h.state() is HealthState.DEGRADED)
        assert h.ring.signing_key(h.clock()).version == 1
        h.clock.offset = timedelta(hours=1)
        with pytest.raises(NoUsableKeyError, match="expired"):
            h.ring.signing_key(h.clock())
