"""nginx for the benchmark: find or install Debian's package, render configs, run instances.

Two instances per run, each in its own prefix directory under the run dir: the TLS
*upstream* (the stand-in venue every path ends at) and the *proxy* (the nginx send path).
Never the system config or service: each instance gets `-p DIR -c DIR/nginx.conf -e
DIR/error.log`, `daemon off` so it stays our child, and is stopped by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.procs import (
    LOOPBACK,
    READY_TIMEOUT_S,
    child_pids,
    free_port,
    pin_preexec,
    stop_process,
    tail,
    wait_for_port,
)

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
APT_PACKAGES = ("nginx-light", "nginx")
APT_TIMEOUT_S = 600.0
# Debian's invoke-rc.d asks this hook whether a package may start its service; 101 means
# "no", so installing nginx does not also start the system nginx on port 80.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
PORT_ATTEMPTS = 3  # free_port() can race with another process taking the port
# Each venue's new-order success, shaped as the venue sends it: the sidecar inspects
# answers (a Bybit refusal comes as HTTP 200 with a retCode), so the shape matters.
ORDER_BODY = '{"symbol":"BTCUSDT","orderId":1,"status":"NEW"}'  # Binance POST /api/v3/order
BYBIT_ORDER_BODY = (  # Bybit v5 POST /v5/order/create
    '{"retCode":0,"retMsg":"OK","result":{"orderId":"1","orderLinkId":""},'
    '"retExtInfo":{},"time":1764370000000}'
)
# Temp-path directives per module: Debian compiles absolute paths under /var/lib/nginx in,
# so each instance points them into its own prefix.
_TEMP_PATH_DIRECTIVES = {
    "client_body_temp_path": None,
    "proxy_temp_path": "http_proxy",
    "fastcgi_temp_path": "http_fastcgi",
    "uwsgi_temp_path": "http_uwsgi",
    "scgi_temp_path": "http_scgi",
}


class NginxError(Exception):
    """nginx could not be found, installed or started."""


def find_nginx() -> str | None:
    on_path = shutil.which("nginx")
    if on_path:
        return on_path
    return next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)


def apt_get(args: list[str], timeout_s: float) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"bench: apt-get {' '.join(args)}", flush=True)
    try:
        done = subprocess.run(
            ["apt-get", *args], env=env, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"bench: apt-get failed: {exc}", flush=True)
        return False
    return done.returncode == 0


def ensure_nginx(timeout_s: float = APT_TIMEOUT_S) -> str:
    """Return the nginx binary, installing Debian's nginx-light (or nginx) if missing.

    Raises NginxError when it is missing and cannot be installed.
    """
    found = find_nginx()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NginxError("nginx is not installed; install Debian's nginx-light package")
    made_policy = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text("#!/bin/sh\n# authproxy bench: no service starts\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        made_policy = True
    try:
        for refresh in (False, True):
            if refresh and not apt_get(["update"], timeout_s):
                break
            for package in APT_PACKAGES:
                if apt_get(["install", "-y", "--no-install-recommends", package], timeout_s):
                    found = find_nginx()
                    if found:
                        return found
    finally:
        if made_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    raise NginxError(f"could not install any of {', '.join(APT_PACKAGES)} with apt-get")


def nginx_version(binary: str) -> str:
    """The version string `nginx -v` prints, e.g. 'nginx/1.22.1'."""
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"nginx version: (\S+)", done.stderr + done.stdout)
    return match.group(1) if match else (done.stderr + done.stdout).strip()


def missing_modules(binary: str) -> frozenset[str]:
    """Module names compiled out of this binary (from `--without-<name>_module`)."""
    done = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10, check=False)
    return frozenset(re.findall(r"--without-(\w+?)_module", done.stderr + done.stdout))


# ---------------------------------------------------------------------- pure config rendering


def _main_context(prefix: Path, without: frozenset[str]) -> tuple[str, str]:
    """The top-level directives and the http-level temp paths shared by both instances."""
    top = f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
lock_file {prefix}/nginx.lock;
error_log {prefix}/error.log warn;
events {{
    worker_connections 256;
}}
"""
    temp = "".join(
        f"    {directive} {prefix}/tmp-{directive.split('_')[0]};\n"
        for directive, module in _TEMP_PATH_DIRECTIVES.items()
        if module is None or module not in without
    )
    return top, temp


