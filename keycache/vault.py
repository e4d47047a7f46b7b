"""The Vault / OpenBao key source: KV v2 over hvac (the only module that imports hvac).

One read skips hvac: the watcher's poll (``read_metadata``, every poll interval for every
service) goes straight through a urllib3 pool of its own (:class:`_MetadataReader`), with
the same settings, at half the CPU (docs/performance.md, "The poll without hvac").

Layout (DESIGN.md "Vault layout"): ``<mount_path>/data/<path_prefix>/<service>`` holds one
key record per KV v2 version; a rotation writes a new version with check-and-set; a
deleted or destroyed version is revoked.

Nothing is read implicitly. hvac's ``Client`` falls back to ``VAULT_ADDR``,
``VAULT_TOKEN``, ``~/.vault-token``, ``VAULT_CACERT``/``VAULT_CAPATH`` and
``VAULT_CLIENT_CERT``; requests falls back to ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``,
the ``*_PROXY`` variables and ``~/.netrc``. Here every argument is passed explicitly (URL,
an empty token, ``verify`` = the CA file or a bool, timeout, no proxies, no redirects, a
fresh ``Session`` with ``trust_env = False``), and the adapter class drops the one
fallback no argument turns off (the client certificate from ``VAULT_CLIENT_CERT``).
Redirects are refused: requests would forward the ``X-Vault-Token`` header to whatever
host a redirect names. ``tests/keycache/test_vault_source.py`` runs with all of these set
to bogus values.

Every method blocks (network I/O, up to ``timeout_s`` per request): call it in a thread,
never on the event loop. Methods may be called from several threads at once (the token
is kept by a thread-safe :class:`~keycache.vaultauth.TokenKeeper`; each request carries
the token its own thread obtained).

Errors are translated once, here: hvac, requests and urllib3 exceptions become
:class:`~keycache.errors.KeyStoreUnavailable` (down, timeout, 5xx, 429, TLS failure),
:class:`~keycache.errors.KeyStoreSealed` (503 sealed),
:class:`~keycache.errors.KeyStoreForbidden` (401/403),
:class:`~keycache.errors.KeyStoreNotFound` (404),
:class:`~keycache.errors.KeyStoreConflict` (check-and-set lost) or
:class:`~keycache.errors.KeyStoreError`. The foreign exception is not chained: a requests
exception holds the prepared request, whose headers hold the Vault token.

Copies of secrets (measured by ``tests/keycache/test_vault_copies.py``, which counts a
fresh random secret in a child's memory the way a core dump would see it). The plain hvac
read leaves 5 copies outside locked memory: requests' body ``bytes``, the decoded text,
json's ``str``, urllib3's and OpenSSL's buffers. Here: 0 for an HMAC secret, because

- ``<mount>/data/`` requests go through :class:`_SecretTransport`: its TLS context sets
  OpenSSL 3's ``SSL_OP_CLEANSE_PLAINTEXT`` (decrypted records are cleansed once read)
  and its responses read the socket unbuffered (no ``BufferedReader`` buffer, freed
  unwiped, holding the whole small response);
- :meth:`VaultSource.read_version` streams: the body goes from the socket into one
  ``bytearray``, is decoded to one ``str`` and parsed by :mod:`keycache.secretjson`;
  the ``bytearray`` and the text are zeroed at once (:func:`wipe_str`);
- the record's ``secret_key``/``passphrase`` strings are zeroed by :func:`scrub_record`
  (:meth:`VaultSource.discard_record`) once the ring holds the secret: the watcher hands
  every record back that way.

A PEM value is decoded by :mod:`keycache.secretjson` (``json``'s own decoder leaves
partial copies of a value with escapes, as every PEM has, in freed memory) and its key is
parsed only from locked memory (``keycache.record.check_private_key``): 0 copies of the
PEM or of the decoded key measured, where parsing a bytes copy left 1.

Left: writes (:meth:`VaultSource.write_version`) go through requests' JSON encoder
unwiped. The Vault token itself is a ``str`` in many places (each request's headers): it
is a credential with a TTL, not key material, and never logged.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
import requests.auth
import requests.exceptions
import requests.utils
import urllib3
import urllib3.connection
import urllib3.exceptions
import urllib3.util

from keycache import secretjson
from keycache.errors import (
    KeyRecordError,
    KeyStoreConflict,
    KeyStoreError,
    KeyStoreForbidden,
    KeyStoreNotFound,
    KeyStoreSealed,
    KeyStoreUnavailable,
)
from keycache.filestore import SERVICE_NAME_RE
from keycache.record import (
    SECRET_FIELDS,  # noqa: F401 - re-exported: it lived here
    parse_record,
    scrub_record,
)
from keycache.securemem import wipe_bytearray, wipe_str
from keycache.vaultauth import (
    AuthStatus,
    AuthTiming,
    TokenGrant,
    TokenKeeper,
    VaultAuthConfigLike,
    VaultAuthSettings,
    read_credential,
)
from keycache.watcher import SecretMetadata, VersionInfo

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_RESPONSE_BYTES",
    "VaultConfigLike",
    "VaultSource",
    "scrub_record",
    "wipe_str",
]

#: Per request (connect and read each). Vault answers KV reads in milliseconds; 5 s rides
#: out a leader election and still lets a poll give up long before the next few are due.
DEFAULT_TIMEOUT_S: Final = 5.0
#: A record holds at most a 16 kB secret (keycache.record.MAX_SECRET_LEN) plus JSON
#: escaping and Vault's envelope; 256 kB refuses a runaway body before it fills memory.
MAX_RESPONSE_BYTES: Final = 256 * 1024
#: Mount and prefix segments: what Vault accepts in a path and nothing that could climb.
_PATH_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
#: Vault's answer when it is up but sealed (both Vault and OpenBao say "Vault is sealed").
_SEALED_MARKER: Final = "sealed"
_CAS_MARKER: Final = "check-and-set"
#: The KV secret (under the prefix) that holds the revocation list. A leading "_" is not
#: a valid service name, so it can never collide with a service's key.
REVOKED_NAME: Final = "_revoked"
#: How Vault/OpenBao say a token cannot be renewed (any more). OpenBao answers "past the
#: max TTL, cannot renew" with HTTP 500: a refusal, not an outage.
_RENEW_REFUSED_MARKERS: Final = ("max ttl", "cannot renew", "not renewable", "lease not found")

#: OpenSSL 3.0+ ``SSL_OP_CLEANSE_PLAINTEXT`` (ssl.h: SSL_OP_BIT(1)); Python's ssl module
#: has no name for it. OpenSSL then cleanses each decrypted TLS record once it is handed to
#: us, instead of leaving the plaintext (the key record) in its read buffer until reused.
SSL_OP_CLEANSE_PLAINTEXT: Final = 1 << 1
#: Below 3.0 that bit meant something else; set it only where it means "cleanse".
CLEANSE_SUPPORTED: Final = ssl.OPENSSL_VERSION_INFO >= (3, 0)

T = TypeVar("T")


class VaultConfigLike(Protocol):
    """What :meth:`VaultSource.from_config` reads: the shape of the proxy's
    ``VaultConfig`` (keycache never imports proxy; this matches it structurally)."""

    @property
    def address(self) -> str: ...
    @property
    def mount_path(self) -> str: ...
    @property
    def path_prefix(self) -> str: ...
    @property
    def tls_verify(self) -> bool: ...
    @property
    def tls_ca_cert(self) -> Path | None: ...
    @property
    def auth(self) -> VaultAuthConfigLike: ...


# -- the token on each request ----------------------------------------------------------


class _ThreadToken(requests.auth.AuthBase):
    """Adds ``X-Vault-Token`` from a per-thread slot: each thread sends the token it got
    from the keeper, and a login sends none. Never shows the token in its repr."""

    def __init__(self) -> None:
        self._local = threading.local()

    def use(self, token: str | None) -> None:
        self._local.token = token

    def current(self) -> str | None:
        """The token this thread sends (set by ``use``)."""
        token: str | None = getattr(self._local, "token", None)
        return token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.current()
        if token:
            r.headers["X-Vault-Token"] = token
        return r

    def __repr__(self) -> str:
        return "_ThreadToken()"


class _NoEnvCertAdapter(hvac.adapters.RawAdapter):  # type: ignore[misc]
    """hvac's RawAdapter minus the one fallback ``hvac.Client`` applies that cannot be
    turned off by an argument: with ``cert=None`` it substitutes ``VAULT_CLIENT_CERT`` /
    ``VAULT_CLIENT_KEY`` (read from the environment when hvac is imported). No client
    certificate is used, whatever the environment says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["cert"] = None
        super().__init__(*args, **kwargs)


