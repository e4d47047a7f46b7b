"""``python -m proxy.simulator``: serve the venue simulator over HTTPS until SIGTERM/SIGINT.

Once listening it prints exactly one JSON line to stdout and flushes it::

    {"event": "ready", "port": 43121, "ca_file": "/abs/DIR/ca.pem"}

Nothing else goes to stdout; logs go to stderr. Exit codes: :data:`EXIT_OK` after a clean
stop, :data:`EXIT_START_FAILED` if it could not listen (bind or TLS error),
:data:`EXIT_USAGE` for bad arguments or a bad keys file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from proxy.simulator.base import KeySetError
from proxy.simulator.server import MAX_LATENCY_MS, make_app, system_clock
from proxy.simulator.tlsca import make_tls_material, server_ssl_context, write_ca_file

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2

# A stop waits this long for in-flight requests (e.g. /__sim/slow) before cancelling them;
# aiohttp applies it per phase (handlers, then connections), so a stop takes at most about
# twice this. Tests SIGTERM the simulator and expect it gone promptly.
SHUTDOWN_TIMEOUT_S = 1.0

log = logging.getLogger("proxy.simulator")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy.simulator",
        description="Local HTTPS venue simulator that verifies signed requests like the venue.",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        help='keys file: {"binance": [{"api_key", "algorithm", "secret"|"public_key"}]}',
    )
    parser.add_argument(
        "--state-dir", type=Path, required=True, help="directory for ca.pem (created if missing)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 = any free port")
    parser.add_argument(
        "--clock-offset-ms",
        type=int,
        default=0,
        help="shift the simulator's clock (provokes -1021 timestamp errors)",
    )
    parser.add_argument(
        "--latency-ms", type=int, default=0, help="fixed delay before answering each request"
    )
    parser.add_argument(
        "--gzip",
        action="store_true",
        help="gzip JSON answers when the request sends Accept-Encoding: gzip",
    )
    return parser


def _load_keys(path: Path | None) -> object:
    if path is None:
        return None
    return json.loads(path.read_text(encoding="utf-8"))


async def serve(app: web.Application, args: argparse.Namespace) -> int:
    """Listen on ``args.host``/``args.port`` with a fresh TLS identity, print the ready line,
    and run ``app`` until SIGTERM or SIGINT. Returns an exit code."""
    try:
        material = make_tls_material()
        ca_file = write_ca_file(material, args.state_dir)
        ssl_context = server_ssl_context(material, args.state_dir)
    except (OSError, ssl.SSLError) as exc:
        log.error("TLS setup failed: %s", exc)
        return EXIT_START_FAILED

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
            return EXIT_START_FAILED
        port = runner.addresses[0][1]

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        sys.stdout.write(
            json.dumps({"event": "ready", "port": port, "ca_file": str(ca_file)}) + "\n"
        )
        sys.stdout.flush()
        log.info("venue simulator listening on %s port %d", args.host, port)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, serve, and return the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    if not 0 <= args.latency_ms <= MAX_LATENCY_MS:
        log.error("--latency-ms must be in 0..%d", MAX_LATENCY_MS)
        return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        log.error("--port must be in 0..65535")
        return EXIT_USAGE
    try:
        keys = _load_keys(args.keys)
    except (OSError, ValueError) as exc:  # unreadable, or not JSON
        log.error("cannot read keys file %s: %s", args.keys, exc)
        return EXIT_USAGE
    try:
        app = make_app(
            keys,
            clock=system_clock(args.clock_offset_ms),
            latency_ms=args.latency_ms,
            gzip=args.gzip,
        )
    except KeySetError as exc:
        log.error("bad keys file %s: %s", args.keys, exc)
        return EXIT_USAGE
    return asyncio.run(serve(app, args))


if __name__ == "__main__":
    sys.exit(main())
