"""The benchmark client: one blocking keep-alive connection per path, closed loop.

Runs in its own process (multiprocessing, spawn) pinned to one CPU, so that its own
overhead is the same for every path and does not compete with the servers. Deliberately
plain: blocking sockets, `ssl` for the direct path, the framing in `httpwire`, and
`time.perf_counter_ns` around exactly one request write plus one response read.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import ssl
import struct
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as PipeEnd

from loadtests.httpwire import (
    CHUNKED,
    HEAD_END,
    MAX_HEAD_BYTES,
    UNTIL_CLOSE,
    HttpWireError,
    chunked_body_end,
    dechunk,
    parse_response_head,
)

RECV_BYTES = 65536
# Responses here are tens of bytes; anything this big is a misbehaving peer.
MAX_BODY_BYTES = 16 * 1024 * 1024
# A path that fails this many requests in a row is dropped for the rest of the run rather
# than burning the deadline on connect timeouts.
MAX_CONSECUTIVE_ERRORS = 50


@dataclass(frozen=True, slots=True)
class Target:
    """One send path: where to connect and the exact request bytes to send each time."""

    name: str
    host: str
    port: int
    request: bytes
    tls_ca_file: str | None = None  # None: plain HTTP
    tls_server_hostname: str | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response, for probes and diagnostics (the hot path keeps only the status)."""

    status: int
    head: bytes
    body: bytes


class PeerClosedError(ConnectionError):
    """The server closed the connection before a whole response arrived."""


class Connection:
    """One keep-alive HTTP/1.1 connection, optionally TLS, with blocking I/O.

    Blocking sockets with kernel SO_RCVTIMEO/SO_SNDTIMEO instead of `settimeout`, because
    a Python-level timeout adds a poll() to every recv. I/O errors surface as OSError (an
    `ssl.SSLError` is one) or HttpWireError; the caller closes and reconnects.
    """

    __slots__ = ("_buf", "_ctx", "_io_timeout_s", "_sock", "target")

    def __init__(self, target: Target, io_timeout_s: float) -> None:
        self.target = target
        self._io_timeout_s = io_timeout_s
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ctx: ssl.SSLContext | None = None
        if target.tls_ca_file is not None:
            # Verifies the chain against the run's CA and the host name against the SAN.
            self._ctx = ssl.create_default_context(cafile=target.tls_ca_file)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Open the TCP (and TLS) connection; raises OSError on failure."""
        self.close()
        t = self.target
        sock = socket.create_connection((t.host, t.port), timeout=self._io_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                sock = self._ctx.wrap_socket(sock, server_hostname=t.tls_server_hostname)
            sock.settimeout(None)
            seconds = int(self._io_timeout_s)
            timeval = struct.pack("ll", seconds, int((self._io_timeout_s - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buf = b""

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buf = b""
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def roundtrip(self) -> int:
        """Send the target's request, read the whole response, return its status."""
        sock = self._sock
        if sock is None:
            raise PeerClosedError("not connected")
        sock.sendall(self.target.request)
        return self._read_response(sock, want_body=False).status

    def exchange(self) -> Response:
        """Like `roundtrip` but connects if needed and returns the head and body."""
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        sock.sendall(self.target.request)
        return self._read_response(sock, want_body=True)

    def _read_response(self, sock: socket.socket, want_body: bool) -> Response:
        buf = self._buf
        while True:
            end = buf.find(HEAD_END)
            while end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise HttpWireError("response head too large")
                chunk = sock.recv(RECV_BYTES)
                if not chunk:
                    raise PeerClosedError("closed before the response head")
                buf += chunk
                end = buf.find(HEAD_END)
            head_bytes = buf[:end]
            head = parse_response_head(head_bytes)
            pos = end + 4
            if head.status >= 200:
                break
            buf = buf[pos:]  # 1xx interim response: the real one follows

        length = head.content_length
        if length >= 0:
            if length > MAX_BODY_BYTES:
                raise HttpWireError("response body too large")
            body_end = pos + length
            while len(buf) < body_end:
                chunk = sock.recv(RECV_BYTES)
                if not chunk:
                    raise PeerClosedError("closed inside the response body")
                buf += chunk
        elif length == CHUNKED:
            found = chunked_body_end(buf, pos)
            while found is None:
                if len(buf) - pos > MAX_BODY_BYTES:
                    raise HttpWireError("response body too large")
                chunk = sock.recv(RECV_BYTES)
                if not chunk:
                    raise PeerClosedError("closed inside a chunked body")
                buf += chunk
                found = chunked_body_end(buf, pos)
            body_end = found
        else:
            assert length == UNTIL_CLOSE
            while chunk := sock.recv(RECV_BYTES):
                buf += chunk
                if len(buf) - pos > MAX_BODY_BYTES:
                    raise HttpWireError("response body too large")
            body_end = len(buf)

        body = b""
        if want_body:
            body = buf[pos:body_end]
            if length == CHUNKED:
                body = dechunk(body)
        self._buf = buf[body_end:]
        if not head.keep_alive:
            self.close()
        return Response(status=head.status, head=head_bytes, body=body)


@dataclass(frozen=True, slots=True)
class ClientPlan:
    """Everything the client process needs; picklable for the spawn start method."""

    targets: tuple[Target, ...]
    warmup: int
    rounds: int
    requests: int
    budget_s: float  # wall-clock budget for warm-up plus all rounds
    cpu: int | None  # CPU to pin the client to, or None
    io_timeout_s: float


