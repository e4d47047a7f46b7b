"""Process plumbing for the benchmark: free ports, readiness, CPU pinning, stopping by PID.

Only processes this script started are ever signalled, always by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"
# How long a server gets to open its port / to exit after a polite signal.
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the caller may race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll until 127.0.0.1:`port` accepts a connection; False if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(POLL_INTERVAL_S)
    return False


def choose_cpus() -> tuple[int | None, int | None]:
    """Return (client CPU, server CPU) from the CPUs we may run on, or (None, None) with < 2."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pin_preexec(cpu: int | None) -> Callable[[], None] | None:
    """A Popen preexec_fn pinning the child to `cpu` before exec, so every thread and
    worker process it later creates inherits the pinning (pinning a PID afterwards would
    miss threads that already exist)."""
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def make_idle(pid: int) -> int:
    """Put every thread of `pid` under SCHED_IDLE (threads it creates later inherit it);
    returns how many threads were changed. A SCHED_IDLE thread runs only when the CPU has
    nothing else to do, so it never preempts the process being measured."""
    changed = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
            changed += 1
    return changed


def child_pids(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (e.g. nginx workers of a master)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in children.read_text().split()]
    except OSError:
        pass
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The comm field may hold spaces; the fields after its closing paren are fixed.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def affinity_of(pid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def stop_process(
    proc: subprocess.Popen[bytes],
    sig: signal.Signals,
    timeout_s: float = STOP_TIMEOUT_S,
    orphans: list[int] | None = None,
    orphan_marker: bytes = b"",
) -> int | None:
    """Send `sig` to `proc`, wait up to `timeout_s`, then SIGKILL it; return its exit code.

    `orphans` are PIDs of its children (nginx workers) that a SIGKILLed parent would leave
    behind; each is killed only if its command line still contains `orphan_marker`, so a
    reused PID is never hit.
    """
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
        for pid in orphans or []:
            if orphan_marker and orphan_marker in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return proc.returncode


def tail(path: Path, max_chars: int = 20_000) -> str:
    """The last `max_chars` of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return text[-max_chars:] if text else "(empty)"
