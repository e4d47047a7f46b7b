from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import parse_config
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHARED_SEED = REPO.parent / "shared" / "seed" / "api-key-management-hft.txt"

BASE = """\
listen:   {address: 127.0.0.1, port: 8080}
admin:    {address: 127.0.0.1, port: 9901}
keystore:
  backend: file
  file: {path: keys.enc, kek_file: kek.key}
  vault:
    address: https://vault.hft-system.local:8200
    mount_path: secret
    path_prefix: api_keys
    tls_verify: true
    tls_ca_cert: /etc/pki/ca-trust/vault-ca.crt
    auth: {method: token, token_file: /run/secrets/vault-token}
    poll_interval_ms: 1000
services:
  binance_spot_trading:
    venue: binance
    key_type: exchange_api
    upstream: https://api.binance.com
    route: /binance
    ca_file: null
    timeout_ms: 2000
"""


def test_design_example_with_seed_policy_verbatim(seed_policy_yaml: str) -> None:
    cfg = parse_config(BASE + seed_policy_yaml, source=Path("/etc/authproxy/authproxy.yaml"))
    svc = cfg.services["binance_spot_trading"]
    assert svc.upstream_host == "api.binance.com" and svc.upstream_port == 443
    assert svc.host_header == "api.binance.com"
    assert cfg.keystore.file is not None
    assert cfg.keystore.file.path == Path("/etc/authproxy/keys.enc")
    policy = cfg.api_key_policy
    assert policy.global_settings.rotation_overlap_hours == 24
    assert policy.key_types["exchange_api"].rate_limits.requests_per_minute == 5000
    assert policy.key_types["internal_service"].rate_limits.requests_per_minute is None
    assert policy.key_types["broker_api"].permissions == (
        "read_positions",
        "read_executions",
        "submit_orders",
    )
    assert policy.rotation.schedule == "0 2 * * 0"
    assert policy.audit.syslog_facility == "LOCAL5"
    assert policy.storage["hsm_config"]["type"] == "thales"


def test_fixture_is_the_seed_block_verbatim(seed_policy_yaml: str) -> None:
    """The fixture and the demo's copy are byte-for-byte the seed's block."""
    assert (REPO / "proxy" / "seed_policy.yaml").read_text() == seed_policy_yaml
    if SHARED_SEED.exists():  # beside a checkout; not on an end user's machine
        text = SHARED_SEED.read_text()
        assert seed_policy_yaml in text


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (
            lambda c: c["services"]["binance_spot_trading"].update(upstream="http://x"),
            "services.binance_spot_trading.upstream",
            "must be an https URL",
        ),
        (
            lambda c: c["services"]["binance_spot_trading"].update(venue="nasdaq"),
            "services.binance_spot_trading.venue",
            "must be one of",
        ),
        (
            lambda c: c["services"]["binance_spot_trading"].update(key_type="master"),
            "services.binance_spot_trading.key_type",
            "must be one of api_key_policy.key_types",
        ),
        (
            lambda c: c["services"]["binance_spot_trading"].update(route="/a/b"),
            "services.binance_spot_trading.route",
            "one path segment",
        ),
        (
            lambda c: c["services"]["binance_spot_trading"].update(timeout_ms=0),
            "services.binance_spot_trading.timeout_ms",
            "must be between",
        ),
        (
            lambda c: c["services"]["binance_spot_trading"].update(secret_key="x"),
            "services.binance_spot_trading.secret_key",
            "unknown field",
        ),
        (lambda c: c["listen"].update(port=70000), "listen.port", "must be between"),
        (lambda c: c["admin"].update(address="0.0.0.0"), "admin.address", "loopback only"),
        (lambda c: c["keystore"].update(backend="s3"), "keystore.backend", "must be file or vault"),
        (
            lambda c: c["keystore"]["file"].update(passphrase_env="P"),
            "keystore.file",
            "exactly one of",
        ),
        (
            lambda c: c["api_key_policy"]["key_types"]["exchange_api"].pop("validity_days"),
            "api_key_policy.key_types.exchange_api.validity_days",
            "is required",
        ),
        (lambda c: c.pop("services"), "services", "is required"),
        (
            lambda c: c["services"]["binance_spot_trading"].update(on_limit={"wait_ms": 70_000}),
            "services.binance_spot_trading.on_limit.wait_ms",
            "must be between",
        ),
        (
            lambda c: c["services"]["binance_spot_trading"].update(allow=["/api/v3/klines"]),
            "services.binance_spot_trading.allow[0]",
            "METHOD /path",
        ),
        (lambda c: c["listen"].update(address="0.0.0.0"), "listen.address", "allow_remote"),
        (lambda c: c["listen"].update(allow_uids=[1000]), "listen.allow_uids", "unix socket"),
        (
            lambda c: c["listen"].update(address="unix:/run/a.sock", allow_gids=[]),
            "listen.allow_gids",
            "non-empty list",
        ),
        (lambda c: c["listen"].update(max_connections=0), "listen.max_connections", "between"),
        (
            lambda c: c.update(clients={"risk": {"token_file": "/nonexistent/token"}}),
            "clients.risk.token_file",
            "",
        ),
    ],
)
def test_invalid_field_is_named(seed_policy_yaml: str, mutate, path: str, reason: str) -> None:
    raw = yaml.safe_load(BASE + seed_policy_yaml)
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    assert info.value.path == path
    assert reason in info.value.reason


