"""The ingress's pure core: ``proxy.signers.internal.verify``, ``NonceCache``, ``KeyTable``.

No loop, no socket. Requests are signed by the sidecar's own signer and, independently,
by the formula of docs/internal-auth.md written out again here; the verifier must accept
both and refuse every alteration with the code the document gives.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keycache.record import make_record
from keycache.ring import KeyRing, build_ring
from proxy import ingress
from proxy.config import ServiceConfig
from proxy.ingress import KeyTable
from proxy.signers.base import SignerContext
from proxy.signers.internal import (
    AUTH_HEADERS,
    REPEATED,
    InternalVenue,
    NonceCache,
    Refusal,
    Verified,
    VerifyKey,
    activation_time,
    collect_auth,
    verify,
)
from tests.proxy.helpers import NOW, PERMS, ring_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "internal-auth.md"
CALLER = "order_router_service"
KEY_ID = "hft_0123456789abcdef0123456789abcdef"
OTHER_ID = "hft_fedcba9876543210fedcba9876543210"
SECRET = "unit-test-secret-Zx8s0Qm1c7Vt4pLr"  # made up for these tests
NOW_MS = int(NOW.timestamp() * 1000)
SERVICE = ServiceConfig(
    name=CALLER,
    venue="internal",
    key_type="internal_service",
    upstream="https://risk.internal.hft:8443",
    route="/risk",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
OVERLAP = timedelta(hours=24)


def rec(
    key_id: str,
    secret: str,
    *,
    created: datetime = NOW - timedelta(days=1),
    expires: datetime = NOW + timedelta(days=30),
    activates: datetime | None = None,
) -> dict[str, object]:
    return make_record(
        key_id,
        secret,
        created_at=created,
        expires_at=expires,
        activates_at=activates,
        permissions=PERMS,
    )


def keys_of(ring: KeyRing, caller: str = CALLER) -> dict[bytes, VerifyKey]:
    return {k.key_id.encode(): VerifyKey(caller, k) for k in ring.keys}


RING = ring_of(CALLER, rec(KEY_ID, SECRET))
KEYS = keys_of(RING)


def signed(
    method: bytes, target: bytes, body: bytes, now_ms: int = NOW_MS, ring: KeyRing = RING
) -> list[bytes | None]:
    """The auth header values the sidecar's signer sends for this request."""
    path, _, query = target.partition(b"?")
    signer = InternalVenue().signer(ring.keys[-1], SERVICE, SignerContext())
    _, lines, _ = signer.sign(method, path, query, body, now_ms)
    pairs = [tuple(line.split(b": ", 1)) for line in lines.split(b"\r\n") if line]
    return collect_auth([(n, v) for n, v in pairs])


def documented(
    secret: bytes, method: bytes, target: bytes, body: bytes, ts: int, nonce: bytes
) -> list[bytes | None]:
    """docs/internal-auth.md "The canonical string", written out again on purpose."""
    path, _, query = target.partition(b"?")
    content = hashlib.sha256(body).hexdigest().encode()
    canonical = b"\n".join([b"HFT-AUTH-V1", method, path, query, b"%d" % ts, nonce, content])
    sig = hmac.new(secret, canonical, hashlib.sha256).hexdigest().encode()
    return [KEY_ID.encode(), b"%d" % ts, nonce, content, sig]


def check(
    method: bytes,
    target: bytes,
    auth: Sequence[bytes | None],
    body: bytes,
    *,
    keys: dict[bytes, VerifyKey] = KEYS,
    revoked: frozenset[bytes] = frozenset(),
    now_ms: int = NOW_MS,
    floor_ms: int = -1,
) -> Verified | Refusal:
    return verify(
        method,
        target,
        auth,
        body,
        keys=keys,
        revoked=revoked,
        now_ms=now_ms,
        floor_ms=floor_ms,
    )


def code(verdict: Verified | Refusal) -> str:
    return "ok" if isinstance(verdict, Verified) else verdict.code


# -- accepted -------------------------------------------------------------------------------


def test_a_request_signed_by_the_sidecar_verifies() -> None:
    body = b'{"symbol":"BTCUSDT","qty":"0.5"}'
    auth = signed(b"POST", b"/internal/v1/echo?account=main&tag=a%2Fb", body)
    verdict = check(b"POST", b"/internal/v1/echo?account=main&tag=a%2Fb", auth, body)
    assert isinstance(verdict, Verified)
    assert verdict.key.caller == CALLER and verdict.key.key_id == KEY_ID
    assert verdict.timestamp == NOW_MS


