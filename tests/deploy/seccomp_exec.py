"""Install the seccomp filters systemd 252 builds for a unit, then exec a command.

Standard library only, run as a script before the sidecar:

    python seccomp_exec.py [--mdwe] [--families AF_UNIX,AF_INET] [--allow FILE] -- argv...

``--mdwe``: MemoryDenyWriteExecute=yes, as systemd 252 builds it (seccomp-util.c): refuse
mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat with
SHM_EXEC (EPERM). ``--families``: RestrictAddressFamilies=: socket() of any other family
fails with EAFNOSUPPORT. ``--allow FILE``: SystemCallFilter= allow-list (one syscall name
a line) with SystemCallErrorNumber=EPERM. Each is its own filter, as systemd loads them;
libseccomp sets no_new_privs. The filters survive execve.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import socket
import sys

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
ACT_ALLOW = 0x7FFF0000
CMP_EQ, CMP_GE, CMP_MASKED_EQ = 4, 5, 7
AF_MAX = 46  # Linux 6.x: families are 0..45


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _Cmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


_lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
_lib.seccomp_init.restype = ctypes.c_void_p
_lib.seccomp_init.argtypes = (ctypes.c_uint32,)
_lib.seccomp_rule_add_array.argtypes = (
    ctypes.c_void_p,
    ctypes.c_uint32,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.POINTER(_Cmp),
)
_lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
_lib.seccomp_load.argtypes = (ctypes.c_void_p,)
_lib.seccomp_release.argtypes = (ctypes.c_void_p,)


def _nr(name: str) -> int:
    return int(_lib.seccomp_syscall_resolve_name(name.encode()))


def _filter(default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> None:
    ctx = _lib.seccomp_init(default)
    assert ctx, "seccomp_init failed"
    try:
        for action, name, cmps in rules:
            nr = _nr(name)
            if nr < 0:  # not a syscall of this architecture (e.g. i386-only names)
                continue
            array = (_Cmp * max(1, len(cmps)))(*(_Cmp(*c) for c in cmps))
            rc = _lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
            assert rc == 0, f"seccomp_rule_add {name}: {rc}"
        rc = _lib.seccomp_load(ctx)
        assert rc == 0, f"seccomp_load: {rc}"
    finally:
        _lib.seccomp_release(ctx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mdwe", action="store_true")
    parser.add_argument("--families", default="")
    parser.add_argument("--allow")
    parser.add_argument("--umask", type=lambda v: int(v, 8))
    parser.add_argument("argv", nargs="+")
    args = parser.parse_args()
    if args.umask is not None:
        os.umask(args.umask)
    if args.families:
        keep = {int(getattr(socket, fam)) for fam in args.families.split(",")}
        refuse = _errno_action(errno.EAFNOSUPPORT)
        rules = [(refuse, "socket", [(0, CMP_EQ, af, 0)]) for af in range(AF_MAX) if af not in keep]
        rules.append((refuse, "socket", [(0, CMP_GE, AF_MAX, 0)]))
        _filter(ACT_ALLOW, rules)
    if args.mdwe:
        eperm = _errno_action(errno.EPERM)
        wx = PROT_WRITE | PROT_EXEC
        _filter(
            ACT_ALLOW,
            [
                (eperm, "mmap", [(2, CMP_MASKED_EQ, wx, wx)]),
                (eperm, "mprotect", [(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                (eperm, "pkey_mprotect", [(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                (eperm, "shmat", [(2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
            ],
        )
    # Last, as systemd does: the allow-list may not include seccomp() itself.
    if args.allow:
        with open(args.allow, encoding="utf-8") as f:
            names = sorted({line.strip() for line in f if line.strip()})
        _filter(_errno_action(errno.EPERM), [(ACT_ALLOW, n, []) for n in names])
    sys.stdout.flush()
    os.execv(args.argv[0], args.argv)


if __name__ == "__main__":
    main()
