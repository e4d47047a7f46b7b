"""What a SIGHUP reload may change, decided over two compiled configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy.config import Config, load_config
from proxy.demo import binance_service, sidecar_config
from proxy.reload import plan, refusal


def _config(tmp_path: Path, services: dict[str, dict[str, Any]], **top: Any) -> Config:
    keys, kek = tmp_path / "keys.enc", tmp_path / "kek.key"
    keys.write_bytes(b"x")
    kek.write_bytes(b"k" * 32)
    kek.chmod(0o600)
    cfg = sidecar_config(keys, kek, services)
    for k, v in top.items():
        cfg[k] = v if not isinstance(v, dict) else {**cfg.get(k, {}), **v}
    path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_services_are_kept_rebuilt_added_or_removed(tmp_path: Path) -> None:
    a = binance_service(9443, None, "/a")  # type: ignore[arg-type]
    b = binance_service(9443, None, "/b")  # type: ignore[arg-type]
    c = binance_service(9443, None, "/c")  # type: ignore[arg-type]
    old = _config(tmp_path, {"sa": a, "sb": b, "sc": c})
    new = _config(
        tmp_path,
        {
            "sa": a,  # unchanged
            "sb": {**b, "rate_limit": {"requests_per_second": 5}},  # same pool, new limits
            "sc": {**c, "upstream": "https://127.0.0.1:9444"},  # new upstream: new pool
            "sd": binance_service(9443, None, "/d"),  # type: ignore[arg-type]
        },
    )
    assert refusal(old, new) is None
    p = plan(old, new)
    assert (p.unchanged, p.rebuilt, p.added, p.removed) == (
        {"sa"},
        {"sb"},
        {"sc", "sd"},
        frozenset(),
    )
    assert plan(new, old).removed == {"sd"}


def test_listeners_and_key_store_need_a_restart(tmp_path: Path) -> None:
    svc = {"sa": binance_service(9443, None, "/a")}  # type: ignore[arg-type]
    old = _config(tmp_path, svc)
    moved = _config(tmp_path, svc, listen={"address": "127.0.0.1", "port": 18081})
    reason = refusal(old, moved)
    assert reason is not None and "listen" in reason
    assert refusal(old, _config(tmp_path, svc)) is None