def test_the_documented_formula_verifies_and_both_worked_examples_verify() -> None:
    nonce = b"8f14e45fceea167a5a36dedd4bea2543"
    auth = documented(SECRET.encode(), b"GET", b"/p?b=2&a=1", b"", NOW_MS, nonce)
    assert code(check(b"GET", b"/p?b=2&a=1", auth, b"")) == "ok"
    text = DOC.read_text(encoding="utf-8")
    for block in re.findall(r"```hft-auth-example\n(.*?)```", text, re.DOTALL):
        e = dict(
            line.split(": ", 1) if ": " in line else (line[:-1], "") for line in block.splitlines()
        )
        ring = ring_of("doc", rec(e["key_id"], e["secret"]))
        values = [
            e["key_id"].encode(),
            e["timestamp"].encode(),
            e["nonce"].encode(),
            e["content_sha256"].encode(),
            e["signature"].encode(),
        ]
        verdict = check(
            e["method"].encode(),
            e["target"].encode(),
            values,
            e["body"].encode(),
            keys=keys_of(ring, "doc"),
            now_ms=int(e["timestamp"]),
        )
        assert code(verdict) == "ok", e


def test_a_bare_question_mark_signs_as_no_query() -> None:
    auth = signed(b"GET", b"/positions", b"")
    assert code(check(b"GET", b"/positions?", auth, b"")) == "ok"


# -- refused, each with the code of docs/internal-auth.md ---------------------------------


def test_missing_repeated_and_misspelt_headers_are_malformed() -> None:
    good = signed(b"GET", b"/x", b"")
    for i in range(5):
        missing = list(good)
        missing[i] = None
        repeated = list(good)
        repeated[i] = REPEATED
        for auth in (missing, repeated):
            refusal = check(b"GET", b"/x", auth, b"")
            assert isinstance(refusal, Refusal)
            assert (refusal.status, refusal.code) == (400, "malformed_auth")
    spellings = {
        0: [b"hft_" + b"A" * 32, b"hft_abc", KEY_ID.encode() + b" "],
        1: [b"0" + b"%d" % NOW_MS, b"+%d" % NOW_MS, b"%d.0" % NOW_MS, b""],
        2: [b"8F14E45FCEEA167A5A36DEDD4BEA2543", b"8f14"],
        3: [(good[3] or b"").upper(), b"00"],
        4: [(good[4] or b"").upper(), (good[4] or b"") + b"0"],
    }
    for i, values in spellings.items():
        for value in values:
            auth = list(good)
            auth[i] = value
            assert code(check(b"GET", b"/x", auth, b"")) == "malformed_auth", (i, value)


def test_unknown_revoked_and_expired_keys() -> None:
    auth = signed(b"GET", b"/x", b"")
    assert code(check(b"GET", b"/x", auth, b"", keys={})) == "unknown_key"
    revoked = frozenset({KEY_ID.encode()})
    refusal = check(b"GET", b"/x", auth, b"", keys={}, revoked=revoked)
    assert isinstance(refusal, Refusal) and (refusal.status, refusal.code) == (401, "revoked_key")
    expiring = ring_of(CALLER, rec(KEY_ID, SECRET, expires=NOW + timedelta(seconds=1)))
    late = NOW_MS + 1000
    auth = signed(b"GET", b"/x", b"", now_ms=late, ring=expiring)
    assert code(check(b"GET", b"/x", auth, b"", keys=keys_of(expiring), now_ms=late)) == (
        "unknown_key"
    )


@pytest.mark.parametrize("skew_ms", [-30_001, 30_001, -(10**9), 10**9])
def test_stale_timestamps_are_refused_whatever_the_signature(skew_ms: int) -> None:
    auth = signed(b"GET", b"/x", b"", now_ms=NOW_MS + skew_ms)
    assert code(check(b"GET", b"/x", auth, b"")) == "stale_timestamp"


@pytest.mark.parametrize("skew_ms", [-30_000, 0, 30_000])
def test_the_window_edges_are_inside(skew_ms: int) -> None:
    auth = signed(b"GET", b"/x", b"", now_ms=NOW_MS + skew_ms)
    assert code(check(b"GET", b"/x", auth, b"")) == "ok"


def test_at_or_below_the_replay_floor_is_stale() -> None:
    auth = signed(b"GET", b"/x", b"")
    assert code(check(b"GET", b"/x", auth, b"", floor_ms=NOW_MS)) == "stale_timestamp"
    assert code(check(b"GET", b"/x", auth, b"", floor_ms=NOW_MS - 1)) == "ok"


