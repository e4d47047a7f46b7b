"""Start the project's own processes (sidecar, venue simulator) and read their ready line.

Used by the demo, the end-to-end tests and the benchmarks, so all of them start the real
processes the same way. Blocking: not for the event loop.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 30.0


class Proc:
    """A child process that printed one JSON ``{"event": "ready", ...}`` line on stdout."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stderr_path: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(  # noqa: S603 - our own executables, fixed argv
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self.ready: dict[str, Any] = self._wait_ready()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _wait_ready(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + READY_TIMEOUT_S
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("event") == "ready":
                        return msg
            elif self.popen.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.argv[0]} did not become ready: {self.stderr_tail()}")

    def stderr_tail(self, n: int = 4000) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_bytes()[-n:].decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()  # type: ignore[union-attr]
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


def simulator_argv(keys_file: Path, state_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxy.simulator",
        "--keys",
        str(keys_file),
        "--state-dir",
        str(state_dir),
        *extra,
    ]


def sidecar_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