def test_duplicate_keys_refused(seed_policy_yaml: str) -> None:
    text = BASE.replace("    timeout_ms: 2000\n", "    timeout_ms: 2000\n    timeout_ms: 10\n")
    with pytest.raises(ConfigError, match="duplicate key 'timeout_ms'"):
        parse_config(text + seed_policy_yaml)


def test_duplicate_route_refused(seed_policy_yaml: str) -> None:
    raw = yaml.safe_load(BASE + seed_policy_yaml)
    raw["services"]["other"] = dict(raw["services"]["binance_spot_trading"])
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    assert info.value.path == "services.other.route"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli(tmp_path: Path, seed_policy_yaml: str) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BASE + seed_policy_yaml)
    out = _cli("check-config", str(good))
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert effective["services"]["binance_spot_trading"]["recv_window_ms"] == 5000
    assert effective["keystore"]["file"]["kek_file"] == str(tmp_path / "kek.key")

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        BASE.replace("https://api.binance.com", "ftp://api.binance.com") + seed_policy_yaml
    )
    out = _cli("check-config", str(bad))
    assert out.returncode == 2
    assert "services.binance_spot_trading.upstream: must be an https URL" in out.stderr


def test_state_dir_is_optional_and_resolved_against_the_config(seed_policy_yaml: str) -> None:
    assert parse_config(BASE + seed_policy_yaml).state_dir is None
    cfg = parse_config(
        BASE + "state_dir: state\n" + seed_policy_yaml, source=Path("/etc/authproxy/a.yaml")
    )
    assert cfg.state_dir == Path("/etc/authproxy/state")


# -- ingress ---------------------------------------------------------------------------------

INGRESS = """\
ingress:
  service: risk_engine_service
  address: 127.0.0.1
  port: 8443
  upstream: http://localhost:9000
  accept: [order_router_service, position_service]
"""


def test_ingress_mapping_defaults_and_normalized_upstream(seed_policy_yaml: str) -> None:
    cfg = parse_config(BASE + INGRESS + seed_policy_yaml)
    (ing,) = cfg.ingress
    assert ing.service == "risk_engine_service"
    assert (ing.address, ing.port) == ("127.0.0.1", 8443)
    assert ing.upstream == "http://127.0.0.1:9000"
    assert (ing.upstream_host, ing.upstream_port) == ("127.0.0.1", 9000)
    assert ing.accept == ("order_router_service", "position_service")
    assert ing.max_skew_ms == 30_000 and ing.nonce_capacity == 100_000
    assert cfg.callers == ("order_router_service", "position_service")
    assert cfg.effective()["ingress"][0]["accept"] == ["order_router_service", "position_service"]


def test_ingress_list_and_no_services(seed_policy_yaml: str) -> None:
    raw = yaml.safe_load(BASE + seed_policy_yaml)
    raw.pop("services")
    raw["ingress"] = [
        {"service": "a", "address": "127.0.0.1", "upstream": "http://127.0.0.1:1", "accept": ["x"]},
        {
            "service": "b",
            "address": "unix:/run/b.sock",
            "upstream": "http://[::1]:2",
            "accept": ["x", "y"],
            "max_skew_ms": 5000,
        },
    ]
    cfg = parse_config(yaml.safe_dump(raw))
    assert cfg.services == {}
    assert [i.service for i in cfg.ingress] == ["a", "b"]
    assert cfg.ingress[1].unix_path == "/run/b.sock"
    assert cfg.ingress[1].upstream == "http://[::1]:2"
    assert cfg.callers == ("x", "y")


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (lambda i: i.update(upstream="https://127.0.0.1:9000"), "ingress.upstream", "http://"),
        (lambda i: i.update(upstream="http://10.0.0.5:9000"), "ingress.upstream", "loopback"),
        (lambda i: i.update(upstream="http://127.0.0.1"), "ingress.upstream", "port"),
        (lambda i: i.update(upstream="http://127.0.0.1:9/x"), "ingress.upstream", "no path"),
        (lambda i: i.update(accept=[]), "ingress.accept", "at least one caller"),
        (lambda i: i.update(accept=["a", "a"]), "ingress.accept", "listed twice"),
        (lambda i: i.update(accept=["ok", "no way"]), "ingress.accept[1]", "letters, digits"),
        (lambda i: i.pop("service"), "ingress.service", "is required"),
        (lambda i: i.update(max_skew_ms=0), "ingress.max_skew_ms", "must be between"),
        (lambda i: i.update(max_skew_ms=600_000), "ingress.max_skew_ms", "must be between"),
        (lambda i: i.update(nonce_capacity=0), "ingress.nonce_capacity", "must be between"),
        (lambda i: i.update(secret="x"), "ingress.secret", "unknown field"),
        (lambda i: i.update(address="example.org"), "ingress.address", "IP address"),
        (lambda i: i.update(port=8080), "ingress.port", "already used by listen"),
    ],
)
def test_invalid_ingress_field_is_named(
    seed_policy_yaml: str, mutate: Any, path: str, reason: str
) -> None:
    raw = yaml.safe_load(BASE + INGRESS + seed_policy_yaml)
    mutate(raw["ingress"])
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    assert info.value.path == path
    assert reason in info.value.reason


