"""The key lifecycle audit log: one JSON object per line, never a secret.

Each line: ``timestamp`` (ISO-8601 UTC), ``event`` (the seed's names: KEY_REGISTERED,
KEY_ROTATION_STARTED, KEY_ROTATION_COMPLETED, KEY_ARCHIVED, plus KEY_REVOKED,
KEY_ROTATION_FAILED, KEY_EXPIRY_WARNING, KEY_VERIFIED, KEY_VERIFY_FAILED), ``service``,
``key_id``, ``actor``, ``outcome`` (``success`` / ``failure`` / ``warning``) and an optional
``detail`` dict of public facts (versions, reasons). Events take key ids and versions
only; :func:`event` has no parameter a secret could travel through except ``detail``,
whose values must be public (the lifecycle module passes versions and error codes).

Writes are appends with ``O_APPEND`` (one ``write`` per line, so concurrent CLI runs do
not interleave within a line) and optionally to syslog with the configured facility.
Blocking file I/O: not for the event loop.
"""

from __future__ import annotations

import getpass
import json
import os
import syslog
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

__all__ = ["EVENTS", "AuditLog", "Event", "Outcome", "event"]

Event = Literal[
    "KEY_REGISTERED",
    "KEY_ROTATION_STARTED",
    "KEY_ROTATION_COMPLETED",
    "KEY_ROTATION_FAILED",
    "KEY_ARCHIVED",
    "KEY_REVOKED",
    "KEY_EXPIRY_WARNING",
    "KEY_VERIFIED",
    "KEY_VERIFY_FAILED",
]
EVENTS: Final = frozenset(Event.__args__)  # type: ignore[attr-defined]
Outcome = Literal["success", "failure", "warning"]

_FACILITIES: Final[dict[str, int]] = {
    **{f"local{n}": getattr(syslog, f"LOG_LOCAL{n}") for n in range(8)},
    "auth": syslog.LOG_AUTH,
    "authpriv": getattr(syslog, "LOG_AUTHPRIV", syslog.LOG_AUTH),
    "user": syslog.LOG_USER,
    "daemon": syslog.LOG_DAEMON,
}


def _actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid:{os.getuid()}"


def event(
    name: Event,
    service: str,
    key_id: str | None,
    outcome: Outcome,
    *,
    actor: str,
    now: datetime,
    detail: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Build one audit entry (pure)."""
    if name not in EVENTS:
        raise ValueError(f"unknown audit event {name}")
    entry: dict[str, object] = {
        "timestamp": now.astimezone(UTC).isoformat(timespec="milliseconds"),
        "event": name,
        "service": service,
        "key_id": key_id,
        "actor": actor,
        "outcome": outcome,
    }
    if detail:
        entry["detail"] = dict(detail)
    return entry


@dataclass
class AuditLog:
    """Appends audit entries to ``path`` (None: nowhere) and optionally syslog.

    ``clock`` and ``actor`` are seams for tests. ``entries`` keeps what was written in
    this process (the CLI prints nothing of it; tests read it).
    """

    path: Path | None
    syslog_facility: str | None = None
    actor: str = field(default_factory=_actor)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    entries: list[dict[str, object]] = field(default_factory=list)

    def record(
        self,
        name: Event,
        service: str,
        key_id: str | None,
        outcome: Outcome = "success",
        **detail: object,
    ) -> None:
        """Write one entry. Raises OSError if the audit file cannot be written: a
        lifecycle action that cannot be audited is reported, not silently done."""
        entry = event(
            name, service, key_id, outcome, actor=self.actor, now=self.clock(), detail=detail
        )
        self.entries.append(entry)
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        if self.syslog_facility is not None:
            facility = _FACILITIES.get(self.syslog_facility.lower(), syslog.LOG_AUTH)
            syslog.openlog("authproxy", 0, facility)
            priority = syslog.LOG_WARNING if outcome != "success" else syslog.LOG_INFO
            syslog.syslog(priority, line.rstrip("\n"))
