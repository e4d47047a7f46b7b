"""The simulator's aiohttp application: venue routes, ``/__sim/`` test endpoints, request log.

``make_app`` builds it; ``__main__`` serves it over TLS. Everything that decides (key
verification, parameter checks) lives in the venue modules as plain functions; this module
only routes, sleeps, logs and serializes.

Test and control endpoints (not part of any venue):

- ``GET /__sim/log`` → ``{"entries": [...]}``, oldest first, at most :data:`LOG_CAPACITY`;
  ``DELETE /__sim/log`` clears it.
- ``GET /__sim/keys`` → the accepted API key ids per venue;
  ``POST /__sim/keys`` with a keys document (same shape as the keys file) replaces the
  key set of every venue the document names, all or nothing;
  ``DELETE /__sim/keys/{api_key}`` revokes one key at once (404 if unknown).
- ``GET /__sim/slow?ms=N`` answers after N ms; ``GET /__sim/reset`` aborts the TCP
  connection without answering; ``GET /__sim/gzip`` always answers with a gzip-encoded
  JSON body; ``/__sim/echo`` (any method) returns what it received, byte-exact.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy.simulator.base import (
    NOTE_KEY,
    Clock,
    Commit,
    KeySetError,
    RequestNote,
    Venue,
    Verdict,
    compact_json,
    note_of,
)
from proxy.simulator.binance import BinanceVenue
from proxy.simulator.binance_usdm import BinanceUsdmVenue
from proxy.simulator.bitmex import BitmexVenue
from proxy.simulator.bybit import BybitVenue
from proxy.simulator.coinbase import CoinbaseVenue
from proxy.simulator.deribit import DeribitVenue
from proxy.simulator.gemini import GeminiVenue
from proxy.simulator.internal import InternalVenue
from proxy.simulator.kraken import KrakenVenue
from proxy.simulator.okx import OkxVenue

# One line per venue module: the name is its field in a keys document.
VENUE_FACTORIES: Mapping[str, Callable[[Clock], Venue]] = {
    "binance": lambda clock: BinanceVenue(clock=clock),
    "binance_usdm": lambda clock: BinanceUsdmVenue(clock=clock),
    "internal": lambda clock: InternalVenue(clock=clock),
    "kraken": lambda clock: KrakenVenue(clock=clock),
    "bitmex": lambda clock: BitmexVenue(clock=clock),
    "gemini": lambda clock: GeminiVenue(clock=clock),
    "deribit": lambda clock: DeribitVenue(clock=clock),
    "okx": lambda clock: OkxVenue(clock=clock),
    "bybit": lambda clock: BybitVenue(clock=clock),
    "coinbase": lambda clock: CoinbaseVenue(clock=clock),
}

LOG_CAPACITY = 10_000  # enough for a test run or a short benchmark, bounded for long ones
MAX_SLOW_MS = 600_000  # /__sim/slow longer than 10 minutes is a typo, not a test
MAX_LATENCY_MS = 600_000

# Control endpoints are neither delayed by --latency-ms nor recorded in the log: a test
# reading the log must not see its own reads, nor wait for them.
_CONTROL_PREFIXES = ("/__sim/log", "/__sim/keys")


def system_clock(offset_ms: int = 0) -> Clock:
    """The wall clock in milliseconds, shifted by ``offset_ms`` (``--clock-offset-ms``)."""

    def now_ms() -> int:
        return time.time_ns() // 1_000_000 + offset_ms

    return now_ms


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One received request, as the log keeps it: public data only, never a body."""

    time_ms: int
    method: str
    path: str
    query: str
    api_key: str | None
    verdict: Verdict
    algorithm: str | None
    status: int

    def as_json(self) -> dict[str, object]:
        """The entry as ``GET /__sim/log`` renders it."""
        return {
            "time": self.time_ms,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "api_key": self.api_key,
            "verdict": self.verdict,
            "algorithm": self.algorithm,
            "status": self.status,
        }


