"""Structured logs: one JSON line per significant event, on stderr.

Never per request. Callers pass only non-secret fields (key ids, service names, counts).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


class EventLog:
    """Writes ``{"ts": ..., "event": ..., ...}`` lines. Safe to call from any thread."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, event: str, fields: dict[str, Any] | None = None, /, **kw: Any) -> None:
        record: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "event": event,
        }
        if fields:
            record.update(fields)
        record.update(kw)
        try:
            self.stream.write(json.dumps(record, default=str) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the sidecar down
