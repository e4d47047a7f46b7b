"""Shared fixtures: test keys are made here, never committed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def vectors() -> list[dict[str, Any]]:
    data = json.loads((FIXTURES / "published_vectors.json").read_text())
    return list(data["vectors"])


@pytest.fixture(scope="session")
def seed_policy_yaml() -> str:
    return (FIXTURES / "seed_policy.yaml").read_text()
