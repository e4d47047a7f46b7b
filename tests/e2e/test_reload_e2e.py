"""SIGHUP under steady load: a changed config takes effect with zero failed requests; a
broken one is refused, logged, and the running config keeps serving."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import Sidecars, Venue, raw_exchange
from tests.e2e.test_listener_errors import parse_responses

pytestmark = pytest.mark.e2e

ORDER = (
    b"POST /hmac/api/v3/order/test?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
    b"&quantity=0.01&price=30000&newClientOrderId=reload-%d HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 0\r\n\r\n"
)
STATUS = b"GET /hmac/sapi/v1/account/status HTTP/1.1\r\nHost: x\r\n\r\n"


class SteadyLoad:
    """One keep-alive engine connection sending an order every 20 ms until stopped
    (bounded: at most 60 s); every answer's status is kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                f = sock.makefile("rb")
                n = 0
                while not self.stop.is_set() and time.monotonic() < deadline:
                    sock.sendall(ORDER % n)
                    n += 1
                    status = int(f.readline().split(b" ", 2)[1])
                    length = 0
                    while (line := f.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    f.read(length)
                    self.statuses.append(status)
                    time.sleep(0.02)
        except OSError as exc:
            self.errors.append(repr(exc))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _wait_for(path: Path, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text} not logged: {path.read_text()[-2000:]}")


def test_sighup_applies_a_changed_config_without_dropping_a_request(
    sidecars: Sidecars, venue: Venue
) -> None:
    proc = sidecars.start()
    port = proc.ready["listen"]["port"]
    cfg_path = sidecars.run_dir / "sidecar" / "authproxy.yaml"
    stderr = sidecars.run_dir / "sidecar" / "stderr.log"
    (before,) = parse_responses(raw_exchange(port, STATUS))
    assert before[0] == 403  # not in Binance's map nor the allow-list
    load = SteadyLoad(port)
    time.sleep(0.5)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["services"]["binance_hmac"]["allow"].append("GET /sapi/v1/account/status")
    cfg["services"]["binance_ed25519"]["route"] = "/ed2"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc.popen.send_signal(signal.SIGHUP)
    _wait_for(stderr, '"event": "config_reloaded"')
    time.sleep(0.5)
    # A broken file: refused as a whole, and what runs keeps running.
    cfg_path.write_text(cfg_path.read_text().replace("route: /hmac", "route: hmac-no-slash"))
    proc.popen.send_signal(signal.SIGHUP)
    log = _wait_for(stderr, '"event": "config_reload_refused"')
    assert "services.binance_hmac.route" in log
    time.sleep(0.5)
    load.finish()
    assert load.errors == []
    assert len(load.statuses) >= 40 and set(load.statuses) == {200}, load.statuses
    (after,) = parse_responses(raw_exchange(port, STATUS))
    assert after[0] == 404 and b"x-authproxy-error" not in after[1]  # the venue's own 404
    moved = parse_responses(
        raw_exchange(
            port,
            b"GET /ed2/api/v3/account HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /ed25519/api/v3/account HTTP/1.1\r\nHost: x\r\n\r\n",
        )
    )
    assert [m[0] for m in moved] == [200, 404]
    assert proc.popen.poll() is None
