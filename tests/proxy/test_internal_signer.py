"""HFT-AUTH-V1 (``venue: internal``): the sidecar's signer against docs/internal-auth.md.

Two independent oracles: the formula as the document states it, written again here
(``documented_signature``), and the simulator's verifier ``verify_internal``, which was
written from the document without looking at the signer. The worked examples are parsed
out of the document itself, so the page and the code cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keycache.record import make_record
from proxy.config import ServiceConfig
from proxy.errors import SigningError
from proxy.service import REQUEST_DROP, KeySet, ServiceRuntime, encode_request_headers
from proxy.signers import VENUES, Rejection
from proxy.signers.internal import InternalVenue
from proxy.simulator.internal import InternalAccepted, InternalKey, verify_internal
from tests.proxy.helpers import NOW, PERMS, record, ring_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "internal-auth.md"

SERVICE = ServiceConfig(
    name="risk_service",
    venue="internal",
    key_type="internal_service",
    upstream="https://risk.internal.hft:8443",
    route="/risk",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)

# Made up for these tests; the same shape as keycache.record.new_key_id().
KEY_ID = "hft_0123456789abcdef0123456789abcdef"
SECRET = "unit-test-secret-Zx8s0Qm1c7Vt4pLr"
NOW_MS = int(NOW.timestamp() * 1000)


def documented_signature(
    secret: bytes, method: bytes, target: bytes, body: bytes, timestamp: bytes, nonce: bytes
) -> str:
    """docs/internal-auth.md, "The canonical string", written out again on purpose."""
    path, _, query = target.partition(b"?")
    content = hashlib.sha256(body).hexdigest().encode()
    fields = [b"HFT-AUTH-V1", method, path, query, timestamp, nonce, content]
    return hmac.new(secret, b"\n".join(fields), hashlib.sha256).hexdigest()


def runtime(venue: InternalVenue | None = None, key_id: str = KEY_ID) -> ServiceRuntime:
    rt = ServiceRuntime(SERVICE, None)
    rt.keys = KeySet(ring_of(SERVICE.name, record(key_id, SECRET)), venue or rt.venue, SERVICE)
    return rt


def split(data: bytes) -> tuple[bytes, bytes, dict[bytes, list[bytes]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        headers.setdefault(name.lower(), []).append(value)
    return method, target, headers, body


def one(headers: dict[bytes, list[bytes]], name: bytes) -> bytes:
    (value,) = headers[name.lower()]
    return value


# ----- the worked examples of the document


def doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def doc_examples() -> list[dict[str, str]]:
    examples = []
    for block in doc_blocks("hft-auth-example"):
        fields = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        examples.append(fields)
    return examples


def test_document_has_the_examples_and_marks_the_key_as_a_test_key() -> None:
    examples = doc_examples()
    assert [e["method"] for e in examples] == ["POST", "GET"]
    text = DOC.read_text(encoding="utf-8")
    assert "Test key, made up for this page" in text
    for e in examples:
        assert e["secret"].startswith("TEST-ONLY-")
        assert re.fullmatch(r"hft_[0-9a-f]{32}", e["key_id"])


@pytest.mark.parametrize("index", [0, 1])
def test_worked_example_recomputes_from_the_formula(index: int) -> None:
    e = doc_examples()[index]
    body = e["body"].encode("utf-8")
    assert hashlib.sha256(body).hexdigest() == e["content_sha256"]
    sig = documented_signature(
        e["secret"].encode(),
        e["method"].encode(),
        e["target"].encode(),
        body,
        e["timestamp"].encode(),
        e["nonce"].encode(),
    )
    assert sig == e["signature"]


def test_the_python_snippet_of_the_document_computes_the_examples() -> None:
    (snippet,) = doc_blocks("python")
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(DOC), "exec"), namespace)  # our own document, not input
    for e in doc_examples():
        sig = namespace["hft_auth_v1"](
            e["secret"].encode(),
            e["method"].encode(),
            e["target"].encode(),
            e["body"].encode(),
            int(e["timestamp"]),
            e["nonce"],
        )
        assert sig == e["signature"]


def test_canonical_string_block_matches_the_first_example() -> None:
    (canonical,) = doc_blocks("hft-auth-canonical")
    e = doc_examples()[0]
    path, _, query = e["target"].partition("?")
    assert canonical.rstrip("\n") == "\n".join(
        ["HFT-AUTH-V1", e["method"], path, query, e["timestamp"], e["nonce"], e["content_sha256"]]
    )


@pytest.mark.parametrize("index", [0, 1])
def test_sidecar_reproduces_the_worked_example_byte_for_byte(index: int) -> None:
    e = doc_examples()[index]
    venue = InternalVenue(nonce_source=lambda n: bytes.fromhex(e["nonce"]))
    rt = ServiceRuntime(SERVICE, None)
    at = datetime.fromtimestamp(int(e["timestamp"]) / 1000, UTC)
    rec = make_record(
        e["key_id"],
        e["secret"],
        created_at=at - timedelta(days=1),
        expires_at=at + timedelta(days=1),
        permissions=PERMS,
    )
    rt.keys = KeySet(ring_of(SERVICE.name, rec, now=at), venue, SERVICE)
    path, _, query = e["target"].encode().partition(b"?")
    data = rt.prepare(
        e["method"].encode(),
        path,
        query,
        encode_request_headers([]),
        e["body"].encode(),
        int(e["timestamp"]) / 1000,
    )
    method, target, headers, body = split(data)
    assert (method, target, body) == (
        e["method"].encode(),
        e["target"].encode(),
        e["body"].encode(),
    )
    assert one(headers, b"X-Auth-Key-Id") == e["key_id"].encode()
    assert one(headers, b"X-Auth-Timestamp") == e["timestamp"].encode()
    assert one(headers, b"X-Auth-Nonce") == e["nonce"].encode()
    assert one(headers, b"X-Auth-Content-SHA256") == e["content_sha256"].encode()
    assert one(headers, b"X-Auth-Signature") == e["signature"].encode()


# ----- properties


_SEGMENT = st.text(
    st.characters(codec="utf-8", exclude_characters="/?#%\x7f", min_codepoint=0x21),
    min_size=1,
    max_size=8,
)
_PARAM = st.tuples(
    st.text(st.characters(codec="utf-8", min_codepoint=0x20), min_size=1, max_size=6),
    st.text(st.characters(codec="utf-8", min_codepoint=0x20), max_size=10),
)
_RAW = st.text(
    st.characters(codec="utf-8", min_codepoint=0x21, exclude_characters="\x7f#&="),
    max_size=8,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, bytes]:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
    segments = draw(st.lists(_SEGMENT, min_size=1, max_size=4))
    # Raw unicode in the path: the sidecar percent-encodes it and must sign what it sends.
    path = ("/" + "/".join(segments)).encode("utf-8")
    if draw(st.booleans()):
        params = draw(st.lists(_PARAM, max_size=5))
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in params).encode()
    else:  # raw unicode values: percent-encoded by the sidecar, which signs what it sends
        raw = draw(st.lists(st.tuples(_RAW, _RAW), max_size=5))
        query = "&".join(f"{k}={v}" for k, v in raw).encode()
    body_kind = draw(st.sampled_from(["empty", "json", "bytes"]))
    if body_kind == "json":
        body = json.dumps(draw(_JSON), ensure_ascii=False).encode()
    elif body_kind == "bytes":
        body = draw(st.binary(min_size=1, max_size=64))
    else:
        body = b""
    return method, path, query, body


@settings(max_examples=300, deadline=None)
@given(request=requests(), now_ms=st.integers(NOW_MS - 80_000_000, NOW_MS + 29 * 86_400_000))
def test_property_prepared_request_verifies_under_the_documented_formula(
    request: tuple[bytes, bytes, bytes, bytes], now_ms: int
) -> None:
    method, path, query, body = request
    rt = runtime()
    data = rt.prepare(method, path, query, encode_request_headers([]), body, now_ms / 1000)
    sent_method, target, headers, sent_body = split(data)
    assert sent_method == method and sent_body == body
    assert target.isascii() and b"\n" not in target
    timestamp = one(headers, b"X-Auth-Timestamp")
    nonce = one(headers, b"X-Auth-Nonce")
    assert re.fullmatch(rb"[1-9][0-9]*", timestamp)
    assert re.fullmatch(rb"[0-9a-f]{32}", nonce)
    assert one(headers, b"X-Auth-Key-Id") == KEY_ID.encode()
    assert one(headers, b"X-Auth-Content-SHA256") == hashlib.sha256(body).hexdigest().encode()
    expected = documented_signature(SECRET.encode(), method, target, body, timestamp, nonce)
    assert one(headers, b"X-Auth-Signature") == expected.encode()

    # The simulator's verifier, written independently from the document, agrees.
    sent_path, _, sent_query = target.partition(b"?")
    verdict = verify_internal(
        method=method,
        path=sent_path,
        query=sent_query,
        headers={
            name: [v.decode() for v in headers[name.lower().encode()]]
            for name in (
                "X-Auth-Key-Id",
                "X-Auth-Timestamp",
                "X-Auth-Nonce",
                "X-Auth-Content-SHA256",
                "X-Auth-Signature",
            )
        },
        body=sent_body,
        keys={KEY_ID: InternalKey(KEY_ID, SECRET.encode())},
        revoked=frozenset(),
        now_ms=int(timestamp),
    )
    assert isinstance(verdict, InternalAccepted), verdict


def test_every_attempt_has_a_fresh_nonce() -> None:
    rt = runtime()
    nonces = set()
    for _ in range(50):
        data = rt.prepare(
            b"POST", b"/v1/x", b"", encode_request_headers([]), b"{}", NOW.timestamp()
        )
        nonces.add(one(split(data)[2], b"X-Auth-Nonce"))
    assert len(nonces) == 50


def test_engine_sent_auth_headers_are_replaced_not_forwarded() -> None:
    spoofed = [
        (b"X-Auth-Key-Id", b"hft_ffffffffffffffffffffffffffffffff"),
        (b"x-auth-signature", b"00" * 32),
        (b"X-Auth-Nonce", b"00" * 16),
        (b"X-Auth-Timestamp", b"1"),
        (b"X-AUTH-CONTENT-SHA256", b"00" * 32),
        (b"X-Trace", b"keep-me"),
    ]
    assert {n.lower() for n, _ in spoofed[:5]} <= REQUEST_DROP
    data = runtime().prepare(
        b"GET", b"/v1/positions", b"", encode_request_headers(spoofed), b"", NOW.timestamp()
    )
    _, _, headers, _ = split(data)
    assert headers[b"x-auth-key-id"] == [KEY_ID.encode()]
    assert len(headers[b"x-auth-signature"]) == 1
    assert headers[b"x-auth-signature"] != [b"00" * 32]
    assert headers[b"x-trace"] == [b"keep-me"]


def test_bare_question_mark_is_not_sent_and_empty_query_signs_an_empty_line() -> None:
    data = runtime().prepare(
        b"GET", b"/v1/positions", b"", encode_request_headers([]), b"", NOW.timestamp()
    )
    _, target, headers, _ = split(data)
    assert target == b"/v1/positions"
    expected = documented_signature(
        SECRET.encode(),
        b"GET",
        b"/v1/positions",
        b"",
        one(headers, b"X-Auth-Timestamp"),
        one(headers, b"X-Auth-Nonce"),
    )
    assert one(headers, b"X-Auth-Signature") == expected.encode()


def test_moving_bytes_between_path_and_query_changes_the_signature() -> None:
    """``/a?b=1`` and ``/a%3Fb=1`` must not share a signature (docs: unambiguous fields)."""
    fixed = InternalVenue(nonce_source=lambda n: b"\x01" * n)
    rt = runtime(fixed)
    first = rt.prepare(b"GET", b"/a", b"b=1", encode_request_headers([]), b"", NOW.timestamp())
    second = rt.prepare(b"GET", b"/a%3Fb=1", b"", encode_request_headers([]), b"", NOW.timestamp())
    sig_a = one(split(first)[2], b"X-Auth-Signature")
    sig_b = one(split(second)[2], b"X-Auth-Signature")
    assert sig_a != sig_b


def test_newline_in_a_field_is_refused_by_the_signer() -> None:
    rt = runtime()
    assert rt.keys is not None
    signer = rt.keys.signer_for(NOW.timestamp())
    with pytest.raises(SigningError):
        signer.sign(b"GET", b"/a\nb", b"", b"", 1)
    with pytest.raises(SigningError):
        signer.sign(b"GET", b"/a", b"x=1\n", b"", 1)


@pytest.mark.parametrize(
    "key_id", ["vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zv", "hft_ABCDEF", "hft_" + "0" * 31]
)
def test_key_id_must_be_ours(key_id: str) -> None:
    with pytest.raises(SigningError, match="hft_<32 hex>"):
        runtime(key_id=key_id)


def test_non_hmac_key_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.proxy.helpers import pem_of

    rt = ServiceRuntime(SERVICE, None)
    with pytest.raises(SigningError, match="hmac-sha256"):
        KeySet(
            ring_of(
                SERVICE.name,
                record(KEY_ID, pem_of(ed25519.Ed25519PrivateKey.generate()), "ed25519"),
            ),
            rt.venue,
            SERVICE,
        )


# ----- classifier


def _refusal(code: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": "whatever"}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"ok":true}', None),
        (204, b"", None),
        (401, _refusal("unknown_key"), Rejection.KEY_REJECTED),
        (401, _refusal("revoked_key"), Rejection.KEY_REJECTED),
        (401, _refusal("bad_signature"), Rejection.BAD_SIGNATURE),
        (401, _refusal("stale_timestamp"), Rejection.CLOCK_OR_NONCE),
        (401, _refusal("replayed_nonce"), Rejection.CLOCK_OR_NONCE),
        (429, _refusal("rate_limited"), Rejection.RATE_LIMITED),
        (429, b"Too Many Requests", Rejection.RATE_LIMITED),
        (400, _refusal("malformed_auth"), Rejection.OTHER),
        # An unknown 401 is not a definitive "key not accepted": no fallback re-sign.
        (401, b"<html>401 Authorization Required</html>", Rejection.OTHER),
        (401, _refusal("something_new"), Rejection.OTHER),
        (403, b'{"error":"forbidden"}', Rejection.OTHER),
        (502, b"", Rejection.OTHER),
    ],
)
def test_classifier(status: int, body: bytes, expected: Rejection | None) -> None:
    assert VENUES["internal"].classify(status, body) is expected


def test_registry_and_no_time_endpoint() -> None:
    venue = VENUES["internal"]
    assert venue.time_endpoint is None
    assert venue.credential_headers == {
        b"x-auth-key-id",
        b"x-auth-timestamp",
        b"x-auth-nonce",
        b"x-auth-content-sha256",
        b"x-auth-signature",
    }