class RequestLog:
    """The last ``capacity`` requests, oldest first. Loop thread only; O(1) append."""

    __slots__ = ("_entries",)

    def __init__(self, capacity: int = LOG_CAPACITY) -> None:
        self._entries: deque[LogEntry] = deque(maxlen=capacity)

    def append(self, entry: LogEntry) -> None:
        """Record ``entry``, dropping the oldest past capacity."""
        self._entries.append(entry)

    def entries(self) -> list[LogEntry]:
        """A snapshot, oldest first."""
        return list(self._entries)

    def clear(self) -> int:
        """Forget everything; return how many entries were dropped."""
        count = len(self._entries)
        self._entries.clear()
        return count

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    """Behaviour switches from the CLI. ``latency_ms`` delays every non-control request;
    ``gzip`` lets JSON answers be gzip-encoded when the client accepts it."""

    latency_ms: int = 0
    gzip: bool = False


class Simulator:
    """The application's state: venues, request log, clock and options."""

    def __init__(self, *, clock: Clock, options: SimulatorOptions) -> None:
        self.clock = clock
        self.options = options
        self.log = RequestLog()
        self.venues: dict[str, Venue] = {
            name: make(clock) for name, make in VENUE_FACTORIES.items()
        }

    def load_keys(self, document: object) -> None:
        """Replace the key set of every venue named in ``document`` (``{"binance": [...]}``).

        All or nothing: raises :class:`KeySetError` naming the bad field, and then no venue
        changes. Venues the document does not name keep their keys.
        """
        if not isinstance(document, dict):
            raise KeySetError("$", "must be an object mapping venue names to key lists")
        commits: list[Commit] = []
        for name, entries in document.items():
            venue = self.venues.get(name)
            if venue is None:
                raise KeySetError(str(name), f"unknown venue (known: {', '.join(self.venues)})")
            commits.append(venue.prepare_keys(entries, name))
        for commit in commits:
            commit()

    def revoke_key(self, api_key: str) -> list[str]:
        """Revoke ``api_key`` in every venue that knows it; return those venues' names."""
        return [name for name, venue in self.venues.items() if venue.revoke_key(api_key)]

    def key_ids(self) -> dict[str, list[str]]:
        """Accepted API key ids per venue."""
        return {name: venue.api_keys() for name, venue in self.venues.items()}


SIMULATOR_KEY: web.AppKey[Simulator] = web.AppKey("simulator", Simulator)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(text=compact_json(payload), status=status, content_type="application/json")


def _control_error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _is_control(path: str) -> bool:
    return path.startswith(_CONTROL_PREFIXES)