# -- the transport for key material -------------------------------------------------------


class _UnbufferedResponse(http.client.HTTPResponse):
    """``http.client``'s response, reading straight from the socket. The stock one reads
    through a ``BufferedReader`` whose 8 KiB buffer takes in the whole small response -
    the key record included - and is freed, never wiped, when the response closes.
    Unbuffered, headers are read a byte at a time (from OpenSSL's decrypted record, no
    system call per byte) and the body lands directly in the caller's buffer."""

    def __init__(
        self,
        sock: socket.socket,
        debuglevel: int = 0,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(sock, debuglevel, method, url)
        buffered = self.fp
        self.fp = sock.makefile("rb", buffering=0)  # type: ignore[assignment]
        buffered.close()  # nothing read from it yet; drops its socket reference

    def _safe_readinto(self, b: memoryview) -> int:
        # http.client (3.11) reads a chunk of a chunked body with ONE readinto and calls a
        # short read an IncompleteRead: right for its BufferedReader, wrong for a raw
        # socket, which returns one TLS record at a time. Loop until full (or EOF).
        total = 0
        with memoryview(b) as view:
            while total < len(view):
                n = self.fp.readinto(view[total:])
                if not n:
                    # Not the partial bytes (http.client's habit): they may be a secret.
                    raise http.client.IncompleteRead(b"", len(view) - total)
                total += n
        return total


class _SecretHTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _UnbufferedResponse


class _SecretHTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _UnbufferedResponse


class _SecretHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _SecretHTTPConnection


class _SecretHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _SecretHTTPSConnection


class _SecretTransport(requests.adapters.HTTPAdapter):
    """The requests transport for ``<mount>/data/...`` (where key records travel): no
    retries, unbuffered responses, and a TLS context that cleanses decrypted records
    (OpenSSL 3). Verification is unchanged: the context trusts exactly what ``verify``
    names (the CA file, or requests' bundle for True) and checks the hostname."""

    def __init__(self, verify: bool | str) -> None:
        self._verify = verify
        self._context: ssl.SSLContext | None = None
        self._context_lock = threading.Lock()
        super().__init__(max_retries=0)

    def _tls_context(self) -> ssl.SSLContext | None:
        """The cleansing context, made on first use (in the calling worker thread: loading
        requests' CA bundle is file I/O). For a CA file nothing is loaded here: urllib3
        loads ``ca_certs`` into it on every new connection."""
        if self._verify is False:
            return None
        with self._context_lock:
            if self._context is None:
                ctx = urllib3.util.ssl_.create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
                if self._verify is True:
                    ctx.load_verify_locations(cafile=requests.utils.DEFAULT_CA_BUNDLE_PATH)
                if CLEANSE_SUPPORTED:
                    ctx.options |= SSL_OP_CLEANSE_PLAINTEXT
                self._context = ctx
            return self._context

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _SecretHTTPPool,
            "https": _SecretHTTPSPool,
        }

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        context = self._tls_context() if host.get("scheme") == "https" else None
        if context is not None:
            # urllib3 still loads ``ca_certs`` (a CA file: re-read on each new
            # connection, so a CA bundle updated in place is picked up) into it.
            pool["ssl_context"] = context
        return host, pool


