"""Who may call and what, against the real sidecar and simulator: endpoints outside the
allow-list and withdrawals get 403 and never reach the venue; on a unix socket only the
allowed uid is served (a process under another uid is refused before anything is read);
client tokens."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.demo import binance_service
from tests.e2e.conftest import Sidecars, Venue, raw_exchange
from tests.e2e.test_listener_errors import parse_responses

pytestmark = pytest.mark.e2e

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by any user (the venv lives under /root)

CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(0.5)
try:
    first = s.recv(65536)  # a refused peer is answered before it sends anything
except TimeoutError:
    first = b""
data = first
if not first:
    s.settimeout(10)
    s.sendall(sys.argv[2].encode())
    s.shutdown(socket.SHUT_WR)
    while chunk := s.recv(65536):
        data += chunk
sys.stdout.write(data.decode("latin-1"))
"""


def _log_queries(venue: Venue) -> list[str]:
    from tests.e2e.test_vault_e2e import sim_call

    entries = asyncio.run(sim_call(venue, "GET", "/__sim/log"))["entries"]
    return [str(e["query"]) for e in entries]


def test_unlisted_endpoints_and_withdrawals_are_403_and_never_reach_the_venue(
    sidecars: Sidecars, venue: Venue
) -> None:
    svc = binance_service(venue.port, venue.ca_file, "/hmac", allow=["GET /api/v3/klines"])
    proc = sidecars.start({"binance_hmac": svc})
    port = proc.ready["listen"]["port"]
    tag = b"forbid-" + os.urandom(6).hex().encode()
    requests = (
        b"POST /hmac/sapi/v1/capital/withdraw/apply?coin=BTC&amount=1&t=%s HTTP/1.1\r\n"
        b"Host: x\r\nContent-Length: 0\r\n\r\n"
        b"POST /hmac/sapi/v1/asset/transfer?type=MAIN_UMFUTURE&t=%s HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 0\r\n\r\n"
        b"GET /hmac/sapi/v1/account/status?t=%s HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /hmac/__sim/echo?t=%s HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /hmac/api/v3/klines?symbol=BTCUSDT&interval=1m HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /hmac/api/v3/account HTTP/1.1\r\nHost: x\r\n\r\n"
    ) % (tag, tag, tag, tag)
    answers = parse_responses(raw_exchange(port, requests))
    statuses = [status for status, _, _ in answers]
    assert statuses[:4] == [403, 403, 403, 403]
    for _, headers, body in answers[:4]:
        assert headers[b"x-authproxy-error"] == b"forbidden"
        assert json.loads(body)["error"]["code"] == "forbidden"
    # klines is allow-listed (the simulator does not serve it: its 404 is the venue's);
    # the account read is in Binance's map and the key type may read accounts.
    assert b"x-authproxy-error" not in answers[4][1] and statuses[5] == 200
    assert not any(tag.decode() in q for q in _log_queries(venue))  # none reached it


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="authproxy-sock-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _call_as(uid: int, sock: Path, request: str) -> str:
    argv = [SYSTEM_PYTHON, "-I", "-S", "-c", CLIENT, str(sock), request]
    if uid != os.getuid():
        setpriv = shutil.which("setpriv")
        assert setpriv is not None  # util-linux, on every Debian
        argv = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_only_allowed_uids_are_served_on_the_unix_socket(
    sidecars: Sidecars, venue: Venue, socket_dir: Path
) -> None:
    assert os.getuid() == 0, "the test switches to another uid (CI runs as root)"
    assert Path(SYSTEM_PYTHON).exists()
    sock = socket_dir / "engine.sock"
    proc = sidecars.start(listen={"address": f"unix:{sock}", "allow_uids": [0]})
    # The socket is 0660 root: open it to everyone so the *peer check* is what decides.
    sock.chmod(0o666)
    order = (
        "POST /hmac/api/v3/order/test?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
        "&quantity=0.01&price=30000&newClientOrderId=peer-{who} HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    refused = _call_as(NOBODY, sock, order.format(who="nobody"))
    assert refused.startswith("HTTP/1.1 403 "), refused[:200]
    assert "this user may not use the sidecar" in refused
    served = _call_as(0, sock, order.format(who="root"))
    assert served.startswith("HTTP/1.1 200 "), served[:200]
    from tests.e2e.test_vault_e2e import signed_by

    assert [k for _, k, _ in asyncio.run(signed_by(venue, "peer-nobody"))] == []
    assert len(asyncio.run(signed_by(venue, "peer-root"))) == 1
    assert proc.popen.poll() is None


def test_client_tokens(sidecars: Sidecars, venue: Venue, tmp_path: Path) -> None:
    token = tmp_path / "risk.token"
    token.write_text("risk-" + os.urandom(16).hex())
    token.chmod(0o600)
    proc = sidecars.start(
        clients={"risk": {"token_file": str(token), "services": ["binance_hmac"]}}
    )
    port = proc.ready["listen"]["port"]
    value = token.read_text().encode()
    answers = parse_responses(
        raw_exchange(
            port,
            b"GET /hmac/api/v3/account HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /hmac/api/v3/account HTTP/1.1\r\nHost: x\r\nX-Authproxy-Token: %s\r\n\r\n"
            b"GET /ed25519/api/v3/account HTTP/1.1\r\nHost: x\r\nX-Authproxy-Token: %s\r\n\r\n"
            % (value, value),
        )
    )
    assert [a[0] for a in answers] == [401, 200, 403]


def test_every_venue_refuses_withdrawals_and_unlisted_endpoints_at_the_sidecar(
    sidecars: Sidecars, venue: Venue
) -> None:
    """One service per venue, all aimed at the simulator: for each, a withdrawal and an
    endpoint outside its map are 403 and neither reaches the simulator."""
    import base64
    import secrets
    from datetime import UTC, datetime, timedelta

    from keycache.record import make_record
    from proxy.demo import PERMISSIONS
    from tests.proxy.test_access import MOVES_AND_UNLISTED

    now = datetime.now(UTC).replace(microsecond=0)
    times = {"created_at": now - timedelta(days=1), "expires_at": now + timedelta(days=30)}
    algorithms = {"kraken": "hmac-sha512", "gemini": "hmac-sha384"}
    services, records = {}, {}
    for i, name in enumerate(sorted(MOVES_AND_UNLISTED)):
        secret = (
            base64.b64encode(secrets.token_bytes(64)).decode()
            if name == "kraken"
            else secrets.token_hex(32)
        )
        extra = {"passphrase": "Sim-" + secrets.token_hex(4)} if name == "okx" else {}
        records[f"{name}_svc"] = make_record(
            f"k{i}-" + secrets.token_hex(8),
            secret,
            algorithm=algorithms.get(name, "hmac-sha256"),
            permissions=PERMISSIONS,
            **times,  # type: ignore[arg-type]
            **extra,  # type: ignore[arg-type]
        )
        services[f"{name}_svc"] = {
            "venue": name,
            "key_type": "exchange_api",
            "upstream": f"https://127.0.0.1:{venue.port}",
            "route": f"/{name}",
            "ca_file": venue.ca_file,
            "clock_sync": False,
        }
    proc = sidecars.start(services, records=records)
    port = proc.ready["listen"]["port"]
    tag = "forbid-" + os.urandom(6).hex()
    for name, lines in MOVES_AND_UNLISTED.items():
        for line in lines:
            method, _, path = line.partition(b" ")
            request = b"%s /%s%s?t=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % (
                method,
                name.encode(),
                path,
                tag.encode(),
            )
            ((status, headers, body),) = parse_responses(raw_exchange(port, request))
            assert status == 403, (name, line, body)
            assert headers[b"x-authproxy-error"] == b"forbidden"
    assert not any(tag in q for q in _log_queries(venue))