def test_a_tampered_body_is_a_bad_signature() -> None:
    auth = signed(b"POST", b"/orders", b'{"qty":"1"}')
    refusal = check(b"POST", b"/orders", auth, b'{"qty":"9"}')
    assert isinstance(refusal, Refusal)
    assert (refusal.status, refusal.code) == (401, "bad_signature")
    assert "Content-SHA256" in refusal.message
    # A body hash recomputed by an attacker for the new body breaks the signature instead.
    forged = list(auth)
    forged[3] = hashlib.sha256(b'{"qty":"9"}').hexdigest().encode()
    refusal = check(b"POST", b"/orders", forged, b'{"qty":"9"}')
    assert isinstance(refusal, Refusal) and refusal.message == "signature does not match"


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b"/orders?a=1"),  # method changed
        (b"POST", b"/orders%3Fa=1"),  # query folded into the path
        (b"POST", b"/orders?a=1&b=2"),  # parameter added
        (b"POST", b"/Orders?a=1"),  # case folded
        (b"post", b"/orders?a=1"),  # the method is case-sensitive
    ],
)
def test_any_change_to_the_request_line_is_a_bad_signature(method: bytes, target: bytes) -> None:
    auth = signed(b"POST", b"/orders?a=1", b"")
    assert code(check(method, target, auth, b"")) == "bad_signature"


def test_a_signature_by_another_key_under_this_key_id_is_refused() -> None:
    ring = ring_of(CALLER, rec(KEY_ID, "another-made-up-secret-for-tests-0000"))
    auth = signed(b"GET", b"/x", b"", ring=ring)
    assert code(check(b"GET", b"/x", auth, b"")) == "bad_signature"


# -- the nonce cache --------------------------------------------------------------------------


def test_a_nonce_is_accepted_once() -> None:
    cache = NonceCache()
    assert cache.claim(KEY_ID.encode(), b"a" * 32, NOW_MS, NOW_MS)
    assert not cache.claim(KEY_ID.encode(), b"a" * 32, NOW_MS, NOW_MS + 5)
    # Another key's identical nonce is another pair.
    assert cache.claim(OTHER_ID.encode(), b"a" * 32, NOW_MS, NOW_MS + 5)


def test_a_nonce_is_remembered_until_its_timestamp_has_left_the_window() -> None:
    cache = NonceCache(window_ms=30_000)
    ts = NOW_MS + 30_000  # a caller clock 30 s ahead: valid until now + 60 s
    assert cache.claim(KEY_ID.encode(), b"b" * 32, ts, NOW_MS)
    assert not cache.claim(KEY_ID.encode(), b"b" * 32, ts, NOW_MS + 60_000)
    # Later still, the time check refuses it anyway; the cache may forget it.
    assert cache.claim(KEY_ID.encode(), b"b" * 32, ts, NOW_MS + 60_001)
    assert len(cache) == 1


def test_a_full_cache_raises_the_floor_so_an_evicted_nonce_stays_refused() -> None:
    cache = NonceCache(capacity=3)
    for i in range(3):
        assert cache.claim(KEY_ID.encode(), b"%032d" % i, NOW_MS + i, NOW_MS + i)
    assert cache.floor_ms == -1
    assert cache.claim(KEY_ID.encode(), b"%032d" % 3, NOW_MS + 3, NOW_MS + 3)
    assert cache.floor_ms == NOW_MS  # nonce 0 went: its timestamp is the floor now
    assert len(cache) == 3
    # Replaying nonce 0 (timestamp NOW_MS) now fails the time check, before the cache.
    auth = documented(SECRET.encode(), b"GET", b"/x", b"", NOW_MS, b"%032d" % 0)
    floor = cache.floor_ms
    assert code(check(b"GET", b"/x", auth, b"", now_ms=NOW_MS + 3, floor_ms=floor)) == (
        "stale_timestamp"
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(-30_000, 30_000), st.integers(0, 500)),
        max_size=80,
    ),
    st.integers(1, 8),
)
def test_no_replay_is_ever_accepted_whatever_the_capacity(
    events: list[tuple[int, int, int]], capacity: int
) -> None:
    """After every step, each request accepted so far, sent again byte for byte, is
    refused: by the time check (outside the window, at or below the floor) or by the
    cache. The bound may refuse fresh requests (below the floor), never accept a replay."""
    cache = NonceCache(window_ms=30_000, capacity=capacity)
    accepted: list[tuple[bytes, int]] = []
    now = NOW_MS
    for nonce_n, skew, advance in events:
        now += advance
        ts = now + skew
        nonce = b"%032x" % nonce_n
        if ts > cache.floor_ms and cache.claim(KEY_ID.encode(), nonce, ts, now):
            accepted.append((nonce, ts))
        for old_nonce, old_ts in accepted:
            if abs(now - old_ts) <= 30_000 and old_ts > cache.floor_ms:
                assert not cache.claim(KEY_ID.encode(), old_nonce, old_ts, now)


