"""The admin API (aiohttp, loopback only): /metrics /healthz /readyz /keys, POST /keys/revoke.

A thin shell: every answer comes from the ``AdminBackend`` (the running sidecar), whose
methods run on the loop and never block. Read-only endpoints need no token (the listener
is loopback only, enforced by the config); the state-changing ``POST /keys/revoke``
needs ``Authorization: Bearer <token>`` matching ``admin.token_file`` (read per call, so
the token can be replaced without a restart; compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from proxy.http11 import error_body
from proxy.metrics import CONTENT_TYPE

#: A revocation request body is a two-field JSON object; anything larger is refused.
MAX_REVOKE_BODY = 4096
#: A token file holds one token line; a larger file is a misconfiguration.
MAX_TOKEN_BYTES = 4096


class AdminBackend(Protocol):
    """What the admin API asks of the sidecar (all on the loop)."""

    def render_metrics(self) -> bytes: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def keys_report(self) -> dict[str, Any]: ...

    def has_service(self, service: str) -> bool: ...

    async def revoke(self, service: str, key_id: str) -> bool: ...


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(code, message),
        content_type="application/json",
        headers={"X-Authproxy-Error": code},
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def _read_token(path: Path) -> bytes | None:
    """The admin token (stripped), or None if the file is missing or empty. Blocking."""
    try:
        with path.open("rb") as fh:
            token = fh.read(MAX_TOKEN_BYTES).strip()
    except OSError:
        return None
    return token or None


class AdminApi:
    """The aiohttp application and its listener."""

    def __init__(self, backend: AdminBackend, token_file: Path | None) -> None:
        self.backend = backend
        self.token_file = token_file
        self.app = web.Application(client_max_size=MAX_REVOKE_BODY)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/keys", self.keys)
        self.app.router.add_post("/keys/revoke", self.revoke)
        self.runner: web.AppRunner | None = None

    async def start(self, address: str, port: int) -> tuple[str, int]:
        """Listen on ``address:port`` (0: any free port); return the bound address."""
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        # reuse_port: a successor (proxy.handover) binds the same port while this one drains.
        site = web.TCPSite(self.runner, address, port, reuse_address=True, reuse_port=True)
        await site.start()
        host, bound = self.runner.addresses[0][:2]
        return str(host), int(bound)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- handlers ----------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.backend.render_metrics(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, detail = self.backend.readiness()
        return _json({"ready": ready, **detail}, 200 if ready else 503)

    async def keys(self, request: web.Request) -> web.Response:
        return _json(self.backend.keys_report())

    async def revoke(self, request: web.Request) -> web.Response:
        if self.token_file is None:
            return _error(403, "admin_token_not_configured", "no admin.token_file is configured")
        token = await asyncio.to_thread(_read_token, self.token_file)
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if (
            token is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(value.strip().encode(), token)
        ):
            return _error(401, "unauthorized", "a valid admin bearer token is required")
        try:
            body = await request.json()
        except (ValueError, web.HTTPException):
            return _error(400, "bad_request", "the body must be a JSON object")
        if not isinstance(body, dict):
            return _error(400, "bad_request", "the body must be a JSON object")
        service, key_id = body.get("service"), body.get("key_id")
        if not isinstance(service, str) or not isinstance(key_id, str) or not key_id:
            return _error(400, "bad_request", "service and key_id (strings) are required")
        if not self.backend.has_service(service):
            return _error(404, "unknown_service", "no such service")
        revoked = await self.backend.revoke(service, key_id)
        return _json({"revoked": revoked})