def test_ingress_needs_an_overlap_window(seed_policy_yaml: str) -> None:
    raw = yaml.safe_load(BASE + INGRESS + seed_policy_yaml)
    raw["api_key_policy"]["global_settings"]["rotation_overlap_hours"] = 0
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    assert info.value.path == "api_key_policy.global_settings.rotation_overlap_hours"


def test_two_ingresses_for_one_service_refused(seed_policy_yaml: str) -> None:
    raw = yaml.safe_load(BASE + INGRESS + seed_policy_yaml)
    one = dict(raw["ingress"], port=0)
    raw["ingress"] = [one, dict(one)]
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    assert info.value.path == "ingress[1].service"


def test_check_config_prints_the_ingress(tmp_path: Path, seed_policy_yaml: str) -> None:
    path = tmp_path / "ingress.yaml"
    path.write_text(BASE + INGRESS + seed_policy_yaml)
    out = _cli("check-config", str(path))
    assert out.returncode == 0, out.stderr
    (ing,) = json.loads(out.stdout)["ingress"]
    assert ing["service"] == "risk_engine_service"
    assert ing["upstream"] == "http://127.0.0.1:9000"
    assert ing["accept"] == ["order_router_service", "position_service"]


def test_ingress_tls_is_required_off_loopback_and_files_must_exist(
    tmp_path: Path, seed_policy_yaml: str
) -> None:
    raw = yaml.safe_load(BASE + INGRESS + seed_policy_yaml)
    raw["ingress"]["address"] = "0.0.0.0"
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    assert info.value.path == "ingress.tls"
    raw["ingress"]["tls"] = {"cert_file": "cert.pem", "key_file": "key.pem"}
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw), source=tmp_path / "a.yaml")
    assert info.value.path == "ingress.tls.cert_file"
    (tmp_path / "cert.pem").write_text("not checked here")
    (tmp_path / "key.pem").write_text("not checked here")
    cfg = parse_config(yaml.safe_dump(raw), source=tmp_path / "a.yaml")
    (ing,) = cfg.ingress
    assert ing.tls_cert_file == tmp_path / "cert.pem" and ing.tls_key_file == tmp_path / "key.pem"


def test_listener_limits_callers_and_allow_lists(seed_policy_yaml: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    raw = yaml.safe_load(BASE + seed_policy_yaml)
    raw["listen"] = {
        "address": "unix:/run/authproxy/engine.sock",
        "allow_uids": [1000],
        "allow_gids": [2000],
        "max_connections": 64,
        "header_timeout_ms": 2000,
    }
    raw["services"]["binance_spot_trading"]["allow"] = ["GET /api/v3/klines"]
    raw["services"]["binance_spot_trading"]["on_limit"] = {"wait_ms": 50}
    raw["clients"] = {"risk": {"token_file": str(token), "services": ["binance_spot_trading"]}}
    cfg = parse_config(yaml.safe_dump(raw))
    assert (cfg.listen.allow_uids, cfg.listen.allow_gids) == ((1000,), (2000,))
    assert (cfg.listen.max_connections, cfg.listen.header_timeout_ms) == (64, 2000)
    assert cfg.listen.body_timeout_ms == 30_000 and not cfg.listen.allow_remote
    svc = cfg.services["binance_spot_trading"]
    assert svc.allow == ("GET /api/v3/klines",) and svc.on_limit_wait_ms == 50
    assert "place_orders" in svc.permissions  # the key type's, from the policy
    assert cfg.clients is not None and cfg.clients[0].services == ("binance_spot_trading",)
    raw["clients"]["risk"]["services"] = ["nope"]
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    assert info.value.path == "clients.risk.services[0]"
    raw.pop("clients")
    raw["listen"] = {"address": "0.0.0.0", "allow_remote": True}
    assert parse_config(yaml.safe_dump(raw)).listen.allow_remote
