"""The open-loop load generator: requests leave on a fixed schedule, whatever the server does.

A `Job` is one path and a schedule of intended send times. The loop sends request i at
its intended time t0 + offsets[i] on an idle keep-alive connection (connections are used
in FIFO order, so all stay warm); when every connection is busy the request waits in a
backlog and is sent as soon as one frees. Its latency is always counted from the
*intended* send time, so queueing behind a slow server is measured rather than hidden
(coordinated omission, as in wrk2 and HdrHistogram's own guidance). A closed loop would
instead slow down with the server and report only service time.

One thread, non-blocking sockets in an epoll set. Waiting is `select.select` on the epoll
descriptor alone (a microsecond timeout, where epoll's own is whole milliseconds) with the
thread's timer slack cut to 1 us, and a short spin before each send, so that the
generator itself adds a few microseconds, not a millisecond. The
loop records raw nanosecond timings in arrays; histograms are built afterwards, outside
the timed region (an HdrHistogram record in Python costs ~3 us).

How late the loop noticed each request was due (`lag_ns`) is kept too: when the
generator, not the server, is the bottleneck it shows there, and the report says so.

`Generator` runs jobs in a separate process pinned to its own CPU, one job at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import select
import socket
import ssl
import time
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as PipeEnd
from typing import Any

from loadtests.client import RECV_BYTES, Target, open_socket
from loadtests.httpwire import HttpWireError, response_end

# Request outcomes (one byte per request in JobResult.outcome).
OK = 0
HTTP_ERROR = 1  # a response that was not 2xx
IO_ERROR = 2  # connect/send/receive failed or the response was malformed
TIMEOUT = 3  # no whole response within Job.io_timeout_s of the send
INCOMPLETE = 4  # still unanswered (or unsent) when the drain window closed
OUTCOME_NAMES = ("ok", "http_error", "io_error", "timeout", "incomplete")

# Wake this long before a send is due and spin the rest: select's timeout still lands a
# few tens of microseconds late even with 1 us timer slack.
SPIN_NS = 60_000
TIMEOUT_CHECK_NS = 10_000_000  # look for timed-out requests every 10 ms
LEAD_NS = 50_000_000  # t0 is this far after the connections are up (the parent's events key on it)
_PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1000
STARTED = "started"
RESULT = "result"
FAILED = "failed"
# Beyond a job's own schedule and drain, what the parent allows for connecting, pickling
# and process start-up before it calls the generator hung.
JOB_GRACE_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Job:
    """One path under one schedule. Picklable: it crosses to the generator process."""

    target: Target
    offsets_ns: array[int]  # intended send times after t0, non-decreasing
    connections: int
    drain_s: float  # after the last intended send, how long to wait for answers
    io_timeout_s: float  # per request: sent and not answered within this is a TIMEOUT
    # Spin this long before each send (SPIN_NS); 0 where the generator shares its CPU with
    # the servers, whose time a spin would take.
    spin_ns: int = SPIN_NS

    @property
    def schedule_s(self) -> float:
        return self.offsets_ns[-1] / 1e9 if self.offsets_ns else 0.0


@dataclass(slots=True)
class JobResult:
    """Raw per-request timings of one job; index i is the request intended at t0+offsets[i]."""

    path: str
    t0_ns: int  # perf_counter_ns (CLOCK_MONOTONIC: the same clock in every process)
    end_ns: int  # when the loop stopped (after the drain)
    offsets_ns: array[int]
    latency_ns: array[int]  # answer time minus intended send time; -1 when unanswered
    outcome: array[int]  # OK, HTTP_ERROR, ...
    lag_ns: array[int]  # how late the loop noticed that request i was due
    statuses: dict[int, int] = field(default_factory=dict)  # non-2xx status -> count
    # Diagnostics by kind (an idle connection the server closed counts here but fails no
    # request); request failures are counted from `outcome`.
    errors: dict[str, int] = field(default_factory=dict)
    connects: int = 0
    connections: int = 0
    cpu_affinity: list[int] = field(default_factory=list)


class GeneratorError(Exception):
    """The generator process failed, died or hung; the message says which."""


def set_timer_slack(ns: int = TIMER_SLACK_NS) -> bool:
    """Cut this thread's timer slack (default 50 us) so short sleeps wake on time."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class _Conn:
    __slots__ = ("buf", "index", "sent_ns", "sock", "tls")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.buf = b""
        self.index = -1  # the request in flight, -1 when idle
        self.sent_ns = 0
        self.tls = False


