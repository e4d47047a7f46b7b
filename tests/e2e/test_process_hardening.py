"""What the kernel says about a running sidecar: no core file; and systemd told when it is
ready and when it stops (both checked from outside the process)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.e2e.conftest import Sidecars

pytestmark = pytest.mark.e2e


def _core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line")


def test_the_running_sidecar_writes_no_core(sidecars: Sidecars) -> None:
    proc = sidecars.start()
    assert _core_limit(proc.pid) == ("0", "0")
    # The test process itself may dump core: the difference is the sidecar's doing.
    assert _core_limit(os.getpid()) != ("0", "0")


def test_systemd_is_told_ready_then_stopping(sidecars: Sidecars, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        proc = sidecars.start(env={"NOTIFY_SOCKET": str(path)})
        first = sock.recv(4096).decode()
        assert "READY=1" in first.splitlines()
        assert f"MAINPID={proc.pid}" in first.splitlines()
        proc.popen.send_signal(signal.SIGTERM)
        second = sock.recv(4096).decode()
        assert "STOPPING=1" in second.splitlines()
        assert proc.popen.wait(timeout=30) == 0
