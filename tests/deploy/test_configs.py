"""The sample configs in deploy/ pass ``authproxy check-config``: the systemd one, and the
Kubernetes ConfigMap as each overlay renders it; each carries the seed's policy block."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import DEPLOY, OVERLAYS, REPO, by_kind, render

AUTHPROXY = Path(sys.executable).parent / "authproxy"
SEED_POLICY = yaml.safe_load((REPO / "tests" / "fixtures" / "seed_policy.yaml").read_text())


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AUTHPROXY), "check-config", str(path)], capture_output=True, text=True, check=False
    )


def _assert_valid(path: Path) -> dict[str, object]:
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    effective: dict[str, object] = json.loads(result.stdout)
    raw = yaml.safe_load(path.read_text())
    assert raw["api_key_policy"] == SEED_POLICY["api_key_policy"]
    return effective


def test_the_systemd_sample_config_is_valid() -> None:
    effective = _assert_valid(DEPLOY / "systemd" / "authproxy.yaml")
    assert effective["memory"] == {"require_memory_lock": True, "lock_all": True}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_of_each_overlay_is_valid(overlay: str, tmp_path: Path) -> None:
    configmap = by_kind(render(overlay), "ConfigMap")
    path = tmp_path / "authproxy.yaml"
    path.write_text(configmap["data"]["authproxy.yaml"])
    effective = _assert_valid(path)
    assert effective["memory"] == {"require_memory_lock": True, "lock_all": False}


def test_check_config_refuses_a_broken_sample(tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / "authproxy.yaml").read_text()
    path = tmp_path / "authproxy.yaml"
    path.write_text(text.replace("venue: binance", "venue: nowhere", 1))
    result = check_config(path)
    assert result.returncode == 2
    assert "services.binance_spot_trading.venue" in result.stderr