# -- properties -------------------------------------------------------------------------------

_TOKEN = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD"])
_SEGMENT = st.binary(min_size=0, max_size=40).map(
    lambda b: bytes(c for c in b if 0x21 <= c < 0x7F and c not in b"?#")
)


@settings(max_examples=300, deadline=None)
@given(
    _TOKEN,
    _SEGMENT,
    st.one_of(st.none(), _SEGMENT.map(lambda b: b.replace(b"#", b""))),
    st.binary(max_size=512),
    st.integers(-30_000, 30_000),
)
def test_whatever_the_sidecar_signs_verifies(
    method: bytes, path: bytes, query: bytes | None, body: bytes, skew: int
) -> None:
    target = b"/" + path + (b"?" + query if query is not None else b"")
    auth = signed(method, target, body, now_ms=NOW_MS + skew)
    assert code(check(method, target, auth, body)) == "ok"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=256), st.data())
def test_flipping_any_byte_of_the_body_or_signature_is_refused(
    body: bytes, data: st.DataObject
) -> None:
    auth = signed(b"POST", b"/orders?x=1", body)
    i = data.draw(st.integers(0, len(body) - 1))
    tampered = body[:i] + bytes([body[i] ^ data.draw(st.integers(1, 255))]) + body[i + 1 :]
    assert code(check(b"POST", b"/orders?x=1", auth, tampered)) == "bad_signature"
    sig = auth[4]
    assert sig is not None
    j = data.draw(st.integers(0, len(sig) - 1))
    other = data.draw(st.sampled_from(b"0123456789abcdef").filter(lambda c: c != sig[j]))
    forged = list(auth)
    forged[4] = sig[:j] + bytes([other]) + sig[j + 1 :]
    assert code(check(b"POST", b"/orders?x=1", forged, body)) == "bad_signature"


_JUNK = st.one_of(st.none(), st.just(REPEATED), st.binary(max_size=80))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=20), st.binary(max_size=80), st.lists(_JUNK, min_size=5, max_size=5))
def test_verify_never_raises_on_junk(
    method: bytes, target: bytes, auth: list[bytes | None]
) -> None:
    verdict = check(method, target, auth, b"junk")
    assert isinstance(verdict, Refusal)
    assert verdict.status in (400, 401)


def test_collect_auth_marks_repeats_and_ignores_case() -> None:
    values = collect_auth(
        [(b"x-auth-key-id", b"a"), (b"X-AUTH-KEY-ID", b"b"), (b"X-Auth-Nonce", b"n")]
    )
    assert values[0] is REPEATED and values[2] == b"n" and values[1] is None
    assert len(AUTH_HEADERS) == 5


def test_a_verify_key_never_shows_its_secret() -> None:
    (vk,) = KEYS.values()
    assert SECRET not in repr(vk) and KEY_ID in repr(vk)


# -- the key table through a rotation ---------------------------------------------------------


def _ring(records: list[tuple[int, dict[str, object]]], now: datetime) -> KeyRing:
    return build_ring(CALLER, records, now=now, overlap=OVERLAP)


def test_both_keys_verify_through_the_overlap_and_the_old_one_ends_as_unknown() -> None:
    table = KeyTable([CALLER], OVERLAP)
    old = rec(KEY_ID, SECRET, created=NOW - timedelta(days=20))
    t0 = NOW
    table.update(CALLER, _ring([(1, old)], t0), t0)
    assert set(table.keys) == {KEY_ID.encode()}
    # The new version appears, signing only from two polls later: both verify at once.
    new = rec(
        OTHER_ID, "new-made-up-secret-0123456789", created=t0, activates=t0 + timedelta(seconds=2)
    )
    assert table.update(CALLER, _ring([(1, old), (2, new)], t0), t0) == []
    assert set(table.keys) == {KEY_ID.encode(), OTHER_ID.encode()}
    # The overlap closes: the old key leaves by time, not as a revocation.
    later = t0 + OVERLAP + timedelta(seconds=1)
    assert table.update(CALLER, _ring([(1, old), (2, new)], later), later) == []
    assert set(table.keys) == {OTHER_ID.encode()}
    assert KEY_ID.encode() not in table.revoked


