"""The authproxy sidecar send path: KEK, config, test key import, start, ready, stop.

Written to the contract in the design (CLI, config fields, key record, the `ready` line);
the sidecar itself may not run yet, so every failure becomes a SidecarError that carries
the sidecar's own output for the caller to print.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import queue
import re
import secrets
import signal
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from loadtests.pki import write_private_file
from loadtests.procs import LOOPBACK, affinity_of, pin_preexec, stop_process, tail

SERVICE = "bench"
VENUE = "bybit"  # the default; see loadtests/README.md ("Which venue")
ROUTE = "/venue"  # the engine's path prefix on the sidecar and on nginx
KEY_TYPE = "exchange_api"
READY_TIMEOUT_S = 30.0
IMPORT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0  # SIGTERM drains in-flight requests first
UPSTREAM_TIMEOUT_MS = 2000
KEK_BYTES = 32
KEY_ID_LENGTH = 64
KEY_PERMISSIONS = ("place_orders",)
KEY_AGE = dt.timedelta(days=1)
KEY_LIFETIME = dt.timedelta(days=30)  # within exchange_api validity_days (60)
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
SEED_NAME = "api-key-management-hft.txt"
# The exchange_api limits (100/s, 5000/min) would turn a closed-loop benchmark into a
# measurement of 429s. By default the bench raises them in the policy it writes (a value
# change, no new field), so the limiter still runs on every request but never rejects.
BENCH_RATE_LIMITS = {"requests_per_second": 1_000_000, "requests_per_minute": 60_000_000}

# Used when the seed document is not beside the clone: the fields the sidecar needs.
MINIMAL_POLICY: dict[str, Any] = {
    "global_settings": {
        "default_validity_days": 90,
        "rotation_overlap_hours": 24,
        "minimum_key_length": 256,
        "hash_algorithm": "SHA-256",
    },
    "key_types": {
        "exchange_api": {
            "validity_days": 60,
            "rotation_required": True,
            "auto_rotate": True,
            "permissions": [
                "read_market_data",
                "place_orders",
                "cancel_orders",
                "read_account_info",
            ],
            "rate_limits": {"requests_per_second": 100, "requests_per_minute": 5000},
        },
    },
}

_POLICY_BLOCK = re.compile(r"```yaml\s*\n(api_key_policy:.*?)```", re.DOTALL)
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class Ready:
    """What the sidecar's ready line announces."""

    port: int
    admin_port: int | None


class SidecarError(Exception):
    """The sidecar could not be prepared or started; `output` is what it printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


# ---------------------------------------------------------------------- pure parts


def extract_policy(seed_text: str) -> dict[str, Any] | None:
    """The `api_key_policy` mapping from the seed document's ```yaml block, or None."""
    match = _POLICY_BLOCK.search(seed_text)
    if match is None:
        return None
    loaded = yaml.safe_load(match.group(1))
    if not isinstance(loaded, dict) or not isinstance(loaded.get("api_key_policy"), dict):
        return None
    policy: dict[str, Any] = loaded["api_key_policy"]
    return policy


def bench_policy(policy: dict[str, Any], lift_rate_limits: bool) -> dict[str, Any]:
    """A copy of `policy`, with the exchange_api rate limits raised if asked."""
    out = copy.deepcopy(policy)
    if lift_rate_limits:
        out["key_types"][KEY_TYPE]["rate_limits"] = dict(BENCH_RATE_LIMITS)
    return out


def make_key_record(now: dt.datetime) -> dict[str, Any]:
    """A fresh throwaway HMAC key record (never a real key) with the seed's checksum."""
    key_id = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(KEY_ID_LENGTH))
    created_at = (now - KEY_AGE).strftime(TIMESTAMP_FORMAT)
    expires_at = (now + KEY_LIFETIME).strftime(TIMESTAMP_FORMAT)
    permissions = list(KEY_PERMISSIONS)
    return {
        "key_id": key_id,
        "secret_key": secrets.token_hex(32),
        "algorithm": "hmac-sha256",
        "created_at": created_at,
        "expires_at": expires_at,
        "permissions": permissions,
        "checksum": key_checksum(key_id, created_at, expires_at, permissions),
    }


