"""The token schedule of keycache.vaultauth with a fake transport and a fake clock.

(The same code against a real OpenBao is in test_vault_source.py.)
"""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keycache.errors import KeyStoreError, KeyStoreForbidden, KeyStoreUnavailable
from keycache.vaultauth import (
    AuthAction,
    AuthTiming,
    TokenGrant,
    TokenKeeper,
    VaultAuthSettings,
    backoff_delay,
    next_auth_action,
    read_credential,
)

TIMING = AuthTiming(
    min_attempt_interval_s=1.0, backoff_base_s=1.0, backoff_cap_s=60.0, forbidden_recheck_s=10.0
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeTransport:
    """Scripted Vault: each call pops the next outcome (an exception or a value)."""

    clock: Clock
    login_ttl: float = 30.0
    renew_outcomes: list[TokenGrant | KeyStoreError] = field(default_factory=list)
    lookup_outcomes: list[TokenGrant | KeyStoreError] = field(default_factory=list)
    login_error: KeyStoreError | None = None
    calls: list[tuple[str, float]] = field(default_factory=list)
    issued: int = 0
    renew_gate: threading.Event | None = None

    def login(self, settings: VaultAuthSettings) -> tuple[str, TokenGrant]:
        self.calls.append(("login", self.clock.now))
        if self.login_error is not None:
            raise self.login_error
        self.issued += 1
        return f"tok-{self.issued}", TokenGrant(self.login_ttl, True)

    def lookup_self(self, token: str) -> TokenGrant:
        self.calls.append(("lookup", self.clock.now))
        outcome = self.lookup_outcomes.pop(0) if self.lookup_outcomes else TokenGrant(30.0, True)
        if isinstance(outcome, KeyStoreError):
            raise outcome
        return outcome

    def renew_self(self, token: str) -> TokenGrant:
        self.calls.append(("renew", self.clock.now))
        if self.renew_gate is not None:
            self.renew_gate.wait(5)
        outcome = (
            self.renew_outcomes.pop(0) if self.renew_outcomes else TokenGrant(self.login_ttl, True)
        )
        if isinstance(outcome, KeyStoreError):
            raise outcome
        return outcome

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def approle_keeper(
    tmp_path: Path, timing: AuthTiming = TIMING
) -> tuple[TokenKeeper, FakeTransport, Clock]:
    clock = Clock()
    transport = FakeTransport(clock)
    settings = VaultAuthSettings(
        "approle", role_id_file=tmp_path / "role_id", secret_id_file=tmp_path / "secret_id"
    )
    keeper = TokenKeeper(settings, transport, timing=timing, clock=clock, rng=random.Random(7))
    return keeper, transport, clock


# -- the pure schedule ------------------------------------------------------------------


def action(**kw: object) -> AuthAction:
    args: dict[str, object] = {
        "method": "approle",
        "has_token": True,
        "ttl_s": 30.0,
        "renewable": True,
        "known": True,
        "elapsed_s": 0.0,
        "exhausted": False,
        "timing": TIMING,
    }
    args.update(kw)
    return next_auth_action(**args)  # type: ignore[arg-type]


def test_schedule() -> None:
    assert action(has_token=False) is AuthAction.OBTAIN
    assert action(known=False) is AuthAction.LOOKUP
    assert action(elapsed_s=19.9) is AuthAction.NONE
    assert action(elapsed_s=20.0) is AuthAction.RENEW  # two thirds of 30 s
    assert action(elapsed_s=20.0, renewable=False) is AuthAction.NONE
    assert action(elapsed_s=30.0) is AuthAction.LOGIN  # expired
    assert action(elapsed_s=5.0, exhausted=True) is AuthAction.LOGIN
    assert action(ttl_s=None, elapsed_s=1e9) is AuthAction.NONE  # never expires (root)
    # A token from a file is never replaced by a login: look it up, or ride it out.
    assert action(method="token", elapsed_s=30.0) is AuthAction.LOOKUP
    assert action(method="token", elapsed_s=5.0, exhausted=True) is AuthAction.NONE


def test_backoff_grows_with_jitter_within_bounds() -> None:
    rng = random.Random(1)
    for failures in range(1, 12):
        step = min(60.0, 2.0 ** (failures - 1))
        for _ in range(50):
            d = backoff_delay(failures, TIMING, rng)
            assert max(1.0, step / 2) <= d <= max(1.0, step)
    assert backoff_delay(0, TIMING, rng) == 1.0


def test_timing_is_validated() -> None:
    with pytest.raises(ValueError, match="renew_fraction"):
        AuthTiming(renew_fraction=1.0)
    with pytest.raises(ValueError, match="backoff_cap_s"):
        AuthTiming(backoff_base_s=2.0, backoff_cap_s=1.0)


def test_settings_name_the_missing_field() -> None:
    with pytest.raises(ValueError, match=r"auth\.secret_id_file: is required"):
        VaultAuthSettings("approle", role_id_file=Path("r"))
    with pytest.raises(ValueError, match=r"auth\.jwt_file"):
        VaultAuthSettings("kubernetes", role="r")
    assert VaultAuthSettings("kubernetes", role="r", jwt_file=Path("j")).login_mount == "kubernetes"


# -- the keeper -------------------------------------------------------------------------


def test_renews_at_two_thirds_and_logs_in_again_when_capped(tmp_path: Path) -> None:
    keeper, transport, clock = approle_keeper(tmp_path)
    assert keeper.token() == "tok-1"
    clock.now += 19
    keeper.token()
    assert transport.kinds() == ["login"]
    clock.now += 1  # 20 s = 2/3 of 30 s
    assert keeper.token() == "tok-1"
    assert transport.kinds() == ["login", "renew"]
    # The next renewal is capped by the max TTL (5 s of a 30 s token): log in again.
    transport.renew_outcomes.append(TokenGrant(5.0, True))
    clock.now += 20
    assert keeper.token() == "tok-1"
    assert keeper.status().exhausted
    clock.now += 1  # the attempt gate: one auth request per second at most
    assert keeper.token() == "tok-2"
    assert transport.kinds() == ["login", "renew", "renew", "login"]
    status = keeper.status()
    assert (status.logins, status.renewals, status.exhausted) == (2, 2, False)
    assert status.ttl_remaining_s == 30.0


def test_refused_renewal_and_expiry_lead_to_login(tmp_path: Path) -> None:
    keeper, transport, clock = approle_keeper(tmp_path)
    keeper.token()
    transport.renew_outcomes.append(KeyStoreForbidden("refused"))
    clock.now += 20
    assert keeper.token() == "tok-1"  # still valid for 10 s
    clock.now += 1
    assert keeper.token() == "tok-2"
    # Expired without any renewal opportunity (process asleep): log in.
    clock.now += 100
    assert keeper.token() == "tok-3"
    assert transport.kinds() == ["login", "renew", "login", "login"]


def test_never_hammers_a_failing_vault(tmp_path: Path) -> None:
    keeper, transport, clock = approle_keeper(tmp_path)
    transport.login_error = KeyStoreUnavailable("vault: login: cannot connect")
    errors = 0
    for _ in range(6000):  # a caller retrying every 10 ms for 60 s
        try:
            keeper.token()
        except KeyStoreUnavailable as exc:
            errors += 1
            assert "next auth attempt in" in str(exc)
        clock.now += 0.01
    times = [t for _, t in transport.calls]
    assert errors == 6000
    # Exponential backoff from 1 s, capped at 60 s: 1+2+4+8+16+32 s > 60 s of trying.
    assert 3 <= len(times) <= 8
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= TIMING.min_attempt_interval_s for g in gaps)
    assert gaps == sorted(gaps)
    assert keeper.status().consecutive_failures == len(times)