def run_job(job: Job, on_start: Callable[[int], None] | None = None) -> JobResult:
    """Run `job` in this thread: connect, call `on_start(t0)`, send on schedule, drain.

    Blocks for the schedule plus at most `job.drain_s`. Never raises for what the server
    does (refused, reset, garbage, silence): those become per-request outcomes. Raises
    OSError only when not even the first connections can be opened.
    """
    run = _Run(job)
    try:
        for conn in run.conns:
            run.connect(conn)  # before t0: an unreachable path fails here, loudly
        t0 = time.perf_counter_ns() + LEAD_NS
        if on_start is not None:
            on_start(t0)
        end_ns = run.loop(t0)
    finally:
        for conn in run.conns:
            run.drop(conn)
        run.poller.close()
    return JobResult(
        path=job.target.name,
        t0_ns=t0,
        end_ns=end_ns,
        offsets_ns=job.offsets_ns,
        latency_ns=run.latency,
        outcome=run.outcome,
        lag_ns=run.lag,
        statuses=dict(run.statuses),
        errors=dict(run.errors),
        connects=run.connects,
        connections=job.connections,
        cpu_affinity=sorted(os.sched_getaffinity(0)),
    )


class _Run:
    """The state of one job's loop (see `run_job`)."""

    def __init__(self, job: Job) -> None:
        n = len(job.offsets_ns)
        self.job = job
        self.ctx = job.target.tls_context()
        self.latency = array("q", [-1]) * n
        self.outcome = array("b", [INCOMPLETE]) * n
        self.lag = array("q", [0]) * n
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.conns = [_Conn() for _ in range(job.connections)]
        self.by_fd: dict[int, _Conn] = {}
        self.poller = select.epoll()
        self.connects = 0
        self.inflight = 0

    def connect(self, conn: _Conn) -> None:
        """Open `conn` (blocking, then non-blocking for the loop); raises OSError."""
        sock = open_socket(self.job.target, self.ctx, self.job.io_timeout_s)
        sock.setblocking(False)
        conn.sock, conn.buf, conn.tls = sock, b"", isinstance(sock, ssl.SSLSocket)
        self.by_fd[sock.fileno()] = conn
        self.poller.register(sock.fileno(), select.EPOLLIN)
        self.connects += 1

    def drop(self, conn: _Conn) -> None:
        """Close `conn`; the next request on it reconnects."""
        sock, conn.sock, conn.buf = conn.sock, None, b""
        if sock is not None:
            fd = sock.fileno()
            if self.by_fd.pop(fd, None) is not None:
                self.poller.unregister(fd)
            with contextlib.suppress(OSError):
                sock.close()

    def fail(self, conn: _Conn, kind: str, code: int) -> None:
        """Fail the request in flight on `conn` (if any) with `code` and drop `conn`."""
        if conn.index >= 0:
            self.outcome[conn.index] = code
            conn.index = -1
            self.inflight -= 1
        self.errors[kind] += 1
        self.drop(conn)

    def loop(self, t0: int) -> int:
        """Send every request at t0 + its offset, read the answers; return the end time."""
        job = self.job
        request = job.target.request
        req_len = len(request)
        offsets = job.offsets_ns
        n = len(offsets)
        latency, outcome, lag = self.latency, self.outcome, self.lag
        by_fd, conns = self.by_fd, self.conns
        poll = self.poller.poll
        wait_set = [self.poller.fileno()]
        io_timeout_ns = int(job.io_timeout_s * 1e9)
        spin_ns = job.spin_ns
        idle = deque(conns)
        backlog: deque[int] = deque()
        clock = time.perf_counter_ns
        drain_deadline = t0 + (offsets[-1] if n else 0) + int(job.drain_s * 1e9)
        next_check = t0 + TIMEOUT_CHECK_NS
        i_next = 0
        while True:
            now = clock()
            while i_next < n:
                due = t0 + offsets[i_next]
                if due > now:
                    break
                lag[i_next] = now - due
                backlog.append(i_next)
                i_next += 1
            while backlog and idle:
                conn = idle.popleft()
                i = backlog.popleft()
                if conn.sock is None:
                    try:
                        self.connect(conn)
                    except OSError as exc:
                        outcome[i] = IO_ERROR
                        self.errors[f"connect:{type(exc).__name__}"] += 1
                        idle.append(conn)
                        continue
                sock = conn.sock
                assert sock is not None
                conn.index = i
                self.inflight += 1
                try:
                    # One small request, one in flight per connection: the socket buffer
                    # is empty, so a partial write means something is wrong.
                    if sock.send(request) != req_len:
                        raise BlockingIOError("partial write")
                except OSError as exc:
                    self.fail(conn, f"send:{type(exc).__name__}", IO_ERROR)
                    idle.append(conn)
                    continue
                conn.sent_ns = now
            if i_next < n:
                wait_ns = t0 + offsets[i_next] - clock()
            elif self.inflight == 0 and not backlog:
                break
            else:
                now = clock()
                if now >= drain_deadline:
                    break
                wait_ns = min(drain_deadline - now, TIMEOUT_CHECK_NS)
            if now >= next_check and self.inflight:
                next_check = now + TIMEOUT_CHECK_NS
                for conn in conns:
                    if conn.index >= 0 and now - conn.sent_ns > io_timeout_ns:
                        self.fail(conn, "timeout", TIMEOUT)
                        idle.append(conn)
            if (
                wait_ns > spin_ns
                and not select.select(wait_set, (), (), (wait_ns - spin_ns) / 1e9)[0]
            ):
                continue
            for fd, _ in poll(0):
                conn = by_fd[fd]
                sock = conn.sock
                assert sock is not None
                try:
                    data = sock.recv(RECV_BYTES)
                    if conn.tls:
                        while pending := sock.pending():  # type: ignore[attr-defined]
                            data += sock.recv(pending)
                except ssl.SSLWantReadError:
                    continue  # a partial TLS record; epoll will say when the rest is here
                except OSError as exc:
                    busy = conn.index >= 0
                    self.fail(conn, f"recv:{type(exc).__name__}", IO_ERROR)
                    if busy:  # an idle connection is in `idle` already
                        idle.append(conn)
                    continue
                if not data or conn.index < 0:
                    # EOF, or bytes nobody asked for: this connection is done either way.
                    busy = conn.index >= 0
                    kind = "unsolicited" if data else "closed" if busy else "idle_closed"
                    self.fail(conn, kind, IO_ERROR)
                    if busy:
                        idle.append(conn)
                    continue
                buf = conn.buf + data if conn.buf else data
                try:
                    framed = response_end(buf)
                except HttpWireError:
                    self.fail(conn, "malformed", IO_ERROR)
                    idle.append(conn)
                    continue
                if framed is None:
                    conn.buf = buf
                    continue
                done = clock()
                head, _, end = framed
                i = conn.index
                latency[i] = done - (t0 + offsets[i])
                status = head.status
                if 200 <= status < 300:
                    outcome[i] = OK
                else:
                    outcome[i] = HTTP_ERROR
                    self.statuses[status] += 1
                conn.index = -1
                conn.buf = b""
                self.inflight -= 1
                if end != len(buf) or not head.keep_alive:
                    self.drop(conn)  # reconnect on next use; extra bytes would desync framing
                idle.append(conn)
        return clock()


