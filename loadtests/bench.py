"""`python -m loadtests.bench` (also `make bench`): what does each send path add, under load?

One run, one local TLS upstream (nginx answering a fixed order response), three paths:

  direct   client --HTTPS keep-alive--> upstream            (engine signing in-process)
  nginx    client --HTTP--> nginx --TLS keep-alive pool--> upstream
  sidecar  client --HTTP--> authproxy serve (signs) --TLS--> upstream

The load is open loop (`loadtests.openloop`): requests leave at their scheduled times and
latency counts from the intended send time. The generator is a separate process pinned to
one CPU; nginx, the sidecar, the upstream and OpenBao share the other. Paths take turns in
interleaved rounds, so drift lands on all of them alike: compare paths within one run,
not absolute numbers across runs. Scenarios (see loadtests/README.md):

  steady      each path at fixed rates (default 1 000 and 5 000 req/s)
  engines     32 client connections at once
  burst       10x the rate for 100 ms every second
  saturation  the highest rate each path holds with p99 under 1 ms (bounded search)
  rotation    a key rotation written into a real OpenBao mid-run (sidecar on Vault)
  outage      OpenBao killed mid-run; the sidecar must keep signing with the keys it holds

Writes loadtests/results/bench-<UTC>.json, PNG plots beside it and summary.md. This is a
benchmark, not a test: it fails (non-zero exit) only when it cannot measure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from loadtests import floor, nginx, openloop, report, scenarios, sidecar
from loadtests.client import Target, probe
from loadtests.httpwire import HttpWireError, build_request
from loadtests.keystore import KeyStore, KeyStoreError
from loadtests.openloop import (
    OK,
    Action,
    EventMark,
    Generator,
    GeneratorError,
    Job,
    JobResult,
    StallProbe,
    measure_stalls,
)
from loadtests.pki import LEAF_DNS_NAME, write_tls_files
from loadtests.procs import (
    LOOPBACK,
    affinity_of,
    choose_cpus,
    make_idle,
    pin_preexec,
    stop_process,
    tail,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "loadtests" / "results"
PATH_NAMES = ("direct", "nginx", "floor", "sidecar")
SCENARIO_NAMES = ("steady", "engines", "burst", "saturation", "rotation", "outage")
FLOOR_READY_TIMEOUT_S = 30.0  # the floor forwarder's warm connections, then its ready line
VAULT_PATH = "sidecar-vault"  # the second sidecar, keys from OpenBao
VENUES = ("bybit", "binance")


@dataclass(frozen=True, slots=True)
class Order:
    """A venue's new-order request as an engine sends it, unsigned."""

    path: str
    answer: str  # the upstream's fixed success body for it (nginx.render_upstream_conf)
    query: str = ""
    body: bytes = b""
    content_type: str | None = None


# Every path sends the same order (the sidecar signs it on the way); the upstream answers
# both paths with the same fixed body.
ORDERS = {
    "binance": Order(
        "/api/v3/order",
        nginx.ORDER_BODY,
        query="symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000",
    ),
    "bybit": Order(
        "/v5/order/create",
        nginx.BYBIT_ORDER_BODY,
        body=b'{"category":"spot","symbol":"BTCUSDT","side":"Buy","orderType":"Limit",'
        b'"qty":"0.01","price":"30000","timeInForce":"GTC"}',
        content_type="application/json",
    ),
}
IO_TIMEOUT_S = 2.0  # per request; the upstream answers in well under 1 ms
WARMUP_RATE = 1000.0
WARMUP_S = 1.0  # per path, once, before the first scenario
TEARDOWN_RESERVE_S = 20.0  # of --max-seconds, kept for stopping servers and writing files
JOB_OVERHEAD_S = 0.3  # connecting, pickling, histogram building: for the deadline estimate
VAULT_SETUP_S = 30.0  # OpenBao and a second sidecar starting, for the deadline estimate
STALL_PROBE_S = 1.0  # per CPU, before the servers start: how jittery is this host?
EVENT_SPAN_S = 2.0  # p99 before vs after an event over this many seconds each side
ROTATION_STEP_LIMIT_US = 100.0  # issue 10: no p99 step larger than this around a rotation

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code
EXIT_SETUP = 3  # nginx / TLS / upstream could not be set up
EXIT_SIDECAR = 4  # the sidecar could not be prepared or started
EXIT_PROBE = 5  # a path did not answer its first request with a 2xx
EXIT_CLIENT = 6  # the generator process crashed or hung
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return tuple(n for n in allowed if n in names)  # fixed order

    return parse


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"need positive rates, got {text!r}")
    return rates


