"""``authproxy keys import/list`` against the encrypted key file, as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from keycache.filestore import KeyFile
from proxy.demo import binance_service, sidecar_config
from tests.proxy.helpers import random_hmac_secret, record


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _config(tmp_path: Path) -> Path:
    kek = tmp_path / "kek.key"
    KeyFile.create_kek_file(kek)
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    cfg = sidecar_config(
        tmp_path / "keys.enc", kek, {"binance_spot": binance_service(443, str(ca), "/binance")}
    )
    path = tmp_path / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_import_then_list_shows_metadata_never_secrets(tmp_path: Path) -> None:
    config = _config(tmp_path)
    secrets_seen = []
    for n in range(2):
        secret = random_hmac_secret()
        secrets_seen.append(secret)
        out = _cli(
            "keys",
            "import",
            "--config",
            str(config),
            "--service",
            "binance_spot",
            stdin=json.dumps(record(f"key-{n}", secret)),
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {
            "service": "binance_spot",
            "version": n + 1,
            "key_id": f"key-{n}",
        }
    out = _cli("keys", "list", "--config", str(config))
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [(k["version"], k["key_id"]) for k in listed] == [(1, "key-0"), (2, "key-1")]
    for secret in secrets_seen:
        assert secret not in out.stdout and secret not in out.stderr
    assert (tmp_path / "keys.enc").stat().st_mode & 0o777 == 0o600


def test_import_refuses_bad_checksum_duplicate_and_unknown_service(tmp_path: Path) -> None:
    config = _config(tmp_path)
    secret = random_hmac_secret()
    good = record("key-a", secret)
    bad = dict(good, checksum="0" * 64)
    out = _cli(
        "keys",
        "import",
        "--config",
        str(config),
        "--service",
        "binance_spot",
        stdin=json.dumps(bad),
    )
    assert out.returncode == 3
    assert "checksum" in out.stderr and secret not in out.stderr

    assert (
        _cli(
            "keys",
            "import",
            "--config",
            str(config),
            "--service",
            "binance_spot",
            stdin=json.dumps(good),
        ).returncode
        == 0
    )
    dup = _cli(
        "keys",
        "import",
        "--config",
        str(config),
        "--service",
        "binance_spot",
        stdin=json.dumps(good),
    )
    assert dup.returncode == 3 and "key-a" in dup.stderr

    unknown = _cli(
        "keys", "import", "--config", str(config), "--service", "nope", stdin=json.dumps(good)
    )
    assert unknown.returncode == 2 and "no service named nope" in unknown.stderr

    junk = _cli(
        "keys", "import", "--config", str(config), "--service", "binance_spot", stdin="not json"
    )
    assert junk.returncode == 2


def test_kek_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "kek.key").chmod(0o644)
    out = _cli(
        "keys",
        "import",
        "--config",
        str(config),
        "--service",
        "binance_spot",
        stdin=json.dumps(record("k", random_hmac_secret())),
    )
    assert out.returncode == 3
    assert "kek.key" in out.stderr and "644" in out.stderr