def test_one_renewal_at_a_time_and_others_keep_the_current_token(tmp_path: Path) -> None:
    keeper, transport, clock = approle_keeper(tmp_path)
    keeper.token()
    clock.now += 25
    transport.renew_gate = threading.Event()
    renewing = threading.Thread(target=keeper.token)
    renewing.start()
    while transport.kinds().count("renew") == 0:
        threading.Event().wait(0.001)
    # While the renewal hangs, other callers are served the (still valid) token.
    results = [keeper.token() for _ in range(5)]
    transport.renew_gate.set()
    renewing.join(5)
    assert results == ["tok-1"] * 5
    assert transport.kinds() == ["login", "renew"]


def test_token_file_reread_on_change_and_dead_token(tmp_path: Path) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    token_file = tmp_path / "token"
    token_file.write_text("file-token-A\n")
    keeper = TokenKeeper(
        VaultAuthSettings("token", token_file=token_file), transport, timing=TIMING, clock=clock
    )
    assert keeper.token() == "file-token-A"
    assert transport.kinds() == ["lookup"]  # learn its TTL
    # Vault says the token is dead (403 on lookup after a 403 on data).
    transport.lookup_outcomes.append(KeyStoreForbidden("permission denied"))
    clock.now += 11
    assert keeper.token_rejected("file-token-A") is False
    with pytest.raises(KeyStoreForbidden, match="waiting for the file to change") as info:
        keeper.token()
    assert "file-token-A" not in str(info.value)
    # The platform writes a new token: picked up without a restart.
    token_file.write_text("file-token-B\n")
    clock.now += 1
    assert keeper.token() == "file-token-B"
    assert "file-token" not in repr(keeper)


def test_policy_denial_is_not_rechecked_on_every_403(tmp_path: Path) -> None:
    keeper, transport, clock = approle_keeper(tmp_path)
    token = keeper.token()
    clock.now += 1
    for _ in range(20):
        assert keeper.token_rejected(token) is False
        clock.now += 0.5
    # Right after login the token is known good; one lookup after forbidden_recheck_s.
    assert transport.kinds().count("lookup") == 1


def test_credentials_are_read_safely(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text("  s3cr3t-value \n")
    assert read_credential(good, "secret_id_file") == "s3cr3t-value"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(KeyStoreForbidden, match=r"secret_id_file .*empty"):
        read_credential(empty, "secret_id_file")
    with pytest.raises(KeyStoreForbidden, match="cannot open role_id_file"):
        read_credential(tmp_path / "missing", "role_id_file")
    with pytest.raises(KeyStoreForbidden, match="not a regular file"):
        read_credential(tmp_path, "jwt_file")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(KeyStoreForbidden, match="larger than") as info:
        read_credential(big, "jwt_file")
    assert "xxxx" not in str(info.value)
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyStoreForbidden, match="not UTF-8"):
        read_credential(binary, "token_file")
