"""verify_binance, the pure core: no loop, no socket."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.simulator.base import KeySetError
from proxy.simulator.binance import (
    BinanceAccepted,
    BinanceError,
    FixedWindowCounter,
    parse_binance_keys,
    verify_binance,
)
from tests.simulator.support import (
    DOC_API_KEY,
    DOC_MIXED_BODY,
    DOC_MIXED_QUERY,
    DOC_MIXED_SIGNATURE,
    DOC_PAYLOAD,
    DOC_SECRET,
    DOC_SIGNATURE,
    DOC_TIMESTAMP,
    ED25519_API_KEY,
    HMAC_API_KEY,
    HMAC_SECRET,
    NOW_MS,
    RSA_API_KEY,
    keys_document,
    sign_hmac,
    signed,
)

KEYS = parse_binance_keys(keys_document()["binance"])


def verify(
    query: str = "",
    body: str = "",
    *,
    api_key: str | None = HMAC_API_KEY,
    now: int = NOW_MS,
) -> BinanceAccepted | BinanceError:
    return verify_binance(
        api_key=api_key, query=query.encode(), body=body.encode(), keys=KEYS, now_ms=now
    )


def code_of(result: BinanceAccepted | BinanceError) -> int | str:
    return result.code if isinstance(result, BinanceError) else "ok"


def params(ts: int = NOW_MS, extra: str = "") -> str:
    return f"symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=100{extra}&timestamp={ts}"


# ----- Binance's published examples


def test_published_vector_as_body_verifies_at_its_own_time() -> None:
    result = verify(
        body=f"{DOC_PAYLOAD}&signature={DOC_SIGNATURE}", api_key=DOC_API_KEY, now=DOC_TIMESTAMP
    )
    assert isinstance(result, BinanceAccepted), result
    assert result.params["symbol"] == "LTCBTC"
    assert result.recv_window == 5000
    assert result.timestamp == DOC_TIMESTAMP
    assert "signature" not in result.params


def test_published_vector_as_query_verifies() -> None:
    result = verify(
        f"{DOC_PAYLOAD}&signature={DOC_SIGNATURE}", api_key=DOC_API_KEY, now=DOC_TIMESTAMP
    )
    assert isinstance(result, BinanceAccepted), result


def test_published_mixed_example_concatenates_query_and_body_without_ampersand() -> None:
    result = verify(
        DOC_MIXED_QUERY,
        f"{DOC_MIXED_BODY}&signature={DOC_MIXED_SIGNATURE}",
        api_key=DOC_API_KEY,
        now=DOC_TIMESTAMP + 10,
    )
    assert isinstance(result, BinanceAccepted), result
    assert result.params["timeInForce"] == "GTC"
    assert result.params["quantity"] == "1"


def test_published_vector_is_stale_at_any_later_time() -> None:
    result = verify(
        f"{DOC_PAYLOAD}&signature={DOC_SIGNATURE}", api_key=DOC_API_KEY, now=DOC_TIMESTAMP + 5001
    )
    assert code_of(result) == -1021


def test_published_vector_with_one_byte_changed_is_rejected() -> None:
    tampered = DOC_PAYLOAD.replace("price=0.1", "price=0.2")
    result = verify(f"{tampered}&signature={DOC_SIGNATURE}", api_key=DOC_API_KEY, now=DOC_TIMESTAMP)
    assert result == BinanceError(400, -1022, "Signature for this request is not valid.")


def test_percent_encoded_non_ascii_is_signed_as_sent() -> None:
    """Binance signs the percent-encoded bytes as sent (its non-ASCII symbol example)."""
    payload = (
        "symbol=%EF%BC%91%EF%BC%92%EF%BC%93%EF%BC%94%EF%BC%95%EF%BC%96&side=BUY&type=LIMIT"
        "&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
    )
    sig = "e1353ec6b14d888f1164ae9af8228a3dbd508bc82eb867db8ab6046442f33ef3"
    result = verify(f"{payload}&signature={sig}", api_key=DOC_API_KEY, now=DOC_TIMESTAMP)
    assert isinstance(result, BinanceAccepted), result
    assert result.params["symbol"] == "１２３４５６"


# ----- each key type, and the signature's encoding


@pytest.mark.parametrize("api_key", [HMAC_API_KEY, ED25519_API_KEY, RSA_API_KEY])
def test_each_algorithm_accepts_its_own_signature(api_key: str) -> None:
    result = verify(signed(params(), api_key), api_key=api_key)
    assert isinstance(result, BinanceAccepted), result
    assert result.key.api_key == api_key


@pytest.mark.parametrize("api_key", [ED25519_API_KEY, RSA_API_KEY])
def test_asymmetric_signature_from_another_key_is_rejected(api_key: str) -> None:
    other = RSA_API_KEY if api_key == ED25519_API_KEY else ED25519_API_KEY
    assert code_of(verify(signed(params(), other), api_key=api_key)) == -1022


def test_hmac_hex_case_is_ignored() -> None:
    p = params()
    assert code_of(verify(f"{p}&signature={sign_hmac(p.encode()).upper()}")) == "ok"


def test_asymmetric_signature_case_matters() -> None:
    query = signed(params(), ED25519_API_KEY)
    head, _, sig = query.rpartition("=")
    flipped = sig.swapcase()
    assert code_of(verify(f"{head}={flipped}", api_key=ED25519_API_KEY)) == -1022


def test_unencoded_base64_signature_is_read_with_unquote_not_form_decoding() -> None:
    """A raw '+' in the signature stays '+' (unquote, not unquote_plus)."""
    query = signed(params(), RSA_API_KEY)
    head, _, sig = query.rpartition("=")
    raw = urllib.parse.unquote(sig)
    assert code_of(verify(f"{head}={raw}", api_key=RSA_API_KEY)) == "ok"


# ----- the key header


def test_missing_key_header_is_2014() -> None:
    assert verify(signed(params()), api_key=None) == BinanceError(
        401, -2014, "API-key format invalid."
    )
    assert code_of(verify(signed(params()), api_key="  ")) == -2014


def test_unknown_key_is_2015() -> None:
    assert verify(signed(params()), api_key="nobody") == BinanceError(
        401, -2015, "Invalid API-key, IP, or permissions for action."
    )


# ----- signature presence and position


def test_missing_signature_is_1102_naming_it() -> None:
    assert verify(params()) == BinanceError(
        400,
        -1102,
        "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
    )
    assert code_of(verify(params() + "&signature=")) == -1102


def test_signature_in_body_of_a_mixed_request() -> None:
    query = "symbol=BTCUSDT&side=BUY"
    body = f"type=LIMIT&timeInForce=GTC&quantity=1&price=100&timestamp={NOW_MS}"
    sig = sign_hmac((query + body).encode())
    assert code_of(verify(query, f"{body}&signature={sig}")) == "ok"
    # The same signature over query + "&" + body is a different payload.
    wrong = sign_hmac(f"{query}&{body}".encode())
    assert code_of(verify(query, f"{body}&signature={wrong}")) == -1022


def test_signature_alone_in_body_signs_the_query() -> None:
    """Binance's RSA curl example: parameters in the query, signature as the only body field."""
    query = params()
    assert code_of(verify(query, f"signature={sign_hmac(query.encode())}")) == "ok"


