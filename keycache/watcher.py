"""The key watcher: follows a key store (Vault KV v2) and keeps one key ring per service.

:class:`KeyWatcher` runs on an asyncio loop but never blocks it: every store call and every
ring build runs in a worker thread (``asyncio.to_thread``); only the decisions that
publish a ring, update health and call back run on the loop.

Per service, every ``poll_interval`` (with jitter) it reads the version metadata (no
secrets) and works out the live set (DESIGN.md "Vault layout"): among the versions that
are neither deleted nor destroyed, nor refused, nor revoked here, the newest is the *next*
key; the one before it stays live while the overlap window - ``overlap`` after the newest
version's Vault ``created_time`` - is open, or while the newest is not usable yet. Only
when that set changes does it read anything more, and then only the records of versions
it does not hold yet: a held key is copied from the old ring's locked buffer into the new
one. The new ring is built in fresh locked memory and handed to ``on_ring(service, ring,
retired)`` on the loop; the caller swaps one reference and retires the old ring once no
request can still use it.

- A record that fails validation (checksum, fields) is refused and reported; it is
  treated as absent, so the ring the service had keeps serving. Health: DEGRADED
  (``invalid_record``) while it is the store's newest version.
- A version deleted or destroyed in the store leaves memory at the next poll.
- The overlap window closing needs no store: ``ring.rebuild_at`` wakes the watcher, and
  during an outage the ring is rebuilt from the keys it holds.
- Store down, timing out, sealed or refusing us: the keys held keep serving (a key past
  ``expires_at`` is simply unusable: ``KeyRing.signing_key`` raises NoUsableKeyError),
  polls back off (never faster than ``poll_interval``, capped), health says why, and the
  first good poll resumes by itself.
- :meth:`KeyWatcher.revoke_now` drops a key from memory at once (the admin call), and it
  stays refused whatever the store says.

Reporting goes through ``on_event(event, fields)`` (keycache does not log): fields are
service names, versions, key ids, error codes and messages, never a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final, Protocol, TypeVar

from keycache.errors import (
    KeyCacheError,
    KeyRecordError,
    KeyStoreError,
    KeyStoreForbidden,
    KeyStoreNotFound,
    KeyStoreSealed,
)
from keycache.health import HealthEvent, HealthMachine, HealthSnapshot, HealthState, worst_state
from keycache.record import KeyMeta, parse_record
from keycache.ring import KeyRing, LiveKey, build_ring, previous_stays_live

__all__ = [
    "MAX_OUTAGE_BACKOFF",
    "POLL_JITTER",
    "EventSink",
    "KeySource",
    "KeyWatcher",
    "OnRing",
    "SecretMetadata",
    "ServiceStatus",
    "VersionInfo",
]

#: Polls are spread by +-10 %: sidecars started together (a deploy) do not poll the store
#: in lock step, and a poll is still never much later than ``poll_interval``.
POLL_JITTER: Final = 0.1
#: During an outage polls back off exponentially up to this: a recovered store is noticed
#: within half a minute, and a fleet of sidecars sends a down store little traffic.
MAX_OUTAGE_BACKOFF: Final = timedelta(seconds=30)

#: revoke_now rebuilds from the current ring; it retries only when a concurrent publish
#: replaced that ring mid-build. More than a few such races in a row means a bug.
_REVOKE_ATTEMPTS: Final = 5

T = TypeVar("T")
#: A store version's identity: version numbers restart if a store is rebuilt, so a
#: version is known by its number *and* its creation time.
_VKey = tuple[int, datetime]


# -- what a key store answers -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version's metadata in the store (no secret). ``deletion_time`` may lie in the
    future (KV ``delete_version_after``): the version is present until then."""

    version: int
    created_time: datetime
    deletion_time: datetime | None
    destroyed: bool

    def present(self, now: datetime) -> bool:
        """True if the version can still be read at ``now`` (not destroyed, not deleted)."""
        return not self.destroyed and (self.deletion_time is None or self.deletion_time > now)


@dataclass(frozen=True, slots=True)
class SecretMetadata:
    """A service's version metadata: ``versions`` ascending by version number."""

    service: str
    current_version: int
    oldest_version: int
    versions: tuple[VersionInfo, ...]


