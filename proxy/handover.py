"""Zero-downtime upgrade: a successor process takes over the listening socket itself.

On SIGUSR2 the running sidecar starts its successor (the same command line, so a new
install's code) with the listening socket inherited as a file descriptor
(``AUTHPROXY_LISTEN_FD``), waits for its ready line, then stops accepting and drains.
Both processes hold the *same* socket, so connections the kernel has queued but nobody
has accepted yet are accepted by the successor: none is refused or reset (with
``SO_REUSEPORT`` instead, each process has its own queue, and the old one's is reset when
it closes). Engine connections to the old process close one by one after their current
answer (``Connection: close``), so each engine's next request goes to the successor.

Under systemd the old process tells it the new main PID (``MAINPID=``; the unit has
``NotifyAccess=all`` for that). A successor that fails to become ready is stopped and
the old process keeps serving.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence

LISTEN_FD_ENV = "AUTHPROXY_LISTEN_FD"
READY_TIMEOUT_S = 30.0


class HandoverFailed(Exception):
    pass


def inherited_listener(environ: Mapping[str, str]) -> socket.socket | None:
    """The listening socket a predecessor passed down, or None (then bind as usual)."""
    raw = environ.get(LISTEN_FD_ENV)
    if not raw:
        return None
    fd = int(raw)
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock


def start_successor(
    argv: Sequence[str], listener: socket.socket, environ: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    """Start ``argv`` with ``listener`` inherited and wait (blocking: call it in a thread)
    for its JSON ready line; return the process and that line. Raises HandoverFailed
    (the successor is stopped) when it exits or is not ready in time."""
    fd = listener.fileno()
    # NOTIFY_SOCKET stays: the successor's READY=1 carries its MAINPID (NotifyAccess=all).
    env = {**environ, LISTEN_FD_ENV: str(fd)}
    proc = subprocess.Popen(  # noqa: S603 - our own command line
        list(argv), pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    out = proc.stdout.fileno()
    deadline = time.monotonic() + READY_TIMEOUT_S
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([out], [], [], 0.1)
        if ready:
            chunk = os.read(out, 65536)
            if not chunk:
                break
            buf += chunk
            for line in buf.splitlines():
                try:
                    info = json.loads(line)
                except ValueError:
                    continue
                if isinstance(info, dict) and info.get("event") == "ready":
                    return proc, info
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise HandoverFailed("the successor did not become ready")
