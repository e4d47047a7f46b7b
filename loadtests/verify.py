"""Micro-benchmark: what verifying HFT-AUTH-V1 at the ingress costs, next to signing it at
the egress. No sockets, no event-loop I/O (the measuring style of ``loadtests.hotpath``).

Two pairs, each the best of ``--repeat`` interleaved runs of ``--requests`` requests:

- **core**: each side's own step, as its histogram counts it. Egress: ``ServiceRuntime.
  prepare`` (choose the key, normalize the target, sign: timestamp, nonce, body hash,
  HMAC; serialize the request). Ingress: ``Ingress.check`` (the five header formats, key
  lookup, window and floor, body hash, HMAC, constant-time compare, nonce claim) and
  serializing the request for the protected service;
- **path**: each listener's whole per-request work through its real callbacks with fake
  transports. Egress: ``ClientConnection`` for a ``venue: internal`` service, engine bytes
  in, signed request out to ``UpstreamConnection``, response in and out. Ingress:
  ``IngressConnection``, signed request bytes in (five more headers to parse), verified
  request out to ``LocalConnection``, the service's response in and out.

    python -m loadtests.verify [--requests N] [--repeat R] [--body-bytes B]
    python -m loadtests.verify --instructions      # callgrind, deterministic; minutes

Per-request metric observations are off on both sides (``admin.metrics`` off, the Router
default; the ingress's ``timing=False``). Each ingress request carries its own nonce (a
replay would be refused, which is cheaper); they are signed before the clock starts.
Times on shared machines are noisy: compare figures from one run only, or use
``--instructions`` (each bench at two sizes minus its set-up alone, under callgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from keycache.record import make_record
from keycache.ring import KeyRing, build_ring
from loadtests.hotpath import FakeTransport
from proxy.config import IngressConfig, ServiceConfig
from proxy.http11 import build_request
from proxy.ingress import (
    Ingress,
    IngressConnection,
    KeyTable,
    LocalConnection,
    LocalPool,
    RefusalAudit,
)
from proxy.metrics import Metrics
from proxy.runtime import new_event_loop
from proxy.server import ClientConnection, Router
from proxy.service import KeySet, ServiceRuntime
from proxy.signers.base import SignerContext
from proxy.signers.internal import REFUSAL_CODES, InternalVenue, Verified, collect_auth
from proxy.upstream import UpstreamConnection, UpstreamPool

CALLER = "order_router"
KEY_ID = "hft_" + "5eed" * 8  # made up for the benchmark
SECRET = "bench-only-secret-" + "x" * 46
TARGET = b"/internal/v1/limits?account=main&symbol=BTCUSDT"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: risk\r\nContent-Type: application/json\r\n"
    b"Content-Length: 27\r\n\r\n"
    b'{"ok":true,"limit":"10.00"}'
)
NOW_S = time.time()  # the ingress clock stays here: every request is inside its window


def ring() -> KeyRing:
    now = datetime.fromtimestamp(NOW_S, UTC)
    record = make_record(
        KEY_ID,
        SECRET,
        created_at=now - timedelta(days=1),
        expires_at=now + timedelta(days=29),
        permissions=["service_to_service_auth"],
    )
    return build_ring(CALLER, [(1, record)], now=now, overlap=timedelta(hours=24))


SERVICE = ServiceConfig(
    name=CALLER,
    venue="internal",
    key_type="internal_service",
    upstream="https://127.0.0.1:9443",
    route="/risk",
    ca_file=None,
    timeout_ms=2000,
    recv_window_ms=5000,
    pool_size=1,
)
INGRESS = IngressConfig(
    service="risk_engine",
    address="127.0.0.1",
    port=0,
    upstream="http://127.0.0.1:9000",
    accept=(CALLER,),
    nonce_capacity=10_000_000,
)


# -- core: sign() against check() --------------------------------------------------------------


def core_sign(n: int, body: bytes, timed: bool = True) -> float:
    """The egress's signing step as its signing histogram counts it: choose the key,
    normalize the target, sign, serialize the request for the venue."""
    runtime = ServiceRuntime(SERVICE, None)
    runtime.keys = KeySet(ring(), runtime.venue, SERVICE)
    path, _, query = TARGET.partition(b"?")
    headers = b"Content-Type: application/json\r\n"
    prepare = runtime.prepare
    for _ in range(1000):
        prepare(b"POST", path, query, headers, body, NOW_S)
    if not timed:
        return 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        prepare(b"POST", path, query, headers, body, NOW_S)
    return (time.perf_counter() - t0) / n * 1e6


def _signed_auth(n: int, body: bytes) -> list[list[bytes | None]]:
    signer = InternalVenue().signer(ring().keys[0], SERVICE, SignerContext())
    path, _, query = TARGET.partition(b"?")
    out = []
    for _ in range(n):
        _, lines, _ = signer.sign(b"POST", path, query, body, int(NOW_S * 1000))
        out.append(collect_auth(tuple(ln.split(b": ", 1)) for ln in lines.split(b"\r\n") if ln))  # type: ignore[misc]
    return out


def _ingress(loop: asyncio.AbstractEventLoop) -> tuple[Ingress, LocalConnection, FakeTransport]:
    table = KeyTable([CALLER], timedelta(hours=24))
    table.update(CALLER, ring(), datetime.fromtimestamp(NOW_S, UTC))
    pool = LocalPool("127.0.0.1", 9000, loop, timeout_s=2.0, max_size=1)
    up = FakeTransport()
    conn = LocalConnection(pool)
    conn.connection_made(up)  # type: ignore[arg-type]
    pool.idle.append(conn)
    metrics = Metrics([], {INGRESS.service: REFUSAL_CODES}).ingress[INGRESS.service]
    # timing=False: the egress side runs with admin.metrics off too (Router default).
    ingress = Ingress(
        INGRESS, table, pool, metrics, RefusalAudit(None), clock=lambda: NOW_S, timing=False
    )
    return ingress, conn, up


def core_check(n: int, body: bytes, timed: bool = True) -> float:
    """The ingress's verifying step, the same way: verify (steps 1-6, with the refusal
    bookkeeping), serialize the request for the protected service."""
    loop = new_event_loop()
    try:
        auths = _signed_auth(n + 1000, body)
        ingress, _, _ = _ingress(loop)
        check, host_line, identity = ingress.check, ingress.host_line, ingress.identity
        headers = b"Content-Type: application/json\r\n"

        def one(auth: list[bytes | None]) -> None:
            verdict = check(b"POST", TARGET, auth, body)
            assert type(verdict) is Verified
            build_request(b"POST", TARGET, host_line, headers, identity(verdict.key), body)

        for auth in auths[:1000]:
            one(auth)
        if not timed:
            return 0.0
        todo = auths[1000:]
        t0 = time.perf_counter()
        for auth in todo:
            verdict = check(b"POST", TARGET, auth, body)
            build_request(
                b"POST",
                TARGET,
                host_line,
                headers,
                identity(verdict.key),  # type: ignore[union-attr]
                body,
            )
        elapsed = time.perf_counter() - t0
        assert ingress.metrics.outcomes == [0, 0, 0, 0], ingress.metrics.outcomes
        return elapsed / n * 1e6
    finally:
        loop.close()


# -- path: the whole listener, fake transports -------------------------------------------------


def path_egress(n: int, body: bytes, timed: bool = True) -> float:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        runtime = ServiceRuntime(SERVICE, None)
        runtime.keys = KeySet(ring(), runtime.venue, SERVICE)
        pool = UpstreamPool(SERVICE, loop)
        runtime.pool = pool
        up, client_t = FakeTransport(), FakeTransport()
        upstream = UpstreamConnection(pool)
        upstream.connection_made(up)  # type: ignore[arg-type]
        pool.idle.append(upstream)
        client = ClientConnection(Router({CALLER: runtime}, max_body=1 << 20))
        client.connection_made(client_t)  # type: ignore[arg-type]
        request = b"POST /risk%s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" % TARGET
        request += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        for _ in range(1000):
            client.data_received(request)
            upstream.data_received(RESPONSE)
        assert client_t.written[-1].startswith(b"HTTP/1.1 200 OK"), client_t.written[-1][:80]
        assert b"X-Auth-Signature: " in up.written[-1]
        if not timed:
            return 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            client.data_received(request)
            upstream.data_received(RESPONSE)
        elapsed = time.perf_counter() - t0
        return elapsed / n * 1e6
    finally:
        loop.close()


def _requests(n: int, body: bytes) -> list[bytes]:
    out = []
    for auth in _signed_auth(n, body):
        names = (b"X-Auth-Key-Id", b"X-Auth-Timestamp", b"X-Auth-Nonce")
        names += (b"X-Auth-Content-SHA256", b"X-Auth-Signature")
        creds = b"".join(b"%s: %s\r\n" % (k, v or b"") for k, v in zip(names, auth, strict=True))
        out.append(
            b"POST %s HTTP/1.1\r\nHost: risk.internal:8443\r\nContent-Type: application/json\r\n"
            b"%sContent-Length: %d\r\n\r\n%s" % (TARGET, creds, len(body), body)
        )
    return out


def path_ingress(n: int, body: bytes, timed: bool = True) -> float:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        requests = _requests(n + 1000, body)
        ingress, upstream, up = _ingress(loop)
        client_t = FakeTransport()
        client = IngressConnection(ingress)
        client.connection_made(client_t)  # type: ignore[arg-type]
        for request in requests[:1000]:
            client.data_received(request)
            upstream.data_received(RESPONSE)
        assert client_t.written[-1].startswith(b"HTTP/1.1 200 OK"), client_t.written[-1][:120]
        assert b"X-Authproxy-Caller: order_router\r\n" in up.written[-1]
        if not timed:
            return 0.0
        todo = requests[1000:]
        t0 = time.perf_counter()
        for request in todo:
            client.data_received(request)
            upstream.data_received(RESPONSE)
        elapsed = time.perf_counter() - t0
        assert ingress.metrics.outcomes[0] == n + 1000, ingress.metrics.outcomes
        return elapsed / n * 1e6
    finally:
        loop.close()


BENCHES: dict[str, Callable[..., float]] = {
    "core-sign": core_sign,
    "core-verify": core_check,
    "path-egress": path_egress,
    "path-ingress": path_ingress,
}
#: Instruction counts: each bench at two sizes, minus its set-up alone at the same sizes
#: (the ingress side pre-signs its requests), so start-up and set-up cancel out.
CALLGRIND_SIZES = (1000, 3000)


def _instructions(name: str, n: int, body_bytes: int, timed: bool) -> int:
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "loadtests.verify",
        "--only",
        name,
        "--requests",
        str(n),
        "--body-bytes",
        str(body_bytes),
    ]
    if not timed:
        argv.append("--setup-only")
    # Our own fixed argv (valgrind and this interpreter); bounded by a timeout.
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    match = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(argv[4:])} failed: {out.stderr[-1500:]}")
    return int(match.group(1))


def instructions_per_request(names: Sequence[str], body_bytes: int) -> dict[str, float]:
    """Per bench: ((I(large) - I(small)) - (setup(large) - setup(small))) / (large - small).
    The 16 valgrind runs go four at a time (each is one process; counts do not depend on
    the machine's load)."""
    small, large = CALLGRIND_SIZES
    jobs = [(name, n, timed) for name in names for n in (small, large) for timed in (True, False)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda j: _instructions(j[0], j[1], body_bytes, j[2]), jobs)
        counts = dict(zip(jobs, results, strict=True))
    return {
        name: (
            (counts[name, large, True] - counts[name, small, True])
            - (counts[name, large, False] - counts[name, small, False])
        )
        / (large - small)
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--body-bytes", type=int, default=64, help="request body size")
    parser.add_argument("--only", choices=sorted(BENCHES), help="run one bench once")
    parser.add_argument("--setup-only", action="store_true", help="with --only: no timed loop")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instructions per request under callgrind (deterministic; takes minutes)",
    )
    args = parser.parse_args()
    n = max(1, min(args.requests, 1_000_000))  # bounded: every request is pre-signed
    body = (b'{"order":"' + b"7" * args.body_bytes)[: args.body_bytes]
    if args.only:
        # No cyclic collection: its timing depends on every allocation before it, which
        # would make instruction counts differ between otherwise equal runs.
        gc.disable()
        print(f"{args.only}: {BENCHES[args.only](n, body, not args.setup_only):.2f} µs/request")
        return
    if args.instructions:
        counts = instructions_per_request(list(BENCHES), args.body_bytes)
        print(f"HFT-AUTH-V1, {args.body_bytes}-byte body, instructions per request (callgrind):")
        for name, count in counts.items():
            print(f"  {name:<14} {count:9.0f}")
        for side in ("core", "path"):
            e, i = (
                counts[f"{side}-sign" if side == "core" else "path-egress"],
                counts[f"{side}-verify" if side == "core" else "path-ingress"],
            )
            print(f"  {side}: verify / sign = {i / e:.2f}x ({i - e:+.0f} instructions)")
        return
    rows: list[tuple[str, float]] = []
    pairs: list[tuple[str, Callable[..., float], Callable[..., float]]] = [
        ("core", core_sign, core_check),
        ("path", path_egress, path_ingress),
    ]
    results: dict[str, tuple[float, float]] = {}
    for label, egress, ingress in pairs:
        # Interleaved, best of each: a shared machine's noise hits both sides alike.
        e = i = float("inf")
        for _ in range(args.repeat):
            e = min(e, egress(n, body))
            i = min(i, ingress(n, body))
        results[label] = (e, i)
        rows.append((f"{label}: egress sign", e))
        rows.append((f"{label}: ingress verify", i))
    print(f"HFT-AUTH-V1, {args.body_bytes}-byte body, best of {args.repeat} x {n}:")
    for name, value in rows:
        print(f"  {name:<24} {value:7.2f} µs/request")
    for label, (e, i) in results.items():
        print(f"  {label}: verify - sign = {i - e:+.2f} µs ({i / e:.2f}x)")


if __name__ == "__main__":
    main()