@dataclass(frozen=True, slots=True)
class StallProbe:
    """A job that only spins on the clock for `seconds`: how often is this CPU taken away?"""

    seconds: float
    threshold_ns: int = 50_000


def measure_stalls(probe: StallProbe) -> dict[str, float]:
    """Spin reading the clock; every gap over the threshold is time this thread could not
    run (another process, an interrupt, the hypervisor). The generator's own lateness can
    never be better than this, so every run records it."""
    clock = time.perf_counter_ns
    start = last = clock()
    end = start + int(probe.seconds * 1e9)
    gaps: list[int] = []
    while (now := clock()) < end:
        if now - last > probe.threshold_ns:
            gaps.append(now - last)
        last = now
    total = now - start
    return {
        "seconds": round(total / 1e9, 3),
        "stalls": len(gaps),
        "stalled_fraction": round(sum(gaps) / total, 5) if total else 0.0,
        "longest_us": round(max(gaps) / 1000, 1) if gaps else 0.0,
        "threshold_us": probe.threshold_ns / 1000,
    }


def generator_main(pipe: PipeEnd, cpu: int | None) -> None:
    """Entry point of the generator process: pin, then run jobs until told to stop (None)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    set_timer_slack()
    try:
        while True:
            job = pipe.recv()
            if job is None:
                return
            if isinstance(job, StallProbe):
                pipe.send((RESULT, measure_stalls(job)))
                continue
            gc.collect()
            gc.disable()  # a collection would land on whichever request is in flight
            try:
                result = run_job(job, lambda t0: pipe.send((STARTED, t0)))
            except Exception:
                pipe.send((FAILED, traceback.format_exc()))
                continue
            finally:
                gc.enable()
            pipe.send((RESULT, result))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return


@dataclass(frozen=True, slots=True)
class Action:
    """Something the parent does while a job runs, `at_s` after its t0 (e.g. a rotation)."""

    at_s: float
    name: str
    run: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class EventMark:
    """When an action ran, in seconds after the job's t0, and how it went."""

    name: str
    start_s: float
    end_s: float
    error: str | None = None


