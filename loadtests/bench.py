"""`python -m loadtests.bench` (also `make bench`): what does each send path add?

One run, one local TLS upstream (nginx answering a fixed order response), three paths:

  direct   client --HTTPS keep-alive--> upstream            (engine signing in-process)
  nginx    client --HTTP--> nginx --TLS keep-alive pool--> upstream
  sidecar  client --HTTP--> authproxy serve (signs) --TLS--> upstream

The client is a separate process pinned to one CPU, the servers share another. Paths are
measured in interleaved rounds, rotating their order, so machine noise and drift land on
all of them alike: compare paths within one run, not absolute numbers across runs. Prints
a table and writes the whole result to loadtests/results/bench-<UTC>.json.

This is a benchmark, not a test: it fails (non-zero exit) only when it cannot measure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import multiprocessing
import os
import platform
import shutil
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from loadtests import nginx, report, sidecar
from loadtests.client import ClientPlan, ClientResult, Target, client_main, probe
from loadtests.httpwire import HttpWireError, build_request
from loadtests.pki import LEAF_DNS_NAME, write_tls_files
from loadtests.procs import LOOPBACK, affinity_of, choose_cpus, tail

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "loadtests" / "results"
PATH_NAMES = ("direct", "nginx", "sidecar")
VENUE_PATH = "/api/v3/order"
ORDER_QUERY = "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000"
IO_TIMEOUT_S = 5.0  # per socket operation; the upstream answers in well under 1 ms
# Of --max-seconds, kept back from the client for stopping servers and writing results.
TEARDOWN_RESERVE_S = 20.0
CLIENT_START_GRACE_S = 30.0  # spawn start-up + sending the result back
CLIENT_STOP_TIMEOUT_S = 10.0

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code
EXIT_SETUP = 3  # nginx / TLS / upstream could not be set up
EXIT_SIDECAR = 4  # the sidecar could not be prepared or started
EXIT_PROBE = 5  # a path did not answer its first request with a 2xx
EXIT_CLIENT = 6  # the client process crashed or hung
EXIT_PATH_ABORTED = 7  # measured, but a path kept failing and was dropped
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _paths(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PATH_NAMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(PATH_NAMES)}; got {text!r}")
    return tuple(n for n in PATH_NAMES if n in names)  # fixed order; rounds rotate it


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Latency added by nginx and by the authproxy sidecar over direct TLS.",
    )
    p.add_argument("--requests", type=_positive_int, default=1000, help="per round per path")
    p.add_argument("--rounds", type=_positive_int, default=20)
    p.add_argument("--warmup", type=_non_negative_int, default=500, help="requests per path")
    p.add_argument(
        "--paths", type=_paths, default=PATH_NAMES, help="comma list of direct,nginx,sidecar"
    )
    p.add_argument(
        "--max-seconds", type=float, default=300.0, help="overall deadline (default 300)"
    )
    p.add_argument(
        "--sidecar-extra-config",
        type=_yaml_mapping,
        default={},
        metavar="YAML",
        help="YAML mapping (or @FILE) merged into the sidecar's service config",
    )
    p.add_argument(
        "--keep-policy-rate-limits",
        action="store_true",
        help="keep exchange_api's policy rate limits (100/s) instead of raising them",
    )
    p.add_argument(
        "--authproxy",
        type=Path,
        default=sidecar.authproxy_executable(),
        metavar="PATH",
        help="the authproxy executable (default: the one next to this Python)",
    )
    p.add_argument(
        "--metrics-ab",
        action="store_true",
        help="also run a second sidecar with admin.metrics: false (path 'nometric') in the "
        "same rounds, and report what the per-request metrics cost",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.max_seconds <= TEARDOWN_RESERVE_S:
        p.error(f"--max-seconds must be > {TEARDOWN_RESERVE_S:.0f}")
    return args


def _order_request(path: str, host_port: str) -> bytes:
    """The order request every path sends; only the route prefix and Host differ."""
    return build_request("POST", f"{path}?{ORDER_QUERY}", host_port)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _machine_info(nginx_version: str) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "openssl": ssl.OPENSSL_VERSION,
        "nginx": nginx_version,
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the same cleanup as Ctrl-C


def _stop_client(proc: multiprocessing.process.BaseProcess) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(CLIENT_STOP_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join(CLIENT_STOP_TIMEOUT_S)


def _stop_sidecar(running: sidecar.Sidecar) -> None:
    code = running.stop()
    if code not in (0, None, -signal.SIGTERM):
        print(
            f"bench: sidecar exited {code} on SIGTERM; stderr:\n{tail(running.stderr_log)}",
            file=sys.stderr,
        )


def _fail(message: str, detail: str = "") -> None:
    print(f"bench: {message}", file=sys.stderr)
    if detail:
        print(detail.rstrip(), file=sys.stderr)


def _run_client(plan: ClientPlan, stack: contextlib.ExitStack) -> ClientResult | str:
    """Run the client process; its result, or a message saying why there is none."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=client_main, args=(plan, send), name="bench-client")
    proc.start()
    send.close()
    stack.callback(_stop_client, proc)
    if not receive.poll(plan.budget_s + CLIENT_START_GRACE_S):
        return "the client process sent no result in time"
    try:
        result: ClientResult = receive.recv()
    except EOFError:
        return f"the client process died (exit code {proc.exitcode})"
    proc.join(CLIENT_STOP_TIMEOUT_S)
    if result.error is not None:
        return f"the client process failed:\n{result.error}"
    return result


