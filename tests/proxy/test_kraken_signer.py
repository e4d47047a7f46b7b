"""Kraken spot signing: the published example, ccxt's ``kraken.sign`` as the oracle, the
classifier, and the nonce's monotonicity across threads, rebuilds and restarts."""

from __future__ import annotations

import base64
import secrets
import threading
from pathlib import Path
from typing import Any

import ccxt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.service import KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection, SignerContext
from proxy.signers.kraken import TIME_ENDPOINT, decode_secret
from proxy.signers.nonce import BLOCK_MS, NonceSource, _read_mark, state_file
from tests.proxy.helpers import NOW, record, ring_of

SERVICE = ServiceConfig(
    name="kraken_spot",
    venue="kraken",
    key_type="exchange_api",
    upstream="https://api.kraken.com",
    route="/kraken",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
NOW_MS = int(NOW.timestamp() * 1000)


def fresh_secret() -> str:
    return base64.b64encode(secrets.token_bytes(64)).decode()


def runtime_with(
    key_id: str, secret: str, context: SignerContext | None = None, algorithm: str = "hmac-sha512"
) -> ServiceRuntime:
    rt = ServiceRuntime(SERVICE, None)
    ring = ring_of(SERVICE.name, record(key_id, secret, algorithm))
    rt.keys = KeySet(ring, rt.venue, SERVICE, context)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return method, target, headers, body


def prepare(
    rt: ServiceRuntime, body: bytes, now_ms: int = NOW_MS, path: bytes = b"/0/private/AddOrder"
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    data = rt.prepare(b"POST", path, b"", encode_request_headers([]), body, now_ms / 1000)
    _, target, headers, sent = split(data)
    return target, headers, sent


def nonce_of(body: bytes) -> int:
    first, _, _ = body.partition(b"&")
    name, _, value = first.partition(b"=")
    assert name == b"nonce"
    return int(value)


# --------------------------------------------------------------------------- vectors


def test_published_vector(vectors: list[dict[str, Any]]) -> None:
    (v,) = [v for v in vectors if v["venue"] == "kraken"]
    rt = runtime_with("kraken-doc-" + secrets.token_hex(6), v["secret"])
    params = v["post_data"].split("&", 1)[1]
    # The engine sends the order parameters and a stale nonce the signer must replace.
    target, headers, body = prepare(
        rt, b"nonce=1&" + params.encode(), int(v["nonce"]), v["uri_path"].encode()
    )
    assert target == v["uri_path"].encode()
    assert body == v["post_data"].encode()
    assert headers[b"API-Sign"] == v["expected_signature"].encode()


def test_decode_secret_matches_base64_and_refuses_junk() -> None:
    for raw in (b"", b"a", b"ab", b"abc", secrets.token_bytes(64), secrets.token_bytes(65)):
        text = base64.b64encode(raw)
        if not raw:
            with pytest.raises(SigningError):
                decode_secret(memoryview(text))
            continue
        assert bytes(decode_secret(memoryview(text))) == raw
    for junk in (b"abc", b"ab!d", b"a=bc", b"====", b"YQ=a"):
        with pytest.raises(SigningError):
            decode_secret(memoryview(junk))


def test_only_hmac_sha512_keys() -> None:
    with pytest.raises(SigningError, match="hmac-sha512"):
        runtime_with("k-" + secrets.token_hex(4), fresh_secret(), algorithm="hmac-sha256")
    with pytest.raises(SigningError, match="base64"):
        runtime_with("k-" + secrets.token_hex(4), "not base64 at all!")


def test_engine_credentials_replaced_and_nonce_first() -> None:
    rt = runtime_with("k-" + secrets.token_hex(4), fresh_secret())
    data = rt.prepare(
        b"POST",
        b"/0/private/AddOrder",
        b"nonce=7",
        encode_request_headers(
            [
                (b"API-Key", b"engine"),
                (b"API-Sign", b"forged"),
                (b"Content-Type", b"application/x-www-form-urlencoded"),
            ]
        ),
        b"pair=XBTUSD&nonce=5&type=buy",
        NOW.timestamp(),
    )
    _, target, headers, body = split(data)
    assert target == b"/0/private/AddOrder"
    assert body == b"nonce=%d&pair=XBTUSD&type=buy" % NOW_MS
    assert headers[b"API-Key"] != b"engine"
    assert b"forged" not in data
    assert headers[b"Content-Type"] == b"application/x-www-form-urlencoded"


# --------------------------------------------------------------------------- ccxt oracle

ORACLE_KEY = "kraken-prop-" + secrets.token_hex(6)
ORACLE_SECRET = fresh_secret()
ORACLE_RT = runtime_with(ORACLE_KEY, ORACLE_SECRET)
ORACLE: Any = ccxt.kraken({"apiKey": ORACLE_KEY, "secret": ORACLE_SECRET})

names = st.text(st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    params=st.dictionaries(names.filter(lambda n: n != "nonce"), st.text(max_size=12), max_size=6),
    stale_nonce_at=st.none() | st.integers(min_value=0, max_value=6),
    method=st.sampled_from([b"POST", b"GET", b"PUT", b"DELETE"]),
    endpoint=st.sampled_from(["AddOrder", "CancelOrder", "OpenOrders", "Balance"]),
    skew_ms=st.integers(min_value=-5000, max_value=5000),
)
def test_property_ccxt_signs_the_same_bytes(
    params: dict[str, str],
    stale_nonce_at: int | None,
    method: bytes,
    endpoint: str,
    skew_ms: int,
) -> None:
    """Whatever the parameters (unicode, empty, any order), the bytes the sidecar sends are
    exactly what ccxt's own kraken.sign() produces for them with the same nonce."""
    encoded = ORACLE.urlencode_nested(params) if params else ""
    parts = encoded.split("&") if encoded else []
    if stale_nonce_at is not None:
        parts.insert(min(stale_nonce_at, len(parts)), "nonce=1")
    engine_body = "&".join(parts).encode()
    path = f"/0/private/{endpoint}".encode()
    data = ORACLE_RT.prepare(
        method, path, b"", encode_request_headers([]), engine_body, (NOW_MS + skew_ms) / 1000
    )
    _, target, headers, body = split(data)
    nonce = nonce_of(body)
    ORACLE.nonce = lambda: nonce
    expected = ORACLE.sign(endpoint, "private", method.decode(), dict(params))
    assert target == path and expected["url"].endswith(path.decode())
    assert body == expected["body"].encode()
    assert headers[b"API-Sign"] == expected["headers"]["API-Sign"].encode()
    assert headers[b"API-Key"] == ORACLE_KEY.encode()


def test_nonces_strictly_increase_on_a_stuck_or_backward_clock() -> None:
    rt = runtime_with("k-" + secrets.token_hex(4), fresh_secret())
    seen = [nonce_of(prepare(rt, b"pair=XBTUSD", NOW_MS - i * 7)[2]) for i in range(50)]
    assert seen == sorted(set(seen)) and seen[0] == NOW_MS


def test_rebuilt_signer_continues_the_sequence() -> None:
    """A rotation or reload builds a new signer for the same key: no nonce goes back."""
    key_id, secret = "k-" + secrets.token_hex(4), fresh_secret()
    first = runtime_with(key_id, secret)
    last = max(nonce_of(prepare(first, b"", NOW_MS)[2]) for _ in range(5))
    again = runtime_with(key_id, secret)
    assert nonce_of(prepare(again, b"", NOW_MS - 60_000)[2]) == last + 1


# --------------------------------------------------------------------------- nonce state


def test_nonce_source_in_memory_is_monotonic_across_threads() -> None:
    source = NonceSource(None)
    out: list[list[int]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        out[i].extend(source.next(NOW_MS) for _ in range(2000))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [n for seq in out for n in seq]
    assert len(set(flat)) == len(flat) == 8000
    assert all(seq == sorted(seq) for seq in out)


def test_state_file_survives_a_restart_with_the_clock_behind(tmp_path: Path) -> None:
    path = state_file(tmp_path, "kraken", "some key id/../x")
    assert path.parent == tmp_path and "/" not in path.name
    first = NonceSource(path, wall_ms=NOW_MS)
    # Reserved before any nonce is issued: the mark is a block ahead of the clock.
    assert _read_mark(path) == NOW_MS + BLOCK_MS
    issued = [first.next(NOW_MS) for _ in range(1000)]  # a burst: runs ahead of the clock
    assert issued[-1] == NOW_MS + 999
    # "Crash" and restart with the wall clock 10 s behind: still above everything issued.
    second = NonceSource(path, wall_ms=NOW_MS - 10_000)
    assert second.next(NOW_MS - 10_000) > issued[-1]
    assert path.stat().st_mode & 0o777 == 0o600


def test_state_file_always_covers_a_long_burst(tmp_path: Path) -> None:
    """With the clock stuck, every issued nonce is at most what is on disk: a crash at any
    moment can never lead to a repeated nonce."""
    path = tmp_path / "mark"
    source = NonceSource(path, wall_ms=NOW_MS)
    for i in range(3 * BLOCK_MS):
        nonce = source.next(NOW_MS)
        if i % 5000 == 0:
            assert _read_mark(path) >= nonce
    assert source.wait_durable()
    assert _read_mark(path) >= source.last + BLOCK_MS // 2
    assert source.error is None


def test_time_based_nonces_write_only_every_half_block(tmp_path: Path) -> None:
    path = tmp_path / "mark"
    source = NonceSource(path, wall_ms=NOW_MS)
    writes_before = path.stat().st_mtime_ns
    for ms in range(0, BLOCK_MS // 2 - 1, 250):  # 4 requests a second for 30 s
        source.next(NOW_MS + ms)
    assert source.wait_durable()
    assert path.stat().st_mtime_ns == writes_before  # no I/O yet
    source.next(NOW_MS + BLOCK_MS // 2 + 1)
    assert source.wait_durable()
    assert _read_mark(path) == NOW_MS + BLOCK_MS // 2 + 1 + BLOCK_MS


def test_corrupt_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mark"
    path.write_text("12ab\n")
    with pytest.raises(SigningError, match="corrupt"):
        NonceSource(path)


def test_unusable_state_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SigningError, match="nonce high-water mark"):
        NonceSource(blocker / "mark")


def test_signer_uses_the_state_dir(tmp_path: Path) -> None:
    key_id = "k-" + secrets.token_hex(4)
    rt = runtime_with(key_id, fresh_secret(), SignerContext(state_dir=tmp_path))
    nonce = nonce_of(prepare(rt, b"pair=XBTUSD", NOW_MS)[2])
    assert _read_mark(state_file(tmp_path, "kraken", key_id)) > nonce


# --------------------------------------------------------------------------- classifier

KRAKEN = VENUES["kraken"]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"error":[],"result":{"txid":["OUF4EM-FRGI2-MQMWZD"]}}', None),
        (200, b'{"error":["WGeneral:Something"],"result":{"count":1}}', None),
        (200, b'{"error":["EAPI:Invalid key"]}', Rejection.KEY_REJECTED),
        (200, b'{"error":["EAPI:Invalid signature"]}', Rejection.BAD_SIGNATURE),
        (200, b'{"error":["EAPI:Invalid nonce"]}', Rejection.CLOCK_OR_NONCE),
        (200, b'{"error":["EAPI:Rate limit exceeded"]}', Rejection.RATE_LIMITED),
        (200, b'{"error":["EOrder:Rate limit exceeded"]}', Rejection.RATE_LIMITED),
        (200, b'{"error":["EGeneral:Too many requests"]}', Rejection.RATE_LIMITED),
        (200, b'{"error":["EGeneral:Temporary lockout"]}', Rejection.BANNED),
        (200, b'{"error":["EGeneral:Invalid arguments:volume"]}', Rejection.OTHER),
        (200, b'{"error":["EOrder:Insufficient funds"]}', Rejection.OTHER),
        (200, b'{"error": ["EAPI:Invalid key"], "result": {}}', Rejection.KEY_REJECTED),
        (
            200,
            b'{"error":["EGeneral:Internal error:42","EAPI:Invalid nonce"]}',
            Rejection.CLOCK_OR_NONCE,
        ),
        (429, b"<html>rate limited</html>", Rejection.RATE_LIMITED),
        (520, b"cloudflare", Rejection.OTHER),
        (200, b'{"result":{}}', None),
    ],
)
def test_classifier(status: int, body: bytes, expected: Rejection | None) -> None:
    assert KRAKEN.classify(status, body) is expected


def test_time_endpoint_parses_but_is_not_used_for_clock_sync() -> None:
    assert KRAKEN.time_endpoint is None  # one-second resolution; Kraken checks no time
    endpoint = TIME_ENDPOINT
    assert endpoint.path == b"/0/public/Time"
    body = (
        b'{"error":[],"result":{"unixtime":1688669448,"rfc1123":"Thu, 06 Jul 23 18:50:48 +0000"}}'
    )
    assert endpoint.parse(body) == 1688669448000.0
    with pytest.raises(ValueError):
        endpoint.parse(b'{"error":["EService:Unavailable"]}')
