"""The audit log: JSON lines with the seed's event names, appended, nothing secret."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.audit import EVENTS, AuditLog, event

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def test_event_fields_and_seed_names() -> None:
    assert {
        "KEY_REGISTERED",
        "KEY_ROTATION_STARTED",
        "KEY_ROTATION_COMPLETED",
        "KEY_ARCHIVED",
    } <= EVENTS
    entry = event("KEY_REVOKED", "svc", "hft_" + "0" * 32, "success", actor="ops", now=NOW)
    assert entry == {
        "timestamp": "2026-11-28T12:00:00.000+00:00",
        "event": "KEY_REVOKED",
        "service": "svc",
        "key_id": "hft_" + "0" * 32,
        "actor": "ops",
        "outcome": "success",
    }
    with pytest.raises(ValueError, match="unknown audit event"):
        event("KEY_STOLEN", "svc", None, "success", actor="ops", now=NOW)  # type: ignore[arg-type]


def test_log_appends_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, None, actor="ops", clock=lambda: NOW)
    log.record("KEY_ROTATION_STARTED", "svc", "k1", from_version=1)
    AuditLog(path, None, actor="ops", clock=lambda: NOW).record(
        "KEY_ROTATION_COMPLETED", "svc", "k2"
    )
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["KEY_ROTATION_STARTED", "KEY_ROTATION_COMPLETED"]
    assert lines[0]["detail"] == {"from_version": 1}
    assert path.stat().st_mode & 0o007 == 0  # never world-readable