def _yaml_mapping(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise argparse.ArgumentTypeError("must be a YAML mapping")
    return loaded


# --quick: a smoke run of every scenario in about a minute and a half (numbers are rough).
QUICK = {
    "rates": (1000.0,),
    "rounds": 1,
    "duration": 1.5,
    "sat_probes": 4,
    "sat_seconds": 1.0,
    "burst_seconds": 3.0,
    "event_seconds": 6.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Open-loop latency of direct TLS, nginx and the authproxy sidecar.",
    )
    g = p.add_argument_group("what to run")
    g.add_argument(
        "--scenarios",
        type=_choices(SCENARIO_NAMES),
        default=SCENARIO_NAMES,
        help=f"comma list of {','.join(SCENARIO_NAMES)} (default all)",
    )
    g.add_argument(
        "--paths",
        type=_choices(PATH_NAMES),
        default=PATH_NAMES,
        help="comma list of direct,nginx,floor,sidecar (default all; rotation/outage use their "
        "own Vault-backed sidecar)",
    )
    g.add_argument("--quick", action="store_true", help="short smoke run of every scenario")
    g = p.add_argument_group("load")
    g.add_argument("--rates", type=_rates, default=(1000.0, 5000.0), help="steady rates, req/s")
    g.add_argument("--connections", type=_positive_int, default=4, help="per path (default 4)")
    g.add_argument("--duration", type=_positive_float, default=3.0, help="s per path per round")
    g.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds")
    g.add_argument(
        "--warmup", type=float, default=0.3, help="s at the start of each job, unrecorded"
    )
    g.add_argument("--drain", type=_positive_float, default=2.0, help="s to wait for answers")
    g.add_argument("--engines", type=_positive_int, default=32, help="connections, engines")
    g.add_argument("--engines-rate", type=_positive_float, default=1000.0)
    g.add_argument("--burst-rate", type=_positive_float, default=1000.0, help="base rate")
    g.add_argument("--burst-factor", type=_positive_float, default=10.0)
    g.add_argument("--burst-ms", type=_positive_float, default=100.0)
    g.add_argument("--burst-seconds", type=_positive_float, default=6.0, help="per path")
    g.add_argument("--sat-start", type=_positive_float, default=1000.0)
    g.add_argument("--sat-max", type=_positive_float, default=64000.0)
    g.add_argument("--sat-probes", type=_positive_int, default=7, help="per path")
    g.add_argument("--sat-seconds", type=_positive_float, default=1.5, help="per probe")
    g.add_argument(
        "--sat-limit-us",
        type=_positive_float,
        default=report.SAT_LIMIT_US,
        help="latency limit of the saturation search (default 1000)",
    )
    g.add_argument(
        "--sat-percentile",
        type=float,
        choices=(50.0, 90.0, 99.0, 99.9),
        default=None,
        help="percentile held under --sat-limit-us (default 99, or 90 on a host that "
        "stalls its CPUs more than 1%% of the time)",
    )
    g.add_argument("--event-rate", type=_positive_float, default=1000.0, help="rotation/outage")
    g.add_argument("--event-seconds", type=_positive_float, default=14.0, help="rotation/outage")
    g.add_argument("--window-ms", type=_positive_float, default=100.0, help="timeline windows")
    g = p.add_argument_group("the sidecar")
    g.add_argument(
        "--venue",
        choices=VENUES,
        default=sidecar.VENUE,
        help="the sidecar service's venue and the order every path sends (default bybit: "
        "the sidecar holds a binance service to Binance's own 100 orders per 10 s)",
    )
    g.add_argument(
        "--sidecar-extra-config",
        type=_yaml_mapping,
        default={},
        metavar="YAML",
        help="YAML mapping (or @FILE) merged into the sidecar's service config",
    )
    g.add_argument(
        "--keep-policy-rate-limits",
        action="store_true",
        help="keep exchange_api's policy rate limits (100/s) instead of raising them",
    )
    g.add_argument(
        "--authproxy",
        type=Path,
        default=sidecar.authproxy_executable(),
        metavar="PATH",
        help="the authproxy executable (default: the one next to this Python)",
    )
    g.add_argument(
        "--metrics-ab",
        action="store_true",
        help="also run a sidecar with admin.metrics: false (path 'nometric') alongside",
    )
    g = p.add_argument_group("output")
    g.add_argument("--max-seconds", type=float, default=570.0, help="overall deadline")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--keep", action="store_true", help="keep the run directory")
    g.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if args.max_seconds <= TEARDOWN_RESERVE_S:
        p.error(f"--max-seconds must be > {TEARDOWN_RESERVE_S:.0f}")
    if not 0 <= args.warmup < args.duration:
        p.error("--warmup must be >= 0 and shorter than --duration")
    return args


# ---------------------------------------------------------------------- setup


def order_request(order: Order, prefix: str, host_port: str) -> bytes:
    """The order request every path sends; only the route prefix and Host differ."""
    target = prefix + order.path + (f"?{order.query}" if order.query else "")
    return build_request("POST", target, host_port, order.body, order.content_type)


def _proxied_target(name: str, port: int, order: Order) -> Target:
    return Target(name, LOOPBACK, port, order_request(order, sidecar.ROUTE, f"{LOOPBACK}:{port}"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _machine_info(nginx_version: str, usable: list[int]) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "openssl": ssl.OPENSSL_VERSION,
        "nginx": nginx_version,
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the same cleanup as Ctrl-C


class SetupError(Exception):
    """A server could not be set up; `code` is the exit code, `detail` what it printed."""

    def __init__(self, code: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


def _stop_sidecar(running: sidecar.Sidecar) -> None:
    code = running.stop()
    if code not in (0, None, -signal.SIGTERM):
        print(
            f"bench: sidecar exited {code} on SIGTERM; stderr:\n{tail(running.stderr_log)}",
            file=sys.stderr,
        )


def _check_probe(target: Target, order: Order, running: sidecar.Sidecar | None = None) -> None:
    """One request on a fresh connection; raises SetupError unless it is the upstream's 2xx."""
    problem = detail = ""
    try:
        response = probe(target, IO_TIMEOUT_S)
    except (OSError, HttpWireError) as exc:
        problem = f"{target.name}: probe request failed: {type(exc).__name__}: {exc}"
    else:
        if not 200 <= response.status < 300:
            problem = f"{target.name}: probe answered HTTP {response.status}"
            detail = (response.head + b"\r\n\r\n" + response.body[:2000]).decode(errors="replace")
        elif order.answer.encode() not in response.body:
            # A 2xx that did not come from the upstream would make the numbers lie.
            problem = f"{target.name}: probe got a 2xx without the upstream's body"
            detail = response.body[:2000].decode(errors="replace")
    if problem:
        if running is not None:
            detail += f"\nsidecar stderr:\n{tail(running.stderr_log)}"
        raise SetupError(EXIT_PROBE, problem, detail)


@dataclass(slots=True)
class Stage:
    """The servers of one run and the send paths to them."""

    run_dir: Path
    server_cpu: int | None
    upstream_port: int = 0
    ca_cert: Path = Path()
    policy: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    servers: dict[str, Any] = field(default_factory=dict)
    nginx_version: str = ""


def _start_sidecar(
    args: argparse.Namespace,
    stage: Stage,
    stack: contextlib.ExitStack,
    name: str,
    config: dict[str, Any],
    run_dir: Path,
    import_key: bool,
) -> sidecar.Sidecar:
    exe = args.authproxy
    try:
        if import_key:
            config_path = sidecar.prepare(exe, run_dir, config)
        else:
            config_path = sidecar.write_config(run_dir, config)
        running = sidecar.start(exe, config_path, run_dir, stage.server_cpu)
    except sidecar.SidecarError as exc:
        raise SetupError(EXIT_SIDECAR, f"{name} unavailable: {exc}", exc.output) from exc
    stack.callback(_stop_sidecar, running)
    stage.servers[name] = {
        "port": running.port,
        "admin_port": running.admin_port,
        "executable": str(exe),
        # Which stream's pump saw a ready event first (the structured log on stderr
        # carries the same event, so either may win the race).
        "ready_seen_on": running.ready_on,
        "pids": [running.proc.pid],
        "keystore": config["keystore"]["backend"],
        "extra_service_config": args.sidecar_extra_config,
    }
    target = _proxied_target(name, running.port, ORDERS[args.venue])
    _check_probe(target, ORDERS[args.venue], running)
    stage.targets[name] = target
    return running


def _start_floor(
    stage: Stage, stack: contextlib.ExitStack, upstream_port: int, ca_cert: Path, order: Order
) -> None:
    """The bare forwarder on the sidecar's stack (loadtests/floor.py), on the server CPU."""
    log = stage.run_dir / "floor.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, *floor.command(f"{LOOPBACK}:{upstream_port}", ca_cert, sidecar.ROUTE)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            preexec_fn=pin_preexec(stage.server_cpu),
        )
    stack.callback(stop_process, proc, signal.SIGTERM)
    assert proc.stdout is not None
    port = floor.read_ready(proc.stdout, FLOOR_READY_TIMEOUT_S)
    if port is None:
        raise SetupError(EXIT_SETUP, "the floor forwarder did not start", tail(log))
    stage.servers["floor"] = {"port": port, "pids": [proc.pid]}
    target = _proxied_target("floor", port, order)
    _check_probe(target, order)
    stage.targets["floor"] = target


def set_up(args: argparse.Namespace, stage: Stage, stack: contextlib.ExitStack) -> None:
    """Start the upstream, nginx and the file-backed sidecar(s); probe each path."""
    try:
        nginx_bin = nginx.ensure_nginx()
    except nginx.NginxError as exc:
        raise SetupError(EXIT_SETUP, str(exc)) from exc
    stage.nginx_version = nginx.nginx_version(nginx_bin)
    without = nginx.missing_modules(nginx_bin)
    run_dir = stage.run_dir
    tls = write_tls_files(run_dir)
    stage.ca_cert = tls.ca_cert
    cpu = stage.server_cpu
    try:
        up_prefix = run_dir / "upstream"
        upstream = nginx.start_upstream(
            nginx_bin, up_prefix, tls.leaf_cert, tls.leaf_key, without, cpu
        )
        stack.callback(upstream.stop)
        stage.upstream_port = upstream.port
        stage.servers["upstream"] = {
            "port": upstream.port,
            "pids": [upstream.proc.pid, *upstream.workers],
        }
        if "direct" in args.paths:
            target = Target(
                "direct",
                LOOPBACK,
                upstream.port,
                order_request(ORDERS[args.venue], "", f"{LOOPBACK}:{upstream.port}"),
                tls_ca_file=str(tls.ca_cert),
                tls_server_hostname=LOOPBACK,  # what the sidecar dials: IP SAN check
            )
            _check_probe(target, ORDERS[args.venue])
            stage.targets["direct"] = target
        if "nginx" in args.paths:
            px_prefix = run_dir / "proxy"
            proxy = nginx.start_nginx(
                nginx_bin,
                "proxy",
                px_prefix,
                lambda port: nginx.render_proxy_conf(
                    px_prefix,
                    port,
                    upstream.port,
                    tls.ca_cert,
                    LEAF_DNS_NAME,
                    without,
                    sidecar.ROUTE,
                ),
                cpu,
            )
            stack.callback(proxy.stop)
            stage.servers["nginx"] = {
                "port": proxy.port,
                "pids": [proxy.proc.pid, *proxy.workers],
            }
            target = _proxied_target("nginx", proxy.port, ORDERS[args.venue])
            _check_probe(target, ORDERS[args.venue])
            stage.targets["nginx"] = target
    except nginx.NginxError as exc:
        raise SetupError(EXIT_SETUP, str(exc)) from exc
    if "floor" in args.paths:
        _start_floor(stage, stack, upstream.port, tls.ca_cert, ORDERS[args.venue])

    policy, policy_source = sidecar.load_policy(REPO_ROOT)
    stage.policy = sidecar.bench_policy(policy, lift_rate_limits=not args.keep_policy_rate_limits)
    stage.servers["policy"] = {
        "source": policy_source,
        "rate_limits": stage.policy["key_types"][sidecar.KEY_TYPE]["rate_limits"],
    }
    if "sidecar" in args.paths:
        config = sidecar.render_config(
            run_dir,
            upstream.port,
            tls.ca_cert,
            stage.policy,
            args.sidecar_extra_config,
            venue=args.venue,
        )
        _start_sidecar(args, stage, stack, "sidecar", config, run_dir, import_key=True)
        if args.metrics_ab:
            ab_dir = run_dir / "nometric"
            ab_dir.mkdir()
            ab_config = sidecar.render_config(
                ab_dir,
                upstream.port,
                tls.ca_cert,
                stage.policy,
                args.sidecar_extra_config,
                venue=args.venue,
            )
            ab_config["admin"]["metrics"] = False
            _start_sidecar(args, stage, stack, "nometric", ab_config, ab_dir, import_key=True)
    for info in stage.servers.values():
        if "pids" in info:
            info["cpu_affinity"] = {pid: affinity_of(pid) for pid in info["pids"]}


# ---------------------------------------------------------------------- running jobs


class Budget:
    """The run's deadline: scenarios that would not finish before it are skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds - TEARDOWN_RESERVE_S

    def fits(self, seconds: float) -> bool:
        return time.monotonic() + seconds < self.deadline


class Runner:
    """Runs jobs on the generator and turns them into scenario records."""

    def __init__(self, args: argparse.Namespace, gen: Generator, budget: Budget) -> None:
        self.args = args
        self.spin_ns = openloop.SPIN_NS if gen.cpu is not None else 0
        self.gen = gen
        self.budget = budget
        self.skipped: list[str] = []

    def job(self, target: Target, offsets: Any, connections: int | None = None) -> Job:
        return Job(
            target=target,
            offsets_ns=offsets,
            connections=connections or self.args.connections,
            drain_s=self.args.drain,
            io_timeout_s=IO_TIMEOUT_S,
            spin_ns=self.spin_ns,
        )

    def run(self, job: Job, actions: Sequence[Action] = ()) -> tuple[JobResult, list[EventMark]]:
        return self.gen.run(job, actions)

    def estimate(self, per_job_s: float, jobs: int) -> float:
        return jobs * (per_job_s + JOB_OVERHEAD_S)

    def fits(self, name: str, seconds: float) -> bool:
        if self.budget.fits(seconds):
            return True
        self.skipped.append(f"{name} (needs ~{seconds:.0f} s, past --max-seconds)")
        print(f"bench: skipping {name}: not enough time left", flush=True)
        return False

    def rounds(
        self, targets: Sequence[Target], make: Callable[[Target], Job], rounds: int
    ) -> dict[str, list[JobResult]]:
        """Every target once per round; the order rotates each round."""
        results: dict[str, list[JobResult]] = {t.name: [] for t in targets}
        for rnd in range(rounds):
            shift = rnd % len(targets)
            for target in [*targets[shift:], *targets[:shift]]:
                result, _ = self.run(make(target))
                results[target.name].append(result)
        return results


def _path_record(
    name: str,
    kind: str,
    description: str,
    results: dict[str, list[JobResult]],
    warmup_s: float,
    **params: Any,
) -> dict[str, Any]:
    stats = {path: report.path_stats(res, warmup_s) for path, res in results.items()}
    added = report.added_vs_direct(stats)
    return {
        "name": name,
        "kind": kind,
        "description": description,
        **params,
        "warmup_s": warmup_s,
        "paths": report.stats_json(stats),
        "added_vs_direct_us": added,
        "sidecar_over_nginx_added": report.added_ratio(added),
        "floor_over_nginx_added": report.added_ratio(added, "floor"),
    }


def _print_stats(record: dict[str, Any]) -> None:
    for name, s in record["paths"].items():
        print(
            f"  {name:<14} {s['target_rps']:>8,.0f}/s  p50 {s['p50_us']:>6,} "
            f"p99 {s['p99_us']:>7,} p99.9 {s['p999_us']:>7,} max {s['max_us']:>9,.0f} us  "
            f"done {s['throughput_rps']:>7,.0f}/s  errors {s['errors']} "
            f"unanswered {s['incomplete']}  gen lag p99 {s['gen_lag_p99_us']:,.0f} us",
            flush=True,
        )
    ratio = record.get("sidecar_over_nginx_added")
    if ratio:
        print(f"  sidecar/nginx added: p50 {ratio['p50']}, p99 {ratio['p99']}", flush=True)
    ratio = record.get("floor_over_nginx_added")
    if ratio:
        print(f"  floor/nginx added: p50 {ratio['p50']}, p99 {ratio['p99']}", flush=True)


def steady(
    runner: Runner,
    targets: list[Target],
    rate: float,
    connections: int,
    name: str,
    description: str,
) -> dict[str, Any] | None:
    a = runner.args
    seconds = a.duration
    if not runner.fits(name, runner.estimate(seconds + a.drain / 4, a.rounds * len(targets))):
        return None
    print(f"bench: {name}: {description}", flush=True)
    offsets = scenarios.constant(rate, seconds)
    results = runner.rounds(targets, lambda t: runner.job(t, offsets, connections), a.rounds)
    record = _path_record(
        name,
        "steady",
        description,
        results,
        a.warmup,
        rate=rate,
        connections=connections,
        seconds_per_round=seconds,
        rounds=a.rounds,
    )
    _print_stats(record)
    return record


def burst(runner: Runner, targets: list[Target]) -> dict[str, Any] | None:
    a = runner.args
    shape = scenarios.Burst(
        base=a.burst_rate,
        factor=a.burst_factor,
        burst_s=a.burst_ms / 1000,
        period_s=1.0,
        seconds=a.burst_seconds,
    )
    description = (
        f"{a.burst_rate:,.0f} req/s with {a.burst_factor:g}x for {a.burst_ms:g} ms every second"
    )
    if not runner.fits("burst", runner.estimate(a.burst_seconds + a.drain / 2, len(targets))):
        return None
    print(f"bench: burst: {description}", flush=True)
    offsets = shape.schedule()
    results = runner.rounds(targets, lambda t: runner.job(t, offsets), 1)
    record = _path_record(
        "burst",
        "burst",
        description,
        results,
        0.0,
        rate=a.burst_rate,
        connections=a.connections,
        seconds_per_round=a.burst_seconds,
        rounds=1,
    )
    record["window_s"] = a.window_ms / 1000
    record["bursts"] = shape.windows()
    record["timeline"] = {
        path: report.timeline(res[0], a.window_ms / 1000) for path, res in results.items()
    }
    _print_stats(record)
    return record


def saturation(
    runner: Runner, targets: list[Target], pct: float, why: str
) -> dict[str, Any] | None:
    a = runner.args
    per_probe = a.sat_seconds + a.warmup
    if not runner.fits(
        "saturation", runner.estimate(per_probe + a.drain / 2, a.sat_probes * len(targets))
    ):
        return None
    print(
        f"bench: saturation: highest rate with p{pct:g} < {a.sat_limit_us:,.0f} us ({why}), "
        f"{a.sat_probes} probes of {a.sat_seconds:g} s per path",
        flush=True,
    )
    searches = {
        t.name: scenarios.SaturationSearch(
            start=a.sat_start, ceiling=a.sat_max, floor=a.sat_start / 8, max_probes=a.sat_probes
        )
        for t in targets
    }
    probes: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    # Paths take turns probe by probe, so drift during the search lands on all of them.
    while True:
        pending = [(t, searches[t.name].next_rate()) for t in targets]
        pending = [(t, r) for t, r in pending if r is not None]
        if not pending:
            break
        for target, rate in pending:
            assert rate is not None
            offsets = scenarios.constant(rate, per_probe)
            result, _ = runner.run(runner.job(target, offsets))
            stats = report.path_stats([result], a.warmup)
            passed = report.passes(stats, a.sat_limit_us, pct)
            searches[target.name].record(rate, passed)
            probes[target.name].append({"rate": rate, "passed": passed, "stats": stats})
            print(
                f"  {target.name:<14} {rate:>8,.0f}/s  p{pct:g} "
                f"{report.percentile_us(stats, pct):>8,} us  errors "
                f"{stats.failed}  {'pass' if passed else 'FAIL'}"
                f"{' (gen late)' if stats.generator_late else ''}",
                flush=True,
            )
    search: dict[str, dict[str, Any]] = {
        name: {
            "best_rps": searches[name].best,
            "probes": [{**p, "stats": report.stats_json({name: p["stats"]})[name]} for p in ps],
        }
        for name, ps in probes.items()
    }
    best_side = searches["sidecar"].best if "sidecar" in searches else None
    best_ngx = searches["nginx"].best if "nginx" in searches else None
    best_floor = searches["floor"].best if "floor" in searches else None
    return {
        "name": "saturation",
        "kind": "saturation",
        "description": f"highest rate with p{pct:g} < {a.sat_limit_us:,.0f} us and no errors",
        "percentile": pct,
        "percentile_reason": why,
        "limit_us": a.sat_limit_us,
        "probe_s": a.sat_seconds,
        "warmup_s": a.warmup,
        "connections": a.connections,
        "search": search,
        "paths": {},
        "sidecar_over_nginx_throughput": best_side / best_ngx if best_side and best_ngx else None,
        "floor_over_nginx_throughput": best_floor / best_ngx if best_floor and best_ngx else None,
    }


# ---------------------------------------------------------------------- Vault scenarios


@contextlib.contextmanager
def vault_stage(
    args: argparse.Namespace, stage: Stage, stack: contextlib.ExitStack
) -> Iterator[tuple[KeyStore, sidecar.Sidecar, dict[str, Any]]]:
    """OpenBao with one key, and a sidecar reading its keys from it; yields both and the
    record it signs with."""
    vdir = stage.run_dir / "vault"
    vdir.mkdir()
    store = KeyStore(vdir)
    stack.callback(store.stop)
    print("bench: starting OpenBao (bao server -dev -dev-tls)", flush=True)
    try:
        store.start()
        first = sidecar.make_key_record(dt.datetime.now(dt.UTC))
        store.write(sidecar.SERVICE, first)
    except (KeyStoreError, OSError, RuntimeError) as exc:
        raise SetupError(EXIT_SETUP, f"OpenBao unavailable: {exc}") from exc
    # OpenBao stands in for a Vault server that runs on other machines: its own CPU is not
    # the sidecar's to pay. On the shared server CPU it runs under SCHED_IDLE, so its
    # wake-ups never preempt the sidecar. That does not make it free: on an EEVDF kernel it
    # can still be picked while the sidecar waits (loadtests/README.md, "Key-store polls").
    idle_threads = make_idle(store.pid) if store.pid else 0
    stage.servers["openbao"] = {
        "pid": store.pid,
        "cpu_affinity": affinity_of(store.pid or 0),
        "sched_idle_threads": idle_threads,
    }
    config = sidecar.render_config(
        vdir,
        stage.upstream_port,
        stage.ca_cert,
        stage.policy,
        args.sidecar_extra_config,
        keystore=sidecar.vault_keystore(**store.keystore_config()),
        venue=args.venue,
    )
    running = _start_sidecar(args, stage, stack, VAULT_PATH, config, vdir, import_key=False)
    yield store, running, first


def _sidecar_events(
    running: sidecar.Sidecar, t0_ns: int, since_s: float, names: Sequence[str]
) -> list[tuple[str, float]]:
    since = t0_ns + int(since_s * 1e9)
    return [
        (e["event"], round((t - t0_ns) / 1e9, 4))
        for t, e in running.events_since(since)
        if e["event"] in names
    ]


def event_run(
    runner: Runner,
    target: Target,
    running: sidecar.Sidecar,
    name: str,
    description: str,
    action: Action,
    reactions: Sequence[str],
) -> dict[str, Any]:
    a = runner.args
    print(f"bench: {name}: {description}", flush=True)
    offsets = scenarios.constant(a.event_rate, a.event_seconds)
    result, marks = runner.run(runner.job(target, offsets), [action])
    record = _path_record(
        name,
        "events",
        description,
        {target.name: [result]},
        0.0,
        rate=a.event_rate,
        connections=a.connections,
        seconds_per_round=a.event_seconds,
        rounds=1,
    )
    record["window_s"] = a.window_ms / 1000
    record["timeline"] = {target.name: report.timeline(result, a.window_ms / 1000)}
    events = []
    for mark in marks:
        seen = _sidecar_events(running, result.t0_ns, mark.start_s, reactions)
        around = report.around(result, mark.start_s, EVENT_SPAN_S)
        events.append(
            {
                "name": mark.name,
                "start_s": round(mark.start_s, 4),
                "end_s": round(mark.end_s, 4),
                "error": mark.error,
                "around": around,
                "sidecar_events": seen,
                "sidecar_reaction": (
                    f"{seen[0][0]} +{seen[0][1] - mark.start_s:.2f} s" if seen else "nothing logged"
                ),
            }
        )
        print(
            f"  {mark.name} at {mark.start_s:.2f} s{' FAILED: ' + mark.error if mark.error else ''}"
            f"; p99 before {around['p99_before_us']} us, after {around['p99_after_us']} us"
            f"; sidecar: {events[-1]['sidecar_reaction']}",
            flush=True,
        )
    record["events"] = events
    _print_stats(record)
    return record


def rotation(
    runner: Runner, store: KeyStore, running: sidecar.Sidecar, target: Target
) -> dict[str, Any]:
    a = runner.args
    new = sidecar.make_key_record(dt.datetime.now(dt.UTC))
    at = a.event_seconds / 2
    record = event_run(
        runner,
        target,
        running,
        "rotation",
        f"{a.event_rate:,.0f} req/s; a new key version written to OpenBao "
        f"at {at:g} s (watcher polls every {store.keystore_config()['poll_interval_ms']} ms)",
        Action(at, "rotation written", store.writer(sidecar.SERVICE, new)),
        ("keys_swapped", "key_swap_failed", "key_version_refused"),
    )
    stats = record["paths"][target.name]
    swapped = [
        e
        for t, e in running.events_since(0, "keys_swapped")
        if new["key_id"] in e.get("key_ids", [])
    ]
    around = record["events"][0]["around"] if record["events"] else {}
    step, noise = around.get("p99_step_us"), around.get("p99_step_noise_us")
    record["verdict"] = {
        "errors": stats["errors"] + stats["incomplete"],
        "new_key_swapped_in": bool(swapped),
        "p99_step_us": step,
        "step_limit_us": ROTATION_STEP_LIMIT_US,
        # The step only means something where the run's own window-to-window noise is
        # below the limit; on a busy host it is not, whichever way the step went.
        "p99_step_noise_us": noise,
        "conclusive": noise is not None and noise <= ROTATION_STEP_LIMIT_US,
        "ok": bool(swapped)
        and stats["errors"] + stats["incomplete"] == 0
        and step is not None
        and step <= ROTATION_STEP_LIMIT_US,
    }
    print(f"  verdict: {record['verdict']}", flush=True)
    return record


def outage(
    runner: Runner, store: KeyStore, running: sidecar.Sidecar, target: Target
) -> dict[str, Any]:
    a = runner.args
    at = a.event_seconds * 0.4
    record = event_run(
        runner,
        target,
        running,
        "outage",
        f"{a.event_rate:,.0f} req/s; OpenBao SIGKILLed at {at:g} s and not restarted",
        Action(at, "OpenBao killed", store.kill),
        ("key_store_error", "key_store_health", "watcher_error"),
    )
    stats = record["paths"][target.name]
    record["verdict"] = {
        "errors": stats["errors"] + stats["incomplete"],
        "ok": stats["errors"] + stats["incomplete"] == 0,
    }
    print(f"  verdict: {record['verdict']}", flush=True)
    return record


# ---------------------------------------------------------------------- the run


def _stamp(results_dir: Path, started: dt.datetime) -> str:
    base = started.strftime("%Y%m%dT%H%M%SZ")
    stamp, n = base, 0
    while (results_dir / f"bench-{stamp}.json").exists():
        n += 1
        stamp = f"{base}-{n}"
    return stamp


def run(args: argparse.Namespace, run_dir: Path, stack: contextlib.ExitStack) -> int:
    wall0 = time.monotonic()
    budget = Budget(args.max_seconds)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    usable = sorted(os.sched_getaffinity(0))  # before this process pins itself below
    client_cpu, server_cpu = choose_cpus()
    # The generator pins itself to its CPU; everything else this process starts (nginx,
    # sidecars, OpenBao and their threads) inherits the other one from here.
    gen = Generator(client_cpu)
    stack.callback(gen.close)
    if server_cpu is not None:
        os.sched_setaffinity(0, {server_cpu})
    try:
        stalls = {
            "generator_cpu": gen.stalls(StallProbe(STALL_PROBE_S)),
            "server_cpu": measure_stalls(StallProbe(STALL_PROBE_S)),
        }
    except GeneratorError as exc:
        _fail(str(exc))
        return EXIT_CLIENT
    print(f"bench: host stalls over {STALL_PROBE_S:g} s of spinning: {stalls}", flush=True)
    stage = Stage(run_dir=run_dir, server_cpu=server_cpu)
    try:
        set_up(args, stage, stack)
    except SetupError as exc:
        _fail(str(exc), exc.detail)
        return exc.code
    print(
        f"bench: {stage.nginx_version}; generator on CPU {client_cpu}, servers on CPU "
        f"{server_cpu}; run dir {run_dir}",
        flush=True,
    )
    runner = Runner(args, gen, budget)
    targets = [stage.targets[n] for n in (*PATH_NAMES, "nometric") if n in stage.targets]
    records: list[dict[str, Any]] = []
    exit_code = EXIT_OK
    try:
        for target in targets:  # connections, caches, the sidecar's first signatures
            warm, _ = runner.run(runner.job(target, scenarios.constant(WARMUP_RATE, WARMUP_S)))
            _warn_failures(warm)
        wanted = set(args.scenarios)
        if "steady" in wanted:
            for rate in args.rates:
                rec = steady(
                    runner,
                    targets,
                    rate,
                    args.connections,
                    f"steady-{rate:g}",
                    f"{rate:,.0f} req/s over {args.connections} connections",
                )
                if rec:
                    records.append(rec)
        if "engines" in wanted:
            rec = steady(
                runner,
                targets,
                args.engines_rate,
                args.engines,
                f"engines-{args.engines}",
                f"{args.engines_rate:,.0f} req/s spread over {args.engines} connections",
            )
            if rec:
                records.append(rec)
        if "burst" in wanted and (rec := burst(runner, targets)):
            records.append(rec)
        pct, why = report.saturation_percentile(args.sat_percentile, stalls)
        if "saturation" in wanted and (rec := saturation(runner, targets, pct, why)):
            records.append(rec)
        vault_wanted = [s for s in ("rotation", "outage") if s in wanted]
        need = VAULT_SETUP_S + len(vault_wanted) * (args.event_seconds + args.drain + 1)
        if vault_wanted and runner.fits("+".join(vault_wanted), need):
            try:
                with vault_stage(args, stage, stack) as (store, running, _):
                    target = stage.targets[VAULT_PATH]
                    warm, _ = runner.run(
                        runner.job(target, scenarios.constant(WARMUP_RATE, WARMUP_S))
                    )
                    _warn_failures(warm)
                    if "rotation" in wanted:
                        records.append(rotation(runner, store, running, target))
                    if "outage" in wanted:
                        records.append(outage(runner, store, running, target))
            except SetupError as exc:
                _fail(str(exc), exc.detail)
                runner.skipped.append(f"{'+'.join(vault_wanted)} ({exc})")
                exit_code = exc.code
    except GeneratorError as exc:
        _fail(str(exc))
        runner.skipped.append(f"the rest ({exc})")
        exit_code = EXIT_CLIENT

    stamp = _stamp(args.results_dir, started)
    for info in stage.servers.values():
        if isinstance(info, dict) and "pids" in info:
            info["pids"] = [int(p) for p in info["pids"]]
    doc: dict[str, Any] = {
        "schema": 2,
        "stamp": stamp,
        "json_name": f"bench-{stamp}.json",
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "wall_s": round(time.monotonic() - wall0, 1),
        "argv": sys.argv[1:],
        "options": {
            "scenarios": list(args.scenarios),
            "venue": args.venue,
            "paths": list(args.paths),
            "rates": list(args.rates),
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "drain_s": args.drain,
            "sat_limit_us": args.sat_limit_us,
            "sat_percentile": args.sat_percentile,
            "quick": args.quick,
            "max_seconds": args.max_seconds,
            "keep_policy_rate_limits": args.keep_policy_rate_limits,
            "sidecar_extra_config": args.sidecar_extra_config,
        },
        "machine": _machine_info(stage.nginx_version, usable),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "pinning": {"client_cpu": client_cpu, "server_cpu": server_cpu},
        "host_stalls": stalls,
        "servers": stage.servers,
        "latency_unit": "us",
        "latency_from": "intended send time",
        "hdr_histogram": {
            "lowest": report.HDR_LOWEST_US,
            "highest": report.HDR_HIGHEST_US,
            "significant_digits": report.HDR_SIGNIFICANT_DIGITS,
        },
        "skipped": runner.skipped,
        "scenarios": records,
    }
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        from loadtests import plots  # matplotlib takes a second to import: only when drawing

        doc["plots"] = [p.name for p in plots.draw_all(doc, results_dir)]
    # Start to here: set-up, every scenario and the plots; not the teardown that follows.
    doc["wall_s"] = round(time.monotonic() - wall0, 1)
    written = report.write_json(results_dir, stamp, doc)
    summary = report.summary_markdown(doc)
    report.write_text(results_dir / "summary.md", summary)
    print()
    print(summary)
    print(f"results: {_relative(written)}, {_relative(results_dir / 'summary.md')}")
    return exit_code


def _warn_failures(result: JobResult) -> None:
    """Say loudly when a path fails its warm-up: every figure after it would be of errors."""
    failed = sum(1 for o in result.outcome if o != OK)
    if failed:
        print(
            f"bench: WARNING: {result.path} failed {failed} of {len(result.outcome)} warm-up "
            f"requests at {WARMUP_RATE:,.0f} req/s (statuses {result.statuses}, errors "
            f"{result.errors}). A sidecar answering 429 is holding the service to a rate "
            "limit: the policy's (lifted unless --keep-policy-rate-limits) or the venue's "
            "own windows.",
            file=sys.stderr,
            flush=True,
        )


def _relative(path: Path) -> Path:
    with contextlib.suppress(ValueError):
        return path.relative_to(Path.cwd())
    return path


def _fail(message: str, detail: str = "") -> None:
    print(f"bench: {message}", file=sys.stderr)
    if detail:
        print(detail.rstrip(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    run_dir = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            return run(args, run_dir, stack)
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if args.keep:
            print(f"bench: run dir kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
