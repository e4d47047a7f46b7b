"""Key-store health: one state machine, written as one transition table.

Each watched service has one :class:`HealthMachine`. The watcher feeds it one
:class:`HealthEvent` per poll outcome; :data:`TRANSITIONS` says where that leads, and a
pair missing from the table raises :class:`~keycache.errors.HealthTransitionError` (the
h11 ``_state.py`` idea: what is not written down cannot happen silently).

States, and what the proxy does in each::

    STARTING   nothing loaded yet                    not ready
    IN_SYNC    last poll succeeded, serving the store's newest good versions
    DEGRADED   store unreachable / timed out / 5xx, path missing, the newest
               version refused (bad record), or a ring could not be built here
               (mlock refused): the last good keys keep serving
    SEALED     store answered 503 sealed: the last good keys keep serving
    FORBIDDEN  store refused our identity (403, login refused): last good keys serve
    STOPPED    watcher stopped; every further event raises

Pure and synchronous; a machine is owned by one thread (the watcher's event loop). It
also keeps what readiness and metrics need: last successful sync, error counts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final

from keycache.errors import HealthTransitionError

__all__ = [
    "ERROR_EVENTS",
    "SEVERITY",
    "TRANSITIONS",
    "HealthEvent",
    "HealthMachine",
    "HealthSnapshot",
    "HealthState",
    "worst_state",
]


class HealthState(enum.Enum):
    """Where one service's key store stands (values are stable metric label values)."""

    STARTING = "starting"
    IN_SYNC = "in_sync"
    DEGRADED = "degraded"
    SEALED = "sealed"
    FORBIDDEN = "forbidden"
    STOPPED = "stopped"


class HealthEvent(enum.Enum):
    """The outcome of one attempt to sync with the store (values are stable labels)."""

    SYNC_OK = "sync_ok"
    UNREACHABLE = "unreachable"  # down, timeout, 5xx, 429, TLS failure
    SEALED = "sealed"  # 503 sealed
    FORBIDDEN = "forbidden"  # 401/403, login refused, credential unreadable
    NOT_FOUND = "not_found"  # the service's path does not exist in the store
    INVALID_RECORD = "invalid_record"  # the newest version was refused (bad record)
    LOCAL_ERROR = "local_error"  # a ring could not be built here (e.g. mlock refused)
    STOP = "stop"


_S = HealthState
_E = HealthEvent

#: Every error event (each is counted).
ERROR_EVENTS: Final = frozenset(
    (_E.UNREACHABLE, _E.SEALED, _E.FORBIDDEN, _E.NOT_FOUND, _E.INVALID_RECORD, _E.LOCAL_ERROR)
)

#: Once keys are held, an error never drops them: each error state says why the store
#: is not followed while the last good keys keep serving.
_SERVING: Final[Mapping[HealthEvent, HealthState]] = {
    _E.SYNC_OK: _S.IN_SYNC,
    _E.UNREACHABLE: _S.DEGRADED,
    _E.NOT_FOUND: _S.DEGRADED,
    _E.INVALID_RECORD: _S.DEGRADED,
    _E.LOCAL_ERROR: _S.DEGRADED,
    _E.SEALED: _S.SEALED,
    _E.FORBIDDEN: _S.FORBIDDEN,
    _E.STOP: _S.STOPPED,
}

#: The table: (state, event) -> next state. Nothing else is allowed.
TRANSITIONS: Final[Mapping[tuple[HealthState, HealthEvent], HealthState]] = MappingProxyType(
    {
        # Before the first load there are no keys to fall back on: errors keep the
        # service STARTING (not ready) and are counted. A first load that had to refuse
        # the newest version still loaded keys, so it is DEGRADED, not STARTING.
        (_S.STARTING, _E.SYNC_OK): _S.IN_SYNC,
        (_S.STARTING, _E.INVALID_RECORD): _S.DEGRADED,
        (_S.STARTING, _E.UNREACHABLE): _S.STARTING,
        (_S.STARTING, _E.SEALED): _S.STARTING,
        (_S.STARTING, _E.FORBIDDEN): _S.STARTING,
        (_S.STARTING, _E.NOT_FOUND): _S.STARTING,
        (_S.STARTING, _E.LOCAL_ERROR): _S.STARTING,
        (_S.STARTING, _E.STOP): _S.STOPPED,
        **{(_S.IN_SYNC, event): state for event, state in _SERVING.items()},
        **{(_S.DEGRADED, event): state for event, state in _SERVING.items()},
        **{(_S.SEALED, event): state for event, state in _SERVING.items()},
        **{(_S.FORBIDDEN, event): state for event, state in _SERVING.items()},
        # STOPPED is final: no row starts there.
    }
)

