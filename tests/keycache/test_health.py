"""The key-store health table (pure: no loop, no server)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from keycache.errors import HealthTransitionError
from keycache.health import (
    ERROR_EVENTS,
    TRANSITIONS,
    HealthEvent,
    HealthMachine,
    HealthState,
    worst_state,
)
from tests.keycache.helpers import T0

S = timedelta(seconds=1)
SERVING = (HealthState.IN_SYNC, HealthState.DEGRADED, HealthState.SEALED, HealthState.FORBIDDEN)


def test_first_sync_makes_it_ready_and_errors_before_do_not() -> None:
    m = HealthMachine(T0)
    assert not m.snapshot().ready
    for event in (HealthEvent.UNREACHABLE, HealthEvent.SEALED, HealthEvent.FORBIDDEN):
        assert m.apply(event, T0 + S) is HealthState.STARTING
    snap = m.snapshot()
    assert not snap.ready
    assert snap.consecutive_errors == 3
    assert snap.reason is HealthEvent.FORBIDDEN
    assert m.apply(HealthEvent.SYNC_OK, T0 + 2 * S) is HealthState.IN_SYNC
    snap = m.snapshot()
    assert snap.ready and not snap.serving_stale
    assert snap.last_sync == T0 + 2 * S
    assert snap.consecutive_errors == 0
    assert snap.error_counts[HealthEvent.SEALED] == 1


@pytest.mark.parametrize(
    ("event", "state"),
    [
        (HealthEvent.UNREACHABLE, HealthState.DEGRADED),
        (HealthEvent.NOT_FOUND, HealthState.DEGRADED),
        (HealthEvent.INVALID_RECORD, HealthState.DEGRADED),
        (HealthEvent.LOCAL_ERROR, HealthState.DEGRADED),
        (HealthEvent.SEALED, HealthState.SEALED),
        (HealthEvent.FORBIDDEN, HealthState.FORBIDDEN),
    ],
)
def test_errors_after_load_keep_serving_and_recover(event: HealthEvent, state: HealthState) -> None:
    m = HealthMachine(T0)
    m.apply(HealthEvent.SYNC_OK, T0)
    assert m.apply(event, T0 + S) is state
    snap = m.snapshot()
    assert snap.ready and snap.serving_stale
    assert snap.since == T0 + S
    assert snap.last_sync == T0  # the last good sync is kept through the outage
    assert snap.last_error == T0 + S
    assert m.apply(HealthEvent.SYNC_OK, T0 + 2 * S) is HealthState.IN_SYNC
    assert m.snapshot().error_counts[event] == 1


def test_stopped_is_final() -> None:
    m = HealthMachine(T0)
    m.apply(HealthEvent.SYNC_OK, T0)
    assert m.apply(HealthEvent.STOP, T0 + S) is HealthState.STOPPED
    for event in HealthEvent:
        with pytest.raises(HealthTransitionError, match="no transition from stopped"):
            m.apply(event, T0 + 2 * S)
    assert m.state is HealthState.STOPPED


def test_table_is_complete_for_every_live_state_and_nothing_else() -> None:
    live = [s for s in HealthState if s is not HealthState.STOPPED]
    assert set(TRANSITIONS) == {(s, e) for s in live for e in HealthEvent}
    # Once serving, no event ever goes back to STARTING.
    assert all(
        TRANSITIONS[(s, e)] is not HealthState.STARTING for s in SERVING for e in HealthEvent
    )
    assert HealthEvent.SYNC_OK not in ERROR_EVENTS and HealthEvent.STOP not in ERROR_EVENTS


def test_worst_state_orders_by_severity() -> None:
    assert worst_state([HealthState.IN_SYNC, HealthState.DEGRADED]) is HealthState.DEGRADED
    assert worst_state([HealthState.SEALED, HealthState.FORBIDDEN]) is HealthState.FORBIDDEN
    assert worst_state([HealthState.IN_SYNC, HealthState.STARTING]) is HealthState.STARTING
    assert worst_state([]) is HealthState.STARTING