# -- the poll: metadata reads straight through urllib3 ----------------------------------

#: Connections kept for metadata reads, as requests keeps per host: polls of several
#: services may run at once in the loop's worker threads; beyond this many, a connection
#: is opened for the read and dropped after it.
METADATA_CONNECTIONS: Final = 10


class _MetadataReader:
    """``GET <mount>/metadata/...`` on a urllib3 pool of its own: the watcher's poll.

    The poll runs every ``poll_interval_ms`` (1 s by default) for every service, in a
    worker thread on the sidecar's CPU. Through hvac and requests a read took 0.9-1.3 ms
    of CPU in that thread; straight through urllib3 it takes about half of that
    (docs/performance.md, "The poll without hvac"), and every millisecond of it is a
    millisecond the event loop may wait. The trade: a second, small HTTP path next to
    hvac's, for GETs of metadata only (nothing secret). The settings are hvac's and the
    session's: the address's path kept as a prefix, ``X-Vault-Request: true`` sent, the
    same ``verify`` (a CA file re-read for each new connection, a CA directory, certifi's
    bundle for True), the same timeout, no retries, no redirects, no proxies, nothing
    taken from the environment. Pools are thread-safe; this one is built on first use,
    in a worker thread."""

    def __init__(self, address: str, verify: bool | str, timeout_s: float) -> None:
        url = urllib3.util.parse_url(address)
        self._https = url.scheme == "https"
        self._host = url.host or ""
        self._port = url.port or (443 if self._https else 80)
        # hvac joins "/v1/..." to the whole address: a Vault behind a path (a gateway
        # routing https://gw/vault/...) is reached the same way here.
        self._prefix = (url.path or "").rstrip("/")
        self._verify = verify
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> urllib3.HTTPConnectionPool:
        with self._lock:
            if self._pool is None:
                common: dict[str, Any] = {
                    "maxsize": METADATA_CONNECTIONS,
                    "block": False,
                    "retries": False,
                    "timeout": self._timeout,
                }
                if not self._https:
                    self._pool = urllib3.HTTPConnectionPool(self._host, self._port, **common)
                elif self._verify is False:
                    self._pool = urllib3.HTTPSConnectionPool(
                        self._host,
                        self._port,
                        cert_reqs=ssl.CERT_NONE,
                        assert_hostname=False,
                        **common,
                    )
                else:
                    ca = (
                        requests.utils.DEFAULT_CA_BUNDLE_PATH
                        if self._verify is True
                        else self._verify
                    )
                    # As requests: a directory of hashed certificates, or a bundle file.
                    if os.path.isdir(ca):
                        common["ca_cert_dir"] = ca
                    else:
                        common["ca_certs"] = ca
                    self._pool = urllib3.HTTPSConnectionPool(
                        self._host, self._port, cert_reqs=ssl.CERT_REQUIRED, **common
                    )
            return self._pool

    def ca_missing(self) -> str | None:
        """The CA file or directory named by ``verify`` when it cannot be read, else None."""
        if isinstance(self._verify, str) and not (
            (os.path.isfile(self._verify) or os.path.isdir(self._verify))
            and os.access(self._verify, os.R_OK)
        ):
            return self._verify
        return None

    def get(self, path: str, token: str | None) -> tuple[int, bytes]:
        """Status and body of ``GET path``. Raises urllib3's exceptions (``_get_json``
        translates them)."""
        headers = {"X-Vault-Request": "true"}  # hvac's: Vault Agent may require it
        if token:
            headers["X-Vault-Token"] = token
        response = self._get_pool().urlopen(
            "GET",
            self._prefix + path,
            headers=headers,
            retries=False,
            redirect=False,
            preload_content=True,  # read whole; the connection goes back to the pool
        )
        return response.status, response.data

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


