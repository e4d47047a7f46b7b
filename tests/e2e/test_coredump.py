"""What a memory dump of a running sidecar finds: the core-dump test of issue 8.

A real sidecar runs on the real OpenBao with three fresh test keys (HMAC-SHA256, Ed25519
and RSA-2048, made here, known only to this test and the venue simulator), signs orders
with them through the venue simulator over TLS, then every key is rotated in Vault. The
config sets ``rotation_overlap_hours: 0``, so the rotation retires the old keys at once
(the overlap window is what keeps a retired key live; 0 closes it); the sidecar wipes a
retired ring ``RETIRE_GRACE_S`` after the swap. The new keys then sign too.

Then, with the sidecar still running, the test looks for every form of every test secret
(``_forms``: the HMAC secret raw, hex and base64; for the PEM keys a line of the PEM,
the Ed25519 seed raw, hex and base64, and 32-byte windows of the RSA private exponent
and prime as they sit in the DER (big-endian) and in OpenSSL's BIGNUMs (little-endian
limbs on x86-64), with hex and base64) in three places:

- ``core``: a core image taken with ``gcore`` (Debian's gdb). gdb leaves out the mappings
  flagged ``dd`` in ``/proc/<pid>/smaps`` (MADV_DONTDUMP), as the kernel's own core
  writer does: the ring's SecureBuffer is not in it.
- ``outside``: ``/proc/<pid>/mem``, every readable mapping *not* flagged ``dd``.
- ``locked``: ``/proc/<pid>/mem``, the mappings flagged ``dd``: SecureBuffer regions
  (``keycache.securemem``: anonymous ``mmap``, ``mlock``, ``MADV_DONTDUMP``), plus the
  kernel's own ``dd`` mappings (``[vvar]``), which hold no heap data.

Asserted: the retired keys are found nowhere (0 in all three places, every form); each
live key's stored form is in the locked region exactly once (the counting finds what is
there) and the public key ids are in the core (the image is searchable). The live keys'
counts outside the locked region are printed as a table (run with ``-s``) and bounded
from above by what was measured, so a new copy fails the test; THREAT_MODEL.md quotes
them.

How a core of a non-dumpable process is taken: the sidecar calls
``prctl(PR_SET_DUMPABLE, 0)`` and sets ``RLIMIT_CORE`` to 0 at start
(``proxy.runtime.Sidecar.run``). That stops the kernel writing a core on a crash and stops
every process without ``CAP_SYS_PTRACE`` - any other process of the sidecar's own user
included - from attaching with ptrace or reading ``/proc/<pid>/mem``
(``test_process_hardening.py`` proves both from outside). It does not stop root: the tests
run as root with ``CAP_SYS_PTRACE``, and ``gcore`` attaches by ptrace and writes the image
itself, ignoring ``RLIMIT_CORE`` (which only governs the kernel's core writer). This is the
attacker of the policy's threat 1 ("external attacker with system access"), and what
the test measures is what such an attacker finds. The test checks that gcore really did
produce an image (it asserts on the key ids in it), so a gcore that silently failed to
attach could not pass.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from keycache.record import make_record
from proxy.demo import PERMISSIONS, binance_service, random_key_id, sidecar_config
from proxy.procs import Proc, sidecar_argv
from proxy.runtime import RETIRE_GRACE_S
from tests.e2e.conftest import Venue

if TYPE_CHECKING:
    from tests.vaultserver import KVSpace

pytest_plugins = ["tests.vaultserver"]
pytestmark = pytest.mark.e2e

POLL_MS = 200
#: service -> (route, algorithm)
SERVICES: dict[str, tuple[str, str]] = {
    "binance_hmac": ("/hmac", "hmac-sha256"),
    "binance_ed25519": ("/ed25519", "ed25519"),
    "binance_rsa": ("/rsa", "rsa-pkcs1-sha256"),
}
ORDER = "/api/v3/order?symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000"
ORDERS_PER_KEY = 5
#: A 32-byte window of random key material cannot occur by chance in a few hundred MB.
WINDOW = 32
PLACES = ("core", "outside", "locked")

#: The copies of a *live* key found outside the locked region, measured on this stack
#: (CPython 3.11.7, cryptography 50 with its own OpenSSL 4.0, hvac 2.4, uvloop): none,
#: except inside the signer's OpenSSL private-key object, which lives as long as the key
#: (OpenSSL clears it when it is freed): the Ed25519 seed; RSA's private exponent and the
#: prime p, twice (the key and the Montgomery context cached for p). Upper bounds: a
#: change that leaves a new copy behind fails here. Every other (algorithm, form): 0.
LIVE_OUTSIDE_MAX: dict[tuple[str, str], int] = {
    ("ed25519", "seed"): 1,
    ("rsa-pkcs1-sha256", "d.bn"): 1,
    ("rsa-pkcs1-sha256", "p.bn"): 2,
}


# -- gdb ---------------------------------------------------------------------------------


def ensure_gcore() -> str:
    """Path of ``gcore``; installs Debian's gdb with apt-get when it is missing."""
    if shutil.which("gcore") is None:
        apt = ["apt-get", "install", "-y", "--no-install-recommends", "gdb"]
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if subprocess.run(apt, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            subprocess.run(apt, env=env, capture_output=True, check=True)
    gcore = shutil.which("gcore")
    assert gcore is not None, "apt-get did not provide gcore (package gdb)"
    return gcore


def take_core(pid: int, directory: Path) -> Path:
    """A core image of ``pid`` taken with gcore (ptrace attach; the process continues)."""
    prefix = directory / "core"
    result = subprocess.run(
        [ensure_gcore(), "-o", str(prefix), str(pid)],
        capture_output=True,
        check=False,
        timeout=90,
    )
    core = directory / f"core.{pid}"
    assert result.returncode == 0 and core.exists(), result.stderr.decode(errors="replace")[-2000:]
    return core


# -- the test keys and the forms in which they are searched ------------------------------


@dataclass
class KeyUnderTest:
    service: str
    algorithm: str
    # The secret is in these three: never in a repr, so never in a failure message.
    record: dict[str, object] = field(repr=False)
    venue_entry: dict[str, str] = field(repr=False)
    forms: dict[str, bytes] = field(repr=False)  # form name -> needle

    @property
    def key_id(self) -> str:
        return str(self.record["key_id"])


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _text_forms(name: str, raw: bytes) -> dict[str, bytes]:
    """``raw`` itself, as lowercase and uppercase hex, and as base64."""
    return {
        name: raw,
        f"{name}.hex": raw.hex().encode(),
        f"{name}.HEX": raw.hex().upper().encode(),
        f"{name}.b64": _b64(raw),
    }


def _window(data: bytes) -> bytes:
    """A WINDOW-byte slice from the middle of ``data`` (random material, no DER framing)."""
    mid = len(data) // 2
    return data[mid - WINDOW // 2 : mid + WINDOW // 2]


def _forms(algorithm: str, secret: str, private: Any) -> dict[str, bytes]:
    if algorithm == "hmac-sha256":
        return _text_forms("secret", secret.encode("ascii"))
    lines = secret.strip().splitlines()[1:-1]
    forms = {"pem.line": lines[len(lines) // 2][-48:].encode("ascii")}
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if algorithm == "ed25519":
        seed = der[-32:]
        assert seed == private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        forms.update(_text_forms("seed", seed))
        return forms
    numbers = private.private_numbers()
    size = private.key_size // 8
    d_be = _window(numbers.d.to_bytes(size, "big"))
    p_be = _window(numbers.p.to_bytes(size // 2, "big"))
    assert d_be in der and p_be in der
    forms.update(_text_forms("d", d_be))
    forms.update(_text_forms("p", p_be))
    # OpenSSL's BIGNUM keeps 64-bit limbs least significant first: on a little-endian
    # machine the number's bytes are stored reversed.
    forms["d.bn"] = _window(numbers.d.to_bytes(size, "little"))
    forms["p.bn"] = _window(numbers.p.to_bytes(size // 2, "little"))
    return forms


def make_key(service: str, algorithm: str, minutes_ago: float) -> KeyUnderTest:
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=minutes_ago)
    key_id = random_key_id()
    private: Any = None
    if algorithm == "hmac-sha256":
        secret = secrets.token_urlsafe(48)
        venue_entry = {"api_key": key_id, "algorithm": algorithm, "secret": secret}
    else:
        private = (
            ed25519.Ed25519PrivateKey.generate()
            if algorithm == "ed25519"
            else rsa.generate_private_key(65537, 2048)
        )
        secret = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        public = (
            private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )
        venue_entry = {"api_key": key_id, "algorithm": algorithm, "public_key": public}
    record = make_record(
        key_id,
        secret,
        algorithm=algorithm,
        created_at=now,
        expires_at=now + timedelta(days=30),
        permissions=PERMISSIONS,
    )
    return KeyUnderTest(service, algorithm, record, venue_entry, _forms(algorithm, secret, private))


# -- memory ---------------------------------------------------------------------------------

_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def mappings(pid: int) -> list[tuple[int, int, bool]]:
    """(start, end, dont_dump) of every readable mapping of ``pid``, from smaps."""
    found: list[list[Any]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _MAPPING.match(line)
        if m:
            readable = "r" in m[3] and m[4] != "[vsyscall]"
            found.append([int(m[1], 16), int(m[2], 16), readable, False])
        elif line.startswith("VmFlags:") and found:
            found[-1][3] = "dd" in line.split()[1:]
    return [(start, end, dd) for start, end, readable, dd in found if readable]


def read_memory(pid: int) -> tuple[list[bytes], list[bytes]]:
    """The contents of ``pid``'s readable mappings: (not ``dd``, ``dd``)."""
    outside: list[bytes] = []
    locked: list[bytes] = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, dont_dump in mappings(pid):
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue  # [vvar] and guard pages cannot be read
            (locked if dont_dump else outside).append(data)
    return outside, locked


def count(blobs: list[bytes], needle: bytes) -> int:
    total = 0
    for blob in blobs:
        at = blob.find(needle)
        while at >= 0:
            total += 1
            at = blob.find(needle, at + 1)
    return total


# -- the venue and the sidecar ------------------------------------------------------------


def sim_call(venue: Venue, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"https://127.0.0.1:{venue.port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=venue.ca_file)
    with urllib.request.urlopen(req, context=context, timeout=10) as resp:
        return json.loads(resp.read())


def send_orders(port: int, route: str, tag: str, n: int) -> list[int]:
    """``n`` unsigned orders through the sidecar on one keep-alive connection."""
    statuses = []
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for i in range(n):
            conn.request("POST", f"{route}{ORDER}&newClientOrderId={tag}-{i}")
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
    finally:
        conn.close()
    return statuses


def signed_with(venue: Venue, tag: str) -> list[tuple[str, str]]:
    """(api key, verdict) of every order the simulator logged with client id ``tag-*``."""
    entries = sim_call(venue, "GET", "/__sim/log")["entries"]
    return [
        (e["api_key"], str(e["verdict"]))
        for e in entries
        if f"newClientOrderId={tag}-" in e["query"]
    ]


def start_sidecar(tmp: Path, vault: KVSpace, venue: Venue) -> Proc:
    token_file = tmp / "vault-token"
    token_file.write_text(vault.server.create_token(["test-kv-read"]))
    token_file.chmod(0o600)
    # The orders go out back to back: the budget is raised above the policy's pace.
    budget = {"requests_per_second": 100_000, "requests_per_minute": 6_000_000}
    services = {
        name: binance_service(venue.port, venue.ca_file, route, rate_limit=budget)
        for name, (route, _) in SERVICES.items()
    }
    cfg = sidecar_config(tmp / "unused.enc", tmp / "unused.key", services)
    cfg["keystore"] = {
        "backend": "vault",
        "vault": {
            "address": vault.server.address,
            "mount_path": "secret",
            "path_prefix": vault.prefix,
            "tls_verify": True,
            "tls_ca_cert": str(vault.server.ca_file),
            "auth": {"method": "token", "token_file": str(token_file)},
            "poll_interval_ms": POLL_MS,
        },
    }
    # Zero overlap: a rotation retires the previous key at once (see the module doc).
    cfg["api_key_policy"]["global_settings"]["rotation_overlap_hours"] = 0
    path = tmp / "authproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Proc(sidecar_argv(path), stderr_path=tmp / "sidecar.log")


def wait_swapped(proc: Proc, keys: list[KeyUnderTest], timeout: float = 20.0) -> None:
    """Until the sidecar logged ``keys_swapped`` to exactly the new key of every service."""
    want = {k.service: [k.key_id] for k in keys}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {}
        assert proc.stderr_path is not None
        for line in proc.stderr_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not one of the sidecar's JSON log lines
            if isinstance(event, dict) and event.get("event") == "keys_swapped":
                seen[event["service"]] = event["key_ids"]
        if all(seen.get(s) == ids for s, ids in want.items()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no swap to the new keys within {timeout} s: {proc.stderr_tail()}")


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # The core image holds the live keys' copies: never leave it behind.
    for core in tmp_path.glob("core.*"):
        core.unlink()


def test_a_core_dump_holds_no_retired_key(
    vault: KVSpace, venue: Venue, run_dir: Path, record_property: Any
) -> None:
    old = [make_key(s, a, minutes_ago=60) for s, (_, a) in SERVICES.items()]
    new = [make_key(s, a, minutes_ago=0) for s, (_, a) in SERVICES.items()]
    session_keys = [v for _, v in venue.keys.values() if v]
    sim_call(
        venue,
        "POST",
        "/__sim/keys",
        {"binance": session_keys + [k.venue_entry for k in old + new]},
    )
    for key in old:
        vault.write(key.service, key.record)

    sidecar = start_sidecar(run_dir, vault, venue)
    try:
        port = int(sidecar.ready["listen"]["port"])
        tag = secrets.token_hex(4)
        for key in old:
            route = SERVICES[key.service][0]
            assert (
                send_orders(port, route, f"{tag}-old-{key.service}", ORDERS_PER_KEY)
                == [200] * ORDERS_PER_KEY
            )
            assert (
                signed_with(venue, f"{tag}-old-{key.service}")
                == [(key.key_id, "ok")] * ORDERS_PER_KEY
            )

        for key in new:  # the rotation: one new version per service
            vault.write(key.service, key.record)
        wait_swapped(sidecar, new)
        for key in new:
            route = SERVICES[key.service][0]
            assert (
                send_orders(port, route, f"{tag}-new-{key.service}", ORDERS_PER_KEY)
                == [200] * ORDERS_PER_KEY
            )
            assert (
                signed_with(venue, f"{tag}-new-{key.service}")
                == [(key.key_id, "ok")] * ORDERS_PER_KEY
            )
        # The retired rings are wiped RETIRE_GRACE_S after the swap; leave time for the
        # freed signer objects too.
        time.sleep(RETIRE_GRACE_S + 1.0)

        outside, locked = read_memory(sidecar.pid)
        core_path = take_core(sidecar.pid, run_dir)
        core = [core_path.read_bytes()]
        core_path.unlink()
        places = {"core": core, "outside": outside, "locked": locked}
        counts: dict[tuple[str, str, str], dict[str, int]] = {}
        for state, keys in (("retired", old), ("live", new)):
            for key in keys:
                for form, needle in key.forms.items():
                    counts[(state, key.algorithm, form)] = {
                        place: count(blobs, needle) for place, blobs in places.items()
                    }
        # The image is searchable and holds the process's heap: the public key ids are in it.
        for key in new:
            assert count(core, key.key_id.encode()) >= 1, key.service
    finally:
        assert sidecar.stop() == 0, sidecar.stderr_tail()

    lines = [f"{'key':8} {'algorithm':17} {'form':10} " + " ".join(f"{p:>8}" for p in PLACES)]
    for (state, algorithm, form), where in counts.items():
        lines.append(
            f"{state:8} {algorithm:17} {form:10} " + " ".join(f"{where[p]:>8}" for p in PLACES)
        )
    table = "\n".join(lines)
    print("\ncopies of each test secret (core image, /proc/<pid>/mem outside and inside dd)")
    print(table)
    record_property("copies", table)

    retired = {k: v for k, v in counts.items() if k[0] == "retired" and any(v.values())}
    assert retired == {}, "a retired key is still in memory:\n" + table
    for key in new:
        # What the ring stores (the HMAC text, the PEM) is in the locked region, once.
        stored = "secret" if key.algorithm == "hmac-sha256" else "pem.line"
        assert counts[("live", key.algorithm, stored)]["locked"] == 1, table
        assert counts[("live", key.algorithm, stored)]["core"] == 0, table
    for (state, algorithm, form), where in counts.items():
        if state == "live":
            assert where["outside"] <= LIVE_OUTSIDE_MAX.get((algorithm, form), 0), table