def key_checksum(key_id: str, created_at: str, expires_at: str, permissions: list[str]) -> str:
    """The seed's generateChecksum: hex SHA-256 of id + created + expires + permissions."""
    data = key_id + created_at + expires_at + "".join(permissions)
    return hashlib.sha256(data.encode()).hexdigest()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated with `extra`, recursing into mappings present in both."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def render_config(
    run_dir: Path,
    upstream_port: int,
    ca_file: Path,
    policy: dict[str, Any],
    extra_service: dict[str, Any] | None = None,
    keystore: dict[str, Any] | None = None,
    venue: str = VENUE,
) -> dict[str, Any]:
    """The sidecar config: only fields of the design's contract (the validator refuses
    unknown ones), plus whatever `extra_service` merges into the service's block.

    The key store is the encrypted file in `run_dir` unless `keystore` replaces it (the
    Vault scenarios pass `vault_keystore(...)`)."""
    service: dict[str, Any] = {
        "venue": venue,
        "key_type": KEY_TYPE,
        "upstream": f"https://{LOOPBACK}:{upstream_port}",
        "route": ROUTE,
        "ca_file": str(ca_file),
        "timeout_ms": UPSTREAM_TIMEOUT_MS,
    }
    if extra_service:
        service = deep_merge(service, extra_service)
    return {
        "listen": {"address": LOOPBACK, "port": 0},
        "admin": {"address": LOOPBACK, "port": 0},
        "keystore": keystore
        or {
            "backend": "file",
            "file": {"path": str(run_dir / "keys.enc"), "kek_file": str(run_dir / "kek.key")},
        },
        "services": {SERVICE: service},
        "api_key_policy": policy,
    }


def vault_keystore(
    address: str, ca_file: Path, token_file: Path, prefix: str, poll_interval_ms: int
) -> dict[str, Any]:
    """The `keystore` block for OpenBao/Vault KV v2 at secret/data/<prefix>/<service>."""
    return {
        "backend": "vault",
        "vault": {
            "address": address,
            "mount_path": "secret",
            "path_prefix": prefix,
            "tls_verify": True,
            "tls_ca_cert": str(ca_file),
            "auth": {"method": "token", "token_file": str(token_file)},
            "poll_interval_ms": poll_interval_ms,
        },
    }