# -- error translation -------------------------------------------------------------------

_STATUS_OF: Final[dict[type[Exception], int]] = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.PreconditionFailed: 412,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}


def _where(op: str, service: str | None) -> str:
    return f"vault: {op}({service})" if service else f"vault: {op}"


def _status_error(status: int, errors: list[str], op: str, service: str | None) -> KeyStoreError:
    """Map an HTTP status and Vault's ``errors`` list to our error. Vault's texts are
    used to classify only, never copied into the message."""
    where = _where(op, service)
    text = " ".join(errors).lower()
    if status in (401, 403):
        return KeyStoreForbidden(f"{where}: permission denied (HTTP {status})")
    if op == "renew_self" and (
        400 <= status < 500 or any(m in text for m in _RENEW_REFUSED_MARKERS)
    ):
        return KeyStoreForbidden(f"{where}: renewal refused (HTTP {status})")
    if op.startswith("login") and 400 <= status < 500:
        return KeyStoreForbidden(f"{where}: login refused (HTTP {status})")
    if status == 404:
        return KeyStoreNotFound(f"{where}: not found (HTTP 404)")
    if status == 503 and _SEALED_MARKER in text:
        return KeyStoreSealed(f"{where}: the store is sealed (HTTP 503)")
    if status == 400 and _CAS_MARKER in text:
        return KeyStoreConflict(f"{where}: check-and-set version mismatch", None)
    if status in {412, 429} or status >= 500:
        return KeyStoreUnavailable(f"{where}: the store cannot answer (HTTP {status})")
    if 300 <= status < 400:
        return KeyStoreUnavailable(f"{where}: unexpected redirect (HTTP {status}); not followed")
    return KeyStoreError(f"{where}: request rejected (HTTP {status})")


def _translate(exc: Exception, op: str, service: str | None, timeout_s: float) -> KeyStoreError:
    """The one seam where hvac and requests exceptions become ours."""
    where = _where(op, service)
    if isinstance(exc, hvac.exceptions.VaultError):
        status = _STATUS_OF.get(type(exc), 0)
        errors = [str(e) for e in (exc.errors or [])] if isinstance(exc.errors, list) else []
        if status == 0:
            if isinstance(exc, hvac.exceptions.ParamValidationError):
                return KeyStoreError(f"{where}: invalid parameters")
            return KeyStoreUnavailable(f"{where}: unexpected answer from the store")
        return _status_error(status, errors, op, service)
    if isinstance(exc, requests.exceptions.SSLError):
        return KeyStoreUnavailable(f"{where}: {_TLS_FAILED}")
    if isinstance(exc, requests.exceptions.Timeout):
        return KeyStoreUnavailable(f"{where}: {_timed_out(timeout_s)}")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return KeyStoreUnavailable(f"{where}: {_CANNOT_CONNECT}")
    if isinstance(exc, requests.exceptions.RequestException):
        return KeyStoreUnavailable(f"{where}: request failed ({type(exc).__name__})")
    if isinstance(exc, ValueError | KeyError | TypeError):
        return KeyStoreUnavailable(f"{where}: malformed answer from the store")
    raise exc


#: What both translations say about a failed connection (the same words either way).
_TLS_FAILED: Final = "TLS handshake or certificate verification failed"
_CANNOT_CONNECT: Final = "cannot connect"
#: The statuses hvac raises a specific exception for (the rest: "unexpected answer").
_KNOWN_STATUSES: Final = frozenset(_STATUS_OF.values())


def _timed_out(timeout_s: float) -> str:
    return f"timed out after {timeout_s:g} s"


def _translate_urllib3(
    exc: urllib3.exceptions.HTTPError,
    op: str,
    service: str | None,
    timeout_s: float,
    ca_missing: str | None,
) -> KeyStoreError:
    """urllib3's exceptions (the metadata poll's path) as ``_translate`` words requests'."""
    where = _where(op, service)
    if isinstance(exc, urllib3.exceptions.SSLError):
        if ca_missing is not None:
            return KeyStoreUnavailable(
                f"{where}: local I/O error: cannot read the CA certificate bundle {ca_missing}"
            )
        return KeyStoreUnavailable(f"{where}: {_TLS_FAILED}")
    # NewConnectionError subclasses ConnectTimeoutError: checked first.
    if isinstance(exc, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ProtocolError):
        return KeyStoreUnavailable(f"{where}: {_CANNOT_CONNECT}")
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return KeyStoreUnavailable(f"{where}: {_timed_out(timeout_s)}")
    return KeyStoreUnavailable(f"{where}: request failed ({type(exc).__name__})")


def _body_errors(body: bytes) -> list[str]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    errors = parsed.get("errors") if isinstance(parsed, dict) else None
    return [str(e) for e in errors] if isinstance(errors, list) else []


def _json_errors(response: requests.Response) -> list[str]:
    return _body_errors(response.content)


