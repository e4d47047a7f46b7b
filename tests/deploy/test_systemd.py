"""deploy/systemd: the unit passes ``systemd-analyze verify`` (Debian's systemd, installed
when missing), with the engine drop-in; and the sidecar runs, signs and stops under the
process settings of the unit (capabilities, limits, seccomp filters)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.demo import binance_service, make_test_keys, sidecar_config, write_key_file
from proxy.procs import Proc, sidecar_argv, simulator_argv
from tests.deploy.tools import DEPLOY, ensure_systemd_analyze
from tests.deploy.unit import last, parse_unit, sandbox_argv

UNIT = DEPLOY / "systemd" / "authproxy.service"
DROP_IN = DEPLOY / "systemd" / "trading-engine.service.d" / "10-authproxy.conf"
INSTALLED = "/opt/authproxy/bin/authproxy"
AUTHPROXY = Path(sys.executable).parent / "authproxy"  # this venv's console script


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ensure_systemd_analyze(), "verify", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
        cwd=units[0].parent,
    )


def _render_unit(tmp_path: Path) -> Path:
    """The unit as installed, its ExecStart pointing at this venv's ``authproxy`` (verify
    checks that the executable exists); nothing else changed."""
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(INSTALLED) == 1
    rendered = tmp_path / "authproxy.service"
    rendered.write_text(text.replace(INSTALLED, str(AUTHPROXY)))
    return rendered


def test_the_unit_and_the_engine_drop_in_verify_clean(tmp_path: Path) -> None:
    unit = _render_unit(tmp_path)
    engine = tmp_path / "trading-engine.service"
    engine.write_text("[Unit]\nDescription=engine\n[Service]\nExecStart=/bin/sleep infinity\n")
    (tmp_path / "trading-engine.service.d").mkdir()
    (tmp_path / "trading-engine.service.d" / DROP_IN.name).write_text(DROP_IN.read_text())
    result = _verify(unit, engine)
    # verify exits 0 on unknown keys and bad values (it only warns): no output is the bar.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_the_units_exposure_stays_low(tmp_path: Path) -> None:
    """systemd's own hardening score (0 = locked down, 10 = exposed): 1.6 with systemd 252
    when written; above 2.0 means a protection was dropped."""
    unit = str(_render_unit(tmp_path))
    result = subprocess.run(
        [ensure_systemd_analyze(), "security", "--offline=true", "--threshold=20", unit],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Overall exposure level for authproxy.service" in result.stdout


def test_verify_reports_what_the_clean_check_relies_on(tmp_path: Path) -> None:
    unit = _render_unit(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHom=yes"))
    result = _verify(unit)
    assert "Unknown key" in result.stderr and "ProtectHom" in result.stderr
    (tmp_path / "x").mkdir()
    missing = tmp_path / "x" / "authproxy.service"
    missing.write_text(UNIT.read_text())  # ExecStart=/opt/authproxy/... does not exist here
    assert _verify(missing).returncode != 0


def test_the_unit_says_what_the_issue_asks() -> None:
    sections = parse_unit(UNIT)
    service = sections["Service"]
    expected = {
        "Type": "notify",
        "ExecStart": f"{INSTALLED} serve --config /etc/authproxy/authproxy.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "LimitCORE": "0",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "CAP_IPC_LOCK",
        "AmbientCapabilities": "CAP_IPC_LOCK",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute": "yes",
        "ReadOnlyPaths": "/etc/authproxy",
        "StateDirectory": "authproxy",
        "RuntimeDirectory": "authproxy",
    }
    assert {k: last(service, k) for k in expected} == expected
    assert "LimitMEMLOCK" in service
    drop_in = parse_unit(DROP_IN)["Unit"]
    assert last(drop_in, "After") == last(drop_in, "Requires") == "authproxy.service"


def test_the_sample_config_matches_the_units_directories() -> None:
    service = parse_unit(UNIT)["Service"]
    config = yaml.safe_load((DEPLOY / "systemd" / "authproxy.yaml").read_text())
    socket_path = Path(config["listen"]["address"].removeprefix("unix:"))
    assert socket_path.parent == Path("/run") / last(service, "RuntimeDirectory")
    assert Path(config["state_dir"]) == Path("/var/lib") / last(service, "StateDirectory")
    assert Path(last(service, "ExecStart").split()[-1]).parent == Path(
        last(service, "ReadOnlyPaths")
    )


# --- running under the unit's settings ---------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _post(sock_path: Path, target: str) -> bytes:
    """One request over the unix socket, as an engine sends it; the raw response head."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        sock.sendall(
            f"POST {target} HTTP/1.1\r\nHost: authproxy\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _check_sandboxed_sidecar(sidecar: Proc, notify: socket.socket, sock_path: Path) -> None:
    assert "READY=1" in notify.recv(4096).decode().splitlines()
    status = _status(sidecar.pid)
    assert status["CapEff"] == f"{1 << 14:016x}"  # CAP_IPC_LOCK and nothing else
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert int(status["Seccomp_filters"]) >= 3
    assert int(status["VmLck"].split()[0]) > 8192  # kB: over the usual 8 MiB limit
    order = "/api/v3/order?symbol=BTCUSDT&side=BUY&type=MARKET&quantity=1"
    for route in ("hmac", "ed25519", "rsa"):
        reply = _post(sock_path, f"/{route}{order}")
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    reply = _post(sock_path, f"/unregistered{order}")
    assert b'"code":-2015' in reply.replace(b" ", b""), reply[:300]
    sidecar.popen.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
    assert sidecar.popen.wait(timeout=30) == 0


