"""Instructions per request of the real sidecar, of the floor, and of the sidecar without
metrics, counted by valgrind's callgrind: a figure the VM's noise does not move.

    python -m loadtests.instructions [--small 200] [--large 1000] [--top 15]

On the shared development VMs a latency or CPU-time figure moves by tens of percent from
one run to the next; the count of instructions a process executes does not. Each target
runs twice under callgrind (``PYTHONHASHSEED=0``), serving ``--small`` and then
``--large`` sequential Bybit orders over one engine connection, against the stand-in
venue (nginx over TLS, as in ``make bench``). The difference of the two totals divided by
the difference of the counts is what one request costs: start-up, warm-up and shutdown
cancel out. What fires by the clock (the pools' sweeps, the loop-lag sampler, the key
store's poll) does not quite cancel, because the larger run lasts longer under
valgrind: the sidecar's figure moves by up to about 4 000 instructions a request between
runs, the floor's (no timers) by a few.

Targets:
- ``sidecar``: ``authproxy serve`` as ``make bench`` runs it (key file store, metrics on);
- ``nometric``: the same with ``admin.metrics: false``; sidecar minus nometric is what
  the metrics cost (issue 7), in the real process;
- ``floor``: ``loadtests/floor.py``, the bare forwarder on the same stack; sidecar minus
  floor is the sidecar's own work.

What it does not count: the kernel (the system calls, the loopback TCP path) and cache
misses, which are most of a request's time on the VM (docs/performance.md). Instructions
say what the code asks of the CPU, not how long the CPU takes. valgrind is Debian's
package, installed with apt-get when missing. Loopback only; every loop is bounded by
its count and a per-read timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtests import floor, nginx, sidecar
from loadtests.bench import ORDERS, REPO_ROOT
from loadtests.pki import write_tls_files
from loadtests.procs import stop_process

TARGETS = ("sidecar", "nometric", "floor")
START_TIMEOUT_S = 600.0  # start-up under valgrind: imports alone take a minute
READ_TIMEOUT_S = 30.0  # one answer under valgrind
APT_TIMEOUT_S = 600.0
_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)
# callgrind_annotate's lines: "  1,234,567 (12.34%)  file:function [object]"
_ANNOTATED = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.+?)\s*(?:\[.*\])?$")


class InstructionsError(Exception):
    """valgrind could not be found or installed, or a target did not run."""


def ensure_valgrind() -> str:
    """The valgrind binary; Debian's package installed with apt-get when missing."""
    found = shutil.which("valgrind")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InstructionsError("valgrind is not installed; install Debian's valgrind package")
    for refresh in (False, True):
        if refresh and not nginx.apt_get(["update"], APT_TIMEOUT_S):
            break
        if nginx.apt_get(["install", "-y", "--no-install-recommends", "valgrind"], APT_TIMEOUT_S):
            found = shutil.which("valgrind")
            if found:
                return found
    raise InstructionsError("could not install valgrind with apt-get")


@dataclass(frozen=True, slots=True)
class Setup:
    run_dir: Path
    upstream_port: int
    ca_cert: Path
    valgrind: str


def _order_bytes() -> bytes:
    order = ORDERS["bybit"]
    head = (
        f"POST {sidecar.ROUTE}{order.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {order.content_type}\r\nContent-Length: {len(order.body)}\r\n\r\n"
    )
    return head.encode() + order.body


def _send_orders(port: int, count: int) -> int:
    """``count`` orders, one at a time, on one connection; returns how many got a 200."""
    request = _order_bytes()
    ok = 0
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            conn.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    raise InstructionsError("the target closed the connection")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    raise InstructionsError("the target closed the connection")
                body += chunk
            ok += head.startswith(b"HTTP/1.1 200 ")
    return ok


def _callgrind(setup: Setup, out: Path) -> list[str]:
    return [
        setup.valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
    ]


