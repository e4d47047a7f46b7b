"""``authproxy demo``: the embedded default, end to end on this machine.

Makes a throwaway encrypted key file with three Binance test keys (HMAC, Ed25519, RSA)
plus one the venue has never seen, starts the local venue simulator (HTTPS, verifies
signatures like Binance) and the real sidecar, streams unsigned orders through the
sidecar, and prints accepted and rejected counts and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import string
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from keycache.filestore import KeyFile, load_kek_file
from keycache.record import make_record
from proxy.procs import Proc, sidecar_argv, simulator_argv

# The seed's api_key_policy block (shared/seed/api-key-management-hft.txt), verbatim.
SEED_POLICY_FILE = Path(__file__).parent / "seed_policy.yaml"

PERMISSIONS = ["read_market_data", "place_orders", "cancel_orders", "read_account_info"]


def random_key_id() -> str:
    """A random 64-character key id, shaped like a Binance API key. Never a real key."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(64))


def make_test_keys() -> dict[str, tuple[dict[str, object], dict[str, str] | None]]:
    """service → (key record for the sidecar, what the venue knows or None if unregistered)."""
    now = datetime.now(UTC).replace(microsecond=0)
    created, expires = now - timedelta(days=1), now + timedelta(days=60)
    out: dict[str, tuple[dict[str, object], dict[str, str] | None]] = {}

    hmac_secret = secrets.token_urlsafe(48)
    kid = random_key_id()
    out["binance_hmac"] = (
        make_record(
            kid, hmac_secret, created_at=created, expires_at=expires, permissions=PERMISSIONS
        ),
        {"api_key": kid, "algorithm": "hmac-sha256", "secret": hmac_secret},
    )
    for name, algorithm, private in (
        ("binance_ed25519", "ed25519", ed25519.Ed25519PrivateKey.generate()),
        ("binance_rsa", "rsa-pkcs1-sha256", rsa.generate_private_key(65537, 2048)),
    ):
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        public = (
            private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        kid = random_key_id()
        out[name] = (
            make_record(
                kid,
                pem,
                algorithm=algorithm,
                created_at=created,
                expires_at=expires,
                permissions=PERMISSIONS,
            ),
            {"api_key": kid, "algorithm": algorithm, "public_key": public},
        )
    out["binance_unregistered"] = (
        make_record(
            random_key_id(),
            secrets.token_urlsafe(48),
            created_at=created,
            expires_at=expires,
            permissions=PERMISSIONS,
        ),
        None,
    )
    return out


def write_key_file(
    run_dir: Path, records: Mapping[str, dict[str, object] | list[dict[str, object]]]
) -> tuple[Path, Path]:
    """Write a fresh KEK and an encrypted key file holding ``records``.

    ``records`` maps a service to its key record, or to a list of records (versions,
    oldest first).
    """
    kek_path = run_dir / "kek.key"
    keys_path = run_dir / "keys.enc"
    KeyFile.create_kek_file(kek_path)
    keyfile = KeyFile(keys_path, kek=load_kek_file(kek_path))
    try:
        for service, value in records.items():
            for record in value if isinstance(value, list) else [value]:
                keyfile.add_version(service, record)
    finally:
        keyfile.close()
    return keys_path, kek_path


def sidecar_config(
    keys_path: Path, kek_path: Path, services: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A sidecar config (as data) on the file store, with the seed's policy block."""
    config: dict[str, Any] = {
        "listen": {"address": "127.0.0.1", "port": 0},
        "admin": {"address": "127.0.0.1", "port": 0},
        "keystore": {
            "backend": "file",
            "file": {"path": str(keys_path), "kek_file": str(kek_path)},
        },
        "services": services,
    }
    config.update(yaml.safe_load(SEED_POLICY_FILE.read_text(encoding="utf-8")))
    return config


def binance_service(upstream_port: int, ca_file: str, route: str, **extra: Any) -> dict[str, Any]:
    return {
        "venue": "binance",
        "key_type": "exchange_api",
        "upstream": f"https://127.0.0.1:{upstream_port}",
        "route": route,
        "ca_file": ca_file,
        "timeout_ms": 2000,
        **extra,
    }


def write_demo_setup(
    run_dir: Path,
    upstream_port: int,
    ca_file: str,
    keys: dict[str, tuple[dict[str, object], dict[str, str] | None]],
) -> Path:
    """Write the KEK, the encrypted key file and the sidecar config; return the config path."""
    keys_path, kek_path = write_key_file(run_dir, {s: r for s, (r, _) in keys.items()})
    services = {
        # The demo streams as fast as it can: it shows signing, not the limiter, so each
        # service's budget is raised above the policy's 100 req/s for exchange keys.
        s: binance_service(
            upstream_port,
            ca_file,
            "/" + s.removeprefix("binance_"),
            rate_limit={"requests_per_second": 100_000, "requests_per_minute": 6_000_000},
        )
        for s in keys
    }
    path = run_dir / "authproxy.yaml"
    path.write_text(yaml.safe_dump(sidecar_config(keys_path, kek_path, services), sort_keys=False))
    return path


async def _stream_orders(
    port: int, routes: list[str], orders: int, connections: int, deadline_s: float
) -> tuple[Counter[tuple[str, str]], list[float]]:
    import aiohttp

    results: Counter[tuple[str, str]] = Counter()
    latencies: list[float] = []
    next_order = iter(range(orders))
    stop_at = time.monotonic() + deadline_s

    async def worker(session: aiohttp.ClientSession) -> None:
        for n in next_order:
            if time.monotonic() > stop_at:
                return
            route = routes[n % len(routes)]
            url = (
                f"http://127.0.0.1:{port}{route}/api/v3/order?symbol=BTCUSDT&side=BUY"
                f"&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000"
                f"&newClientOrderId=demo-{n}"
            )
            t0 = time.perf_counter()
            async with session.post(url) as resp:
                body = await resp.read()
            latencies.append(time.perf_counter() - t0)
            if resp.status == 200:
                results[(route, "accepted")] += 1
            else:
                try:
                    answer = json.loads(body)
                    # The venue's {"code": -2015, ...} or the sidecar's {"error": {"code": ...}}
                    code = str(answer.get("code") or answer.get("error", {}).get("code"))
                except (ValueError, AttributeError):
                    code = f"http {resp.status}"
                results[(route, f"rejected {code}")] += 1

    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return results, latencies


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# Binance counts at most 100 orders per 10 s per account (the demo's keys share one), and
# the sidecar holds each service to that, corrected by the venue's X-MBX-ORDER-COUNT-10S
# (proxy.venue_limits): 30 orders per route, 90 accepted in all, stays inside it.
DEMO_ORDERS = 120


def run_demo(*, orders: int = DEMO_ORDERS, connections: int = 4, deadline_s: float = 120.0) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="authproxy-demo-"))
    procs: list[Proc] = []
    try:
        print(f"demo: run directory {run_dir} (throwaway test keys, removed at the end)")
        keys = make_test_keys()
        venue_keys = {"binance": [v for _, v in keys.values() if v is not None]}
        sim_keys = run_dir / "venue-keys.json"
        sim_keys.write_text(json.dumps(venue_keys))
        sim_keys.chmod(0o600)
        sim = Proc(simulator_argv(sim_keys, run_dir / "sim"), stderr_path=run_dir / "sim.log")
        procs.append(sim)
        print(f"demo: venue simulator on https://127.0.0.1:{sim.ready['port']}")
        config = write_demo_setup(run_dir, sim.ready["port"], sim.ready["ca_file"], keys)
        sidecar = Proc(sidecar_argv(config), stderr_path=run_dir / "sidecar.log")
        procs.append(sidecar)
        port = sidecar.ready["listen"]["port"]
        print(f"demo: sidecar on http://127.0.0.1:{port} with services {', '.join(keys)}")
        routes = ["/" + s.removeprefix("binance_") for s in keys]
        t0 = time.monotonic()
        results, latencies = asyncio.run(
            _stream_orders(port, routes, orders, connections, deadline_s)
        )
        elapsed = time.monotonic() - t0
        print(
            f"\n{sum(results.values())} unsigned orders sent through the sidecar "
            f"in {elapsed:.1f} s over {connections} connections:"
        )
        for (route, outcome), count in sorted(results.items()):
            print(f"  {route:<16} {outcome:<18} {count:>6}")
        lat = sorted(latencies)
        print(
            "round trip engine→sidecar→venue simulator→engine (client-side, µs): "
            + "  ".join(
                f"{label}={_pct(lat, q) * 1e6:.0f}"
                for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
            )
        )
        expected_rejects = sum(c for (r, o), c in results.items() if r == "/unregistered")
        ok = all(o == "accepted" for (r, o), _ in results.items() if r != "/unregistered")
        ok = ok and expected_rejects == sum(
            c for (r, o), c in results.items() if r == "/unregistered" and o == "rejected -2015"
        )
        print(
            "\nthe three registered keys (HMAC, Ed25519, RSA) are accepted; the key the venue "
            "does not know is rejected with Binance's -2015."
            if ok
            else "\nUNEXPECTED outcomes above: see the logs in the run directory."
        )
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        if all(p.popen.returncode == 0 for p in procs):
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"demo: logs kept in {run_dir}")