@dataclass(slots=True)
class PathRecord:
    """Raw measurements of one path. Latencies are of 2xx responses only."""

    name: str
    latencies_ns: list[list[int]] = field(default_factory=list)  # one list per round
    loop_ns: list[int] = field(default_factory=list)  # wall time of each round's loop
    statuses: Counter[int] = field(default_factory=Counter)  # non-2xx responses
    errors: Counter[str] = field(default_factory=Counter)  # exception name -> count
    warmup_ok: int = 0
    warmup_failed: int = 0
    aborted: str | None = None


@dataclass(slots=True)
class ClientResult:
    paths: dict[str, PathRecord]
    round_orders: list[list[str]]
    rounds_done: int
    deadline_hit: bool
    cpu_affinity: list[int]
    error: str | None = None


class _DeadlineReachedError(Exception):
    pass


class _PathFailedError(Exception):
    pass


def _run_batch(
    conn: Connection,
    count: int,
    deadline_ns: int,
    record: PathRecord,
    latencies: list[int] | None,
) -> int:
    """Send `count` requests back to back; returns how many got a 2xx.

    Appends 2xx latencies (ns) to `latencies` (None during warm-up) and counts failures in
    `record`. Reconnects after an error outside the timed region. Raises
    _DeadlineReachedError at the deadline and _PathFailedError after too many failures in
    a row.
    """
    clock = time.perf_counter_ns
    append = latencies.append if latencies is not None else None
    ok = 0
    consecutive = 0
    for _ in range(count):
        if consecutive >= MAX_CONSECUTIVE_ERRORS:
            raise _PathFailedError(f"{consecutive} consecutive failures")
        if not conn.connected:
            if clock() >= deadline_ns:
                raise _DeadlineReachedError
            try:
                conn.connect()
            except OSError as exc:
                record.errors[f"connect:{type(exc).__name__}"] += 1
                consecutive += 1
                continue
        t0 = clock()
        if t0 >= deadline_ns:
            raise _DeadlineReachedError
        try:
            status = conn.roundtrip()
        except (OSError, HttpWireError) as exc:
            conn.close()
            record.errors[type(exc).__name__] += 1
            consecutive += 1
            continue
        t1 = clock()
        if 200 <= status < 300:
            ok += 1
            consecutive = 0
            if append is not None:
                append(t1 - t0)
        else:
            record.statuses[status] += 1
            consecutive += 1
    return ok


def run_plan(plan: ClientPlan) -> ClientResult:
    """Warm up every path, then measure in rounds, rotating the order of paths each round.

    Stops early (deadline_hit) when the budget runs out; a path that keeps failing is
    dropped (PathRecord.aborted) and the others go on.
    """
    deadline_ns = time.perf_counter_ns() + int(plan.budget_s * 1e9)
    conns = {t.name: Connection(t, plan.io_timeout_s) for t in plan.targets}
    records = {t.name: PathRecord(t.name) for t in plan.targets}
    names = [t.name for t in plan.targets]
    result = ClientResult(
        paths=records,
        round_orders=[],
        rounds_done=0,
        deadline_hit=False,
        cpu_affinity=sorted(os.sched_getaffinity(0)),
    )
    gc_was_enabled = gc.isenabled()
    try:
        for name in names:
            warm = PathRecord(name)
            try:
                records[name].warmup_ok = _run_batch(
                    conns[name], plan.warmup, deadline_ns, warm, None
                )
            except _PathFailedError as exc:
                records[name].aborted = f"warm-up: {exc}"
            records[name].warmup_failed = sum(warm.errors.values()) + sum(warm.statuses.values())

        for rnd in range(plan.rounds):
            shift = rnd % len(names)
            order = names[shift:] + names[:shift]
            result.round_orders.append(order)
            for name in order:
                record = records[name]
                if record.aborted is not None:
                    continue
                latencies: list[int] = []
                # GC pauses would land on whichever path happens to be running; collect
                # between batches instead, outside the timed loop.
                gc.collect()
                gc.disable()
                start = time.perf_counter_ns()
                try:
                    _run_batch(conns[name], plan.requests, deadline_ns, record, latencies)
                except _PathFailedError as exc:
                    record.aborted = f"round {rnd}: {exc}"
                finally:
                    record.loop_ns.append(time.perf_counter_ns() - start)
                    record.latencies_ns.append(latencies)
                    if gc_was_enabled:
                        gc.enable()
            result.rounds_done = rnd + 1
    except _DeadlineReachedError:
        result.deadline_hit = True
    finally:
        if gc_was_enabled:
            gc.enable()
        for conn in conns.values():
            conn.close()
    return result


def client_main(plan: ClientPlan, pipe: PipeEnd) -> None:
    """Entry point of the client process: pin, run the plan, send back a ClientResult."""
    try:
        if plan.cpu is not None:
            os.sched_setaffinity(0, {plan.cpu})
        result = run_plan(plan)
    except KeyboardInterrupt:
        return
    except Exception:
        result = ClientResult(
            paths={},
            round_orders=[],
            rounds_done=0,
            deadline_hit=False,
            cpu_affinity=[],
            error=traceback.format_exc(),
        )
    pipe.send(result)
    pipe.close()


def probe(target: Target, io_timeout_s: float) -> Response:
    """Send one request on a fresh connection and return the whole response.

    Raises OSError or HttpWireError when the path does not answer.
    """
    conn = Connection(target, io_timeout_s)
    try:
        return conn.exchange()
    finally:
        conn.close()
