from __future__ import annotations

import _hashlib
import base64
import ctypes
import hmac
import pickle
import resource
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keycache.securemem import PAGE_SIZE, SecureBuffer, utf8_len, wipe_bytearray

ROOT = Path(__file__).resolve().parents[2]
CAP_IPC_LOCK = 14


def _has_cap_ipc_lock() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return False


def _can_lock(nbytes: int) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return _has_cap_ipc_lock() or soft == resource.RLIM_INFINITY or soft >= 16 * nbytes


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping that contains ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping contains {address:#x}")


def test_size_is_rounded_up_to_pages() -> None:
    assert SecureBuffer(1).size == PAGE_SIZE
    assert SecureBuffer(PAGE_SIZE).size == PAGE_SIZE
    assert SecureBuffer(PAGE_SIZE + 1).size == 2 * PAGE_SIZE
    with pytest.raises(ValueError):
        SecureBuffer(0)


def test_store_returns_read_only_views_of_exactly_the_bytes() -> None:
    buf = SecureBuffer(64)
    a = secrets.token_bytes(20)
    b = bytearray(secrets.token_bytes(7))
    va = buf.store(a)
    vb = buf.store(b)
    vc = buf.store(memoryview(b"xyz"))
    assert (va.tobytes(), vb.tobytes(), vc.tobytes()) == (a, bytes(b), b"xyz")
    assert va.readonly and vb.readonly and vc.readonly
    assert len(va) == 20 and len(vb) == 7
    assert buf.used == 30
    with pytest.raises(TypeError):
        va[0] = 0
    buf.wipe()


def test_store_refuses_when_full_or_wiped() -> None:
    buf = SecureBuffer(1)
    buf.store(bytes(PAGE_SIZE - 1))
    with pytest.raises(ValueError, match="full"):
        buf.store(b"ab")
    buf.store(b"a")  # exactly fills it
    buf.wipe()
    with pytest.raises(ValueError, match="wiped"):
        buf.store(b"a")


def test_wipe_releases_views_and_is_idempotent() -> None:
    buf = SecureBuffer(32)
    view = buf.store(b"secret")
    buf.wipe()
    assert buf.wiped
    assert not buf.locked
    with pytest.raises(ValueError, match="released"):
        view.tobytes()
    buf.wipe()
    assert buf.wiped
    assert buf.unreleased_views == 0


def test_wipe_zeroes_the_whole_region() -> None:
    buf = SecureBuffer(2 * PAGE_SIZE)
    first = buf.store(b"\xff" * PAGE_SIZE)
    buf.store(secrets.token_bytes(100))
    # A slice the holder took keeps the mapping alive after wipe(); through it (and the
    # address) the region can still be read, and must be all zeros.
    peek = first[:]
    buf.wipe()
    with pytest.raises(ValueError, match="released"):
        first.tobytes()
    assert peek.tobytes() == bytes(PAGE_SIZE)
    assert ctypes.string_at(buf.address, buf.size) == bytes(buf.size)
    peek.release()
    buf.wipe()  # now the mapping can be closed


def test_wipe_survives_a_view_it_cannot_release() -> None:
    buf = SecureBuffer(16)
    view = buf.store(b"top-secret")
    holder = pickle.PickleBuffer(view)  # holds a buffer export on the view
    buf.wipe()
    assert buf.wiped
    assert buf.unreleased_views == 1
    assert bytes(holder.raw()) == bytes(10)
    holder.release()
    view.release()
    buf.wipe()


def test_store_text_ascii_and_non_ascii() -> None:
    buf = SecureBuffer(64)
    ascii_secret = secrets.token_urlsafe(24)
    v1 = buf.store_text(ascii_secret)
    v2 = buf.store_text("p\u00e4ss\u20ac")
    assert v1.tobytes() == ascii_secret.encode()
    assert v2.tobytes() == "p\u00e4ss\u20ac".encode()
    assert v1.readonly and v2.readonly
    assert utf8_len(ascii_secret) == len(ascii_secret)
    assert utf8_len("p\u00e4ss\u20ac") == len("p\u00e4ss\u20ac".encode())
    buf.wipe()


def test_views_work_as_hmac_keys() -> None:
    secret = secrets.token_urlsafe(32).encode()
    buf = SecureBuffer(len(secret))
    view = buf.store(secret)
    msg = b"symbol=LTCBTC&side=BUY&timestamp=1499827319559"
    got = _hashlib.hmac_new(view, msg, digestmod="sha256").hexdigest()
    assert got == hmac.new(secret, msg, "sha256").hexdigest()
    buf.wipe()


def test_repr_shows_no_content() -> None:
    buf = SecureBuffer(16)
    buf.store(b"SECRETSECRET")
    assert "SECRET" not in repr(buf)
    assert f"size={PAGE_SIZE}" in repr(buf)
    buf.wipe()


def test_region_is_dump_excluded_and_locked_in_smaps() -> None:
    if not _can_lock(PAGE_SIZE):
        pytest.skip("RLIMIT_MEMLOCK too low and no CAP_IPC_LOCK")
    buf = SecureBuffer(100)
    buf.store(b"x")
    assert buf.locked
    assert buf.dump_excluded
    flags = _vm_flags(buf.address)
    assert "lo" in flags  # VM_LOCKED
    assert "dd" in flags  # VM_DONTDUMP
    buf.wipe()


def test_lock_failure_raises_only_when_required() -> None:
    # Root (CAP_IPC_LOCK) ignores RLIMIT_MEMLOCK, so the child drops that capability
    # before lowering the limit; for a non-root user the capset is a no-op.
    script = r"""
import ctypes, resource
from keycache import MemoryLockError, SecureBuffer

class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]

libc = ctypes.CDLL(None, use_errno=True)
header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
data = (Data * 2)()
assert libc.capget(ctypes.byref(header), data) == 0
data[0].effective &= ~(1 << 14)  # CAP_IPC_LOCK
data[0].permitted &= ~(1 << 14)
assert libc.capset(ctypes.byref(header), data) == 0
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
try:
    SecureBuffer(4096, require_lock=True)
    print("no error")
except MemoryLockError as exc:
    print("raised", exc.code, exc.status, "RLIMIT_MEMLOCK" in str(exc))
buf = SecureBuffer(4096)
view = buf.store(b"abc")
print("unlocked", buf.locked, view.tobytes() == b"abc")
buf.wipe()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["raised memory_lock_failed 500 True", "unlocked False True"]


def test_wipe_bytearray_zeroes_in_place() -> None:
    b = bytearray(secrets.token_bytes(33))
    before = id(b)
    wipe_bytearray(b)
    assert b == bytearray(33)
    assert id(b) == before
    empty = bytearray()
    wipe_bytearray(empty)
    assert empty == bytearray()


def test_make_process_non_dumpable_in_a_child() -> None:
    script = r"""
import ctypes
from keycache import make_process_non_dumpable
libc = ctypes.CDLL(None)
PR_GET_DUMPABLE = 3
print(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), make_process_non_dumpable(),
      libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "True", "0"]


@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=80))
def test_store_base64_decodes_like_b64decode_with_whitespace_anywhere(
    raw: bytes, width: int
) -> None:
    text = base64.b64encode(raw)
    wrapped = b"\n".join(text[i : i + width] for i in range(0, len(text), width))
    buf = SecureBuffer(len(raw))
    try:
        view = buf.store_base64(b"\t" + wrapped + b"\r\n")
        assert view.readonly and view.tobytes() == raw
        assert buf.used == len(raw)  # exactly the decoded size is reserved
    finally:
        buf.wipe()


@pytest.mark.parametrize(
    "bad",
    [b"", b"   ", b"QUJD!", b"QUI", b"QUI=Q", b"Q===", b"QQ=A", b"QR==", b"QUJDRA=", b"=QUJ"],
)
def test_store_base64_refuses_what_is_not_canonical_base64(bad: bytes) -> None:
    buf = SecureBuffer(64)
    try:
        with pytest.raises(ValueError, match="not base64") as info:
            buf.store_base64(bad)
        assert str(info.value).startswith("not base64")
        # Nothing of a refused input is left in the buffer.
        assert ctypes.string_at(buf.address, 64) == bytes(64)
    finally:
        buf.wipe()
