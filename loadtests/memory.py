"""Resident memory of one sidecar holding many services (issue 10: under 60 MB with 10).

    python -m loadtests.memory [--services 10]

Starts the benchmark's stand-in venue (nginx over TLS, a throwaway CA), writes a sidecar
config with N Bybit services (each its own route, key and warm upstream pool), imports a
fresh throwaway key per service, starts ``authproxy serve``, sends one order through each
route, and prints VmRSS, VmHWM (peak) and VmLck from ``/proc/<pid>/status``. A figure, not
a test: it never fails on the number. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import secrets
import subprocess
import tempfile
from pathlib import Path

from loadtests import nginx, sidecar
from loadtests.bench import ORDERS, REPO_ROOT, order_request
from loadtests.client import Target, probe
from loadtests.pki import write_private_file, write_tls_files
from loadtests.procs import LOOPBACK

BUDGET_MB = 60.0  # issue 10
VENUE = "bybit"


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and VmLck of ``pid`` in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "VmLck"):
            out[name] = int(value.split()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10)
    parser.add_argument("--authproxy", type=Path, default=sidecar.authproxy_executable())
    args = parser.parse_args(argv)
    names = [f"svc{i:02d}" for i in range(args.services)]
    with (
        tempfile.TemporaryDirectory(prefix="authproxy-memory-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        run_dir = Path(tmp)
        binary = nginx.ensure_nginx()
        tls = write_tls_files(run_dir)
        prefix = run_dir / "upstream"
        without = nginx.missing_modules(binary)
        upstream = nginx.start_upstream(binary, prefix, tls.leaf_cert, tls.leaf_key, without, None)
        stack.callback(upstream.stop)
        policy, _ = sidecar.load_policy(REPO_ROOT)
        config = sidecar.render_config(
            run_dir, upstream.port, tls.ca_cert, sidecar.bench_policy(policy, True), venue=VENUE
        )
        base = config["services"].pop(sidecar.SERVICE)
        for name in names:
            config["services"][name] = {**base, "route": f"/{name}"}
        write_private_file(run_dir / "kek.key", secrets.token_bytes(sidecar.KEK_BYTES))
        config_path = sidecar.write_config(run_dir, config)
        import_cmd = [str(args.authproxy), "keys", "import", "--config", str(config_path)]
        for name in names:
            record = sidecar.make_key_record(dt.datetime.now(dt.UTC))
            subprocess.run(
                [*import_cmd, "--service", name],
                input=json.dumps(record).encode(),
                capture_output=True,
                timeout=sidecar.IMPORT_TIMEOUT_S,
                cwd=run_dir,
                check=True,
            )
        running = sidecar.start(args.authproxy, config_path, run_dir, None)
        stack.callback(running.stop)
        host = f"{LOOPBACK}:{running.port}"
        statuses = [
            probe(
                Target(
                    name, LOOPBACK, running.port, order_request(ORDERS[VENUE], f"/{name}", host)
                ),
                2.0,
            ).status
            for name in names
        ]
        mem = status_kb(running.proc.pid)
    rss_mb = mem["VmRSS"] / 1024
    print(
        f"authproxy serve with {args.services} {VENUE} services (keys loaded, pools warm, one "
        f"order each: statuses {sorted(set(statuses))}):\n"
        f"  resident {rss_mb:.1f} MB (budget {BUDGET_MB:.0f} MB), peak "
        f"{mem['VmHWM'] / 1024:.1f} MB, locked {mem['VmLck'] / 1024:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
