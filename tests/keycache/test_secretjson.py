"""keycache.secretjson parses exactly as json.loads does (values, errors)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from keycache import secretjson

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(_json_values, st.booleans())
def test_same_values_as_json(value: Any, ensure_ascii: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert secretjson.loads(text) == json.loads(text)


def _same(got: Any, expected: Any) -> bool:
    """Equal, with NaN counted equal to NaN: json.loads accepts a bare ``NaN``."""
    if isinstance(got, float) and isinstance(expected, float) and math.isnan(expected):
        return math.isnan(got)
    return bool(got == expected)


@given(st.text(max_size=40))
@example("NaN")  # found by hypothesis in CI: nan != nan made the old comparison fail
@example("-Infinity")
def test_same_verdict_on_arbitrary_text(text: str) -> None:
    for doc in (text, f'"{text}"', f'{{"k": "{text}"}}'):
        try:
            expected: Any = json.loads(doc)
        except (ValueError, RecursionError) as exc:
            with pytest.raises(type(exc)):
                secretjson.loads(doc)
        else:
            assert _same(secretjson.loads(doc), expected)


@pytest.mark.parametrize(
    "doc",
    [
        r'"\ud83d\ude00 and \u00e9 \n\t\"\\\/\b\f\r"',
        r'"\ud800 lone high"',
        r'"\udc00 lone low"',
        r'"\ud800\u0041"',
        '"plain"',
        '""',
    ],
)
def test_escapes_and_surrogates(doc: str) -> None:
    assert secretjson.loads(doc) == json.loads(doc)


@pytest.mark.parametrize(
    "doc", ['"unterminated', r'"bad \x"', r'"\u12"', r'"\u12g4"', '"ctl \x01"', r'"\"']
)
def test_refuses_what_json_refuses(doc: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(doc)
    with pytest.raises(json.JSONDecodeError):
        secretjson.loads(doc)


def test_object_pairs_hook_sees_pairs_in_order() -> None:
    assert secretjson.loads('{"b": "x\\ny", "a": 1}', object_pairs_hook=list) == [
        ("b", "x\ny"),
        ("a", 1),
    ]
