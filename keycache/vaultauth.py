"""Vault authentication: credentials, token lifetime, renewal and re-login.

This module decides *when* to log in, look a token up or renew it; the HTTP calls
themselves are made by an :class:`AuthTransport` (:mod:`keycache.vault` implements it with
hvac, the only module that imports hvac). So the schedule is testable with a fake
transport and a fake clock, and no Vault detail leaks into the policy.

Methods (DESIGN.md config ``keystore.vault.auth``):

- ``token``: the token is the content of ``token_file``, re-read whenever the file's
  identity, mtime, size or content changes (an agent or the platform rewrites it).
- ``approle``: ``role_id_file`` + ``secret_id_file`` are read at each login and posted to
  ``auth/<mount>/login``.
- ``kubernetes``: ``role`` + the service-account JWT in ``jwt_file`` (re-read at each
  login: projected tokens rotate) are posted to ``auth/<mount>/login``.

Lifetime: a token is renewed once two thirds of its TTL have passed (``lookup-self``
gives TTL and renewability), one renewal at a time; a failed attempt backs off
exponentially with jitter; a renewal that is refused, or that no longer extends the
token (its max TTL caps it), or an expired token leads to a fresh login (approle,
kubernetes). Every auth request - login, lookup, renewal - passes one gate that allows at
most one attempt per ``min_attempt_interval_s`` and more after failures, so even when
everything fails Vault sees a bounded request rate.

Everything here is blocking (file reads, transport calls): call it in a thread. The token
is a secret: it is held as a ``str`` (the HTTP header needs one; it is not in locked
memory), never logged, never in a message or repr.
"""

from __future__ import annotations

import enum
import hmac
import os
import random
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from keycache.errors import (
    KeyStoreError,
    KeyStoreForbidden,
    KeyStoreSealed,
    KeyStoreUnavailable,
)
from keycache.securemem import wipe_bytearray

__all__ = [
    "DEFAULT_MOUNTS",
    "AuthAction",
    "AuthMethod",
    "AuthStatus",
    "AuthTiming",
    "AuthTransport",
    "TokenGrant",
    "TokenKeeper",
    "VaultAuthConfigLike",
    "VaultAuthSettings",
    "backoff_delay",
    "next_auth_action",
    "read_credential",
]

AuthMethod = Literal["token", "approle", "kubernetes"]
_METHODS: Final[frozenset[str]] = frozenset(("token", "approle", "kubernetes"))

#: Where each login method is mounted unless configured otherwise (Vault's defaults).
DEFAULT_MOUNTS: Final[dict[str, str]] = {"approle": "approle", "kubernetes": "kubernetes"}

#: A Vault token is ~100 bytes, a role/secret id 36, a Kubernetes service-account JWT a
#: few kB; 64 kB refuses a wrong file (a log, a binary) before it is read into memory.
MAX_CREDENTIAL_BYTES: Final = 64 * 1024


class VaultAuthConfigLike(Protocol):
    """What :meth:`VaultAuthSettings.from_config` reads: the shape of the proxy's
    ``VaultAuthConfig`` (keycache never imports proxy; this matches it structurally)."""

    @property
    def method(self) -> str: ...
    @property
    def token_file(self) -> Path | None: ...
    @property
    def role_id_file(self) -> Path | None: ...
    @property
    def secret_id_file(self) -> Path | None: ...
    @property
    def role(self) -> str | None: ...
    @property
    def jwt_file(self) -> Path | None: ...


@dataclass(frozen=True, slots=True)
class VaultAuthSettings:
    """How to authenticate; references to credential files only, never a credential.

    Raises ValueError naming the missing field when the method's inputs are incomplete.
    ``mount_point`` defaults to :data:`DEFAULT_MOUNTS` for approle and kubernetes.
    """

    method: AuthMethod
    token_file: Path | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    role: str | None = None
    jwt_file: Path | None = None
    mount_point: str | None = None

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError("auth.method: must be token, approle or kubernetes")
        needs: dict[str, tuple[str, ...]] = {
            "token": ("token_file",),
            "approle": ("role_id_file", "secret_id_file"),
            "kubernetes": ("role", "jwt_file"),
        }
        for name in needs[self.method]:
            if getattr(self, name) is None:
                raise ValueError(f"auth.{name}: is required for auth method {self.method}")

    @property
    def login_mount(self) -> str:
        """The auth mount the login posts to (approle/kubernetes)."""
        return self.mount_point or DEFAULT_MOUNTS.get(self.method, self.method)

    @classmethod
    def from_config(cls, cfg: VaultAuthConfigLike) -> VaultAuthSettings:
        """Build from the proxy's ``VaultAuthConfig`` (or anything shaped like it)."""
        method = cfg.method
        if method == "token":
            return cls("token", token_file=cfg.token_file)
        if method == "approle":
            return cls("approle", role_id_file=cfg.role_id_file, secret_id_file=cfg.secret_id_file)
        if method == "kubernetes":
            return cls("kubernetes", role=cfg.role, jwt_file=cfg.jwt_file)
        raise ValueError("auth.method: must be token, approle or kubernetes")