def test_a_key_deleted_before_its_time_is_revoked_and_a_returning_one_verifies_again() -> None:
    table = KeyTable([CALLER], OVERLAP)
    old = rec(KEY_ID, SECRET, created=NOW - timedelta(days=20))
    new = rec(OTHER_ID, "new-made-up-secret-0123456789", created=NOW)
    table.update(CALLER, _ring([(1, old), (2, new)], NOW), NOW)
    # Emergency rotation: version 1 destroyed inside the overlap window.
    assert table.update(CALLER, _ring([(2, new)], NOW), NOW) == [KEY_ID]
    auth = signed(b"GET", b"/x", b"")
    assert code(check(b"GET", b"/x", auth, b"", keys=table.keys, revoked=table.revoked)) == (
        "revoked_key"
    )
    # The newest deleted: revoked too.
    table.update(CALLER, _ring([(1, old), (2, new)], NOW), NOW)
    assert KEY_ID.encode() not in table.revoked
    assert table.update(CALLER, _ring([(1, old)], NOW), NOW) == [OTHER_ID]


def test_only_accepted_callers_and_internal_keys_enter_the_table() -> None:
    table = KeyTable([CALLER], OVERLAP)
    table.update("someone_else", ring_of("someone_else", rec(OTHER_ID, SECRET)), NOW)
    assert table.keys == {}
    staged = ring_of(CALLER, rec("staged_" + "0" * 32, SECRET))
    table.update(CALLER, staged, NOW)
    assert table.keys == {}


def test_activation_is_two_polls_ahead_rounded_up_to_the_second() -> None:
    written = datetime(2026, 11, 28, 12, 0, 0, 300_000, tzinfo=UTC)
    assert activation_time(written, 200) == datetime(2026, 11, 28, 12, 0, 1, tzinfo=UTC)
    assert activation_time(written, 1000) == datetime(2026, 11, 28, 12, 0, 3, tzinfo=UTC)
    assert activation_time(written.replace(microsecond=0), 500) == written.replace(
        microsecond=0
    ) + timedelta(seconds=1)
    assert activation_time(written, None) == datetime(2026, 11, 28, 12, 0, 1, tzinfo=UTC)


# -- the listener's header classification (proxy.ingress._kind and its spelling table) -----

_KNOWN_NAMES = [
    b"X-Auth-Key-Id",
    b"X-Auth-Signature",
    b"Host",
    b"Content-Length",
    b"Connection",
    b"Transfer-Encoding",
    b"Content-Type",
    b"X-Authproxy-Caller",
    b"X-Authproxy-Token",
    b"X-Request-Id",
]


def _expected_kind(name: bytes) -> str:
    """Independent oracle: docs/ingress.md's rules, written out by hand."""
    lname = name.lower()
    if lname in {
        b"x-auth-key-id",
        b"x-auth-timestamp",
        b"x-auth-nonce",
        b"x-auth-content-sha256",
        b"x-auth-signature",
    }:
        return "credential"
    if lname == b"content-length":
        return "length"
    if lname == b"connection":
        return "connection"
    if lname.startswith(b"x-authproxy-") or lname in {
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"expect",
    }:
        return "dropped"
    return "forward"


def _kind_name(kind: int) -> str:
    if kind < ingress._FORWARD:
        return "credential"
    return {
        ingress._FORWARD: "forward",
        ingress._LENGTH: "length",
        ingress._CONNECTION: "connection",
        ingress._DROPPED: "dropped",
    }[kind]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.sampled_from(_KNOWN_NAMES).flatmap(
            lambda n: st.lists(st.booleans(), min_size=len(n), max_size=len(n)).map(
                lambda up: bytes(
                    c ^ 0x20 if u and chr(c).isalpha() else c for c, u in zip(n, up, strict=True)
                )
            )
        ),
        st.binary(min_size=1, max_size=80),
    )
)
def test_header_kinds_match_the_rules_in_any_spelling(name: bytes) -> None:
    # Classified fresh, through the remembered table (seeded or learned), and again.
    assert _kind_name(ingress._kind(name)) == _expected_kind(name)
    assert _kind_name(ingress._learn_kind(name)) == _expected_kind(name)
    remembered = ingress._KINDS.get(name)
    assert remembered is None or _kind_name(remembered) == _expected_kind(name)


def test_remembered_header_names_are_bounded() -> None:
    saved = dict(ingress._KINDS)
    try:
        for i in range(ingress.MAX_KNOWN_NAMES + 50):
            ingress._learn_kind(b"X-Junk-%d" % i)
        assert len(ingress._KINDS) == ingress.MAX_KNOWN_NAMES
        long_name = b"X-" + b"a" * ingress.MAX_KNOWN_NAME_LEN
        ingress._KINDS.clear()
        assert ingress._learn_kind(long_name) == ingress._FORWARD
        assert long_name not in ingress._KINDS
    finally:
        ingress._KINDS.clear()
        ingress._KINDS.update(saved)
