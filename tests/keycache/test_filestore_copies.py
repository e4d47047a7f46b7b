"""How many copies of a secret a core dump would hold after loading it from the key file.

A child process decrypts a key file (``KeyFile.load``), builds each service's ring
(``build_ring``), scrubs the records it was given (``scrub_record``) and drops every
reference but the rings, then waits. The parent reads the child's memory through
/proc/<pid>/mem, skipping what a core dump skips (mappings flagged ``dd``: the rings'
locked buffers), and counts the secrets: an HMAC secret, and for an RSA PEM key a line
of the PEM and a window of its private exponent as the DER holds it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from keycache.filestore import KeyFile, load_kek_file
from tests.keycache.helpers import hmac_record, pkcs8

REPO = Path(__file__).resolve().parents[2]
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")

CHILD = r"""
import gc, json, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from keycache.filestore import KeyFile, load_kek_file
from keycache.record import scrub_record
from keycache.ring import build_ring
keys, kek, scrub = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "scrub"
def load():
    keyfile = KeyFile(keys, kek=load_kek_file(kek))
    try:
        stored = keyfile.load()
    finally:
        keyfile.close()
    rings = {}
    for name, versions in stored.items():
        rings[name] = build_ring(name, versions, now=datetime.now(UTC), overlap=timedelta(hours=1))
    if scrub:
        for versions in stored.values():
            for _, record in versions:
                scrub_record(record)
    return rings
rings = load()
gc.collect()
print(json.dumps({"dd": all(r.buffer.dump_excluded for r in rings.values())}), flush=True)
sys.stdin.readline()
"""


def _dumpable(pid: int) -> list[tuple[int, int]]:
    regions: list[list[object]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _MAPPING.match(line)
        if m:
            regions.append([int(m[1], 16), int(m[2], 16), m[3], m[4], False])
        elif line.startswith("VmFlags:") and regions:
            regions[-1][4] = "dd" in line.split()[1:]
    return [
        (int(str(start)), int(str(end)))
        for start, end, perms, name, dont_dump in regions
        if "r" in str(perms) and not dont_dump and name not in ("[vvar]", "[vsyscall]")
    ]


def _count(pid: int, needles: list[bytes]) -> list[int]:
    counts = [0] * len(needles)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in _dumpable(pid):
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            for i, needle in enumerate(needles):
                counts[i] += data.count(needle)
    return counts


def _load_in_child(keys: Path, kek: Path, how: str, needles: list[bytes]) -> list[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(keys), str(kek), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert json.loads(proc.stdout.readline())["dd"], "ring buffers must be MADV_DONTDUMP"
        return _count(proc.pid, needles)
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        assert proc.wait(30) == 0


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_secrets_loaded_from_the_key_file_leave_no_copy(tmp_path: Path) -> None:
    hmac = hmac_record()
    key = rsa.generate_private_key(65537, 2048)
    pem = pkcs8(key)
    keys, kek = tmp_path / "keys.enc", tmp_path / "kek.key"
    KeyFile.create_kek_file(kek)
    with KeyFile(keys, kek=load_kek_file(kek)) as keyfile:
        keyfile.add_version("hmac", hmac)
        keyfile.add_version("rsa", hmac_record(secret_key=pem, algorithm="rsa-pkcs1-sha256"))
    d = key.private_numbers().d.to_bytes(256, "big")
    lines = pem.splitlines()
    needles = [
        str(hmac["secret_key"]).encode(),
        lines[len(lines) // 2].encode(),
        d[112:144],  # 32 bytes of the private exponent, as in the DER
    ]
    scrubbed = _load_in_child(keys, kek, "scrub", needles)
    # The decrypted text is parsed without stray copies and wiped; the records' secret
    # strings are zeroed once the rings hold the secrets; the PEM is parsed from locked
    # memory. Measured before those changes (json.loads on the decrypted bytes, the PEM
    # parsed from a bytes copy): [0, 1, 1] scrubbed, [1, 2, 1] not.
    assert scrubbed == [0, 0, 0]
    # Without scrubbing, the records' own strings stay in freed memory until it is reused
    # (measured [1, 1, 0]); proxy.runtime.load_rings scrubs them once its rings are built.
    kept = _load_in_child(keys, kek, "keep", needles)
    assert kept[0] <= 1 and kept[1] <= 1 and kept[2] == 0, kept