class Generator:
    """The generator process (spawned, pinned to `cpu`); `run` one job at a time."""

    def __init__(self, cpu: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=generator_main, args=(child, cpu), name="bench-gen")
        self._proc.start()
        child.close()
        self.cpu = cpu

    def run(self, job: Job, actions: Sequence[Action] = ()) -> tuple[JobResult, list[EventMark]]:
        """Run `job`; perform `actions` at their times meanwhile. Raises GeneratorError."""
        self._pipe.send(job)
        budget = job.schedule_s + job.drain_s + JOB_GRACE_S
        kind, payload = self._receive(budget)
        if kind != STARTED:
            raise GeneratorError(f"generator failed before starting:\n{payload}")
        t0: int = payload
        marks = []
        for action in sorted(actions, key=lambda a: a.at_s):
            delay = (t0 + int(action.at_s * 1e9) - time.perf_counter_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter_ns()
            error = None
            try:
                action.run()
            except Exception as exc:  # reported with the results, the run goes on
                error = f"{type(exc).__name__}: {exc}"
            end = time.perf_counter_ns()
            marks.append(EventMark(action.name, (start - t0) / 1e9, (end - t0) / 1e9, error))
        kind, payload = self._receive(budget)
        if kind != RESULT:
            raise GeneratorError(f"generator failed:\n{payload}")
        result: JobResult = payload
        return result, marks

    def stalls(self, probe: StallProbe) -> dict[str, float]:
        """`measure_stalls` on the generator's CPU."""
        self._pipe.send(probe)
        kind, payload = self._receive(probe.seconds + JOB_GRACE_S)
        if kind != RESULT:
            raise GeneratorError(f"stall probe failed:\n{payload}")
        stats: dict[str, float] = payload
        return stats

    def _receive(self, timeout_s: float) -> tuple[str, Any]:
        if not self._pipe.poll(timeout_s):
            self.close()
            raise GeneratorError(f"the generator sent nothing in {timeout_s:.0f}s")
        try:
            message: tuple[str, Any] = self._pipe.recv()
        except EOFError:
            raise GeneratorError(f"the generator died (exit {self._proc.exitcode})") from None
        return message

    def close(self) -> None:
        """Ask the process to exit; terminate, then kill it if it does not."""
        with contextlib.suppress(OSError, BrokenPipeError):
            self._pipe.send(None)
        self._proc.join(STOP_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(STOP_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_TIMEOUT_S)
        self._pipe.close()