class KeySource(Protocol):
    """What the watcher needs from a store (:class:`keycache.vault.VaultSource`). The
    reads block and raise KeyStoreError subclasses."""

    def read_metadata(self, service: str) -> SecretMetadata:
        """The service's version metadata; KeyStoreNotFound if it has none."""
        ...

    def read_version(self, service: str, version: int) -> dict[str, object]:
        """One version's key record, as a dict the caller owns."""
        ...

    def discard_record(self, record: dict[str, object]) -> None:
        """The caller is done with a record from :meth:`read_version` (its secret is in a
        ring, or it was refused): zero what can be zeroed, empty it. Never raises."""
        ...


#: Called on the loop with (service, new ring, previous ring or None).
OnRing = Callable[[str, KeyRing, KeyRing | None], None]
#: Called on the loop with (event name, fields); fields never hold a secret.
EventSink = Callable[[str, dict[str, object]], None]


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One service as the watcher holds it (for readiness, /keys and metrics)."""

    service: str
    health: HealthSnapshot
    versions: tuple[int, ...]
    key_ids: tuple[str, ...]
    polls: int
    rebuild_at: datetime | None
    revoked_key_ids: frozenset[str]

    @property
    def last_sync(self) -> datetime | None:
        """When a poll of this service last succeeded."""
        return self.health.last_sync


# -- per-service state (loop-owned) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _View:
    """An immutable snapshot of a service's state, handed to the worker thread."""

    service: str
    generation: int
    ring: KeyRing | None
    held: Mapping[int, datetime]
    metas: Mapping[_VKey, KeyMeta]
    refused: frozenset[_VKey]
    revoked: frozenset[str]
    metadata: SecretMetadata | None


@dataclass(slots=True)
class _Outcome:
    """What one sync worked out, applied on the loop by :meth:`KeyWatcher._apply`."""

    generation: int
    now: datetime
    metadata: SecretMetadata
    new_metas: dict[_VKey, KeyMeta] = field(default_factory=dict)
    refusals: list[tuple[_VKey, str]] = field(default_factory=list)
    ring: KeyRing | None = None
    held: dict[int, datetime] = field(default_factory=dict)
    newest_refused: bool = False


class _StaleRing(Exception):
    """The ring a build copied from was retired meanwhile; redo the sync."""


@dataclass(slots=True, eq=False)
class _Service:
    name: str
    health: HealthMachine
    ring: KeyRing | None = None
    held: dict[int, datetime] = field(default_factory=dict)
    metas: dict[_VKey, KeyMeta] = field(default_factory=dict)
    refused: dict[_VKey, str] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    metadata: SecretMetadata | None = None
    generation: int = 0
    polls: int = 0
    errors: int = 0
    next_change: datetime | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def view(self) -> _View:
        return _View(
            service=self.name,
            generation=self.generation,
            ring=self.ring,
            held=dict(self.held),
            metas=dict(self.metas),
            refused=frozenset(self.refused),
            revoked=frozenset(self.revoked),
            metadata=self.metadata,
        )


def _event_for(exc: BaseException) -> HealthEvent:
    if isinstance(exc, KeyStoreSealed):
        return HealthEvent.SEALED
    if isinstance(exc, KeyStoreForbidden):
        return HealthEvent.FORBIDDEN
    if isinstance(exc, KeyStoreNotFound):
        return HealthEvent.NOT_FOUND
    if isinstance(exc, KeyStoreError):
        return HealthEvent.UNREACHABLE
    return HealthEvent.LOCAL_ERROR


def _no_events(event: str, fields: dict[str, object]) -> None:
    return None