def _parse_time(value: object) -> datetime | None:
    """Vault's RFC 3339 timestamps (nanoseconds are truncated to microseconds); "" means
    unset."""
    if value in ("", None):
        return None
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("timestamp without offset")
    return parsed.astimezone(UTC)


def _as_dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _grant_from_auth(auth: Mapping[str, Any]) -> TokenGrant:
    ttl = int(auth.get("lease_duration") or 0)
    return TokenGrant(ttl_s=float(ttl) if ttl > 0 else None, renewable=bool(auth.get("renewable")))


# -- the source ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Paths:
    mount: str
    prefix: str

    def secret(self, service: str) -> str:
        return f"{self.prefix}/{service}"

    def data_url(self, service: str) -> str:
        return f"/v1/{self.mount}/data/{self.prefix}/{service}"

    def metadata_url(self, service: str) -> str:
        return f"/v1/{self.mount}/metadata/{self.prefix}/{service}"


def _check_path(value: str, field: str) -> str:
    value = value.strip("/")
    parts = value.split("/")
    if not value or any(not _PATH_SEGMENT_RE.fullmatch(p) or p in (".", "..") for p in parts):
        raise ValueError(f"{field}: must be /-separated segments of letters, digits, _ . -")
    return value


def _check_service(service: str) -> None:
    if not SERVICE_NAME_RE.fullmatch(service):
        raise KeyRecordError(f"service {service!r}: not a valid service name")