@dataclass(frozen=True, slots=True)
class AuthTiming:
    """Token lifetime policy. Defaults are for production; tests shorten them.

    - ``renew_fraction``: renew once this fraction of the TTL has passed (2/3, as the
      brief asks: leaves a third of the TTL for retries before the token expires).
    - ``min_attempt_interval_s``: at most one auth request (login, lookup, renewal) per
      this interval, successes included: a fleet of sidecars cannot hammer Vault.
    - ``backoff_base_s`` / ``backoff_cap_s``: after n consecutive failures the next
      attempt waits a jittered ``base * 2**(n-1)``, capped (60 s: a sealed or down Vault
      is retried about once a minute per sidecar).
    - ``exhausted_fraction``: a renewal that yields less than this fraction of the
      token's full TTL is hitting its max TTL; log in again instead of renewing it
      towards zero in ever shorter steps. Two thirds: an uncapped renewal restores the
      full TTL, so anything short of the point where we renew is the cap biting.
    - ``forbidden_recheck_s``: after a 403 on a data path with a token ``lookup-self``
      just proved valid, do not look it up again for this long (the 403 is a policy
      denial; re-checking on every poll would double the request rate).
    """

    renew_fraction: float = 2 / 3
    min_attempt_interval_s: float = 1.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    exhausted_fraction: float = 2 / 3
    forbidden_recheck_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_fraction < 1:
            raise ValueError("renew_fraction must be between 0 and 1")
        if not 0 < self.exhausted_fraction <= 1:
            raise ValueError("exhausted_fraction must be in (0, 1]")
        if self.min_attempt_interval_s < 0 or self.backoff_base_s <= 0:
            raise ValueError("intervals must be positive")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff_cap_s must be at least backoff_base_s")


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What Vault said about a token: TTL in seconds (None: it never expires, e.g. a root
    token), whether it is renewable, and its full TTL (the TTL it was issued with; used to
    notice renewals capped by the max TTL)."""

    ttl_s: float | None
    renewable: bool
    full_ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """Token state for metrics and health; nothing secret. ``ttl_remaining_s`` is None
    for a token that never expires or when no token is held."""

    method: AuthMethod
    has_token: bool
    ttl_remaining_s: float | None
    renewable: bool
    exhausted: bool
    consecutive_failures: int
    logins: int
    renewals: int


class AuthTransport(Protocol):
    """The HTTP side of authentication. Every method blocks and raises KeyStoreError
    subclasses (KeyStoreForbidden when Vault refuses, KeyStoreUnavailable when it cannot
    answer)."""

    def login(self, settings: VaultAuthSettings) -> tuple[str, TokenGrant]:
        """Log in with the method's credentials (approle, kubernetes); return the new
        token and its grant."""
        ...

    def lookup_self(self, token: str) -> TokenGrant:
        """``auth/token/lookup-self`` with ``token``."""
        ...

    def renew_self(self, token: str) -> TokenGrant:
        """``auth/token/renew-self`` with ``token``; the grant after renewal."""
        ...


class AuthAction(enum.Enum):
    """What :func:`next_auth_action` asks for."""

    NONE = "none"  # the held token is fine
    OBTAIN = "obtain"  # no token: read the token file / log in
    LOOKUP = "lookup"  # token of unknown lifetime: lookup-self
    RENEW = "renew"  # two thirds of the TTL have passed: renew-self
    LOGIN = "login"  # token expired or cannot be renewed further: log in again


@dataclass(frozen=True, slots=True)
class _Lease:
    obtained_at: float
    grant: TokenGrant

    def expires_at(self) -> float | None:
        ttl = self.grant.ttl_s
        return None if ttl is None else self.obtained_at + ttl

    def remaining(self, now: float) -> float | None:
        expires = self.expires_at()
        return None if expires is None else max(0.0, expires - now)

    def expired(self, now: float) -> bool:
        expires = self.expires_at()
        return expires is not None and now >= expires

    def renew_at(self, fraction: float) -> float | None:
        ttl = self.grant.ttl_s
        if ttl is None or not self.grant.renewable:
            return None
        return self.obtained_at + ttl * fraction


def next_auth_action(
    *,
    method: AuthMethod,
    has_token: bool,
    ttl_s: float | None,
    renewable: bool,
    known: bool,
    elapsed_s: float,
    exhausted: bool,
    timing: AuthTiming,
) -> AuthAction:
    """The pure auth schedule. ``known`` says whether the token's lifetime is known
    (``ttl_s``/``renewable`` come from Vault); ``elapsed_s`` is the time since Vault told
    us that; ``exhausted`` marks a token whose renewal was refused or capped.

    A token from a file is never replaced by a login: when it expires we look it up again
    (an agent may have renewed it) and otherwise wait for the file to change.
    """
    relogin = AuthAction.LOGIN if method != "token" else AuthAction.LOOKUP
    if not has_token:
        return AuthAction.OBTAIN
    if not known:
        return AuthAction.LOOKUP
    if ttl_s is not None and elapsed_s >= ttl_s:
        return relogin
    if exhausted:
        return AuthAction.LOGIN if method != "token" else AuthAction.NONE
    if renewable and ttl_s is not None and elapsed_s >= ttl_s * timing.renew_fraction:
        return AuthAction.RENEW
    return AuthAction.NONE


def backoff_delay(failures: int, timing: AuthTiming, rng: random.Random) -> float:
    """Seconds to wait before the next auth attempt after ``failures`` consecutive
    failures: ``base * 2**(failures-1)`` capped, with "equal jitter" (uniform in the upper
    half, so retries of many sidecars spread out but never come sooner than half the
    step), and never less than ``min_attempt_interval_s``."""
    if failures <= 0:
        return timing.min_attempt_interval_s
    step = min(timing.backoff_cap_s, timing.backoff_base_s * 2 ** min(failures - 1, 30))
    return max(timing.min_attempt_interval_s, rng.uniform(step / 2, step))


def read_credential(path: Path, what: str) -> str:
    """Read a credential file (token, role id, secret id, JWT); return its content without
    surrounding whitespace. Blocking.

    Raises KeyStoreForbidden naming ``what``, the path and the reason (never the
    content) when the file is missing, not a regular file, too large, not text or empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyStoreForbidden(f"vault auth: cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyStoreForbidden(f"vault auth: {what} {path} is not a regular file")
        if st.st_size > MAX_CREDENTIAL_BYTES:
            raise KeyStoreForbidden(
                f"vault auth: {what} {path} is larger than {MAX_CREDENTIAL_BYTES} bytes"
            )
        # One byte more than the size: reading that much means the file grew meanwhile.
        raw = bytearray(st.st_size + 1)
        text: str | None
        try:
            with memoryview(raw) as view:
                got = 0
                while got < len(raw):
                    n = os.readv(fd, [view[got:]])
                    if n == 0:
                        break
                    got += n
                if got == len(raw):
                    raise KeyStoreForbidden(
                        f"vault auth: {what} {path} changed while being read; retry"
                    )
                try:
                    text = str(view[:got], "utf-8").strip()
                except UnicodeDecodeError:
                    text = None
            if text is None:
                raise KeyStoreForbidden(f"vault auth: {what} {path} is not UTF-8 text")
        finally:
            wipe_bytearray(raw)
    except OSError as exc:
        raise KeyStoreForbidden(f"vault auth: cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not text:
        raise KeyStoreForbidden(f"vault auth: {what} {path} is empty")
    return text


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two tokens (any text: compare_digest takes str only
    when it is ASCII)."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class TokenKeeper:
    """Holds the Vault token and keeps it valid. Thread-safe: callers on many worker
    threads share one keeper; auth requests run one at a time under a lock, and a caller
    that finds an auth request in progress keeps using the current token if it is valid.

    ``clock`` is monotonic seconds (a parameter so tests can drive it); ``rng`` feeds the
    backoff jitter. All methods block (file reads, HTTP through ``transport``).
    """

    __slots__ = (
        "_exhausted",
        "_failures",
        "_file_id",
        "_last_error",
        "_lease",
        "_lock",
        "_logins",
        "_next_attempt",
        "_renewals",
        "_rng",
        "_token",
        "_token_dead",
        "_transport",
        "_verified_at",
        "clock",
        "settings",
        "timing",
    )

    def __init__(
        self,
        settings: VaultAuthSettings,
        transport: AuthTransport,
        *,
        timing: AuthTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.timing = timing if timing is not None else AuthTiming()
        self.clock = clock
        self._transport = transport
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_dead = False
        self._file_id: tuple[int, int, int, int] | None = None
        self._lease: _Lease | None = None
        self._exhausted = False
        self._failures = 0
        self._next_attempt = float("-inf")
        self._last_error: KeyStoreError | None = None
        self._verified_at = float("-inf")
        self._logins = 0
        self._renewals = 0

    def __repr__(self) -> str:
        return (
            f"TokenKeeper(method={self.settings.method}, has_token={self._token is not None}, "
            f"failures={self._failures})"
        )

    # -- public ---------------------------------------------------------------------------

    def token(self) -> str:
        """Return a token to send now, after any renewal or login that is due (and allowed
        by the attempt gate). Raises KeyStoreForbidden / KeyStoreUnavailable when no usable
        token can be had right now. Blocking."""
        if not self._lock.acquire(blocking=False):
            held = self._usable_token(self.clock())
            if held is not None:
                return held  # an auth request is in flight; the current token still works
            self._lock.acquire()
        try:
            return self._maintain()
        finally:
            self._lock.release()

    def token_rejected(self, token: str) -> bool:
        """Report that Vault answered 401/403 to a request made with ``token``. Checks
        whether the token itself is dead (``lookup-self``), and if so obtains a new one.
        Return True if the caller should retry once with :meth:`token` (a different token
        is now held); False if the token is valid (a policy denial) or nothing better can
        be had yet. Blocking; rate-limited like every auth request."""
        with self._lock:
            now = self.clock()
            if self._token is None or not _same(self._token, token):
                return self._token is not None  # someone already replaced it
            if now - self._verified_at < self.timing.forbidden_recheck_s:
                return False  # proven valid moments ago: a policy denial
            if self.settings.method == "token" and self._reload_token_file(force=True):
                return True
            if not self._gate_open(now):
                return False
            try:
                grant = self._transport.lookup_self(token)
            except KeyStoreForbidden:
                self._attempt_done(now, ok=True)
                self._drop_token()
                if self.settings.method == "token":
                    return False  # nothing to do until the file changes
                # Log in at once: the gate allowed this lookup, and a lookup plus a login
                # per interval is still a bounded rate.
                self._perform(AuthAction.LOGIN, now)
                return self._usable_token(self.clock()) is not None
            except KeyStoreError as exc:
                self._attempt_failed(now, exc)
                return False
            self._attempt_done(now, ok=True)
            self._set_lease(grant, now)
            self._verified_at = now
            return False

    def status(self) -> AuthStatus:
        """The token's state for metrics (TTL remaining, renewability, counters)."""
        now = self.clock()
        lease = self._lease
        return AuthStatus(
            method=self.settings.method,
            has_token=self._token is not None and not self._token_dead,
            ttl_remaining_s=lease.remaining(now) if lease is not None else None,
            renewable=lease.grant.renewable if lease is not None else False,
            exhausted=self._exhausted,
            consecutive_failures=self._failures,
            logins=self._logins,
            renewals=self._renewals,
        )

    # -- internals (lock held) -------------------------------------------------------------

    def _usable_token(self, now: float) -> str | None:
        token = self._token
        lease = self._lease
        if token is None or self._token_dead:
            return None
        if lease is not None and lease.expired(now):
            return None
        return token

    def _gate_open(self, now: float) -> bool:
        return now >= self._next_attempt

    def _attempt_done(self, now: float, *, ok: bool) -> None:
        if ok:
            self._failures = 0
            self._last_error = None
        self._next_attempt = now + self.timing.min_attempt_interval_s

    def _attempt_failed(self, now: float, exc: KeyStoreError) -> None:
        self._failures += 1
        self._last_error = exc
        self._next_attempt = now + backoff_delay(self._failures, self.timing, self._rng)

    def _set_lease(self, grant: TokenGrant, now: float) -> None:
        full = grant.full_ttl_s if grant.full_ttl_s else grant.ttl_s
        self._lease = _Lease(now, TokenGrant(grant.ttl_s, grant.renewable, full))

    def _drop_token(self) -> None:
        if self.settings.method == "token":
            self._token_dead = True  # until the file changes
        else:
            self._token = None
        self._lease = None
        self._exhausted = False
        self._verified_at = float("-inf")

    def _reload_token_file(self, *, force: bool) -> bool:
        """Re-read token_file if its identity changed (or ``force``); return True if the
        token changed. Raises KeyStoreForbidden if it cannot be read and no token is held."""
        path = self.settings.token_file
        assert path is not None
        ident = _file_identity(path)
        if not force and ident == self._file_id and self._token is not None:
            return False
        try:
            text = read_credential(path, "token_file")
        except KeyStoreForbidden:
            if self._token is None:
                raise
            return False  # keep the token we have; the file may be mid-rewrite
        self._file_id = ident
        if self._token is not None and _same(text, self._token):
            return False
        self._token = text
        self._token_dead = False
        self._lease = None
        self._exhausted = False
        self._verified_at = float("-inf")
        return True

    def _fail_without_token(self, now: float) -> KeyStoreError:
        err = self._last_error
        if err is None:
            return KeyStoreUnavailable("vault auth: no valid token yet; waiting to retry")
        wait = f"{err} (next auth attempt in {max(0.0, self._next_attempt - now):.1f} s)"
        if isinstance(err, KeyStoreForbidden):
            return KeyStoreForbidden(wait)
        if isinstance(err, KeyStoreSealed):
            return KeyStoreSealed(wait)
        return KeyStoreUnavailable(wait)

    def _maintain(self) -> str:
        now = self.clock()
        if self.settings.method == "token":
            self._reload_token_file(force=False)
            if self._token_dead:
                raise KeyStoreForbidden(
                    "vault auth: the token in token_file is invalid or expired; "
                    "waiting for the file to change"
                )
        lease = self._lease
        action = next_auth_action(
            method=self.settings.method,
            has_token=self._token is not None,
            ttl_s=lease.grant.ttl_s if lease is not None else None,
            renewable=lease.grant.renewable if lease is not None else False,
            known=lease is not None,
            elapsed_s=now - lease.obtained_at if lease is not None else 0.0,
            exhausted=self._exhausted,
            timing=self.timing,
        )
        if action is not AuthAction.NONE and self._gate_open(now):
            self._perform(action, now)
        token = self._usable_token(self.clock())
        if token is None:
            raise self._fail_without_token(now)
        return token

    def _perform(self, action: AuthAction, now: float) -> None:
        transport = self._transport
        try:
            if action in (AuthAction.OBTAIN, AuthAction.LOGIN) and self.settings.method != "token":
                token, grant = transport.login(self.settings)
                self._token = token
                self._token_dead = False
                self._exhausted = False
                self._set_lease(grant, now)
                self._verified_at = now
                self._logins += 1
            elif action is AuthAction.OBTAIN:
                self._reload_token_file(force=True)
            elif action is AuthAction.LOOKUP:
                assert self._token is not None
                grant = transport.lookup_self(self._token)
                self._set_lease(grant, now)
                self._verified_at = now
            elif action is AuthAction.RENEW:
                assert self._token is not None and self._lease is not None
                full = self._lease.grant.full_ttl_s
                grant = transport.renew_self(self._token)
                self._renewals += 1
                self._lease = _Lease(now, TokenGrant(grant.ttl_s, grant.renewable, full))
                if (
                    full is not None
                    and grant.ttl_s is not None
                    and grant.ttl_s < full * self.timing.exhausted_fraction
                ):
                    # Capped by the token's max TTL: renewing again would only shorten
                    # the steps. Log in again (approle, kubernetes) or ride it out.
                    self._exhausted = True
        except KeyStoreForbidden as exc:
            if action is AuthAction.RENEW:
                # Renewal refused (not renewable any more, max TTL reached): the token may
                # still be valid until it expires; a login method logs in again next.
                self._exhausted = True
                self._attempt_done(now, ok=True)
                return
            if action is AuthAction.LOOKUP:
                self._drop_token()
            self._attempt_failed(now, exc)
            return
        except KeyStoreError as exc:
            self._attempt_failed(now, exc)
            return
        self._attempt_done(now, ok=True)