def _probe_all(targets: list[Target], running: sidecar.Sidecar | None) -> bool:
    """One request per path on a fresh connection; False (after saying why) unless all 2xx."""
    for target in targets:
        problem = detail = ""
        try:
            response = probe(target, IO_TIMEOUT_S)
        except (OSError, HttpWireError) as exc:
            problem = f"{target.name}: probe request failed: {type(exc).__name__}: {exc}"
        else:
            if not 200 <= response.status < 300:
                problem = f"{target.name}: probe answered HTTP {response.status}"
                raw = response.head + b"\r\n\r\n" + response.body[:2000]
                detail = raw.decode(errors="replace")
            elif nginx.ORDER_BODY.encode() not in response.body:
                # A 2xx that did not come from the upstream would make the numbers lie.
                problem = f"{target.name}: probe got a 2xx without the upstream's body"
                detail = response.body[:2000].decode(errors="replace")
        if problem:
            _fail(problem, detail)
            if running is not None and target.name == "sidecar":
                _fail("sidecar stderr:", tail(running.stderr_log))
            return False
    return True


def run(args: argparse.Namespace, run_dir: Path, stack: contextlib.ExitStack) -> int:
    deadline = time.monotonic() + args.max_seconds
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    client_cpu, server_cpu = choose_cpus()
    paths: tuple[str, ...] = args.paths

    try:
        nginx_bin = nginx.ensure_nginx()
    except nginx.NginxError as exc:
        _fail(str(exc))
        return EXIT_SETUP
    nginx_version = nginx.nginx_version(nginx_bin)
    without = nginx.missing_modules(nginx_bin)
    tls = write_tls_files(run_dir)
    print(
        f"bench: {nginx_version}, client on CPU {client_cpu}, servers on CPU {server_cpu}, "
        f"run dir {run_dir}",
        flush=True,
    )

    servers: dict[str, Any] = {}
    targets: list[Target] = []
    running: sidecar.Sidecar | None = None
    try:
        up_prefix = run_dir / "upstream"
        upstream = nginx.start_nginx(
            nginx_bin,
            "upstream",
            up_prefix,
            lambda port: nginx.render_upstream_conf(
                up_prefix, port, tls.leaf_cert, tls.leaf_key, without
            ),
            server_cpu,
        )
        stack.callback(upstream.stop)
        servers["upstream"] = {
            "port": upstream.port,
            "pids": [upstream.proc.pid, *upstream.workers],
        }
        if "direct" in paths:
            host = f"{LOOPBACK}:{upstream.port}"
            targets.append(
                Target(
                    "direct",
                    LOOPBACK,
                    upstream.port,
                    _order_request(VENUE_PATH, host),
                    tls_ca_file=str(tls.ca_cert),
                    tls_server_hostname=LOOPBACK,  # what the sidecar dials: IP SAN check
                )
            )
        if "nginx" in paths:
            px_prefix = run_dir / "proxy"
            proxy = nginx.start_nginx(
                nginx_bin,
                "proxy",
                px_prefix,
                lambda port: nginx.render_proxy_conf(
                    px_prefix, port, upstream.port, tls.ca_cert, LEAF_DNS_NAME, without
                ),
                server_cpu,
            )
            stack.callback(proxy.stop)
            servers["nginx"] = {"port": proxy.port, "pids": [proxy.proc.pid, *proxy.workers]}
            host = f"{LOOPBACK}:{proxy.port}"
            targets.append(
                Target(
                    "nginx", LOOPBACK, proxy.port, _order_request(sidecar.ROUTE + VENUE_PATH, host)
                )
            )
    except nginx.NginxError as exc:
        _fail(str(exc))
        return EXIT_SETUP

    if "sidecar" in paths:
        policy, policy_source = sidecar.load_policy(REPO_ROOT)
        policy = sidecar.bench_policy(policy, lift_rate_limits=not args.keep_policy_rate_limits)
        config = sidecar.render_config(
            run_dir, upstream.port, tls.ca_cert, policy, args.sidecar_extra_config
        )
        exe = args.authproxy
        if not args.keep_policy_rate_limits:
            print(
                f"bench: sidecar policy: {sidecar.KEY_TYPE} rate limits raised to "
                f"{sidecar.BENCH_RATE_LIMITS} (--keep-policy-rate-limits keeps the policy's)",
                flush=True,
            )
        try:
            config_path = sidecar.prepare(exe, run_dir, config)
            running = sidecar.start(exe, config_path, run_dir, server_cpu)
        except sidecar.SidecarError as exc:
            _fail(f"sidecar unavailable: {exc}", exc.output)
            return EXIT_SIDECAR
        stack.callback(_stop_sidecar, running)
        if running.ready_on != "stdout":
            print(
                f"bench: note: the sidecar printed its ready line on {running.ready_on}, "
                "the contract says stdout",
                flush=True,
            )
        servers["sidecar"] = {
            "port": running.port,
            "admin_port": running.admin_port,
            "ready_line_on": running.ready_on,
            "executable": str(exe),
            "pids": [running.proc.pid],
            "policy_source": policy_source,
            "policy_rate_limits": policy["key_types"][sidecar.KEY_TYPE]["rate_limits"],
            "extra_service_config": args.sidecar_extra_config,
        }
        host = f"{LOOPBACK}:{running.port}"
        targets.append(
            Target(
                "sidecar",
                LOOPBACK,
                running.port,
                _order_request(sidecar.ROUTE + VENUE_PATH, host),
            )
        )
        if args.metrics_ab:
            ab_dir = run_dir / "nometric"
            ab_dir.mkdir()
            ab_config = sidecar.render_config(
                ab_dir, upstream.port, tls.ca_cert, policy, args.sidecar_extra_config
            )
            ab_config["admin"]["metrics"] = False
            try:
                ab_path = sidecar.prepare(exe, ab_dir, ab_config)
                ab = sidecar.start(exe, ab_path, ab_dir, server_cpu)
            except sidecar.SidecarError as exc:
                _fail(f"second sidecar (metrics off) unavailable: {exc}", exc.output)
                return EXIT_SIDECAR
            stack.callback(_stop_sidecar, ab)
            servers["nometric"] = {"port": ab.port, "pids": [ab.proc.pid], "metrics": False}
            targets.append(
                Target(
                    "nometric",
                    LOOPBACK,
                    ab.port,
                    _order_request(sidecar.ROUTE + VENUE_PATH, f"{LOOPBACK}:{ab.port}"),
                )
            )

    if not _probe_all(targets, running):
        return EXIT_PROBE
    for info in servers.values():
        info["cpu_affinity"] = {pid: affinity_of(pid) for pid in info["pids"]}

    budget = deadline - time.monotonic() - TEARDOWN_RESERVE_S
    if budget <= 1:
        _fail("--max-seconds used up before measuring")
        return EXIT_SETUP
    plan = ClientPlan(
        targets=tuple(targets),
        warmup=args.warmup,
        rounds=args.rounds,
        requests=args.requests,
        budget_s=budget,
        cpu=client_cpu,
        io_timeout_s=IO_TIMEOUT_S,
    )
    print(
        f"bench: measuring {','.join(paths)}: warm-up {args.warmup}, "
        f"{args.rounds} rounds x {args.requests} requests per path (budget {budget:.0f}s)",
        flush=True,
    )
    outcome = _run_client(plan, stack)
    if isinstance(outcome, str):
        _fail(outcome)
        return EXIT_CLIENT

    summaries = {t.name: report.summarize(outcome.paths[t.name]) for t in targets}
    added = report.added_latency(summaries)
    ratio = report.added_ratio(added)
    print()
    print(report.format_report(summaries, added, ratio))
    on, off = summaries.get("sidecar"), summaries.get("nometric")
    if on is not None and off is not None and on.count and off.count:
        print(
            f"\nmetrics cost (sidecar minus nometric, same rounds): "
            f"p50 {on.p50_us - off.p50_us:+.1f} us, mean {on.mean_us - off.mean_us:+.2f} us, "
            f"p99 {on.p99_us - off.p99_us:+.1f} us"
        )
    if outcome.deadline_hit:
        print(
            f"\nWARNING: --max-seconds reached after {outcome.rounds_done} of {args.rounds} "
            "rounds; results are partial"
        )
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    meta = {
        "schema": 1,
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "argv": sys.argv[1:],
        "options": {
            "paths": list(paths),
            "rounds": args.rounds,
            "requests_per_round": args.requests,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "keep_policy_rate_limits": args.keep_policy_rate_limits,
            "sidecar_extra_config": args.sidecar_extra_config,
        },
        "machine": _machine_info(nginx_version),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "pinning": {"client_cpu": client_cpu, "server_cpu": server_cpu},
        "client_cpu_affinity": outcome.cpu_affinity,
        "servers": servers,
        "rounds_done": outcome.rounds_done,
        "deadline_hit": outcome.deadline_hit,
        "round_orders": outcome.round_orders,
        "latency_unit": "us",
        "hdr_histogram": {
            "lowest": report.HDR_LOWEST_US,
            "highest": report.HDR_HIGHEST_US,
            "significant_digits": report.HDR_SIGNIFICANT_DIGITS,
        },
    }
    document = report.as_json(summaries, added, ratio, meta)
    written = report.write_json(args.results_dir, stamp, document)
    with contextlib.suppress(ValueError):
        written = written.relative_to(Path.cwd())
    print(f"\nresults: {written}")
    if any(s.aborted for s in summaries.values()):
        return EXIT_PATH_ABORTED
    return EXIT_OK


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
