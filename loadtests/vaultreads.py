"""What one key-store read costs the thread that makes it, against a real local OpenBao.

    python -m loadtests.vaultreads [--calls N] [--rounds R]

The sidecar's watcher polls every service's KV v2 metadata once a poll interval (1 s by
default) in a worker thread that shares the event loop's CPU; a rotation also reads the
new record. Every millisecond of CPU such a read takes is a millisecond the loop may wait
for (docs/performance.md, "The key store's poll"). This times, per call, the thread CPU
(``time.thread_time_ns``) and the wall time of:

- ``poll``: ``VaultSource.read_metadata``, the poll as the sidecar makes it;
- ``poll via hvac``: the same read through ``hvac`` and ``requests`` (a client with the
  sidecar's settings), the way the poll was made before: the baseline, same run. It is
  a bare client, without the token keeper, the error translation and the parsing into
  ``SecretMetadata`` that both paths share: the saving it shows is the transport's;
- ``record``: ``VaultSource.read_version``, a rotation's record read.

Each round runs every kind N times, interleaved, after 10 warm-up calls; the table gives
the median over rounds. The process is pinned to one CPU where it may run on several (so
is OpenBao, to another), to keep the figures steady. A micro-benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import requests

from keycache.record import make_record, new_key_id
from keycache.vault import VaultSource, scrub_record
from keycache.vaultauth import VaultAuthSettings
from loadtests.keystore import PREFIX, KeyStore

SERVICE = "reads"


def _per_call(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(thread CPU µs, wall µs) per call of ``fn`` over ``n`` calls."""
    cpu0, wall0 = time.thread_time_ns(), time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - cpu0) / n / 1000, (time.perf_counter_ns() - wall0) / n / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.vaultreads", description=__doc__)
    p.add_argument("--calls", type=int, default=50, help="calls of each kind per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="authproxy-vaultreads-") as tmp:
        store = KeyStore(Path(tmp))
        store.start()
        try:
            server = store.server
            if len(cpus) > 1 and server.pid is not None:
                os.sched_setaffinity(server.pid, {cpus[0]})
                os.sched_setaffinity(0, {cpus[-1]})
            # A throwaway key made here, for this run only.
            now = datetime.now(UTC)
            store.write(
                SERVICE,
                make_record(
                    new_key_id(),
                    os.urandom(32).hex(),
                    created_at=now,
                    expires_at=now + timedelta(days=1),
                    permissions=["read_market_data"],
                ),
            )
            source = VaultSource(
                server.address,
                auth=VaultAuthSettings("token", token_file=store.token_file),
                path_prefix=PREFIX,
                verify=Path(server.ca_file),
            )
            session = requests.Session()
            session.trust_env = False
            session.verify = str(server.ca_file)  # hvac takes the session's over its own
            client = hvac.Client(
                url=server.address,
                token=server.root_token,
                verify=str(server.ca_file),
                session=session,
                proxies={},
                allow_redirects=False,
            )
            kinds: dict[str, Callable[[], object]] = {
                "poll": lambda: source.read_metadata(SERVICE),
                "poll via hvac": lambda: client.secrets.kv.v2.read_secret_metadata(
                    path=f"{PREFIX}/{SERVICE}", mount_point="secret"
                ),
                "record": lambda: scrub_record(source.read_version(SERVICE, 1)),
            }
            results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
            for fn in kinds.values():
                _per_call(fn, 10)
            for _ in range(args.rounds):
                for name, fn in kinds.items():
                    results[name].append(_per_call(fn, args.calls))
            source.close()
            session.close()
        finally:
            store.stop()
    print(f"key-store reads, median of {args.rounds} rounds x {args.calls} calls")
    print("| read | thread CPU per call | wall per call |")
    print("|---|--:|--:|")
    for name, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        wall = statistics.median(r[1] for r in rows)
        print(f"| {name} | {cpu:,.0f} µs | {wall:,.0f} µs |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