def parse_log_event(line: bytes) -> dict[str, Any] | None:
    """The sidecar's structured log line as a mapping, if `line` is one."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def parse_ready_line(line: bytes) -> Ready | None:
    """The ports of the sidecar's ready event if `line` is one, else None.

    The contract puts `{"event": "ready", "listen": {...}, "admin": {...}}` on stdout; a
    missing or unparsable `admin` is tolerated (the bench never uses it).
    """
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") != "ready":
        return None
    try:
        port = int(event["listen"]["port"])
    except (KeyError, TypeError, ValueError):
        return None
    admin = event.get("admin")
    admin_port = admin.get("port") if isinstance(admin, dict) else None
    return Ready(port, admin_port if isinstance(admin_port, int) else None)


# ---------------------------------------------------------------------- I/O shell


def find_seed(repo_root: Path) -> Path | None:
    """The seed document in the `shared/` directory beside the clone, if there is one."""
    candidate = repo_root.parent / "shared" / "seed" / SEED_NAME
    return candidate if candidate.is_file() else None


def load_policy(repo_root: Path) -> tuple[dict[str, Any], str]:
    """The api_key_policy block and where it came from (a path, or 'embedded minimal')."""
    seed = find_seed(repo_root)
    if seed is not None:
        policy = extract_policy(seed.read_text(errors="replace"))
        if policy is not None:
            return policy, str(seed)
    return copy.deepcopy(MINIMAL_POLICY), "embedded minimal"


def authproxy_executable() -> Path:
    """The `authproxy` console script installed next to this interpreter."""
    return Path(sys.executable).parent / "authproxy"


def write_config(run_dir: Path, config: dict[str, Any]) -> Path:
    """Write the sidecar config into `run_dir`; return its path."""
    config_path = run_dir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def prepare(exe: Path, run_dir: Path, config: dict[str, Any]) -> Path:
    """Write the KEK and the config, import one test key; return the config path.

    Raises SidecarError (with the CLI's output) if the import fails.
    """
    if not exe.exists():
        raise SidecarError(f"{exe} not found (is the project installed in this venv?)")
    write_private_file(run_dir / "kek.key", secrets.token_bytes(KEK_BYTES))
    config_path = write_config(run_dir, config)
    record = make_key_record(dt.datetime.now(dt.UTC))
    cmd = [str(exe), "keys", "import", "--config", str(config_path), "--service", SERVICE]
    try:
        done = subprocess.run(
            cmd,
            input=json.dumps(record).encode(),
            capture_output=True,
            timeout=IMPORT_TIMEOUT_S,
            cwd=run_dir,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SidecarError(f"`authproxy keys import` failed: {exc}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        raise SidecarError(f"`authproxy keys import` exited {done.returncode}", output)
    return config_path


@dataclass(slots=True)
class Sidecar:
    """A running sidecar we started."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None
    ready_on: str  # "stdout" per the contract; "stderr" is tolerated and reported
    stdout_log: Path
    stderr_log: Path
    pumps: list[threading.Thread]
    # Every structured log line and when it was read (perf_counter_ns), appended by the
    # pumps: how the scenarios see when the sidecar swapped keys or lost its key store.
    events: list[tuple[int, dict[str, Any]]]

    def events_since(self, t_ns: int, name: str | None = None) -> list[tuple[int, dict[str, Any]]]:
        return [(t, e) for t, e in list(self.events) if t >= t_ns and name in (None, e["event"])]

    def stop(self) -> int | None:
        """SIGTERM (drain), wait, SIGKILL if it hangs; returns its exit code."""
        code = stop_process(self.proc, signal.SIGTERM, timeout_s=STOP_TIMEOUT_S)
        for pump in self.pumps:
            pump.join(timeout=5)
        return code

    def affinity(self) -> list[int] | None:
        return affinity_of(self.proc.pid)


def _pump(
    stream: IO[bytes],
    log: Path,
    name: str,
    ready: queue.Queue[tuple[str, Ready]],
    events: list[tuple[int, dict[str, Any]]],
) -> None:
    """Copy one of the sidecar's output streams into `log` for its whole life (a full pipe
    would block it), time-stamp its structured events into `events`, and hand the first
    ready event seen on it to `ready`."""
    found = False
    with log.open("ab") as out:
        for line in iter(stream.readline, b""):
            seen = time.perf_counter_ns()
            out.write(line)
            out.flush()
            logged = parse_log_event(line)
            if logged is not None:
                events.append((seen, logged))
            if not found:
                event = parse_ready_line(line)
                if event is not None:
                    found = True
                    ready.put((name, event))


def start(
    exe: Path,
    config_path: Path,
    run_dir: Path,
    cpu: int | None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Sidecar:
    """Run `authproxy serve` and wait for its ready line (``ready_timeout_s``).

    The contract says stdout; a ready line on stderr is accepted too (and reported), so a
    sidecar that logs everything to stderr can still be measured. Raises SidecarError with
    its stderr and stdout when it exits or stays silent.
    """
    stdout_log = run_dir / "sidecar.stdout.log"
    stderr_log = run_dir / "sidecar.stderr.log"
    proc = subprocess.Popen(
        [str(exe), "serve", "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=run_dir,
        preexec_fn=pin_preexec(cpu),
        start_new_session=True,  # a Ctrl-C reaches us; we stop it in order
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    ready: queue.Queue[tuple[str, Ready]] = queue.Queue()
    events: list[tuple[int, dict[str, Any]]] = []
    pumps = [
        threading.Thread(target=_pump, args=(stream, log, name, ready, events), daemon=True)
        for stream, log, name in (
            (proc.stdout, stdout_log, "stdout"),
            (proc.stderr, stderr_log, "stderr"),
        )
    ]
    for pump in pumps:
        pump.start()
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            ready_on, event = ready.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        return Sidecar(
            proc, event.port, event.admin_port, ready_on, stdout_log, stderr_log, pumps, events
        )
    exited = proc.poll()
    stop_process(proc, signal.SIGTERM, timeout_s=5)
    for pump in pumps:
        pump.join(timeout=5)
    if exited is not None:
        why = f"`authproxy serve` exited with code {exited} before its ready line"
    else:
        why = f"`authproxy serve` printed no ready line within {ready_timeout_s:.0f}s"
    raise SidecarError(
        why,
        f"--- stderr ---\n{tail(stderr_log)}\n--- stdout ---\n{tail(stdout_log)}",
    )
