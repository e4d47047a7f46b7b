"""How many copies of a secret a core dump would hold after loading it from Vault.

A child process loads one service from the real OpenBao server through the production
path (VaultSource + KeyWatcher, which hands each record back to be scrubbed), drops its references and collects garbage,
then waits. The parent reads the child's memory through /proc/<pid>/mem, skipping exactly
what a core dump skips (mappings flagged ``dd``, MADV_DONTDUMP: the ring's locked buffer),
and counts the secret's bytes. The same is done for the straightforward hvac read
(``read_secret_version`` with the default JSON adapter) as the baseline.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keycache.vault import CLEANSE_SUPPORTED
from tests.keycache.helpers import hmac_record, pkcs8

if TYPE_CHECKING:
    from tests.vaultserver import KVSpace

pytest_plugins = ["tests.vaultserver"]

REPO = Path(__file__).resolve().parents[2]
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")

CHILD = r"""
import asyncio, gc, json, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
how, address, ca, token_file, prefix = sys.argv[1:6]
rings = {}
if how == "watcher":
    from keycache.vault import VaultSource
    from keycache.vaultauth import VaultAuthSettings
    from keycache.watcher import KeyWatcher
    source = VaultSource(address, auth=VaultAuthSettings("token", token_file=Path(token_file)),
                         path_prefix=prefix, verify=Path(ca))
    async def load():
        watcher = KeyWatcher(source, ["svc"], overlap=timedelta(hours=1),
                             poll_interval=timedelta(seconds=1), require_lock=False,
                             clock=lambda: datetime.now(UTC),
                             on_ring=lambda s, r, old: rings.__setitem__(s, r))
        await watcher.load_all()
    asyncio.run(load())
    source.close()
else:  # the straightforward hvac way, as a baseline
    import hvac
    from keycache.ring import build_ring
    client = hvac.Client(url=address, token=Path(token_file).read_text().strip(), verify=ca)
    answer = client.secrets.kv.v2.read_secret_version(
        path=prefix + "/svc", mount_point="secret", raise_on_deleted_version=True)
    rings["svc"] = build_ring("svc", [(1, answer["data"]["data"])],
                              now=datetime.now(UTC), overlap=timedelta(hours=1))
    del answer
    client.adapter.close()
gc.collect()
buffer = rings["svc"].buffer
print(json.dumps({"address": buffer.address, "dump_excluded": buffer.dump_excluded}), flush=True)
sys.stdin.readline()
"""


def dumpable_regions(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, name) of every readable mapping a core dump would include."""
    regions: list[list[object]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _MAPPING.match(line)
        if m:
            regions.append([int(m[1], 16), int(m[2], 16), m[3], m[4], False])
        elif line.startswith("VmFlags:") and regions:
            regions[-1][4] = "dd" in line.split()[1:]
    return [
        (int(str(start)), int(str(end)), str(name))
        for start, end, perms, name, dont_dump in regions
        if "r" in str(perms) and not dont_dump and name not in ("[vvar]", "[vsyscall]")
    ]


def count_copies(pid: int, needle: bytes) -> tuple[int, list[str]]:
    hits: list[str] = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, name in dumpable_regions(pid):
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue  # e.g. a guard page
            at = data.find(needle)
            while at >= 0:
                hits.append(name or hex(start))
                at = data.find(needle, at + 1)
    return len(hits), hits


def load_in_child(vault: KVSpace, token_file: Path, how: str, needles: list[bytes]) -> list[int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            how,
            vault.server.address,
            str(vault.server.ca_file),
            str(token_file),
            vault.prefix,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        info = json.loads(proc.stdout.readline())
        assert info["dump_excluded"], "the ring's buffer must be MADV_DONTDUMP"
        try:
            return [count_copies(proc.pid, needle)[0] for needle in needles]
        except PermissionError:
            pytest.skip("cannot read the child's memory (ptrace restrictions)")
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        proc.wait(30)


@pytest.fixture
def reader_token(vault: KVSpace, tmp_path: Path) -> Path:
    token_file = tmp_path / "token"
    token_file.write_text(vault.server.create_token(["test-kv-read"]))
    return token_file


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_hmac_secret_copies_outside_locked_memory(vault: KVSpace, reader_token: Path) -> None:
    # 48 random bytes, URL-safe: appears nowhere unless it is a copy of this secret.
    secret = secrets.token_urlsafe(48)
    vault.write("svc", hmac_record(secret_key=secret))
    ours = load_in_child(vault, reader_token, "watcher", [secret.encode()])[0]
    baseline = load_in_child(vault, reader_token, "hvac", [secret.encode()])[0]
    # Measured on this stack (CPython 3.11, OpenSSL 3.0, requests 2.34, hvac 2.4):
    # baseline 5 (requests' content bytes, the decoded text, the parsed str, urllib3's
    # and OpenSSL's buffers), ours 0. Without OpenSSL's cleanse option the TLS record
    # buffer keeps one.
    assert ours == (0 if CLEANSE_SUPPORTED else 1), f"ours={ours} baseline={baseline}"
    assert baseline > ours


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_pem_secret_copies_outside_locked_memory(vault: KVSpace, reader_token: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = pkcs8(key)
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    body = pem.splitlines()[1][-24:].encode()  # the random tail of the base64 line
    vault.write("svc", hmac_record(secret_key=pem, algorithm="ed25519"))
    pem_copies, seed_copies = load_in_child(vault, reader_token, "watcher", [body, seed])
    assert pem_copies == (0 if CLEANSE_SUPPORTED else 1)
    # The PEM is decoded and parsed only from locked memory (keycache.record
    # check_private_key): no decoded key is left in freed heap memory. Measured before
    # that (parsing a bytes copy of the PEM): 1.
    assert seed_copies == 0
