"""proxy.admin over a fake backend: status codes, the token check, the error contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import AdminApi

TOKEN = "admin-token-for-tests-0123456789"


class FakeBackend:
    def __init__(self) -> None:
        self.ready = True
        self.revoked: list[tuple[str, str]] = []

    def render_metrics(self) -> bytes:
        return b"# HELP authproxy_x x\n# TYPE authproxy_x gauge\nauthproxy_x 1.0\n"

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"problems": {} if self.ready else {"svc": "no usable key"}}

    def keys_report(self) -> dict[str, Any]:
        return {"backend": "file", "services": {"svc": {"keys": []}}}

    def has_service(self, service: str) -> bool:
        return service == "svc"

    async def revoke(self, service: str, key_id: str) -> bool:
        self.revoked.append((service, key_id))
        return key_id == "held"


async def _client(backend: FakeBackend, token_file: Path | None) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(AdminApi(backend, token_file).app))
    await client.start_server()
    return client


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


async def test_read_only_endpoints(token_file: Path) -> None:
    backend = FakeBackend()
    client = await _client(backend, token_file)
    try:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200
        backend.ready = False
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["problems"] == {"svc": "no usable key"}
        assert (await (await client.get("/keys")).json())["backend"] == "file"
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("auth", "status"),
    [(None, 401), ("Bearer wrong", 401), ("Basic " + TOKEN, 401), ("Bearer " + TOKEN, 200)],
)
async def test_revoke_needs_the_bearer_token(
    token_file: Path, auth: str | None, status: int
) -> None:
    backend = FakeBackend()
    client = await _client(backend, token_file)
    try:
        headers = {"Authorization": auth} if auth else {}
        resp = await client.post(
            "/keys/revoke", json={"service": "svc", "key_id": "held"}, headers=headers
        )
        assert resp.status == status
        body = await resp.read()
        assert TOKEN.encode() not in body
        if status == 401:
            assert resp.headers["X-Authproxy-Error"] == "unauthorized"
            assert json.loads(body)["error"]["code"] == "unauthorized"
            assert backend.revoked == []
        else:
            assert json.loads(body) == {"revoked": True}
            assert backend.revoked == [("svc", "held")]
    finally:
        await client.close()


async def test_revoke_without_token_file_is_forbidden() -> None:
    client = await _client(FakeBackend(), None)
    try:
        resp = await client.post(
            "/keys/revoke",
            json={"service": "svc", "key_id": "held"},
            headers={"Authorization": "Bearer " + TOKEN},
        )
        assert resp.status == 403
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("payload", "status", "answer"),
    [
        ({"service": "other", "key_id": "held"}, 404, None),
        ({"service": "svc", "key_id": "gone"}, 200, {"revoked": False}),
        ({"service": "svc"}, 400, None),
        (["svc", "held"], 400, None),
    ],
)
async def test_revoke_answers(
    token_file: Path, payload: Any, status: int, answer: dict[str, bool] | None
) -> None:
    client = await _client(FakeBackend(), token_file)
    try:
        resp = await client.post(
            "/keys/revoke", json=payload, headers={"Authorization": "Bearer " + TOKEN}
        )
        assert resp.status == status
        if answer is not None:
            assert await resp.json() == answer
        else:
            assert "error" in await resp.json()
    finally:
        await client.close()
