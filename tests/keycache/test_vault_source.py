"""VaultSource against a real OpenBao dev server (TLS verified against its dev CA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keycache.errors import (
    KeyRecordError,
    KeyStoreConflict,
    KeyStoreForbidden,
    KeyStoreNotFound,
    KeyStoreUnavailable,
)
from keycache.vault import VaultSource, scrub_record, wipe_str
from keycache.vaultauth import AuthTiming, VaultAuthSettings
from tests.keycache.helpers import hmac_record

if TYPE_CHECKING:
    from tests.vaultserver import FakeKubernetesAPI, KVSpace, VaultServer

pytest_plugins = ["tests.vaultserver"]

#: Short timings so the token lifetime tests run in seconds.
FAST = AuthTiming(
    min_attempt_interval_s=0.1, backoff_base_s=0.2, backoff_cap_s=1.0, forbidden_recheck_s=0.5
)


def token_source(
    server: VaultServer,
    prefix: str,
    token_file: Path,
    token: str,
    **kw: object,
) -> VaultSource:
    token_file.write_text(token + "\n")
    return VaultSource(
        server.address,
        auth=VaultAuthSettings("token", token_file=token_file),
        path_prefix=prefix,
        verify=server.ca_file,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def admin(vault: KVSpace, tmp_path: Path) -> Iterator[VaultSource]:
    """A source whose token may read and write everything under secret/."""
    token = vault.server.create_token(["test-kv-admin"])
    with token_source(vault.server, vault.prefix, tmp_path / "token", token) as source:
        yield source


def self_signed_ca(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the vault CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- KV v2 ----------------------------------------------------------------------------------


def test_write_read_round_trip_and_metadata(admin: VaultSource, vault: KVSpace) -> None:
    first = hmac_record()
    second = hmac_record(passphrase="okx-pass-phrase")
    assert admin.write_version("svc", first, cas=0) == 1
    assert admin.write_version("svc", second, cas=1) == 2
    md = admin.read_metadata("svc")
    assert md.current_version == 2
    assert [v.version for v in md.versions] == [1, 2]
    assert all(v.deletion_time is None and not v.destroyed for v in md.versions)
    assert md.versions[0].created_time <= md.versions[1].created_time
    assert md.versions[1].created_time.tzinfo is UTC
    # The same JSON object comes back, and the harness (plain urllib) agrees.
    assert admin.read_version("svc", 1) == first
    got = admin.read_version("svc", 2)
    assert got == second
    assert vault.server.request("GET", f"secret/data/{vault.path('svc')}?version=2")["data"][
        "data"
    ] == dict(second)
    scrub_record(got)
    assert got == {}


def test_record_reads_reuse_their_tls_connection(
    admin: VaultSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record read to its last byte hands its connection back to the pool: three reads,
    one TLS handshake (a handshake and a CA load cost 1.8 of a read's 2.9 ms of CPU). So
    does a refusal whose error body was read whole; the next read still works."""
    from keycache import vault

    connects: list[object] = []
    connect = vault._SecretHTTPSConnection.connect

    def counting_connect(self: vault._SecretHTTPSConnection) -> None:
        connects.append(self)
        connect(self)

    monkeypatch.setattr(vault._SecretHTTPSConnection, "connect", counting_connect)
    admin.write_version("svc", hmac_record(), cas=0)
    for _ in range(3):
        scrub_record(admin.read_version("svc", 1))
    assert len(connects) == 1
    with pytest.raises(KeyStoreNotFound):
        admin.read_version("svc", 2)
    record = admin.read_version("svc", 1)
    assert record["checksum"]
    scrub_record(record)
    assert len(connects) == 1


