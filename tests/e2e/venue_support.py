"""Helpers for the end-to-end tests of the non-Binance venues (Kraken, BitMEX, Gemini,
Deribit): start a simulator with a venue's keys, describe a service on it, run
``authproxy sign`` and replay its output straight at the simulator, act as the engine."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from keycache.record import make_record
from proxy.demo import PERMISSIONS
from proxy.procs import Proc, simulator_argv


def key_record(key_id: str, secret: str, algorithm: str) -> dict[str, object]:
    now = datetime.now(UTC).replace(microsecond=0)
    return make_record(
        key_id,
        secret,
        algorithm=algorithm,
        created_at=now - timedelta(days=1),
        expires_at=now + timedelta(days=30),
        permissions=PERMISSIONS,
    )


class Simulator:
    """A simulator process serving one venue's keys over HTTPS."""

    def __init__(self, run_dir: Path, keys: dict[str, Any], *extra: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        keys_file = run_dir / "venue-keys.json"
        keys_file.write_text(json.dumps(keys))
        self.proc = Proc(
            simulator_argv(keys_file, run_dir / "state", *extra),
            stderr_path=run_dir / "sim.log",
        )

    @property
    def port(self) -> int:
        return int(self.proc.ready["port"])

    @property
    def ca_file(self) -> str:
        return str(self.proc.ready["ca_file"])

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def service(self, venue: str, route: str, **extra: Any) -> dict[str, Any]:
        return {
            "venue": venue,
            "key_type": "exchange_api",
            "upstream": self.base,
            "route": route,
            "ca_file": self.ca_file,
            "timeout_ms": 2000,
            **extra,
        }

    def control(self, method: str, path: str, document: Any = None) -> tuple[int, Any]:
        data = json.dumps(document).encode() if document is not None else None
        return self.request(method, path, data, {"Content-Type": "application/json"})

    def revoke(self, api_key: str) -> None:
        status, body = self.control("DELETE", f"/__sim/keys/{api_key}")
        assert status == 200, body

    def restore_keys(self) -> None:
        status, body = self.control("POST", "/__sim/keys", self.keys)
        assert status == 200, body

    def request(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        req = urllib.request.Request(self.base + target, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def replay(self, signed: dict[str, Any], **changes: Any) -> tuple[int, bytes]:
        """Send what ``authproxy sign`` printed (optionally altered) straight to the venue.

        Returns the status and the raw body, for the venue's classifier.
        """
        req = {**signed, **changes}
        target = req["url"].removeprefix(self.base)
        headers = {k: v for k, v in req["headers"] if k.lower() not in ("host", "content-length")}
        data = req["body"].encode()
        request = urllib.request.Request(
            self.base + target,
            data=data if data or req["method"] in ("POST", "PUT") else None,
            method=req["method"],
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def stop(self) -> None:
        assert self.proc.stop() == 0, self.proc.stderr_tail()


def sign_cli(config: str, *args: str) -> dict[str, Any]:
    """``authproxy sign`` as a subprocess; its JSON output."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "sign", "--config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def header_of(signed: dict[str, Any], name: str) -> str:
    (value,) = [v for k, v in signed["headers"] if k.lower() == name.lower()]
    return str(value)


async def engine(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, bytes]:
    """The trading engine: one unsigned request to the sidecar. (status, headers, body)."""
    async with (
        aiohttp.ClientSession(skip_auto_headers=("Content-Type",)) as session,
        session.request(
            method, f"http://127.0.0.1:{port}{path}", data=body or None, headers=headers
        ) as resp,
    ):
        return resp.status, resp.headers, await resp.read()