class KeyWatcher:
    """Follows ``services`` in ``source`` and publishes their rings through ``on_ring``.

    ``overlap`` is ``api_key_policy.global_settings.rotation_overlap_hours``;
    ``poll_interval`` is ``keystore.vault.poll_interval_ms``; ``require_lock`` makes a
    ring build fail (MemoryLockError, the old ring keeps serving) when memory cannot be
    locked; ``clock`` returns the aware current time (it is also called from worker
    threads); ``on_event`` receives reports (default: none). ``max_backoff`` caps the
    outage backoff; ``rng`` feeds the jitter. Every record read is handed back to
    ``source.discard_record`` once its secret is in a ring or it was refused.

    Construct it on the loop that will run it. All methods run on that loop; none blocks.
    """

    def __init__(
        self,
        source: KeySource,
        services: Sequence[str],
        *,
        overlap: timedelta,
        poll_interval: timedelta,
        require_lock: bool,
        clock: Callable[[], datetime],
        on_ring: OnRing,
        on_event: EventSink = _no_events,
        max_backoff: timedelta = MAX_OUTAGE_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        if overlap < timedelta(0):
            raise ValueError("overlap must not be negative")
        if poll_interval <= timedelta(0):
            raise ValueError("poll_interval must be positive")
        if max_backoff < poll_interval:
            raise ValueError("max_backoff must be at least poll_interval")
        if len(set(services)) != len(services) or not services:
            raise ValueError("services must be a non-empty list without duplicates")
        self._source = source
        self._overlap = overlap
        self._poll_s = poll_interval.total_seconds()
        self._max_backoff_s = max_backoff.total_seconds()
        self._require_lock = require_lock
        self._clock = clock
        self._on_ring = on_ring
        self._on_event = on_event
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter only
        now = clock()
        self._services: dict[str, _Service] = {
            name: _Service(name, HealthMachine(now)) for name in services
        }
        self._stopped = asyncio.Event()
        self._running = False

    # -- public: lifecycle ----------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every service once, concurrently, calling ``on_ring`` for each (with
        ``retired=None`` the first time). Raises the first service's KeyCacheError if any
        could not be loaded (the others stay loaded); call again to retry."""
        services = [st for st in self._services.values() if st.ring is None]
        errors = await asyncio.gather(*(self._poll_once(st) for st in services))
        for error in errors:
            if error is not None:
                raise error  # its message names the service

    async def run(self) -> None:
        """Poll every service until :meth:`stop` (or cancellation); then every service's
        health is STOPPED and the watcher cannot run again. Loads what :meth:`load_all`
        has not loaded yet as part of the first polls."""
        if self._running or self._stopped.is_set():
            raise RuntimeError("KeyWatcher.run: already running or stopped")
        self._running = True
        tasks = [
            asyncio.create_task(self._poll_forever(st), name=f"keywatcher:{st.name}")
            for st in self._services.values()
        ]
        try:
            await self._stopped.wait()
        finally:
            # The flag first: a cancellation that races a wake-up can be swallowed by
            # asyncio.wait_for on Python 3.11, and the poll loops check the flag.
            self._stopped.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            now = self._clock()
            for st in self._services.values():
                if st.health.state is not HealthState.STOPPED:
                    st.health.apply(HealthEvent.STOP, now)
            self._running = False

    def stop(self) -> None:
        """Ask :meth:`run` to return. The rings stay with their owner (the caller)."""
        self._stopped.set()

    def poll_soon(self, service: str) -> None:
        """Poll ``service`` now rather than at its next tick (e.g. after an admin write)."""
        self._get(service).wake.set()

    # -- public: state --------------------------------------------------------------------

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self._services)

    def ring(self, service: str) -> KeyRing | None:
        """The ring last published for ``service`` (None before its first load)."""
        return self._get(service).ring

    def health(self, service: str) -> HealthSnapshot:
        return self._get(service).health.snapshot()

    def overall_health(self) -> HealthState:
        """The worst state over all services (health.SEVERITY)."""
        return worst_state(st.health.state for st in self._services.values())

    def status(self, service: str) -> ServiceStatus:
        """Last sync, versions and key ids held, poll count, revocations."""
        st = self._get(service)
        ring = st.ring
        return ServiceStatus(
            service=service,
            health=st.health.snapshot(),
            versions=tuple(k.version for k in ring.keys) if ring is not None else (),
            key_ids=ring.key_ids() if ring is not None else (),
            polls=st.polls,
            rebuild_at=st.next_change,
            revoked_key_ids=frozenset(st.revoked),
        )

    # -- public: revocation ---------------------------------------------------------------

    async def revoke_now(self, service: str, key_id: str) -> bool:
        """Drop ``key_id`` from ``service``'s ring at once: a new ring without it is built
        (in a thread, from the locked buffer; nothing is read from the store) and handed
        to ``on_ring``, whose caller retires the old ring. The key id stays refused for the
        life of the watcher, whatever the store holds. Return True if a held key was
        dropped, False if the ring did not hold it (it is refused all the same).

        The next poll comes at once: with the newest version revoked, the version before
        it may be live again (as if the newest had been deleted in the store).
        """
        st = self._get(service)
        st.revoked.add(key_id)
        # Any sync in flight worked from a view without this revocation: discard it.
        st.generation += 1
        async with st.lock:
            for _ in range(_REVOKE_ATTEMPTS):
                ring = st.ring
                if ring is None or key_id not in ring.key_ids():
                    self._emit("key_revoked", service, key_id=key_id, held=False)
                    st.wake.set()
                    return False
                generation = st.generation
                keep = [k for k in ring.keys if k.key_id != key_id]
                held = {k.version: st.held[k.version] for k in keep if k.version in st.held}
                now = self._clock()
                try:
                    new = await self._in_thread(self._build_from_held, service, keep, held, now)
                except (_StaleRing, ValueError):
                    continue  # the ring was retired under us; take the current one
                if generation != st.generation or ring.buffer.wiped:
                    new.retire()
                    continue
                versions = {k.version for k in new.keys}
                self._publish(st, new, {v: ct for v, ct in held.items() if v in versions})
                self._emit(
                    "key_revoked",
                    service,
                    key_id=key_id,
                    held=True,
                    versions=sorted(versions),
                    key_ids=list(new.key_ids()),
                )
                st.wake.set()
                return True
        raise RuntimeError(f"{service}: revoke_now could not build a ring; ring keeps changing")

    # -- polling --------------------------------------------------------------------------

    def _get(self, service: str) -> _Service:
        try:
            return self._services[service]
        except KeyError:
            raise ValueError(f"{service}: not a watched service") from None

    def _emit(self, event: str, service: str, **fields: object) -> None:
        # A broken log sink must not stop the watcher.
        with contextlib.suppress(Exception):
            self._on_event(event, {"service": service, **fields})

    def _delay(self, st: _Service) -> float:
        base = self._poll_s
        if st.errors:
            step = min(self._max_backoff_s, base * 2 ** min(st.errors - 1, 30))
            delay = self._rng.uniform(max(base, step / 2), max(base, step))
        else:
            delay = base * self._rng.uniform(1 - POLL_JITTER, 1 + POLL_JITTER)
        if st.next_change is not None:
            # Wake for a liveness change still ahead; one already past was handled by the
            # poll that just ran (or could not be), and must not turn into a busy loop.
            until = (st.next_change - self._clock()).total_seconds()
            if until > 0:
                delay = min(delay, until)
        return delay

    async def _poll_forever(self, st: _Service) -> None:
        while not self._stopped.is_set():
            if (st.ring is not None or st.polls) and not st.wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(st.wake.wait(), self._delay(st))
                if self._stopped.is_set():
                    return
            st.wake.clear()
            await self._poll_once(st)

    async def _poll_once(self, st: _Service) -> KeyCacheError | None:
        """One sync of ``st``; returns the error it hit (already reported), or None."""
        st.polls += 1
        try:
            outcome = await self._in_thread(self._sync_blocking, st.view(), False)
        except _StaleRing:
            st.wake.set()
            return None
        except KeyCacheError as exc:
            self._failed(st, exc)
            await self._offline_rebuild_if_due(st)
            return exc
        except Exception as exc:  # a bug must not kill the poll task silently
            self._emit("watcher_error", st.name, error=type(exc).__name__)
            self._failed(st, None)
            return None
        self._apply(st, outcome, report=True)
        return None

    def _failed(self, st: _Service, exc: KeyCacheError | None) -> None:
        st.errors += 1
        event = _event_for(exc) if exc is not None else HealthEvent.LOCAL_ERROR
        before = st.health.state
        st.health.apply(event, self._clock())
        self._emit(
            "key_store_error",
            st.name,
            code=exc.code if exc is not None else "watcher_error",
            message=str(exc) if exc is not None else "",
            health=st.health.state.value,
            previous=before.value,
            consecutive=st.errors,
        )

    async def _offline_rebuild_if_due(self, st: _Service) -> None:
        """While the store cannot be read, still drop what time alone takes out of the
        live set (the overlap window closing, a scheduled deletion)."""
        if st.ring is None or st.metadata is None or st.next_change is None:
            return
        if self._clock() < st.next_change:
            return
        try:
            outcome = await self._in_thread(self._sync_blocking, st.view(), True)
        except (_StaleRing, KeyCacheError):
            return
        self._apply(st, outcome, report=False)

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` in a worker thread. If we are cancelled meanwhile, a ring the thread
        still produces is retired rather than leaked."""
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retire_result)
            raise

    # -- applying a sync (on the loop) ----------------------------------------------------

    def _apply(self, st: _Service, outcome: _Outcome, *, report: bool) -> None:
        if outcome.generation != st.generation:
            # A revocation or another sync published meanwhile: this result is stale.
            if outcome.ring is not None:
                outcome.ring.retire()
            st.wake.set()
            return
        st.metas.update(outcome.new_metas)
        for vkey, reason in outcome.refusals:
            st.refused[vkey] = reason
            self._emit("key_version_refused", st.name, version=vkey[0], reason=reason)
        st.metadata = outcome.metadata
        # Forget versions the store no longer lists (bounded caches).
        listed = {(v.version, v.created_time) for v in outcome.metadata.versions}
        for cache in (st.metas, st.refused):
            for vkey in [k for k in cache if k not in listed]:
                del cache[vkey]
        if outcome.ring is not None:
            previous = st.ring
            self._publish(st, outcome.ring, outcome.held)
            self._emit(
                "key_ring_changed" if previous is not None else "key_ring_loaded",
                st.name,
                versions=sorted(outcome.held),
                key_ids=list(outcome.ring.key_ids()),
                previous_key_ids=list(previous.key_ids()) if previous is not None else [],
                memory_locked=outcome.ring.buffer.locked,
                offline=not report,
            )
        st.next_change = self._next_change(st, outcome.now)
        if report:
            before = st.health.state
            event = HealthEvent.INVALID_RECORD if outcome.newest_refused else HealthEvent.SYNC_OK
            st.health.apply(event, outcome.now)
            st.errors = 0
            if before is not st.health.state:
                self._emit(
                    "key_store_health",
                    st.name,
                    health=st.health.state.value,
                    previous=before.value,
                )

    def _publish(self, st: _Service, ring: KeyRing, held: dict[int, datetime]) -> None:
        previous = st.ring
        st.ring = ring
        st.held = dict(held)
        st.generation += 1
        try:
            self._on_ring(st.name, ring, previous)
        except Exception as exc:  # the caller's bug; keep watching
            self._emit("on_ring_failed", st.name, error=type(exc).__name__)

    def _next_change(self, st: _Service, now: datetime) -> datetime | None:
        moments: list[datetime] = []
        if st.ring is not None and st.ring.rebuild_at is not None:
            moments.append(st.ring.rebuild_at)
        if st.metadata is not None:
            moments.extend(
                v.deletion_time
                for v in st.metadata.versions
                if v.version in st.held and v.deletion_time is not None and v.deletion_time > now
            )
        return min(moments, default=None)

    # -- the work done in a thread ---------------------------------------------------------

    def _build_from_held(
        self, service: str, keep: Sequence[LiveKey], held: Mapping[int, datetime], now: datetime
    ) -> KeyRing:
        return build_ring(
            service,
            [],
            now=now,
            overlap=self._overlap,
            require_lock=self._require_lock,
            created_times=held,
            carried=keep,
        )

    def _sync_blocking(self, view: _View, offline: bool) -> _Outcome:
        """Read metadata (unless ``offline``), decide the live set, read the records it
        lacks, build the ring if the set changed. Blocking; runs in a worker thread and
        touches no watcher state (it works on ``view`` and returns an outcome)."""
        if offline:
            assert view.metadata is not None
            metadata = view.metadata
        else:
            metadata = self._source.read_metadata(view.service)
        now = self._clock()
        outcome = _Outcome(view.generation, now, metadata)
        records: dict[int, dict[str, object]] = {}
        try:
            self._decide_and_build(view, offline, outcome, records)
        finally:
            for record in records.values():
                self._source.discard_record(record)
            records.clear()
        return outcome

    def _meta_of(
        self,
        view: _View,
        info: VersionInfo,
        offline: bool,
        outcome: _Outcome,
        records: dict[int, dict[str, object]],
    ) -> KeyMeta | None:
        """The public metadata of ``info``'s record (reading and validating the record if
        it is not known yet), or None if it is refused, revoked or unreadable offline."""
        vkey = (info.version, info.created_time)
        meta = view.metas.get(vkey) or outcome.new_metas.get(vkey)
        if meta is None:
            if offline:
                return None
            try:
                record = self._source.read_version(view.service, info.version)
            except KeyStoreNotFound:
                return None  # deleted since the metadata read; the next poll sees it
            try:
                meta = parse_record(record)[0]
            except KeyRecordError as exc:
                self._source.discard_record(record)
                outcome.refusals.append((vkey, str(exc)))
                return None
            if meta.key_id in view.revoked:
                self._source.discard_record(record)
                return None
            outcome.new_metas[vkey] = meta
            records[info.version] = record
        return None if meta.key_id in view.revoked else meta

    def _decide_and_build(
        self,
        view: _View,
        offline: bool,
        outcome: _Outcome,
        records: dict[int, dict[str, object]],
    ) -> None:
        now = outcome.now
        present = [v for v in outcome.metadata.versions if v.present(now)]
        candidates = [v for v in present if (v.version, v.created_time) not in view.refused]

        chosen: list[VersionInfo] = []
        newest_meta: KeyMeta | None = None
        while candidates:
            info = candidates.pop()
            meta = self._meta_of(view, info, offline, outcome, records)
            if meta is not None:
                chosen.append(info)
                newest_meta = meta
                break
        if newest_meta is not None:
            # The window runs from the store's created_time of the newest version.
            newest_live = replace(newest_meta, created_at=chosen[0].created_time)
            if previous_stays_live(newest_live, now, self._overlap):
                while candidates:
                    info = candidates.pop()
                    if self._meta_of(view, info, offline, outcome, records) is not None:
                        chosen.insert(0, info)
                        break

        refused_now = view.refused | {vkey for vkey, _ in outcome.refusals}
        outcome.newest_refused = bool(present) and (
            (present[-1].version, present[-1].created_time) in refused_now
        )
        desired = {v.version: v.created_time for v in chosen}
        if view.ring is not None and desired == dict(view.held):
            return  # nothing changed

        carried = [
            key
            for key in (view.ring.keys if view.ring is not None else ())
            if key.version in desired and view.held.get(key.version) == desired[key.version]
        ]
        carried_versions = {key.version for key in carried}
        for version in [v for v in desired if v not in carried_versions and v not in records]:
            if offline:
                del desired[version]  # cannot read it now; serve what is held
                continue
            records[version] = self._source.read_version(view.service, version)
        if view.ring is not None and desired == dict(view.held):
            return
        fresh = [(v, records[v]) for v in desired if v not in carried_versions]
        try:
            ring = build_ring(
                view.service,
                fresh,
                now=now,
                overlap=self._overlap,
                require_lock=self._require_lock,
                created_times=desired,
                carried=carried,
            )
        except ValueError:
            if view.ring is not None and view.ring.buffer.wiped:
                raise _StaleRing from None
            raise
        if view.ring is not None and view.ring.buffer.wiped and carried:
            ring.retire()
            raise _StaleRing
        if {k.version for k in ring.keys} != set(desired):
            ring.retire()
            raise RuntimeError(f"{view.service}: ring versions differ from the plan")
        outcome.ring = ring
        outcome.held = desired


def _retire_result(task: asyncio.Future[Any]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    ring = result.ring if isinstance(result, _Outcome) else result
    if isinstance(ring, KeyRing):
        ring.retire()
