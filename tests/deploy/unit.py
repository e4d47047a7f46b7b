"""Read a systemd unit file and run a command under what its [Service] section says.

Without systemd as PID 1 on the test machine, the settings that act on the process
itself are reproduced the way systemd 252 applies them: LimitCORE= (prlimit), the
capability sets and no_new_privs (setpriv), umask and the seccomp filters of
MemoryDenyWriteExecute=, RestrictAddressFamilies= and SystemCallFilter= (seccomp_exec.py,
with the syscall groups expanded by ``systemd-analyze syscall-filter``). The filesystem
namespaces are reproduced only as far as ProtectSystem=strict goes (``writable``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.deploy.tools import ensure_systemd_analyze

SECCOMP_EXEC = Path(__file__).with_name("seccomp_exec.py")
_SIZE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value assigned, in order (comments and blank lines dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(service: dict[str, list[str]], key: str) -> str:
    return service[key][-1]


def size_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", value)
    assert m, f"unsupported size {value!r}"
    return int(m.group(1)) * _SIZE[m.group(2)]


def syscall_groups() -> dict[str, list[str]]:
    """``@group`` -> its members (syscall names or nested ``@groups``), from systemd."""
    out = subprocess.run(
        [ensure_systemd_analyze(), "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return groups


def expand_syscalls(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    names: set[str] = set()
    for item in items:
        if item.startswith("@"):
            names |= expand_syscalls(groups[item], groups)
        else:
            names.add(item)
    return names


def sandbox_argv(
    unit: Path, argv: list[str], work: Path, *, writable: Path | None = None
) -> list[str]:
    """``argv`` wrapped so it runs with the process-level settings of ``unit``'s [Service].

    With ``writable``, also ProtectSystem=strict in the large: in a private mount namespace
    every mount is read-only but ``writable`` (which stands for the unit's StateDirectory=
    and RuntimeDirectory=), /dev, /proc and /sys.
    """
    service = parse_unit(unit)["Service"]
    # The unit runs as a non-root User= whose only capabilities are the ambient ones. The
    # test runs as root: keep exactly those in every set, so root has them and no other.
    ambient = last(service, "AmbientCapabilities").split()
    assert set(ambient) <= set(last(service, "CapabilityBoundingSet").split())
    caps = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in ambient)])
    core = size_bytes(last(service, "LimitCORE"))
    # LimitMEMLOCK= is not applied: raising the hard limit needs CAP_SYS_RESOURCE, which
    # the test machine may not grant. The sidecar then runs under the machine's limit
    # (often 8 MiB), which shows that CAP_IPC_LOCK alone lets it lock all it needs.
    wrapped = [
        "prlimit",
        f"--core={core}:{core}",
        "--",
        "setpriv",
        f"--bounding-set={caps}",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
    ]
    if last(service, "NoNewPrivileges") == "yes":
        wrapped.append("--no-new-privs")
    wrapped += ["--", sys.executable, str(SECCOMP_EXEC), "--umask", last(service, "UMask")]
    if last(service, "MemoryDenyWriteExecute") == "yes":
        wrapped.append("--mdwe")
    families = " ".join(service.get("RestrictAddressFamilies", [])).split()
    if families:
        wrapped += ["--families", ",".join(families)]
    if "SystemCallFilter" in service:
        assert last(service, "SystemCallErrorNumber") == "EPERM"
        items = " ".join(service["SystemCallFilter"]).split()
        assert not any(i.startswith("~") for i in items), "only allow-lists are reproduced"
        allow = work / "syscalls.allow"
        allow.write_text("\n".join(sorted(expand_syscalls(items, syscall_groups()))) + "\n")
        wrapped += ["--allow", str(allow)]
    wrapped += ["--", *argv]
    if writable is None:
        return wrapped
    assert last(service, "ProtectSystem") == "strict"
    # Every mount but the kernel's and ``writable`` (bound onto itself first) goes read-only.
    remount = (
        'mount --bind "$1" "$1" || exit 1\n'
        "for m in $(cut -d' ' -f5 /proc/self/mountinfo); do\n"
        '  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|"$1") ;;\n'
        '  *) mount -o remount,bind,ro "$m" 2>/dev/null ;; esac\n'
        "done\n"
        'shift; exec "$@"\n'
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        remount,
        "sh",
        str(writable),
        *wrapped,
    ]