class VaultSource:
    """KV v2 access to the key records of every service, with its own authentication.

    ``verify`` is the CA bundle that signs Vault's certificate (a path; re-read for each
    new connection, so a bundle replaced in place is picked up), True for requests' CA
    bundle (certifi), or False (no verification; never in production). ``auth`` says how to
    obtain a token; ``auth_timing``, ``clock`` (monotonic seconds) and ``rng`` drive its
    renewal schedule. The constructor does no I/O; the first request reads credentials
    and logs in. Not for the event loop: every method blocks.
    """

    def __init__(
        self,
        address: str,
        *,
        auth: VaultAuthSettings,
        mount_path: str = "secret",
        path_prefix: str = "api_keys",
        verify: bool | Path = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        auth_timing: AuthTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not address.startswith(("https://", "http://")):
            raise ValueError("address: must be an http(s) URL")
        if timeout_s <= 0:
            raise ValueError("timeout_s: must be positive")
        self._address = address.rstrip("/")
        self._paths = _Paths(
            _check_path(mount_path, "mount_path"), _check_path(path_prefix, "path_prefix")
        )
        self._timeout_s = timeout_s
        verify_arg: bool | str = str(verify) if isinstance(verify, Path) else verify
        self._token_auth = _ThreadToken()

        session = requests.Session()
        session.trust_env = False  # no *_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc
        session.verify = verify_arg  # hvac prefers session.verify over its own argument
        session.cert = None
        session.proxies = {}
        session.auth = self._token_auth
        # No retries below us: the watcher and the token keeper own the retry policy.
        session.mount("https://", requests.adapters.HTTPAdapter(max_retries=0))
        session.mount("http://", requests.adapters.HTTPAdapter(max_retries=0))
        # Key records (and writes of them) take the copy-averse transport.
        session.mount(f"{self._address}/v1/{self._paths.mount}/data/", _SecretTransport(verify_arg))
        self._session = session
        self._metadata = _MetadataReader(self._address, verify_arg, timeout_s)

        # Every argument explicit: token "" (None would make hvac read VAULT_TOKEN and
        # ~/.vault-token), url (else VAULT_ADDR), verify (else VAULT_CACERT/CAPATH).
        # RawAdapter returns the response object, so read_version can stream the body.
        client = hvac.Client(
            url=self._address,
            token="",
            cert=None,
            verify=verify_arg,
            timeout=timeout_s,
            proxies={},
            allow_redirects=False,
            session=session,
            adapter=_NoEnvCertAdapter,
            namespace=None,
        )
        self._client = client
        self._auth_settings = auth
        self._keeper = TokenKeeper(auth, _HvacAuth(self), timing=auth_timing, clock=clock, rng=rng)

    @classmethod
    def from_config(
        cls,
        cfg: VaultConfigLike,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        auth_timing: AuthTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> VaultSource:
        """Build from the proxy's ``keystore.vault`` config: ``verify`` is
        ``tls_ca_cert`` when verification is on and a CA is given, else ``tls_verify``."""
        verify: bool | Path = cfg.tls_verify
        if cfg.tls_verify and cfg.tls_ca_cert is not None:
            verify = cfg.tls_ca_cert
        return cls(
            cfg.address,
            auth=VaultAuthSettings.from_config(cfg.auth),
            mount_path=cfg.mount_path,
            path_prefix=cfg.path_prefix,
            verify=verify,
            timeout_s=timeout_s,
            auth_timing=auth_timing,
            clock=clock,
            rng=rng,
        )

    def __repr__(self) -> str:
        return (
            f"VaultSource(address={self._address!r}, mount={self._paths.mount!r}, "
            f"prefix={self._paths.prefix!r}, auth={self._auth_settings.method})"
        )

    def __enter__(self) -> VaultSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections. Idempotent."""
        self._session.close()
        self._metadata.close()

    @property
    def address(self) -> str:
        return self._address

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def auth_status(self) -> AuthStatus:
        """The token's state (TTL remaining, renewals, failures) for metrics. No I/O."""
        return self._keeper.status()

    def token_ttl(self) -> float | None:
        """Seconds until the held token expires (None: never, or no token yet). No I/O."""
        return self._keeper.status().ttl_remaining_s

    # -- plumbing ----------------------------------------------------------------------

    def _raw(self, op: str, service: str | None, fn: Callable[[], T], token: str | None) -> T:
        """Run one hvac call with ``token`` on this thread; translate its failures."""
        self._token_auth.use(token)
        try:
            return fn()
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
            err = _translate(exc, op, service, self._timeout_s)
        except OSError as exc:
            # Local: requests refuses a CA bundle path that does not exist with OSError.
            reason = exc.strerror or str(exc) or type(exc).__name__
            err = KeyStoreUnavailable(f"{_where(op, service)}: local I/O error: {reason}")
        except (ValueError, KeyError, TypeError):
            err = KeyStoreUnavailable(f"{_where(op, service)}: malformed answer from the store")
        finally:
            self._token_auth.use(None)
        # Raised here, outside the except block: the foreign exception (and the request
        # with its token header) must not stay reachable as __context__.
        raise err

    def _call(self, op: str, service: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` with a valid token; after a 403 caused by a dead token, obtain a new
        one (rate-limited) and retry once."""
        token = self._keeper.token()
        try:
            return self._raw(op, service, fn, token)
        except KeyStoreForbidden:
            if not self._keeper.token_rejected(token):
                raise
        return self._raw(op, service, fn, self._keeper.token())

    def _get_json(self, url: str, op: str, service: str) -> object:
        """``GET url`` through the metadata reader with this thread's token (``_raw`` set
        it); the parsed JSON body of a 200, else the translated error."""
        reader = self._metadata
        try:
            status, body = reader.get(url, self._token_auth.current())
        except urllib3.exceptions.HTTPError as exc:
            err = _translate_urllib3(exc, op, service, self._timeout_s, reader.ca_missing())
        else:
            if status == 200:
                return json.loads(body)
            if status in _KNOWN_STATUSES or 300 <= status < 400:
                err = _status_error(status, _body_errors(body), op, service)
            else:  # as hvac's path: a status it has no exception for
                err = KeyStoreUnavailable(
                    f"{_where(op, service)}: unexpected answer from the store (HTTP {status})"
                )
        # Raised outside the except block: urllib3's exception is not kept as __context__.
        raise err

    # -- KV v2 ---------------------------------------------------------------------------

    def read_metadata(self, service: str) -> SecretMetadata:
        """Read ``<mount>/metadata/<prefix>/<service>``: current version and, per version,
        created_time, deletion_time and destroyed. Nothing secret. Blocking.

        Raises KeyStoreNotFound if the service has never been written, or the errors
        listed in the module docstring.
        """
        _check_service(service)
        op = "read_metadata"
        url = self._paths.metadata_url(service)

        def call() -> SecretMetadata:
            data = _as_dict(_as_dict(self._get_json(url, op, service))["data"])
            versions: list[VersionInfo] = []
            for number, raw_info in _as_dict(data["versions"]).items():
                info = _as_dict(raw_info)
                created = _parse_time(info["created_time"])
                if created is None:
                    raise ValueError("version without created_time")
                versions.append(
                    VersionInfo(
                        version=int(number),
                        created_time=created,
                        deletion_time=_parse_time(info.get("deletion_time")),
                        destroyed=bool(info.get("destroyed")),
                    )
                )
            versions.sort(key=lambda v: v.version)
            return SecretMetadata(
                service=service,
                current_version=int(data["current_version"]),
                oldest_version=int(data.get("oldest_version") or 0),
                versions=tuple(versions),
            )

        return self._call(op, service, call)

    def read_version(self, service: str, version: int) -> dict[str, object]:
        """Read one version's key record (the KV ``data``), as a fresh dict the caller
        owns. It holds the secret: hand it to ``build_ring`` and then :func:`scrub_record`
        it. Blocking.

        The body is read from the socket layer into one buffer, parsed, and the buffer
        and the decoded text are zeroed (module docstring). Raises KeyStoreNotFound if the
        version does not exist or was deleted or destroyed; KeyStoreUnavailable if the
        answer is malformed or larger than MAX_RESPONSE_BYTES; the other errors of the
        module docstring. The record is not validated here (``parse_record`` does that).
        """
        _check_service(service)
        if version < 1:
            raise ValueError("version must be at least 1")
        op = "read_version"
        url = self._paths.data_url(service)
        adapter = self._client.adapter

        def call() -> dict[str, object]:
            response = adapter.get(
                url,
                params={"version": version},
                # identity: the body must arrive as sent, so it can be read in place.
                headers={"Accept-Encoding": "identity"},
                stream=True,
                raise_exception=False,
            )
            try:
                if response.status_code != 200:
                    raise _status_error(response.status_code, _json_errors(response), op, service)
                record = _read_record(response, op, service, version)
            except BaseException:
                response.close()  # and its connection: what is left on it is unknown
                raise
            # The body was read to its last byte (_read_record checks the length): the
            # connection goes back to the pool. response.close() would close it, and each
            # record read would pay a TLS handshake and a CA file load, 1.8 of its 2.9 ms
            # of CPU (on the sidecar's core, during a rotation).
            response.raw.release_conn()
            return record

        return self._call(op, service, call)

    def write_version(self, service: str, record: Mapping[str, object], cas: int | None) -> int:
        """Write ``record`` as the service's next version; return its version number.

        ``cas`` is check-and-set: 0 = only if the service has no version yet, n = only if
        the current version is n, None = unconditionally. The record is validated first
        (KeyRecordError). A lost check-and-set raises KeyStoreConflict carrying the
        current version (read back; None if that read fails). Blocking. The record's
        secret passes through requests' JSON encoder as ``str``/``bytes`` copies that are
        not wiped (a write is an admin action, not the sidecar's steady state).
        """
        _check_service(service)
        parse_record(record)
        if cas is not None and cas < 0:
            raise ValueError("cas must be None or at least 0")
        kv = self._client.secrets.kv.v2
        path = self._paths.secret(service)

        def call() -> int:
            response = kv.create_or_update_secret(
                path=path, secret=dict(record), cas=cas, mount_point=self._paths.mount
            )
            return int(_as_dict(_as_dict(response.json())["data"])["version"])

        try:
            return self._call("write_version", service, call)
        except KeyStoreConflict as exc:
            message = str(exc)
        current: int | None
        try:
            current = self.read_metadata(service).current_version
        except KeyStoreError:
            current = None
        raise KeyStoreConflict(f"{message} (current version {current})", current)

    def discard_record(self, record: dict[str, object]) -> None:
        """:func:`scrub_record`: zero a record's secret strings and empty it (the
        :class:`~keycache.watcher.KeySource` hook). No I/O; never raises."""
        scrub_record(record)

    def delete_version(self, service: str, version: int) -> None:
        """Soft-delete one version (KV v2 ``delete``): the watcher drops it from memory at
        its next poll. Blocking."""
        _check_service(service)
        kv = self._client.secrets.kv.v2
        path = self._paths.secret(service)
        self._call(
            "delete_version",
            service,
            lambda: kv.delete_secret_versions(
                path=path, versions=[version], mount_point=self._paths.mount
            ),
        )

    def destroy_version(self, service: str, version: int) -> None:
        """Destroy one version's data for good (KV v2 ``destroy``). Blocking."""
        _check_service(service)
        kv = self._client.secrets.kv.v2
        path = self._paths.secret(service)
        self._call(
            "destroy_version",
            service,
            lambda: kv.destroy_secret_versions(
                path=path, versions=[version], mount_point=self._paths.mount
            ),
        )

    def read_revoked(self) -> tuple[tuple[str, ...], int]:
        """Read the revocation list kept at ``<mount>/data/<prefix>/_revoked`` (a name no
        service can have): ``({"key_ids": [...]}`` -> (key ids, current version)); ((), 0)
        if it was never written. Nothing secret. Blocking."""
        kv = self._client.secrets.kv.v2
        path = f"{self._paths.prefix}/{REVOKED_NAME}"

        def call() -> tuple[tuple[str, ...], int]:
            response = kv.read_secret_version(
                path=path, mount_point=self._paths.mount, raise_on_deleted_version=True
            )
            data = _as_dict(_as_dict(response.json())["data"])
            ids = _as_dict(data["data"]).get("key_ids", [])
            version = int(_as_dict(data["metadata"])["version"])
            if not isinstance(ids, list) or not all(isinstance(k, str) for k in ids):
                raise ValueError("key_ids must be a list of strings")
            return tuple(ids), version

        try:
            return self._call("read_revoked", None, call)
        except KeyStoreNotFound:
            return (), 0

    def write_revoked(self, key_ids: Sequence[str], cas: int) -> int:
        """Write the revocation list with check-and-set ``cas`` (0 = first write); return
        the new version. KeyStoreConflict if another writer got there first. Blocking."""
        kv = self._client.secrets.kv.v2
        path = f"{self._paths.prefix}/{REVOKED_NAME}"
        secret = {"key_ids": sorted(set(key_ids))}

        def call() -> int:
            response = kv.create_or_update_secret(
                path=path, secret=secret, cas=cas, mount_point=self._paths.mount
            )
            return int(_as_dict(_as_dict(response.json())["data"])["version"])

        return self._call("write_revoked", None, call)

    # -- used by _HvacAuth --------------------------------------------------------------

    def _auth_request(
        self, op: str, fn: Callable[[], requests.Response], token: str | None
    ) -> dict[str, Any]:
        return self._raw(op, None, lambda: _as_dict(fn().json()), token)


class _HvacAuth:
    """The :class:`~keycache.vaultauth.AuthTransport` over the source's hvac client."""

    __slots__ = ("_source",)

    def __init__(self, source: VaultSource) -> None:
        self._source = source

    def login(self, settings: VaultAuthSettings) -> tuple[str, TokenGrant]:
        client = self._source._client
        mount = settings.login_mount
        if settings.method == "approle":
            assert settings.role_id_file is not None and settings.secret_id_file is not None
            role_id = read_credential(settings.role_id_file, "role_id_file")
            secret_id = read_credential(settings.secret_id_file, "secret_id_file")
            body = self._source._auth_request(
                "login(approle)",
                lambda: client.auth.approle.login(
                    role_id=role_id, secret_id=secret_id, use_token=False, mount_point=mount
                ),
                None,
            )
        elif settings.method == "kubernetes":
            assert settings.role is not None and settings.jwt_file is not None
            jwt = read_credential(settings.jwt_file, "jwt_file")
            role = settings.role
            body = self._source._auth_request(
                "login(kubernetes)",
                lambda: client.auth.kubernetes.login(
                    role=role, jwt=jwt, use_token=False, mount_point=mount
                ),
                None,
            )
        else:
            raise KeyStoreForbidden("vault auth: the token method has no login")
        try:
            auth = _as_dict(body["auth"])
            token = auth["client_token"]
            if not isinstance(token, str) or not token:
                raise ValueError("no client_token")
            grant = _grant_from_auth(auth)
        except (KeyError, ValueError, TypeError):
            raise KeyStoreUnavailable("vault: login: malformed answer from the store") from None
        return token, grant

    def lookup_self(self, token: str) -> TokenGrant:
        client = self._source._client
        body = self._source._auth_request("lookup_self", client.auth.token.lookup_self, token)
        try:
            data = _as_dict(body["data"])
            ttl = int(data.get("ttl") or 0)
            expires = data.get("expire_time")
            creation_ttl = int(data.get("creation_ttl") or 0)
            renewable = bool(data.get("renewable"))
            # lookup-self echoes the token itself in data.id; do not keep it around.
            data.clear()
        except (KeyError, ValueError, TypeError):
            raise KeyStoreUnavailable("vault: lookup_self: malformed answer") from None
        finally:
            body.clear()
        if ttl <= 0 and expires is None:
            return TokenGrant(ttl_s=None, renewable=False, full_ttl_s=None)
        return TokenGrant(
            ttl_s=float(max(ttl, 0)),
            renewable=renewable,
            full_ttl_s=float(creation_ttl) if creation_ttl > 0 else None,
        )

    def renew_self(self, token: str) -> TokenGrant:
        client = self._source._client
        body = self._source._auth_request("renew_self", client.auth.token.renew_self, token)
        try:
            return _grant_from_auth(_as_dict(body["auth"]))
        except (KeyError, ValueError, TypeError):
            raise KeyStoreUnavailable("vault: renew_self: malformed answer") from None
        finally:
            body.clear()


# -- reading a record with few copies ------------------------------------------------------


def _read_record(
    response: requests.Response, op: str, service: str, version: int
) -> dict[str, object]:
    where = _where(op, service)
    fp = getattr(response.raw, "_fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if not isinstance(fp, http.client.HTTPResponse) or encoding != "identity":
        # Not the stack this was measured on: fall back to urllib3's reader (its
        # intermediate bytes copies are then left behind, not a correctness issue).
        fp = None
    length = fp.length if fp is not None else None
    if length is not None and length > MAX_RESPONSE_BYTES:
        raise KeyStoreUnavailable(f"{where}: answer larger than {MAX_RESPONSE_BYTES} bytes")
    buf = bytearray(length + 1 if length is not None else MAX_RESPONSE_BYTES + 1)
    text: str | None = None
    try:
        with memoryview(buf) as view:
            got = 0
            while got < len(buf):
                n = fp.readinto(view[got:]) if fp is not None else response.raw.readinto(view[got:])
                if not n:
                    break
                got += n
            if got > MAX_RESPONSE_BYTES or (length is not None and got != length):
                raise KeyStoreUnavailable(f"{where}: answer truncated or too large")
            try:
                text = str(view[:got], "utf-8")
            except UnicodeDecodeError:
                text = None
        doc, problem = _parse_json(text) if text is not None else (None, "not UTF-8")
    finally:
        wipe_bytearray(buf)
        if text is not None:
            wipe_str(text)
        del text
    if problem is not None:
        raise KeyStoreUnavailable(f"{where}: answer is {problem}")
    try:
        data = _as_dict(_as_dict(doc)["data"])
        meta = _as_dict(data["metadata"])
        record = _as_dict(data["data"])
        if int(meta["version"]) != version or meta.get("destroyed") or meta.get("deletion_time"):
            raise KeyStoreNotFound(f"{where}: version {version} is deleted or destroyed")
    except (KeyError, ValueError, TypeError):
        raise KeyStoreUnavailable(f"{where}: malformed answer from the store") from None
    return record


def _parse_json(text: str) -> tuple[object, str | None]:
    """Never raises: json's exceptions carry the whole document (``.doc``), secrets
    included."""
    try:
        # secretjson: no stray partial copies of an escaped value (a PEM) on the heap.
        return secretjson.loads(text), None
    except (ValueError, RecursionError):
        return None, "not valid JSON"