#: Aggregation order for a whole sidecar, worst first: one service not loaded makes the
#: sidecar not ready; a policy problem outranks a sealed store, which outranks an outage.
SEVERITY: Final[tuple[HealthState, ...]] = (
    _S.STOPPED,
    _S.STARTING,
    _S.FORBIDDEN,
    _S.SEALED,
    _S.DEGRADED,
    _S.IN_SYNC,
)


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """One service's key-store health at a moment; immutable, safe to hand to metrics.

    ``reason`` is the last error event while not IN_SYNC (None when in sync);
    ``error_counts`` counts every error event since start; ``consecutive_errors`` resets
    on a successful sync. Times are the watcher clock's (timezone-aware).
    """

    state: HealthState
    since: datetime
    reason: HealthEvent | None
    last_sync: datetime | None
    last_error: datetime | None
    consecutive_errors: int
    error_counts: Mapping[HealthEvent, int] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """True once keys were loaded and until the watcher stops."""
        return self.state not in (HealthState.STARTING, HealthState.STOPPED)

    @property
    def serving_stale(self) -> bool:
        """True while the keys served may lag the store (an error state)."""
        return self.state in (HealthState.DEGRADED, HealthState.SEALED, HealthState.FORBIDDEN)


class HealthMachine:
    """The health of one service. Not thread-safe: one owner (the watcher's loop)."""

    __slots__ = ("_counts", "_errors", "_last_error", "_last_sync", "_reason", "_since", "_state")

    def __init__(self, now: datetime) -> None:
        self._state = HealthState.STARTING
        self._since = now
        self._reason: HealthEvent | None = None
        self._last_sync: datetime | None = None
        self._last_error: datetime | None = None
        self._errors = 0
        self._counts: dict[HealthEvent, int] = dict.fromkeys(
            sorted(ERROR_EVENTS, key=lambda e: e.value), 0
        )

    @property
    def state(self) -> HealthState:
        return self._state

    def apply(self, event: HealthEvent, now: datetime) -> HealthState:
        """Apply ``event`` at ``now``; return the new state.

        Raises HealthTransitionError if the table has no row for (state, event); the
        machine is then unchanged.
        """
        try:
            new = TRANSITIONS[(self._state, event)]
        except KeyError:
            raise HealthTransitionError(
                f"key-store health: no transition from {self._state.value} on {event.value}"
            ) from None
        if event is HealthEvent.SYNC_OK:
            self._last_sync = now
            self._errors = 0
            self._reason = None
        elif event in ERROR_EVENTS:
            self._last_error = now
            self._errors += 1
            self._counts[event] += 1
            self._reason = event
        if new is not self._state:
            self._since = now
        self._state = new
        return new

    def snapshot(self) -> HealthSnapshot:
        """An immutable copy of the current health."""
        return HealthSnapshot(
            state=self._state,
            since=self._since,
            reason=self._reason,
            last_sync=self._last_sync,
            last_error=self._last_error,
            consecutive_errors=self._errors,
            error_counts=MappingProxyType(dict(self._counts)),
        )


def worst_state(states: Iterable[HealthState]) -> HealthState:
    """The worst of ``states`` by :data:`SEVERITY` (STARTING if there are none)."""
    rank = {state: i for i, state in enumerate(SEVERITY)}
    return min(states, key=rank.__getitem__, default=HealthState.STARTING)