def render_upstream_conf(
    prefix: Path, port: int, cert: Path, key: Path, without: frozenset[str] = frozenset()
) -> str:
    """nginx.conf of the stand-in venue: TLS on 127.0.0.1:`port`, a fixed order answer."""
    top, temp = _main_context(prefix, without)
    return f"""{top}http {{
{temp}    access_log off;
    server_tokens off;
    default_type application/json;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:bench_upstream:1m;
    server {{
        listen {LOOPBACK}:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = /api/v3/order {{
            return 200 '{ORDER_BODY}';
        }}
        location = /v5/order/create {{
            return 200 '{BYBIT_ORDER_BODY}';
        }}
        location / {{
            return 404 '{{"code":-1,"msg":"bench upstream: unknown path"}}';
        }}
    }}
}}
"""


def render_proxy_conf(
    prefix: Path,
    port: int,
    upstream_port: int,
    ca_file: Path,
    tls_name: str,
    without: frozenset[str] = frozenset(),
    route: str = "/venue",
) -> str:
    """nginx.conf of the nginx send path: plain HTTP in, TLS keep-alive pool out.

    `location <route>/` + `proxy_pass https://up/` strips the prefix, so the engine sends
    the same path to nginx as to the sidecar.
    """
    top, temp = _main_context(prefix, without)
    return f"""{top}http {{
{temp}    access_log off;
    server_tokens off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream up {{
        server {LOOPBACK}:{upstream_port};
        keepalive 16;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {LOOPBACK}:{port};
        location {route}/ {{
            proxy_pass https://up/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_trusted_certificate {ca_file};
            proxy_ssl_name {tls_name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"""


# ---------------------------------------------------------------------- running instances


@dataclass(slots=True)
class NginxInstance:
    """A running nginx master we started, its workers, and where its files are."""

    name: str
    prefix: Path
    port: int
    proc: subprocess.Popen[bytes]
    workers: list[int] = field(default_factory=list)

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def stop(self) -> None:
        """Graceful stop (SIGQUIT), then SIGKILL of the master and any leftover worker."""
        stop_process(
            self.proc,
            signal.SIGQUIT,
            orphans=self.workers,
            orphan_marker=b"nginx: worker",
        )


def start_nginx(
    binary: str,
    name: str,
    prefix: Path,
    render: Callable[[int], str],
    cpu: int | None,
) -> NginxInstance:
    """Write the config `render(port)` gives for a free port, start nginx, wait for the port.

    Retries with another port if the chosen one was taken meanwhile. Raises NginxError with
    the error log when it does not come up.
    """
    prefix.mkdir(mode=0o700, exist_ok=True)
    conf = prefix / "nginx.conf"
    error_log = prefix / "error.log"
    last_log = ""
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        conf.write_text(render(port))
        test = subprocess.run(
            [binary, "-t", "-q", "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if test.returncode != 0:
            raise NginxError(f"{name}: nginx -t rejected {conf}:\n{test.stderr}")
        proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pin_preexec(cpu),
            start_new_session=True,  # a Ctrl-C reaches us; we stop it in order
        )
        instance = NginxInstance(name=name, prefix=prefix, port=port, proc=proc)
        if wait_for_port(port, proc, READY_TIMEOUT_S):
            instance.workers = _wait_workers(proc.pid)
            return instance
        instance.stop()
        last_log = tail(error_log)
        if "Address already in use" not in last_log:
            break
    raise NginxError(f"{name}: nginx did not start; {error_log}:\n{last_log}")


def start_upstream(
    binary: str, prefix: Path, cert: Path, key: Path, without: frozenset[str], cpu: int | None
) -> NginxInstance:
    """The TLS stand-in venue (``render_upstream_conf``) under ``prefix``."""
    return start_nginx(
        binary,
        "upstream",
        prefix,
        lambda port: render_upstream_conf(prefix, port, cert, key, without),
        cpu,
    )


def _wait_workers(master: int, timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    workers = child_pids(master)
    while not workers and time.monotonic() < deadline:
        time.sleep(0.05)
        workers = child_pids(master)
    return workers