def test_signature_must_be_the_last_parameter() -> None:
    p = params()
    sig = sign_hmac(p.encode())
    assert code_of(verify(f"signature={sig}&{p}")) == -1022
    # In the query while the body carries parameters: not last of totalParams.
    query, body = "symbol=BTCUSDT", f"timestamp={NOW_MS}"
    sig = sign_hmac((query + body).encode())
    assert code_of(verify(f"{query}&signature={sig}", body)) == -1022


# ----- parameters


def test_duplicate_parameter_is_1101() -> None:
    p = params() + "&side=SELL"
    assert verify(f"{p}&signature={sign_hmac(p.encode())}") == BinanceError(
        400, -1101, "Duplicate values for a parameter detected."
    )


def test_signature_sent_twice_is_1101() -> None:
    query = signed(params())
    sig = query.rpartition("=")[2]
    assert code_of(verify(query, f"signature={sig}")) == -1101


def test_query_wins_over_body_for_a_parameter_sent_in_both() -> None:
    """Binance: "If a parameter sent in both ... the query string parameter will be used"."""
    query, body = "side=BUY", f"side=SELL&timestamp={NOW_MS}"
    sig = sign_hmac((query + body).encode())
    result = verify(query, f"{body}&signature={sig}")
    assert isinstance(result, BinanceAccepted), result
    assert result.params["side"] == "BUY"


def test_non_utf8_parameter_is_1100() -> None:
    p = params() + "&x=%FF"
    assert code_of(verify(f"{p}&signature={sign_hmac(p.encode())}")) == -1100


# ----- timing security


@pytest.mark.parametrize("raw", ["", "abc", "-5", "1.5"])
def test_missing_or_malformed_timestamp_is_1102(raw: str) -> None:
    p = params().replace(f"timestamp={NOW_MS}", f"timestamp={raw}")
    result = verify(f"{p}&signature={sign_hmac(p.encode())}")
    assert result == BinanceError(
        400,
        -1102,
        "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
    )


def test_stale_timestamp_is_1021_outside_recv_window() -> None:
    stale = verify(signed(params(NOW_MS - 5001)))
    assert stale == BinanceError(
        400, -1021, "Timestamp for this request is outside of the recvWindow."
    )
    assert code_of(verify(signed(params(NOW_MS - 5000)))) == "ok"  # "<= recvWindow"