@pytest.mark.e2e
def test_the_sidecar_signs_under_the_units_process_settings(tmp_path: Path) -> None:
    """CapabilityBoundingSet/AmbientCapabilities, NoNewPrivileges, LimitCORE, UMask, the
    seccomp filters of MemoryDenyWriteExecute, RestrictAddressFamilies and SystemCallFilter
    (applied as systemd 252 applies them) and a read-only filesystem but the state/socket
    directory; lock_all and require_memory_lock on, so locking the whole process must work
    with CAP_IPC_LOCK alone. HMAC, Ed25519 and RSA requests (CPython, cryptography, uvloop,
    ctypes) all sign and reach the venue simulator."""
    keys = make_test_keys()
    venue_keys = tmp_path / "venue-keys.json"
    venue_keys.write_text(json.dumps({"binance": [v for _, v in keys.values() if v]}))
    venue = Proc(simulator_argv(venue_keys, tmp_path / "venue"), stderr_path=tmp_path / "venue.log")
    try:
        run = tmp_path / "run"  # stands for StateDirectory= and RuntimeDirectory=
        run.mkdir()
        keys_path, kek_path = write_key_file(run, {s: r for s, (r, _) in keys.items()})
        port, ca = int(venue.ready["port"]), str(venue.ready["ca_file"])
        services = {s: binance_service(port, ca, "/" + s.removeprefix("binance_")) for s in keys}
        config = sidecar_config(keys_path, kek_path, services)
        sock_path = run / "authproxy.sock"
        config["listen"] = {"address": f"unix:{sock_path}"}
        config["memory"] = {"require_memory_lock": True, "lock_all": True}
        config["state_dir"] = str(run / "state")
        config_path = run / "authproxy.yaml"
        config_path.write_text(yaml.safe_dump(config))
        argv = sandbox_argv(UNIT, sidecar_argv(config_path), tmp_path, writable=run)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(tmp_path / "notify.sock"))
            notify.settimeout(30)
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "PATH": "/usr/bin:/bin"}
            sidecar = Proc(argv, env=env, stderr_path=tmp_path / "sidecar.log")
            try:
                _check_sandboxed_sidecar(sidecar, notify, sock_path)
            finally:
                sidecar.stop()
    finally:
        venue.stop()
    log = (tmp_path / "sidecar.log").read_text().splitlines()
    events = [json.loads(line)["event"] for line in log]
    assert "memory_locked_all" in events
    assert not {"memory_not_locked", "process_dumpable", "core_limit_not_set"} & set(events)


def test_the_sandbox_bites(tmp_path: Path) -> None:
    """The reproduction of the unit's settings is real: W+X memory, a netlink socket, a
    syscall outside @system-service (mincore) and a write outside the writable directory
    are refused inside it, and allowed outside."""
    probe = (
        "import ctypes, errno, mmap, socket, sys\n"
        "out = []\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    out.append('wx')\n"
        "except OSError as exc:\n"
        "    out.append(errno.errorcode[exc.errno])\n"
        "try:\n"
        "    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()\n"
        "    out.append('netlink')\n"
        "except OSError as exc:\n"
        "    out.append(errno.errorcode[exc.errno])\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "buf = mmap.mmap(-1, 4096)\n"
        "addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))\n"
        "vec = ctypes.create_string_buffer(1)\n"
        "rc = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(4096), vec)\n"
        "out.append('mincore' if rc == 0 else errno.errorcode[ctypes.get_errno()])\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        out.append('written')\n"
        "    except OSError as exc:\n"
        "        out.append(errno.errorcode[exc.errno])\n"
        "print(' '.join(out))\n"
    )
    writable = tmp_path / "state"
    writable.mkdir()
    targets = [str(writable / "a"), str(tmp_path / "b")]
    argv = [sys.executable, "-c", probe, *targets]
    outside = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    assert outside == ["wx", "netlink", "mincore", "written", "written"]
    inside = subprocess.run(
        sandbox_argv(UNIT, argv, tmp_path, writable=writable),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert inside == ["EPERM", "EAFNOSUPPORT", "EPERM", "written", "EROFS"]
