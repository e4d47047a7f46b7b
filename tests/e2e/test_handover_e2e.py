"""Upgrade by handover (SIGUSR2) under steady load: a successor takes the listening socket,
the old process drains and exits; engines see no failed request and no connection error."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from proxy.demo import binance_service
from tests.e2e.conftest import Sidecars, Venue

pytestmark = pytest.mark.e2e

ORDER = (
    b"POST /hmac/api/v3/order/test?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
    b"&quantity=0.01&price=30000&newClientOrderId=handover-%d-%d HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 0\r\n\r\n"
)


class Engine:
    """A keep-alive engine: one request every 10 ms; on Connection: close it opens a new
    connection for the next request, as HTTP clients do. Bounded: 60 s at most."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        i = 0
        sock: socket.socket | None = None
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    f = sock.makefile("rb")
                    self.connections += 1
                sock.sendall(ORDER % (self.n, i))
                i += 1
                status = int(f.readline().split(b" ", 2)[1])
                length, close = 0, False
                while (line := f.readline()) not in (b"\r\n", b""):
                    low = line.lower()
                    if low.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                    close = close or low.strip() == b"connection: close"
                f.read(length)
                self.statuses.append(status)
                if close:
                    sock.close()
                    sock = None
                time.sleep(0.01)
        except (OSError, ValueError, IndexError) as exc:
            self.errors.append(repr(exc))
        finally:
            if sock is not None:
                sock.close()


def _successor_pid(stderr: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stderr.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "handover":
                return int(event["successor_pid"])
        time.sleep(0.05)
    raise AssertionError(stderr.read_text()[-2000:])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_handover_under_load_drops_nothing(sidecars: Sidecars, venue: Venue) -> None:
    # 300 requests/s: above the policy's 100/s for exchange keys, so the budget is raised
    # (each process keeps its own count; during the drain both send, see the closing note).
    svc = binance_service(
        venue.port, venue.ca_file, "/hmac", rate_limit={"requests_per_second": 2000}
    )
    proc = sidecars.start({"binance_hmac": svc})
    port = proc.ready["listen"]["port"]
    stderr = sidecars.run_dir / "sidecar" / "stderr.log"
    engines = [Engine(port, n) for n in range(3)]
    successor = 0
    try:
        time.sleep(1.0)
        proc.popen.send_signal(signal.SIGUSR2)
        successor = _successor_pid(stderr)
        assert proc.popen.wait(timeout=30) == 0  # the old one drained and exited
        assert _alive(successor)
        served_before = sum(len(e.statuses) for e in engines)
        time.sleep(1.0)  # the successor alone now
        for e in engines:
            e.stop.set()
        for e in engines:
            e.thread.join(timeout=10)
        assert [e.errors for e in engines] == [[], [], []]
        statuses = [s for e in engines for s in e.statuses]
        assert set(statuses) == {200}, statuses
        assert len(statuses) > served_before + 100  # traffic went on after the old exited
        assert all(e.connections >= 2 for e in engines)  # each moved to the successor
    finally:
        for e in engines:
            e.stop.set()
        if successor and _alive(successor):
            os.kill(successor, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _alive(successor) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(successor)