def test_ahead_timestamp_is_1021_ahead_message() -> None:
    ahead = verify(signed(params(NOW_MS + 1000)))
    assert ahead == BinanceError(
        400, -1021, "Timestamp for this request was 1000ms ahead of the server's time."
    )
    assert code_of(verify(signed(params(NOW_MS + 999)))) == "ok"  # "timestamp < serverTime + 1000"


def test_recv_window_widens_and_is_capped() -> None:
    assert code_of(verify(signed(params(NOW_MS - 20_000, "&recvWindow=30000")))) == "ok"
    assert code_of(verify(signed(params(NOW_MS - 20_000, "&recvWindow=10000")))) == -1021
    assert code_of(verify(signed(params(NOW_MS, "&recvWindow=60000")))) == "ok"
    capped = verify(signed(params(NOW_MS, "&recvWindow=60001")))
    assert capped == BinanceError(400, -1131, "recvWindow must be less than 60000")


def test_stale_request_reports_the_clock_before_the_signature() -> None:
    p = params(NOW_MS - 60_000)
    assert code_of(verify(f"{p}&signature={'0' * 64}")) == -1021


# ----- properties


_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8
)
_values = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # encodable


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        _names.filter(lambda n: n not in {"signature", "timestamp", "recvWindow"}),
        _values,
        max_size=6,
    ),
    st.integers(0, 300),
)
def test_any_hmac_signed_form_is_accepted_and_any_flip_is_not(
    fields: dict[str, str], flip_at: int
) -> None:
    encoded = urllib.parse.urlencode({**fields, "timestamp": str(NOW_MS)})
    assert code_of(verify(signed(encoded))) == "ok"
    # Flip one byte of the signed part: the request must not verify any more.
    position = flip_at % len(encoded)
    char = encoded[position]
    replacement = "0" if char != "0" else "1"
    tampered = encoded[:position] + replacement + encoded[position + 1 :]
    sig = sign_hmac(encoded.encode())
    assert code_of(verify(f"{tampered}&signature={sig}")) != "ok"


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200),
    st.binary(max_size=200),
    st.one_of(
        st.none(),
        st.sampled_from([HMAC_API_KEY, ED25519_API_KEY, RSA_API_KEY]),
        st.text(max_size=10),
    ),
    st.integers(min_value=0, max_value=2**63),
)
def test_junk_never_raises(query: bytes, body: bytes, api_key: str | None, now: int) -> None:
    result = verify_binance(api_key=api_key, query=query, body=body, keys=KEYS, now_ms=now)
    assert isinstance(result, BinanceAccepted | BinanceError)


# ----- keys document and counters


@pytest.mark.parametrize(
    ("entries", "path"),
    [
        ({}, "binance"),
        (["x"], "binance[0]"),
        ([{"algorithm": "hmac-sha256", "secret": "s"}], "binance[0].api_key"),
        ([{"api_key": "k", "algorithm": "md5", "secret": "s"}], "binance[0].algorithm"),
        ([{"api_key": "k", "algorithm": "hmac-sha256"}], "binance[0].secret"),
        ([{"api_key": "k", "algorithm": "ed25519", "public_key": "nope"}], "binance[0].public_key"),
        (
            [
                {"api_key": "k", "algorithm": "hmac-sha256", "secret": "s"},
                {"api_key": "k", "algorithm": "hmac-sha256", "secret": "t"},
            ],
            "binance[1].api_key",
        ),
    ],
)
def test_bad_keys_document_names_the_field(entries: object, path: str) -> None:
    with pytest.raises(KeySetError) as info:
        parse_binance_keys(entries)
    assert info.value.path == path


def test_public_key_of_the_wrong_type_is_refused() -> None:
    rsa_pem = next(e for e in keys_document()["binance"] if e["api_key"] == RSA_API_KEY)[
        "public_key"
    ]
    with pytest.raises(KeySetError, match="not an Ed25519 public key"):
        parse_binance_keys([{"api_key": "k", "algorithm": "ed25519", "public_key": rsa_pem}])


def test_key_repr_holds_no_secret() -> None:
    assert HMAC_SECRET not in repr(KEYS[HMAC_API_KEY])
    assert DOC_SECRET not in repr(parse_binance_keys(keys_document()["binance"]))


def test_fixed_window_counter_resets_on_the_window_boundary() -> None:
    counter = FixedWindowCounter(60_000)
    assert counter.add("ip", 120_000, 1) == 1
    assert counter.add("ip", 179_999, 20) == 21
    assert counter.peek("ip", 179_999) == 21
    assert counter.add("ip", 180_000, 1) == 1
    assert counter.peek("other", 180_000) == 0
