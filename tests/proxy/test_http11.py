"""The request-target check and percent-encoding (proxy.http11.normalize_target_part)."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.http11 import normalize_target_part

_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f]")  # the rule, as a reference


@given(st.binary(max_size=300))
@example(b"symbol=BTCUSDT&side=BUY")
@example(b"a b")
@example(b"a\x7fb")
@example(b"\x00")
@example(b"symbol=\xef\xbc\x91")
@example(b"\x80\xff~!")
def test_a_target_part_is_refused_exactly_when_it_holds_a_control_space_or_del(
    part: bytes,
) -> None:
    got = normalize_target_part(part)
    if _FORBIDDEN.search(part):
        assert got is None
        return
    assert got is not None and got.isascii()
    # Non-ASCII bytes percent-encoded (uppercase hex), everything else kept as it was.
    decoded = re.sub(rb"%([89A-F][0-9A-F])", lambda m: bytes((int(m.group(1), 16),)), got)
    expected = re.sub(rb"%([89A-F][0-9A-F])", lambda m: bytes((int(m.group(1), 16),)), part)
    assert decoded == expected
    assert len(got) == len(part) + 2 * sum(b >= 0x80 for b in part)
