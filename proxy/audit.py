"""The key lifecycle audit log: one JSON object per line, never a secret.

Each line: ``timestamp`` (ISO-8601 UTC), ``event`` (the seed's names: KEY_REGISTERED,
KEY_ROTATION_STARTED, KEY_ROTATION_COMPLETED, KEY_ARCHIVED, plus KEY_REVOKED,
KEY_ROTATION_FAILED, KEY_EXPIRY_WARNING, KEY_VERIFIED, KEY_VERIFY_FAILED, and AUTH_REFUSED
for a call an ingress refused: the caller's key id as presented, the error code), ``service``,
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
from collections.abc import Callable, Mapping, Sequence
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
    "AUTH_REFUSED",
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
    # False in the long-running sidecar: ``entries`` would grow with every refusal.
    keep_entries: bool = True

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
        self.write([entry])

    def write(self, entries: Sequence[dict[str, object]]) -> None:
        """Write entries built with :func:`event`, all in one ``write`` (a batch of the
        sidecar's ingress refusals). Raises OSError as :meth:`record` does."""
        if not entries:
            return
        if self.keep_entries:
            self.entries.extend(entries)
        lines = [json.dumps(e, sort_keys=True, separators=(",", ":")) for e in entries]
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, ("\n".join(lines) + "\n").encode())
            finally:
                os.close(fd)
        if self.syslog_facility is not None:
            facility = _FACILITIES.get(self.syslog_facility.lower(), syslog.LOG_AUTH)
            syslog.openlog("authproxy", 0, facility)
            for entry, line in zip(entries, lines, strict=True):
                success = entry.get("outcome") == "success"
                syslog.syslog(syslog.LOG_INFO if success else syslog.LOG_WARNING, line)