@contextlib.contextmanager
def _running(setup: Setup, target: str, out: Path) -> Iterator[int]:
    """Start ``target`` under callgrind; yield its engine port; stop it (the profile is
    written at exit)."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    if target == "floor":
        proc = subprocess.Popen(
            [
                *_callgrind(setup, out),
                *floor.command(
                    f"127.0.0.1:{setup.upstream_port}",
                    setup.ca_cert,
                    sidecar.ROUTE,
                    "--connections",
                    "2",
                ),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            port = floor.read_ready(proc.stdout, START_TIMEOUT_S)
            if port is None:
                raise InstructionsError("the floor did not start under valgrind")
            yield port
        finally:
            stop_process(proc, signal.SIGTERM, timeout_s=120)
        return
    exe = sidecar.authproxy_executable()
    target_dir = setup.run_dir / f"dir-{out.name}"
    target_dir.mkdir()
    policy, _ = sidecar.load_policy(REPO_ROOT)
    config = sidecar.render_config(
        target_dir,
        setup.upstream_port,
        setup.ca_cert,
        sidecar.bench_policy(policy, lift_rate_limits=True),
        {},
        venue="bybit",
    )
    if target == "nometric":
        config["admin"]["metrics"] = False
    config_path = sidecar.prepare(exe, target_dir, config)
    wrapper = target_dir / "authproxy-under-callgrind"
    command = shlex.join([*_callgrind(setup, out), str(exe)])
    wrapper.write_text(f'#!/bin/sh\nexport PYTHONHASHSEED=0\nexec {command} "$@"\n')
    wrapper.chmod(0o700)
    try:
        running = sidecar.start(wrapper, config_path, target_dir, None, START_TIMEOUT_S)
    except sidecar.SidecarError as exc:
        raise InstructionsError(f"{target} did not start under valgrind: {exc}") from exc
    try:
        yield running.port
    finally:
        running.stop()


def measure(setup: Setup, target: str, count: int) -> tuple[int, Path]:
    """Total instructions of ``target`` serving ``count`` orders, and its profile."""
    out = setup.run_dir / f"callgrind.{target}.{count}"
    with _running(setup, target, out) as port:
        ok = _send_orders(port, count)
    if ok != count:
        raise InstructionsError(f"{target}: {ok} of {count} orders answered 200")
    match = _TOTALS.search(out.read_bytes())
    if match is None:
        raise InstructionsError(f"{target}: no totals in {out}")
    return int(match.group(1)), out


def per_function(profile: Path) -> dict[str, int]:
    """Self instructions by function (callgrind_annotate's flat list)."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(profile)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    found: dict[str, int] = {}
    for line in text.splitlines():
        m = _ANNOTATED.match(line)
        if m and "PROGRAM TOTALS" not in line:
            name = re.sub(r"^.*/(Python|Objects|Modules|Include|Parser)/", r"\1/", m.group(2))
            found[name] = found.get(name, 0) + int(m.group(1).replace(",", ""))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.instructions", description=__doc__)
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--large", type=int, default=1000)
    p.add_argument("--top", type=int, default=15, help="functions listed per difference")
    p.add_argument("--targets", default=",".join(TARGETS))
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if any(t not in TARGETS for t in targets) or not 0 < args.small < args.large:
        p.error(f"targets are {','.join(TARGETS)}; 0 < --small < --large")
    try:
        valgrind = ensure_valgrind()
        binary = nginx.ensure_nginx()
    except (InstructionsError, nginx.NginxError) as exc:
        print(f"instructions: {exc}", file=sys.stderr)
        return 1
    per_request: dict[str, float] = {}
    functions: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="authproxy-instructions-") as tmp:
        run_dir = Path(tmp)
        tls = write_tls_files(run_dir)
        upstream = nginx.start_upstream(
            binary,
            run_dir / "upstream",
            tls.leaf_cert,
            tls.leaf_key,
            nginx.missing_modules(binary),
            None,
        )
        try:
            setup = Setup(run_dir, upstream.port, tls.ca_cert, valgrind)
            for target in targets:
                small, small_profile = measure(setup, target, args.small)
                large, large_profile = measure(setup, target, args.large)
                n = args.large - args.small
                per_request[target] = (large - small) / n
                big, little = per_function(large_profile), per_function(small_profile)
                functions[target] = {
                    k: (big.get(k, 0) - little.get(k, 0)) / n for k in set(big) | set(little)
                }
                print(f"{target}: {per_request[target]:,.0f} instructions per request")
        except InstructionsError as exc:
            print(f"instructions: {exc}", file=sys.stderr)
            return 1
        finally:
            upstream.stop()
    print()
    print(f"User-space instructions per request ({args.large} - {args.small} orders, Bybit)")
    print()
    print("| target | instructions per request |")
    print("|---|--:|")
    for target, value in per_request.items():
        print(f"| {target} | {value:,.0f} |")
    pairs = (
        ("nometric", "metrics (sidecar - nometric)"),
        ("floor", "the sidecar's own work (sidecar - floor)"),
    )
    shown = [(base, label) for base, label in pairs if {"sidecar", base} <= per_request.keys()]
    for base, label in shown:
        print(f"| {label} | {per_request['sidecar'] - per_request[base]:,.0f} |")
    for base, label in shown:
        print()
        print(f"Where {label} goes (self instructions per request, largest first):")
        print()
        side, other = functions["sidecar"], functions[base]
        rows = sorted(
            ((side.get(k, 0) - other.get(k, 0), k) for k in set(side) | set(other)),
            reverse=True,
        )
        for value, name in rows[: args.top]:
            print(f"  {value:9,.0f}  {name[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
