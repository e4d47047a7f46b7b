"""systemd's readiness protocol (``sd_notify``), without libsystemd.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a datagram socket path, or an
abstract one starting with ``@``); the service sends ``READY=1`` once it can serve,
``RELOADING=1`` / ``STOPPING=1`` around reloads and shutdown. Outside systemd the variable
is absent and every call is a no-op. A failed send is reported, never raised: readiness
signalling must not take the sidecar down.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to ``$NOTIFY_SOCKET``.

    Returns True when sent, False when there is no socket to send to or the send failed.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True
