"""``python -m proxy.simulator``: the real process over real TLS, and argument errors."""

from __future__ import annotations

import json
import os
import select
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from proxy.simulator.__main__ import EXIT_USAGE, main
from tests.simulator.support import HMAC_API_KEY, keys_document, signed

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One stdout line, or fail after ``timeout`` (never blocks forever)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError(f"no ready line (exit {proc.poll()}), got {buf!r}")
        readable, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                continue
            buf += chunk
    line, _, rest = buf.partition(b"\n")
    assert rest == b"", f"more than one line on stdout: {rest!r}"
    return line


def _call(request: urllib.request.Request, ctx: ssl.SSLContext) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.e2e
def test_cli_serves_verified_https_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys_document()))
    state_dir = tmp_path / "state"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    with (tmp_path / "sim.log").open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.simulator",
                "--keys",
                str(keys_file),
                "--state-dir",
                str(state_dir),
                "--port",
                "0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            env=env,
        )
        try:
            ready = json.loads(_read_line(proc, READY_TIMEOUT_S))
            assert set(ready) == {"event", "port", "ca_file"}
            assert ready["event"] == "ready"
            assert ready["ca_file"] == str((state_dir / "ca.pem").resolve())
            port = ready["port"]
            ctx = ssl.create_default_context(cafile=ready["ca_file"])

            status, body = _call(
                urllib.request.Request(f"https://127.0.0.1:{port}/api/v3/time"), ctx
            )
            assert status == 200
            assert isinstance(body, dict)
            assert abs(body["serverTime"] - time.time() * 1000) < 60_000

            params = "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=100"
            form = signed(f"{params}&timestamp={int(time.time() * 1000)}")
            order = urllib.request.Request(
                f"https://localhost:{port}/api/v3/order",
                data=form.encode(),
                method="POST",
                headers={
                    "X-MBX-APIKEY": HMAC_API_KEY,
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
            status, body = _call(order, ctx)
            assert status == 200, body
            assert isinstance(body, dict)
            assert body["status"] == "NEW"

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, (tmp_path / "sim.log").read_text()
            assert proc.stdout is not None
            assert proc.stdout.read() == b""  # exactly one line on stdout, ever
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_cli_refuses_a_bad_keys_file(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({"binance": [{"api_key": "k", "algorithm": "hmac-sha256"}]}))
    assert main(["--keys", str(bad), "--state-dir", str(tmp_path / "s")]) == EXIT_USAGE
    bad.write_text("{not json")
    assert main(["--keys", str(bad), "--state-dir", str(tmp_path / "s")]) == EXIT_USAGE
    assert (
        main(["--keys", str(tmp_path / "missing.json"), "--state-dir", str(tmp_path)]) == EXIT_USAGE
    )
    assert not (tmp_path / "s").exists()  # nothing started, nothing written