def test_the_poll_reads_metadata_without_requests_on_one_connection(
    admin: VaultSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's poll (``read_metadata``, every second per service) goes straight
    through urllib3 on a keep-alive connection: requests' machinery tripled its CPU on the
    sidecar's core (loadtests/vaultreads.py). With requests made unusable, polls still
    work, and five of them open one connection."""
    import requests
    import urllib3.connection

    admin.write_version("svc", hmac_record(), cas=0)

    def no_requests(*_a: object, **_k: object) -> None:
        raise AssertionError("a metadata read went through requests")

    monkeypatch.setattr(requests.Session, "send", no_requests)
    connects: list[object] = []
    connect = urllib3.connection.HTTPSConnection.connect

    def counting_connect(self: urllib3.connection.HTTPSConnection) -> None:
        connects.append(self)
        connect(self)

    monkeypatch.setattr(urllib3.connection.HTTPSConnection, "connect", counting_connect)
    for _ in range(5):
        md = admin.read_metadata("svc")
        assert md.current_version == 1
        assert [v.version for v in md.versions] == [1]
    assert len(connects) == 1
    with pytest.raises(KeyStoreNotFound, match=r"read_metadata\(other\): not found"):
        admin.read_metadata("other")


def test_a_store_that_is_not_listening_cannot_be_connected(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "token").write_text("unused")
    source = VaultSource(
        f"https://127.0.0.1:{port}",
        auth=VaultAuthSettings("token", token_file=tmp_path / "token"),
        verify=False,
        timeout_s=2.0,
    )
    with pytest.raises(KeyStoreUnavailable, match=r"read_metadata\(svc\): cannot connect"):
        source.read_metadata("svc")
    source.close()


class _Recorder:
    """A plain-HTTP stand-in for Vault on loopback: answers each GET with the next queued
    (status, body) (or never, for ``None``), and records the path and headers it got."""

    def __init__(self, answers: list[tuple[int, bytes] | None]) -> None:
        import http.server
        import threading

        self.seen: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if "/auth/token/" in self.path:  # the keeper's look at its token
                    answer: tuple[int, bytes] | None = (200, b'{"data": {"ttl": 0}}')
                else:
                    recorder.seen.append((self.path, dict(self.headers.items())))
                    answer = answers.pop(0)
                if answer is None:
                    recorder.release.wait(10)  # a store that does not answer
                    return
                status, body = answer
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


METADATA = json.dumps(
    {
        "data": {
            "current_version": 1,
            "oldest_version": 0,
            "versions": {
                "1": {
                    "created_time": "2026-11-29T00:00:00Z",
                    "deletion_time": "",
                    "destroyed": False,
                }
            },
        }
    }
).encode()


def test_the_poll_keeps_the_address_path_and_sends_what_hvac_sends(tmp_path: Path) -> None:
    """A Vault behind a path (a gateway at http://host/vault) is polled under that path,
    with hvac's X-Vault-Request header and the token; a status hvac has no exception for
    is 'unexpected', a store that does not answer times out."""
    store = _Recorder([(200, METADATA), (405, b"{}"), None])
    (tmp_path / "token").write_text("s.polltoken")
    source = VaultSource(
        f"http://127.0.0.1:{store.port}/vault/",
        auth=VaultAuthSettings("token", token_file=tmp_path / "token"),
        timeout_s=0.5,
    )
    try:
        assert source.read_metadata("svc").current_version == 1
        path, headers = store.seen[0]
        assert path == "/vault/v1/secret/metadata/api_keys/svc"
        assert headers["X-Vault-Request"] == "true"
        assert headers["X-Vault-Token"] == "s.polltoken"
        with pytest.raises(
            KeyStoreUnavailable, match=r"unexpected answer from the store \(HTTP 405\)"
        ):
            source.read_metadata("svc")
        with pytest.raises(
            KeyStoreUnavailable, match=r"read_metadata\(svc\): timed out after 0.5 s"
        ):
            source.read_metadata("svc")
    finally:
        source.close()
        store.close()


def test_check_and_set_conflict_carries_the_current_version(admin: VaultSource) -> None:
    admin.write_version("svc", hmac_record(), cas=0)
    admin.write_version("svc", hmac_record(), cas=1)
    with pytest.raises(KeyStoreConflict) as info:
        admin.write_version("svc", hmac_record(), cas=1)
    assert info.value.current_version == 2
    assert info.value.code == "key_store_conflict"
    with pytest.raises(KeyStoreConflict):
        admin.write_version("svc", hmac_record(), cas=0)  # "create only": exists already


def test_invalid_records_are_not_written(admin: VaultSource) -> None:
    record = hmac_record()
    record["checksum"] = "0" * 64
    with pytest.raises(KeyRecordError, match="checksum"):
        admin.write_version("svc", record, cas=None)
    with pytest.raises(KeyRecordError, match="not a valid service name"):
        admin.read_metadata("../sys")


def test_deleted_and_destroyed_versions(admin: VaultSource) -> None:
    for _ in range(3):
        admin.write_version("svc", hmac_record(), cas=None)
    admin.delete_version("svc", 2)
    admin.destroy_version("svc", 3)
    md = {v.version: v for v in admin.read_metadata("svc").versions}
    now = datetime.now(UTC)
    assert md[1].present(now)
    assert md[2].deletion_time is not None and not md[2].present(now)
    assert md[3].destroyed and not md[3].present(now)
    for version in (2, 3, 4):
        with pytest.raises(KeyStoreNotFound, match=r"read_version\(svc\)"):
            admin.read_version("svc", version)
    with pytest.raises(KeyStoreNotFound):
        admin.read_metadata("never_written")


# -- TLS and the environment ---------------------------------------------------------------


def test_tls_is_verified_against_the_given_ca(vault: KVSpace, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    self_signed_ca(other_ca)
    token = vault.server.create_token(["test-kv-admin"])
    (tmp_path / "token").write_text(token)
    auth = VaultAuthSettings("token", token_file=tmp_path / "token")
    wrong = VaultSource(vault.server.address, auth=auth, path_prefix=vault.prefix, verify=other_ca)
    with pytest.raises(KeyStoreUnavailable, match="certificate verification failed"):
        wrong.read_metadata("svc")
    system = VaultSource(vault.server.address, auth=auth, path_prefix=vault.prefix, verify=True)
    with pytest.raises(KeyStoreUnavailable, match="certificate verification failed"):
        system.read_metadata("svc")
    missing = VaultSource(  # no I/O in the constructor: the error comes with the request
        vault.server.address, auth=auth, path_prefix=vault.prefix, verify=tmp_path / "none.pem"
    )
    with pytest.raises(KeyStoreUnavailable, match="CA certificate bundle"):
        missing.read_metadata("svc")
    right = VaultSource(
        vault.server.address, auth=auth, path_prefix=vault.prefix, verify=vault.server.ca_file
    )
    with pytest.raises(KeyStoreNotFound):
        right.read_metadata("svc")  # reached Vault: TLS fine, nothing written yet
    for source in (wrong, system, missing, right):
        source.close()


def test_a_ca_directory_verifies_the_poll_as_requests_does(vault: KVSpace, tmp_path: Path) -> None:
    """``verify`` may name a directory of hashed CA certificates (``openssl rehash``): the
    poll's pool is given it as a directory, the way requests hands it to urllib3."""
    cas = tmp_path / "cas"
    cas.mkdir()
    subject_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(vault.server.ca_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (cas / f"{subject_hash}.0").write_bytes(Path(vault.server.ca_file).read_bytes())
    token = vault.server.create_token(["test-kv-admin"])
    (tmp_path / "token").write_text(token)
    source = VaultSource(
        vault.server.address,
        auth=VaultAuthSettings("token", token_file=tmp_path / "token"),
        path_prefix=vault.prefix,
        verify=cas,
    )
    with pytest.raises(KeyStoreNotFound):
        source.read_metadata("svc")  # reached Vault: TLS verified, nothing written yet
    source.close()


ENV_PROBE = r"""
import json, sys
from pathlib import Path
address, ca, token_file, prefix = sys.argv[1:5]
import hvac
from keycache.vault import VaultSource
from keycache.vaultauth import VaultAuthSettings
plain = hvac.Client()  # what hvac does on its own in this environment
src = VaultSource(address, auth=VaultAuthSettings("token", token_file=Path(token_file)),
                  path_prefix=prefix, verify=Path(ca))
md = src.read_metadata("svc")
print(json.dumps({"hvac_default_url": plain.url, "hvac_default_token": plain.token,
                  "current_version": md.current_version}))
"""


def test_vault_environment_variables_are_ignored(
    admin: VaultSource, vault: KVSpace, tmp_path: Path
) -> None:
    admin.write_version("svc", hmac_record(), cas=0)
    token = vault.server.create_token(["test-kv-read"])
    (tmp_path / "token").write_text(token)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".vault-token").write_text("bogus-home-token")
    (home / ".netrc").write_text("machine 127.0.0.1 login bogus password bogus\n")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "VAULT_ADDR": "https://vault.invalid:8200",
        "VAULT_TOKEN": "bogus-env-token",
        "VAULT_CACERT": str(tmp_path / "no-such-ca.pem"),
        "VAULT_CAPATH": str(tmp_path / "no-such-dir"),
        "VAULT_CLIENT_CERT": str(tmp_path / "no-such-cert.pem"),
        "VAULT_CLIENT_KEY": str(tmp_path / "no-such-key.pem"),
        "VAULT_NAMESPACE": "bogus",
        "REQUESTS_CA_BUNDLE": str(tmp_path / "no-such-bundle.pem"),
        "CURL_CA_BUNDLE": str(tmp_path / "no-such-bundle.pem"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            ENV_PROBE,
            vault.server.address,
            str(vault.server.ca_file),
            str(tmp_path / "token"),
            vault.prefix,
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # The environment was live (hvac alone picks it up) ...
    assert out["hvac_default_url"] == "https://vault.invalid:8200"
    assert out["hvac_default_token"] == "bogus-env-token"
    # ... and VaultSource read through to the real server regardless.
    assert out["current_version"] == 1


# -- authentication -------------------------------------------------------------------------


def test_forbidden_and_no_token_in_messages(vault: KVSpace, tmp_path: Path) -> None:
    token = vault.server.create_token(["test-nothing"])
    source = token_source(vault.server, vault.prefix, tmp_path / "token", token)
    with pytest.raises(KeyStoreForbidden, match=r"read_metadata\(svc\): permission denied") as info:
        source.read_metadata("svc")
    err = info.value
    assert err.__context__ is None and err.__cause__ is None  # no request (token) reachable
    for text in (str(err), repr(err), repr(source), repr(source.auth_status())):
        assert token not in text


def test_token_file_change_is_picked_up(vault: KVSpace, tmp_path: Path) -> None:
    vault.write("svc", hmac_record())
    token_file = tmp_path / "token"
    weak = vault.server.create_token(["test-nothing"])
    source = token_source(vault.server, vault.prefix, token_file, weak, auth_timing=FAST)
    with pytest.raises(KeyStoreForbidden):
        source.read_metadata("svc")
    # The platform rotates the token file: the next call uses the new token.
    token_file.write_text(vault.server.create_token(["test-kv-read"]) + "\n")
    assert source.read_metadata("svc").current_version == 1
    # Revoked in Vault and replaced in place (same size: mtime and content both change).
    vault.server.revoke_token(token_file.read_text().strip())
    time.sleep(0.01)
    token_file.write_text(vault.server.create_token(["test-kv-read"]) + "\n")
    assert source.read_metadata("svc").current_version == 1


def test_short_token_is_renewed_and_then_refused_when_expired(
    vault: KVSpace, tmp_path: Path
) -> None:
    vault.write("svc", hmac_record())
    token_file = tmp_path / "token"
    short = vault.server.create_token(["test-kv-read"], ttl="2s", explicit_max_ttl="3s")
    source = token_source(vault.server, vault.prefix, token_file, short, auth_timing=FAST)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # past the 2 s TTL: only renewal keeps it alive
        assert source.read_metadata("svc").current_version == 1
        time.sleep(0.1)
    assert source.auth_status().renewals >= 1
    # Past the 3 s max TTL the token cannot live on: Vault refuses it (a moment after), or
    # the source, knowing the lease has run out, no longer sends it (on a loaded machine
    # that can come first).
    deadline = time.monotonic() + 5.0
    while True:
        try:
            source.read_metadata("svc")
        except (KeyStoreForbidden, KeyStoreUnavailable):
            break
        assert time.monotonic() < deadline, "the expired token was still accepted"
        time.sleep(0.1)
    token_file.write_text(vault.server.create_token(["test-kv-read"]) + "\n")
    deadline = time.monotonic() + 5.0
    while True:  # a new token in the file is used (after the retry gate, if it was closed)
        try:
            assert source.read_metadata("svc").current_version == 1
            break
        except KeyStoreUnavailable:
            assert time.monotonic() < deadline, "the new token was not taken up"
            time.sleep(0.1)


def test_approle_login_renewal_and_relogin_at_max_ttl(vault: KVSpace, tmp_path: Path) -> None:
    vault.write("svc", hmac_record())
    role_id, secret_id = vault.server.approle(
        "authproxy-test", ["test-kv-read"], token_ttl="2s", token_max_ttl="3s"
    )
    (tmp_path / "role_id").write_text(role_id)
    (tmp_path / "secret_id").write_text(secret_id)
    source = VaultSource(
        vault.server.address,
        auth=VaultAuthSettings(
            "approle", role_id_file=tmp_path / "role_id", secret_id_file=tmp_path / "secret_id"
        ),
        path_prefix=vault.prefix,
        verify=vault.server.ca_file,
        auth_timing=FAST,
    )
    deadline = time.monotonic() + 4.5
    reads = 0
    while time.monotonic() < deadline:  # well past the 3 s max TTL of the first token
        assert source.read_metadata("svc").current_version == 1
        reads += 1
        time.sleep(0.05)
    status = source.auth_status()
    assert status.logins >= 2  # logged in again when renewal could not extend the token
    assert status.renewals >= 1
    assert status.ttl_remaining_s is not None and 0 < status.ttl_remaining_s <= 3
    # Bounded: a handful of auth requests in 6 s, not one per read.
    assert status.logins + status.renewals <= 12 < reads
    assert status.consecutive_failures == 0


def test_approle_with_a_bad_secret_id_is_forbidden(vault: KVSpace, tmp_path: Path) -> None:
    role_id, _ = vault.server.approle("authproxy-bad", ["test-kv-read"])
    (tmp_path / "role_id").write_text(role_id)
    (tmp_path / "secret_id").write_text("00000000-0000-0000-0000-000000000000")
    source = VaultSource(
        vault.server.address,
        auth=VaultAuthSettings(
            "approle", role_id_file=tmp_path / "role_id", secret_id_file=tmp_path / "secret_id"
        ),
        path_prefix=vault.prefix,
        verify=vault.server.ca_file,
        auth_timing=FAST,
    )
    with pytest.raises(KeyStoreForbidden) as info:
        source.read_metadata("svc")
    assert "00000000-0000" not in str(info.value)
    assert source.token_ttl() is None


def test_kubernetes_login_reads_the_jwt_file_at_each_login(
    vault: KVSpace, kubernetes_api: FakeKubernetesAPI, tmp_path: Path
) -> None:
    from tests.vaultserver import service_account_jwt

    vault.write("svc", hmac_record())
    vault.server.enable_kubernetes(kubernetes_api, "authproxy", ["test-kv-read"])
    jwt_file = tmp_path / "jwt"
    first = service_account_jwt("trading", "authproxy", kubernetes_api.uid)
    jwt_file.write_text(first)
    source = VaultSource(
        vault.server.address,
        auth=VaultAuthSettings("kubernetes", role="authproxy", jwt_file=jwt_file),
        path_prefix=vault.prefix,
        verify=vault.server.ca_file,
        auth_timing=FAST,
    )
    assert source.read_metadata("svc").current_version == 1
    assert kubernetes_api.reviewed == [first]
    assert source.auth_status().logins == 1
    # The kubelet rotates the projected token; Vault revokes ours (an operator, a lease
    # tidy): the next call gets 403, finds the token dead and logs in with the new JWT.
    second = service_account_jwt("trading", "authproxy", kubernetes_api.uid)
    jwt_file.write_text(second)
    vault.server.revoke_token(source._keeper.token())
    time.sleep(FAST.forbidden_recheck_s)  # the login just proved the old one valid
    assert source.read_metadata("svc").current_version == 1
    assert kubernetes_api.reviewed == [first, second]
    assert source.auth_status().logins == 2
    # A service account the role is not bound to is refused.
    kubernetes_api.account = "intruder"
    other = VaultSource(
        vault.server.address,
        auth=VaultAuthSettings("kubernetes", role="authproxy", jwt_file=jwt_file),
        path_prefix=vault.prefix,
        verify=vault.server.ca_file,
        auth_timing=FAST,
    )
    with pytest.raises(KeyStoreForbidden, match="login"):
        other.read_metadata("svc")


def test_wipe_str_zeroes_only_what_it_can() -> None:
    secret = "".join(["ab", "cd", "ef"])
    assert wipe_str(secret) is True
    assert secret == "\x00" * 6
    assert wipe_str("x") is False  # a shared one-character singleton
    for text in ("".join(["é", "t", "é"]), "".join(["п", "ароль"]), "".join(["🔑", "k"])):
        assert wipe_str(text) is True  # latin-1, two- and four-byte characters
        assert set(text) == {"\x00"}  # (== would compare the storage kind too)


def test_store_error_codes_and_status_hints() -> None:
    from keycache.errors import KeyCacheError, KeyStoreError, KeyStoreSealed

    expected = {
        KeyStoreError: ("key_store_error", 502),
        KeyStoreUnavailable: ("key_store_unavailable", 503),
        KeyStoreSealed: ("key_store_sealed", 503),
        KeyStoreForbidden: ("key_store_forbidden", 502),
        KeyStoreNotFound: ("key_store_not_found", 404),
    }
    for cls, (code, status) in expected.items():
        err = cls("why")
        assert isinstance(err, KeyStoreError) and isinstance(err, KeyCacheError)
        assert (err.code, err.status, str(err)) == (code, status, "why")
    assert issubclass(KeyStoreSealed, KeyStoreUnavailable)  # retry like any outage
    conflict = KeyStoreConflict("lost", 7)
    assert (conflict.code, conflict.status, conflict.current_version) == (
        "key_store_conflict",
        409,
        7,
    )
