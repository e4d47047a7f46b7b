"""What the kernel says about a running sidecar: no core file, not dumpable (so no other
process of its user can read its memory); and systemd told when it is ready and when it
stops. All checked from outside the process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.demo import binance_service, sidecar_config, write_key_file
from proxy.procs import Proc, sidecar_argv
from tests.e2e.conftest import Sidecars, Venue

pytestmark = pytest.mark.e2e


def _core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line")


def test_the_running_sidecar_writes_no_core(sidecars: Sidecars) -> None:
    proc = sidecars.start()
    assert _core_limit(proc.pid) == ("0", "0")
    # The test process itself may dump core: the difference is the sidecar's doing.
    assert _core_limit(os.getpid()) != ("0", "0")


def test_systemd_is_told_ready_then_stopping(sidecars: Sidecars, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        proc = sidecars.start(env={"NOTIFY_SOCKET": str(path)})
        first = sock.recv(4096).decode()
        assert "READY=1" in first.splitlines()
        assert f"MAINPID={proc.pid}" in first.splitlines()
        proc.popen.send_signal(signal.SIGTERM)
        second = sock.recv(4096).decode()
        assert "STOPPING=1" in second.splitlines()
        assert proc.popen.wait(timeout=30) == 0


#: The unprivileged user the sidecar runs as in the dumpability test (Debian's nobody).
TEST_UID = 65534
TEST_GID = 65534
#: util-linux's setpriv execs its command as TEST_UID (same PID: the test watches the
#: sidecar itself). The interpreter lives under /root (mode 0700), so every process of the
#: test user keeps one capability, CAP_DAC_READ_SEARCH (ambient, survives the exec), to
#: read it. The sidecar, the control process and the probe get exactly the same
#: credentials: the only difference between the sidecar and the control is the sidecar's
#: own prctl(PR_SET_DUMPABLE, 0). CAP_DAC_READ_SEARCH does not bypass the ptrace check
#: that guards /proc/<pid>/mem and environ; only CAP_SYS_PTRACE would.
_SETPRIV = (
    "--reuid={uid}",
    "--regid={gid}",
    "--clear-groups",
    "--inh-caps=-all,+dac_read_search",
    "--ambient-caps=+dac_read_search",
)
#: Run as TEST_UID: for each pid on the command line, can it open /proc/<pid>/mem and
#: read /proc/<pid>/environ (what ptrace_may_access guards)?
_PROBE = """
import sys
for pid in sys.argv[1:]:
    verdicts = []
    for name in ("mem", "environ"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                if name == "environ":  # (mem at offset 0 is unmapped: opening is the test)
                    f.read(1)
            verdicts.append("read")
        except PermissionError:
            verdicts.append("denied")
    print(pid, *verdicts)
"""


def _as_test_user(argv: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux, essential in Debian) is missing"
    options = [o.format(uid=TEST_UID, gid=TEST_GID) for o in _SETPRIV]
    return [setpriv, *options, "--", *argv]


def _owner(pid: int, name: str) -> int:
    return os.stat(f"/proc/{pid}/{name}").st_uid


def _uid_line(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return line.split()[1:]
    raise AssertionError("no Uid line")


def test_the_sidecar_is_not_dumpable_seen_from_its_own_user(venue: Venue, tmp_path: Path) -> None:
    """proc(5): the files under /proc/<pid> of a process that is not dumpable are owned
    by root, whoever runs it; and ptrace_may_access (which guards /proc/<pid>/mem and
    environ, and ptrace itself) refuses a process of the same user without
    CAP_SYS_PTRACE. The sidecar runs as an unprivileged user; a plain process of the same
    user with the same credentials is the control: dumpable, so its files are its user's
    and the probe can read them. Root with CAP_SYS_PTRACE could still attach
    (test_coredump.py does, with gcore)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start processes under another uid")
    record = venue.keys["binance_hmac"][0]
    keys_path, kek_path = write_key_file(tmp_path, {"binance_hmac": record})
    services = {"binance_hmac": binance_service(venue.port, venue.ca_file, "/hmac")}
    config = tmp_path / "authproxy.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(keys_path, kek_path, services)))
    for path in (keys_path, kek_path):
        os.chown(path, TEST_UID, TEST_GID)  # the sidecar refuses a KEK it does not own

    sidecar = Proc(_as_test_user(sidecar_argv(config)), stderr_path=tmp_path / "stderr.log")
    control: subprocess.Popen[bytes] | None = None
    try:
        control = subprocess.Popen(
            _as_test_user(
                [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"]
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert control.stdout is not None
        assert control.stdout.readline() == b"ready\n"  # running as TEST_UID by now
        assert _uid_line(sidecar.pid) == [str(TEST_UID)] * 4
        assert _uid_line(control.pid) == [str(TEST_UID)] * 4
        for name in ("status", "environ", "mem", "maps"):
            assert _owner(sidecar.pid, name) == 0, name  # not dumpable: root's
            assert _owner(control.pid, name) == TEST_UID, name  # dumpable: its user's
        probe = subprocess.run(
            _as_test_user([sys.executable, "-c", _PROBE, str(sidecar.pid), str(control.pid)]),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        verdicts = dict(line.split(" ", 1) for line in probe.stdout.splitlines())
        assert verdicts == {str(sidecar.pid): "denied denied", str(control.pid): "read read"}
        assert _core_limit(sidecar.pid) == ("0", "0")
    finally:
        if control is not None:
            for pipe in (control.stdin, control.stdout):
                if pipe is not None:
                    pipe.close()
            control.wait(10)
        assert sidecar.stop() == 0, sidecar.stderr_tail()
