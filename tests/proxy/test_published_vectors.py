"""Every vector in tests/fixtures/published_vectors.json is reproduced, enforced here.

The per-venue signer tests do the reproducing; this module makes sure none is missing
and that each one really checks each vector's expected values, so the claim "every
published vector passes" cannot silently erode when a vector or a venue is added.

Convention (each venue's test module must follow it):

- A vector whose ``venue`` is ``V`` is reproduced by ``tests/proxy/test_V_signer.py``.
- That module defines one or more test functions whose name contains ``published`` and
  whose only parameter is ``vectors`` (the whole list, as the ``vectors`` fixture of
  tests/conftest.py gives it), e.g. ``def test_published_vectors(vectors)``. They pick
  their venue's vectors themselves and assert that the sidecar's signer reproduces every
  ``expected_*`` value byte for byte. Every venue module written so far already does.

What is checked here, for every vector and every ``expected_*`` field of it:

1. the venue's module exists and has at least one such function;
2. with the fixture as published, all of them pass (the claim itself);
3. with that one field altered (one character changed, same alphabet and length, the rest
   of the fixture untouched), at least one of them fails with an AssertionError: proof
   that some test compares against this very value rather than skipping it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import FIXTURES

PublishedCheck = Callable[[list[dict[str, Any]]], object]


def load_vectors() -> list[dict[str, Any]]:
    import json

    data = json.loads((FIXTURES / "published_vectors.json").read_text())
    return list(data["vectors"])


def module_for(venue: str) -> ModuleType:
    name = f"tests.proxy.test_{venue}_signer"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        pytest.fail(f"published vectors of venue {venue!r} need {name.replace('.', '/')}.py")


def published_checks(module: ModuleType) -> list[tuple[str, PublishedCheck]]:
    """The module's ``test_*published*(vectors)`` functions, by the convention above."""
    found = []
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or "published" not in name:
            continue
        if fn.__module__ != module.__name__:
            continue
        if inspect.iscoroutinefunction(fn):
            continue
        if list(inspect.signature(fn).parameters) == ["vectors"]:
            found.append((name, fn))
    return found


def altered(value: str) -> str:
    """``value`` with its first letter or digit changed to another of the same class, so
    hex stays hex and base64 stays base64 of the same length."""
    for i, ch in enumerate(value):
        if ch.isdigit():
            repl = "1" if ch != "1" else "2"
        elif ch.islower():
            repl = "a" if ch != "a" else "b"
        elif ch.isupper():
            repl = "A" if ch != "A" else "B"
        else:
            continue
        return value[:i] + repl + value[i + 1 :]
    raise AssertionError(f"cannot alter {value!r}")


VECTORS = load_vectors()
CASES = [
    pytest.param(index, field, id=f"{v['venue']}-{index}-{field}")
    for index, v in enumerate(VECTORS)
    for field in sorted(v)
    if field.startswith("expected_")
]


def test_every_vector_has_an_expected_value() -> None:
    assert VECTORS
    for v in VECTORS:
        assert any(k.startswith("expected_") for k in v), v
        assert isinstance(v.get("venue"), str) and v["venue"], v


@pytest.mark.parametrize("venue", sorted({v["venue"] for v in VECTORS}))
def test_every_venue_with_vectors_has_passing_checks(venue: str) -> None:
    checks = published_checks(module_for(venue))
    assert checks, (
        f"tests/proxy/test_{venue}_signer.py has no test_*published*(vectors) function "
        "(see the convention at the top of this module)"
    )
    for _, check in checks:
        check([dict(v) for v in VECTORS])


@pytest.mark.parametrize(("index", "field"), CASES)
def test_each_expected_value_is_actually_checked(index: int, field: str) -> None:
    vector = VECTORS[index]
    checks = published_checks(module_for(vector["venue"]))
    assert checks
    tampered = [dict(v) for v in VECTORS]
    tampered[index][field] = altered(str(vector[field]))
    caught = []
    for name, check in checks:
        try:
            check(tampered)
        except AssertionError:
            caught.append(name)
    assert caught, (
        f"no test_*published*(vectors) function of tests/proxy/test_{vector['venue']}_signer.py "
        f"noticed a wrong {field} in vector #{index}: nothing reproduces it"
    )


def test_alteration_keeps_the_alphabet() -> None:
    assert altered("c8db56") == "a8db56"
    assert altered("1abc") == "2abc"
    with pytest.raises(AssertionError):
        altered("+/==")
    assert altered("4/dpx==") == "1/dpx=="
    assert altered("aX") == "bX"