@web.middleware
async def _simulator_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Delay, note and log every request; gzip JSON answers when enabled and accepted."""
    sim = request.app[SIMULATOR_KEY]
    note = RequestNote()
    request[NOTE_KEY] = note
    arrived = sim.clock()
    control = _is_control(request.path)
    if not control and sim.options.latency_ms > 0:
        await asyncio.sleep(sim.options.latency_ms / 1000)
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:  # aiohttp's own 404/405: plain text, as aiohttp sends it
        status = exc.status
        raise
    finally:
        if note.verdict == "ok" and status >= 400:
            note.verdict = status
        if not control:
            sim.log.append(
                LogEntry(
                    time_ms=arrived,
                    method=request.method,
                    path=request.path,
                    query=request.raw_path.partition("?")[2],
                    api_key=note.api_key,
                    verdict=note.verdict,
                    algorithm=note.algorithm,
                    status=status,
                )
            )
    if (
        sim.options.gzip
        and isinstance(response, web.Response)
        and response.content_type == "application/json"
        and "Content-Encoding" not in response.headers
        and "gzip" in request.headers.get("Accept-Encoding", "").lower()
    ):
        response.enable_compression(web.ContentCoding.gzip)
    return response


# --------------------------------------------------------------------------- /__sim/ handlers


async def _get_log(request: web.Request) -> web.Response:
    entries = request.app[SIMULATOR_KEY].log.entries()
    return _json({"entries": [e.as_json() for e in entries]})


async def _clear_log(request: web.Request) -> web.Response:
    return _json({"cleared": request.app[SIMULATOR_KEY].log.clear()})


async def _get_keys(request: web.Request) -> web.Response:
    return _json({"keys": request.app[SIMULATOR_KEY].key_ids()})


async def _replace_keys(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    try:
        document = json.loads(await request.read())
    except ValueError as exc:
        return _control_error(400, "bad_json", f"body is not JSON: {exc}")
    try:
        sim.load_keys(document)
    except KeySetError as exc:
        return _control_error(exc.status_hint, exc.code, str(exc))
    return _json({"keys": sim.key_ids()})


async def _revoke_key(request: web.Request) -> web.Response:
    api_key = request.match_info["api_key"]
    venues = request.app[SIMULATOR_KEY].revoke_key(api_key)
    if not venues:
        return _control_error(404, "unknown_key", "no venue knows this api_key")
    return _json({"revoked": api_key, "venues": venues})


async def _slow(request: web.Request) -> web.Response:
    raw = request.query.get("ms", "")
    if not raw.isdigit() or int(raw) > MAX_SLOW_MS:
        note_of(request).verdict = 400
        return _control_error(400, "bad_ms", f"ms must be an integer in 0..{MAX_SLOW_MS}")
    delay_ms = int(raw)
    await asyncio.sleep(delay_ms / 1000)
    return _json({"slept_ms": delay_ms})


async def _reset(request: web.Request) -> web.StreamResponse:
    """Abort the connection (TCP RST where the OS does that for an abortive close)."""
    note_of(request).verdict = "reset"
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp cannot write this to an aborted transport; the client sees a disconnect.
    return web.Response(status=204)


async def _status(request: web.Request) -> web.Response:
    """``GET /__sim/status?code=418&retry_after=2``: answer that status (Binance's ban body
    for 418, its too-many-requests body for 429) with a ``Retry-After`` header."""
    code = int(request.query.get("code", "429"))
    headers = {}
    if "retry_after" in request.query:
        headers["Retry-After"] = request.query["retry_after"]
    msg = "Way too many requests; IP banned until later." if code == 418 else "Too many requests."
    return web.json_response({"code": -1003, "msg": msg}, status=code, headers=headers)


async def _gzip(request: web.Request) -> web.Response:
    payload = compact_json({"gzip": True, "serverTime": request.app[SIMULATOR_KEY].clock()})
    return web.Response(
        body=gzip.compress(payload.encode(), mtime=0),
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    raw_path, _, query = request.raw_path.partition("?")
    return _json(
        {
            "method": request.method,
            "path": raw_path,
            "query": query,
            # latin-1 maps each header byte to one code point: nothing is lost or merged.
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in request.raw_headers
            ],
            "body": base64.b64encode(body).decode("ascii"),
        }
    )


def make_app(
    keys: object = None,
    *,
    clock: Clock | None = None,
    latency_ms: int = 0,
    gzip: bool = False,
) -> web.Application:
    """Build the simulator application.

    ``keys`` is a keys document (``{"binance": [...]}``, see ``binance.parse_binance_keys``)
    or None for none; ``clock`` defaults to the wall clock. Raises :class:`KeySetError` for a
    bad document and ``ValueError`` for a latency outside ``0..MAX_LATENCY_MS``. The
    :class:`Simulator` state is ``app[SIMULATOR_KEY]``.
    """
    if not 0 <= latency_ms <= MAX_LATENCY_MS:
        raise ValueError(f"latency_ms must be in 0..{MAX_LATENCY_MS}")
    sim = Simulator(
        clock=clock or system_clock(), options=SimulatorOptions(latency_ms=latency_ms, gzip=gzip)
    )
    if keys is not None:
        sim.load_keys(keys)
    app = web.Application(middlewares=[_simulator_middleware])
    app[SIMULATOR_KEY] = sim
    for venue in sim.venues.values():
        app.router.add_routes(venue.routes())
    app.router.add_routes(
        [
            web.get("/__sim/log", _get_log, allow_head=False),
            web.delete("/__sim/log", _clear_log),
            web.get("/__sim/keys", _get_keys, allow_head=False),
            web.post("/__sim/keys", _replace_keys),
            web.delete("/__sim/keys/{api_key}", _revoke_key),
            web.get("/__sim/slow", _slow, allow_head=False),
            web.get("/__sim/reset", _reset, allow_head=False),
            web.get("/__sim/gzip", _gzip, allow_head=False),
            web.get("/__sim/status", _status, allow_head=False),
            web.route("*", "/__sim/echo", _echo),
        ]
    )
    return app
