"""Real processes over loopback: the venue simulator (HTTPS) and the sidecar."""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.demo import binance_service, make_test_keys, sidecar_config, write_key_file
from proxy.procs import Proc, sidecar_argv, simulator_argv

pytestmark = pytest.mark.e2e


@dataclass
class Venue:
    """A running simulator and the test keys made for it."""

    proc: Proc
    run_dir: Path
    keys: dict[str, tuple[dict[str, object], dict[str, str] | None]]

    @property
    def port(self) -> int:
        return int(self.proc.ready["port"])

    @property
    def ca_file(self) -> str:
        return str(self.proc.ready["ca_file"])

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def reset_weight(self) -> None:
        """Binance counts request weight per IP per minute and every test's traffic comes
        from 127.0.0.1: start each sidecar on a clean count, so one test's load cannot make
        the next one's sidecar hold back (the sidecar follows the venue's count)."""
        import urllib.request

        req = urllib.request.Request(
            f"https://127.0.0.1:{self.port}/__sim/binance/weight?used=0", method="POST"
        )
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=10) as resp:
            assert resp.status == 200


@dataclass
class Sidecars:
    venue: Venue
    run_dir: Path
    started: list[Proc] = field(default_factory=list)

    def start(
        self,
        services: dict[str, dict[str, Any]] | None = None,
        listen: dict[str, Any] | None = None,
        name: str = "sidecar",
        records: dict[str, dict[str, object] | list[dict[str, object]]] | None = None,
        memory: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        clients: dict[str, Any] | None = None,
    ) -> Proc:
        """Start a sidecar with ``services`` (default: the four Binance test services).

        ``records`` (service -> key record) adds keys beyond the Binance test keys, for
        services of other venues. ``env`` is added to this process's environment.
        """
        if services is None:
            services = {
                s: binance_service(
                    self.venue.port,
                    self.venue.ca_file,
                    "/" + s.removeprefix("binance_"),
                    # the simulator's control endpoints (/__sim/echo, /status, ...)
                    allow=["* /__sim/**"],
                )
                for s in self.venue.keys
            }
        self.venue.reset_weight()
        run = self.run_dir / name
        run.mkdir()
        stored: dict[str, dict[str, object] | list[dict[str, object]]] = {
            s: self.venue.keys[s][0] for s in services if s in self.venue.keys
        }
        stored.update(records or {})
        keys_path, kek_path = write_key_file(run, stored)
        cfg = sidecar_config(keys_path, kek_path, services)
        if listen:
            cfg["listen"].update(listen)
        if memory:
            cfg["memory"] = memory
        if clients:
            cfg["clients"] = clients
        path = run / "authproxy.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = Proc(
            sidecar_argv(path),
            stderr_path=run / "stderr.log",
            env={**os.environ, **env} if env else None,
        )
        self.started.append(proc)
        return proc


@pytest.fixture(scope="session")
def venue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venue]:
    run_dir = tmp_path_factory.mktemp("venue")
    keys = make_test_keys()
    keys_file = run_dir / "venue-keys.json"
    keys_file.write_text(json.dumps({"binance": [v for _, v in keys.values() if v]}))
    proc = Proc(simulator_argv(keys_file, run_dir / "state"), stderr_path=run_dir / "sim.log")
    try:
        yield Venue(proc, run_dir, keys)
    finally:
        assert proc.stop() == 0, proc.stderr_tail()


@pytest.fixture(autouse=True)
def _fresh_binance_weight(venue: Venue) -> None:
    """Every test starts on a clean Binance weight count (see ``Venue.reset_weight``),
    whatever way it starts its sidecars."""
    venue.reset_weight()


@pytest.fixture
def sidecars(venue: Venue, tmp_path: Path) -> Iterator[Sidecars]:
    sc = Sidecars(venue, tmp_path)
    try:
        yield sc
    finally:
        codes = [p.stop() for p in sc.started]
        assert codes == [0] * len(codes), [p.stderr_tail() for p in sc.started]


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the peer closes or ``timeout``; return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)
