"""The sidecar process: load keys, warm the pools, listen, drain on SIGTERM.

This is the I/O shell around the pure core: it reads the key store in a worker thread,
builds one ``ServiceRuntime`` per service, opens the upstream pools, and starts the
listener only when keys are loaded and pools are warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keycache.errors import KeyCacheError
from keycache.filestore import KeyFile, load_kek_file
from keycache.health import HealthState
from keycache.record import compute_checksum, scrub_record
from keycache.ring import KeyRing, build_ring
from keycache.securemem import disable_core_dumps, lock_all_memory, make_process_non_dumpable
from keycache.watcher import KeyWatcher
from proxy.access import access_for
from proxy.admin import AdminApi
from proxy.audit import AuditLog
from proxy.clock import ClockSync
from proxy.config import Config, FileStoreConfig, IngressConfig
from proxy.errors import ConfigError, NoUsableKey, ProxyError
from proxy.handover import HandoverFailed, inherited_listener, start_successor
from proxy.ingress import (
    REFUSAL_CODES,
    Ingress,
    IngressConnection,
    KeyTable,
    LocalPool,
    RefusalAudit,
    build_tables,
)
from proxy.logs import EventLog
from proxy.metrics import KeyGauge, Metrics, StoreGauge
from proxy.sdnotify import notify
from proxy.server import Client, ClientConnection, Router
from proxy.service import KeySet, ServiceRuntime
from proxy.signers import SignerContext
from proxy.upstream import Exchange, ParsedResponse, SSLContexts, UpstreamPool

if TYPE_CHECKING:  # hvac and requests load only with a Vault key store (resident memory)
    from keycache.vault import VaultSource

DRAIN_TIMEOUT_S = 5.0
# After a handover, how long connections may stay idle before this process closes them
# (each one that sends within it gets its answer and a Connection: close).
HANDOVER_IDLE_GRACE_S = 2.0
# A retired ring is wiped this long after the swap: longer than any request may take to be
# signed (signing is synchronous; this only covers a swap racing a dispatch).
RETIRE_GRACE_S = 1.0
# Venues whose nonce must only grow, kept across restarts under state_dir.
NONCE_VENUES = frozenset({"kraken", "gemini"})  # how long SIGTERM waits for in-flight requests
# How often the event-loop lag is sampled: a sleep's overshoot is the lag.
LOOP_LAG_INTERVAL_S = 0.5
# /readyz tolerates a key store out of sync for this many poll intervals (a blip in Vault
# must not take every sidecar out of service; the last good keys keep serving), and at
# least READY_GRACE_MIN_S.
READY_GRACE_POLLS = 10
READY_GRACE_MIN_S = 30.0


class StartupError(ProxyError):
    code = "startup_failed"


def open_key_file(cfg: FileStoreConfig, environ: Mapping[str, str]) -> KeyFile:
    """Open the encrypted key file named by the config. Blocking: call in a thread."""
    if cfg.kek_file is not None:
        return KeyFile(cfg.path, kek=load_kek_file(cfg.kek_file))
    assert cfg.passphrase_env is not None
    passphrase = environ.get(cfg.passphrase_env)
    if not passphrase:
        raise ConfigError(
            "keystore.file.passphrase_env", f"environment variable {cfg.passphrase_env} is empty"
        )
    return KeyFile(cfg.path, passphrase=passphrase.encode())


def load_rings(config: Config, environ: Mapping[str, str], now: datetime) -> dict[str, KeyRing]:
    """Read every configured service's keys from the key file into fresh locked memory.
    Blocking."""
    assert config.keystore.file is not None
    keyfile = open_key_file(config.keystore.file, environ)
    try:
        stored = keyfile.load()
    finally:
        keyfile.close()
    overlap = timedelta(hours=config.api_key_policy.global_settings.rotation_overlap_hours)
    rings: dict[str, KeyRing] = {}
    try:
        for name in key_names(config):
            versions = stored.get(name)
            if not versions:
                raise StartupError(f"service {name} has no key in {config.keystore.file.path}")
            rings[name] = build_ring(
                name,
                versions,
                now=now,
                overlap=overlap,
                require_lock=config.memory.require_memory_lock,
            )
    except BaseException:
        for ring in rings.values():
            ring.retire()
        raise
    finally:
        # The records' secret strings are in the locked rings now: zero the decoded copies
        # instead of leaving them in freed memory (measured: tests/keycache copies tests).
        for versions in stored.values():
            for _, record in versions:
                scrub_record(record)
    return rings


def key_names(config: Config) -> list[str]:
    """Every key the sidecar holds: its services' (signing) and its ingress callers'
    (verifying), each once. Both come from the same store and the same watcher."""
    return list(dict.fromkeys([*config.services, *config.callers]))


def ingress_audit_log(config: Config) -> tuple[AuditLog | None, str | None]:
    """The audit log refusals go to (the policy's destination, and syslog if enabled),
    and a warning when the destination's directory is missing (then syslog only, or
    nowhere). Blocking (a stat): call in a thread."""
    audit = config.api_key_policy.audit
    path = Path(audit.log_destination) if audit.log_destination else None
    warning = None
    if path is not None and not path.parent.is_dir():
        warning = f"audit log directory {path.parent} does not exist"
        path = None
    facility = audit.syslog_facility if audit.syslog_enabled else None
    if path is None and facility is None:
        return None, warning or "no audit destination configured"
    return AuditLog(path, facility, actor="ingress", keep_entries=False), warning


def ingress_ssl_context(cfg: IngressConfig) -> ssl.SSLContext | None:
    """The ingress's server TLS context (TLS 1.2+), or None when it has no ``tls``.
    Blocking (reads the files): call in a thread. Raises StartupError naming the field."""
    if cfg.tls_cert_file is None or cfg.tls_key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"ingress {cfg.service}: tls: cannot load the certificate: {exc}"
        ) from exc
    return ctx


def signer_context(config: Config) -> SignerContext:
    """The signers' context; creates ``state_dir`` (mode 0700) if it is missing. Blocking."""
    if config.state_dir is not None:
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SignerContext(state_dir=config.state_dir)


def build_services(
    config: Config, rings: Mapping[str, KeyRing], context: SignerContext | None = None
) -> dict[str, ServiceRuntime]:
    """One ServiceRuntime per service, with the signers of its live keys. Blocking (a
    signer may read its state file): call before serving, or in a thread."""
    services = {}
    for name, svc in config.services.items():
        runtime = ServiceRuntime(svc, None)
        runtime.keys = KeySet(rings[name], runtime.venue, svc, context) if name in rings else None
        runtime.access = access_for(svc.venue, svc.permissions, svc.allow)
        services[name] = runtime
    return services


def load_clients(config: Config) -> dict[bytes, Client] | None:
    """The client tokens, read from their files (blocking: call in a thread). A token file
    anyone but its owner can read is refused, like the KEK file."""
    if config.clients is None:
        return None
    clients: dict[bytes, Client] = {}
    for c in config.clients:
        try:
            st = c.token_file.stat()
            token = c.token_file.read_bytes().strip()
        except OSError as exc:
            raise StartupError(f"clients.{c.name}.token_file: {exc.strerror}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise StartupError(
                f"clients.{c.name}.token_file: mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must be readable by its owner only (0400 or 0600)"
            )
        if len(token) < 16:
            raise StartupError(f"clients.{c.name}.token_file: a token of 16 bytes or more")
        if token in clients:
            raise StartupError(f"clients.{c.name}.token_file: the same token as another")
        services = frozenset(c.services) if c.services is not None else None
        clients[token] = Client(c.name, services)
    return clients


class Sidecar:
    """One running sidecar. ``run`` returns when it has drained after SIGTERM/SIGINT."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        log: EventLog | None = None,
        ready: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.environ = environ if environ is not None else os.environ
        self.log = log or EventLog()
        self.ready_cb = ready or _print_ready
        self.services: dict[str, ServiceRuntime] = {}
        self.rings: dict[str, KeyRing] = {}
        self.stopping: asyncio.Event | None = None
        self.watcher: KeyWatcher | None = None
        self.source: VaultSource | None = None
        self.context: SignerContext | None = None
        self._generation: dict[str, int] = {}
        self._swaps: set[asyncio.Task[None]] = set()
        self.metrics = Metrics(
            config.services, {ing.service: REFUSAL_CODES for ing in config.ingress}
        )
        self.router: Router | None = None
        self.pools: list[UpstreamPool] = []
        self.syncs: dict[str, asyncio.Task[None]] = {}  # clock sync per service
        self._reloading: asyncio.Task[None] | None = None
        self._handing_over = False
        # ingress: one key table and listener state per protected service
        self.tables: dict[str, KeyTable] = {}
        self.ingress: dict[str, Ingress] = {}
        self._overlap = timedelta(
            hours=config.api_key_policy.global_settings.rotation_overlap_hours
        )
        self.serving = False
        self._fallbacks_logged: set[tuple[str, str, str]] = set()

    # -- the Vault backend: load at start, then swap rings as the watcher publishes them --

    async def _start_watcher(self) -> KeyWatcher:
        """Build the Vault source and watcher; load every service (raises KeyCacheError)."""
        vault = self.config.keystore.vault
        assert vault is not None
        from keycache.vault import VaultSource  # here: see the TYPE_CHECKING import

        source = await asyncio.to_thread(VaultSource.from_config, vault)
        self.source = source
        overlap = timedelta(hours=self.config.api_key_policy.global_settings.rotation_overlap_hours)
        watcher = KeyWatcher(
            source,
            key_names(self.config),
            overlap=overlap,
            poll_interval=timedelta(milliseconds=vault.poll_interval_ms),
            require_lock=self.config.memory.require_memory_lock,
            clock=lambda: datetime.now(UTC),
            on_ring=self._on_ring,
            on_event=self.log,
        )
        await watcher.load_all()
        return watcher

    def _on_ring(self, service: str, ring: KeyRing, retired: KeyRing | None) -> None:
        """The watcher published a new ring for ``service`` (on the loop).

        Before serving, the ring is just recorded. While serving, the new signers are
        built in a thread (a signer may touch its state file, parse a PEM) and then
        swapped in with one reference assignment; the retired ring is wiped once no
        request can still be signing with it (``RETIRE_GRACE_S`` later).
        """
        self.rings[service] = ring
        self.log(
            "keys_loaded",
            service=service,
            key_ids=list(ring.key_ids()),
            memory_locked=ring.buffer.locked,
        )
        self._update_tables(service, ring)
        runtime = self.services.get(service)
        if runtime is None:
            if retired is not None:
                if service in self.config.services or not self.serving:
                    retired.retire()  # still starting: build_services will use self.rings
                else:
                    # A caller's ring only: the key table keeps no view into it, but a
                    # watcher build may still be copying from it; retire a little later.
                    asyncio.get_running_loop().call_later(RETIRE_GRACE_S, retired.retire)
            return
        generation = self._generation.get(service, 0) + 1
        self._generation[service] = generation
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._swap(runtime, ring, retired, generation))
        self._swaps.add(task)
        task.add_done_callback(self._swaps.discard)

    # -- SIGUSR2: hand the listening socket to a successor and drain (proxy.handover) -----

    def _on_sigusr2(self, server: asyncio.Server) -> None:
        if self._handing_over:
            self.log("handover_skipped", reason="a handover is already running")
            return
        self._handing_over = True
        asyncio.get_running_loop().create_task(self._handover(server))

    async def _handover(self, server: asyncio.Server) -> None:
        sockets = list(server.sockets)
        listener = socket.socket(fileno=os.dup(sockets[0].fileno()))
        try:
            proc, info = await asyncio.to_thread(
                start_successor, sys.orig_argv, listener, self.environ
            )
        except (HandoverFailed, OSError) as exc:
            self._handing_over = False
            self.log("handover_failed", level="error", reason=str(exc))
            return
        finally:
            listener.close()  # our duplicate; the successor holds its own
        self.log("handover", successor_pid=proc.pid, successor=info.get("listen"))
        notify(f"MAINPID={proc.pid}\nSTATUS=handed over to {proc.pid}", self.environ)
        server.close()  # the successor accepts from here on (the same socket)
        router = self.router
        assert router is not None and self.stopping is not None
        router.drain()  # each connection closes after its next answer
        deadline = time.monotonic() + HANDOVER_IDLE_GRACE_S
        while router.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        router.close_idle()  # engines that sent nothing within the grace
        self.stopping.set()

    # -- SIGHUP: reload the config file (proxy.reload decides what may change) ------------

    def _on_sighup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            self.log("config_reload_skipped", reason="a reload is already running")
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    def _offset_setter(self, name: str) -> Callable[[float], None]:
        """The clock sync's result goes to the service's current runtime (a reload may
        replace the object)."""

        def apply(offset_ms: float) -> None:
            svc = self.services.get(name)
            if svc is not None:
                svc.clock_offset_ms = round(offset_ms)

        return apply

    async def _reload(self) -> None:
        path = self.config.source
        if path is None or self.router is None:
            self.log("config_reload_refused", level="error", reason="no config file to re-read")
            return
        notify("RELOADING=1\nSTATUS=reloading the config", self.environ)
        try:
            await self._apply(path)
        finally:
            notify("READY=1\nSTATUS=serving", self.environ)

    async def _apply(self, path: Path) -> None:
        from proxy.config import load_config
        from proxy.reload import plan, refusal

        loop = asyncio.get_running_loop()
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            self.log("config_reload_refused", level="error", field=exc.path, reason=exc.reason)
            return
        reason = refusal(self.config, new)
        if reason is not None:
            self.log("config_reload_refused", level="error", reason=reason)
            return
        p = plan(self.config, new)
        try:
            clients = await asyncio.to_thread(load_clients, new)
            rings = dict(self.rings)
            missing = [n for n in p.added if n not in rings]
            if missing:  # a service new to the file store: read the key file again
                fresh = await asyncio.to_thread(load_rings, new, self.environ, datetime.now(UTC))
                for name in missing:
                    if name not in fresh:
                        raise StartupError(f"services.{name}: no key for it in the key store")
                    rings[name] = fresh[name]
                for name, ring in fresh.items():
                    if name not in missing:
                        ring.retire()
            built = await asyncio.to_thread(
                build_services,
                new,
                {n: rings[n] for n in p.rebuilt | p.added},
                self.context,
            )
        except (ProxyError, KeyCacheError) as exc:
            self.log("config_reload_refused", level="error", reason=str(exc))
            return
        services: dict[str, ServiceRuntime] = {}
        new_pools: list[UpstreamPool] = []
        contexts = SSLContexts()  # CA files read afresh for the pools this reload opens
        for name in new.services:
            old = self.services.get(name)
            if name in p.unchanged and old is not None:
                services[name] = old
                continue
            svc = built[name]
            if old is not None:
                svc.clock_offset_ms = old.clock_offset_ms
                svc.metrics = old.metrics
                if (old.config.rate_limit, old.config.venue) == (
                    svc.config.rate_limit,
                    svc.config.venue,
                ):
                    svc.limiter = old.limiter  # a window the venue still counts stays counted
            if name in p.rebuilt and old is not None:
                svc.pool = old.pool
            else:
                ctx = contexts.for_service(svc.config)
                pool = UpstreamPool(svc.config, loop, ssl_context=ctx, on_event=self.log)
                svc.pool = pool
                new_pools.append(pool)
            services[name] = svc
        await asyncio.gather(*(pool.start() for pool in new_pools))
        # The switch: one assignment each; requests already routed finish where they are.
        old_services, self.services = self.services, services
        # Rings stay for the services and the ingress callers (a caller's keys are not a
        # service's); a removed service's ring is wiped once nothing can sign with it.
        keep = set(services) | set(new.callers)
        dropped = [r for n, r in rings.items() if n not in keep]
        self.rings = {n: r for n, r in rings.items() if n in keep}
        for ring in dropped:
            loop.call_later(RETIRE_GRACE_S, ring.retire)
        router = self.router
        assert router is not None
        router.routes = {s.route: s for s in services.values()}
        router.clients = clients
        self.config = new
        self.pools.extend(new_pools)
        for name in p.added | p.removed:
            task = self.syncs.pop(name, None)
            if task is not None:
                task.cancel()
        for name in p.added:
            svc = services[name]
            if svc.config.clock_sync and svc.venue.time_endpoint is not None:
                sync = ClockSync(name, _time_probe(svc), self._offset_setter(name), self.log)
                self.syncs[name] = loop.create_task(sync.run())
        kept_pools = p.unchanged | p.rebuilt
        retired_pools = [
            old.pool
            for name, old in old_services.items()
            if isinstance(old.pool, UpstreamPool) and name not in kept_pools
        ]
        self.log(
            "config_reloaded",
            unchanged=sorted(p.unchanged),
            rebuilt=sorted(p.rebuilt),
            added=sorted(p.added),
            removed=sorted(p.removed),
        )
        if retired_pools:
            await _wait_drained(retired_pools, DRAIN_TIMEOUT_S)
            for pool in retired_pools:
                self.pools.remove(pool)
                await pool.close()

    def _update_tables(self, caller: str, ring: KeyRing) -> None:
        """A caller's ring changed: every ingress accepting it takes the new keys at once
        (on the loop; keys a verifier holds include a newest one not yet signing)."""
        if not self.tables:
            return  # before the ingress starts: build_tables reads self.rings
        now = datetime.now(UTC)
        for name, table in self.tables.items():
            if caller not in table.accept:
                continue
            revoked = table.update(caller, ring, now)
            self.metrics.ingress[name].keys_live = len(table.keys)
            self.log(
                "ingress_keys",
                ingress=name,
                caller=caller,
                key_ids=table.caller_key_ids(caller),
                revoked_key_ids=revoked,
            )

    async def _swap(
        self, runtime: ServiceRuntime, ring: KeyRing, retired: KeyRing | None, generation: int
    ) -> None:
        runtime = self.services.get(runtime.name, runtime)  # a reload may have replaced it
        try:
            keys = await asyncio.to_thread(
                KeySet, ring, runtime.venue, runtime.config, self.context
            )
        except ProxyError as exc:
            self.log("key_swap_failed", service=runtime.name, error=exc.message)
            return
        if self._generation.get(runtime.name) != generation:
            return  # a newer ring arrived while this one was being built
        if self.services.get(runtime.name) is not runtime:
            self._generation[runtime.name] = generation + 1
            current = self.services.get(runtime.name)
            if current is not None:  # replaced by a reload meanwhile: build for it again
                await self._swap(current, ring, retired, generation + 1)
            return
        runtime.keys = keys
        rotations = self.metrics.state.rotations
        rotations[runtime.name] = rotations.get(runtime.name, 0) + 1
        self.log("keys_swapped", service=runtime.name, key_ids=list(ring.key_ids()))
        if retired is not None:
            asyncio.get_running_loop().call_later(RETIRE_GRACE_S, retired.retire)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.log("starting", pid=os.getpid(), services=sorted(self.config.services))
        # Before any secret is loaded: no core file, no ptrace or /proc/<pid>/mem from
        # other processes of this user (threat model: a memory dump).
        if not make_process_non_dumpable():
            self.log("process_dumpable", level="warning", reason="prctl(PR_SET_DUMPABLE) refused")
        if not disable_core_dumps():
            self.log("core_limit_not_set", level="warning", reason="setrlimit(RLIMIT_CORE) refused")
        if self.config.memory.lock_all:
            if not lock_all_memory():
                if self.config.memory.require_memory_lock:
                    raise StartupError("memory.lock_all: mlockall was refused (RLIMIT_MEMLOCK?)")
                self.log("memory_not_locked", level="warning", reason="mlockall refused")
            else:
                self.log("memory_locked_all")
        now = datetime.now(UTC)
        watcher: KeyWatcher | None = None
        try:
            if self.config.keystore.backend == "vault":
                watcher = await self._start_watcher()
            else:
                self.rings = await asyncio.to_thread(load_rings, self.config, self.environ, now)
        except KeyCacheError as exc:
            raise StartupError(f"{exc.code}: {exc}") from exc
        for name, ring in self.rings.items() if watcher is None else ():
            self.log(
                "keys_loaded",
                service=name,
                key_ids=list(ring.key_ids()),
                memory_locked=ring.buffer.locked,
            )
            if not ring.buffer.locked:
                self.log("memory_not_locked", service=name, level="warning")
        if self.config.state_dir is None and any(
            s.venue in NONCE_VENUES for s in self.config.services.values()
        ):
            self.log(
                "nonce_not_persisted",
                level="warning",
                reason="no state_dir: nonces restart from the clock after a restart",
            )
        context = await asyncio.to_thread(signer_context, self.config)
        self.context = context
        self.services = await asyncio.to_thread(build_services, self.config, self.rings, context)
        pools = self.pools
        contexts = SSLContexts()
        for svc in self.services.values():
            pool = UpstreamPool(
                svc.config, loop, ssl_context=contexts.for_service(svc.config), on_event=self.log
            )
            svc.pool = pool
            pools.append(pool)
        await asyncio.gather(*(p.start() for p in pools))
        for pool in pools:
            self.log("upstream_warm", service=pool.service.name, connections=pool.size)
        syncs = [
            ClockSync(svc.name, _time_probe(svc), self._offset_setter(svc.name), self.log)
            for svc in self.services.values()
            if svc.config.clock_sync and svc.venue.time_endpoint is not None
        ]
        # One probe each before accepting traffic, so the first order is already stamped
        # on the venue's clock; a venue that does not answer does not hold up start-up.
        await asyncio.gather(*(s.sync_once() for s in syncs))
        for sync in syncs:
            self.syncs[sync.service] = loop.create_task(sync.run())
        background: list[asyncio.Task[Any]] = []
        if watcher is not None:
            self.watcher = watcher
            background.append(loop.create_task(watcher.run()))

        admin_cfg = self.config.admin
        metrics_on = admin_cfg is not None and admin_cfg.metrics
        if metrics_on:
            for svc in self.services.values():
                svc.metrics = self.metrics.services[svc.name]
        listen_cfg = self.config.listen
        router = Router(
            self.services,
            max_body=listen_cfg.max_body_bytes,
            on_fallback=self._on_fallback,
            metrics=metrics_on,
            max_connections=listen_cfg.max_connections,
            header_timeout=listen_cfg.header_timeout_ms / 1000,
            body_timeout=listen_cfg.body_timeout_ms / 1000,
            allow_uids=frozenset(listen_cfg.allow_uids) if listen_cfg.allow_uids else None,
            allow_gids=frozenset(listen_cfg.allow_gids) if listen_cfg.allow_gids else None,
            clients=await asyncio.to_thread(load_clients, self.config),
        )
        self.router = router
        self._bind_state()
        background.append(loop.create_task(self._sample_loop_lag()))
        listen = self.config.listen
        inherited = inherited_listener(self.environ)
        if inherited is not None:
            # A predecessor handed its listening socket over (proxy.handover): accept from
            # the very socket it did, so no queued connection is lost.
            if inherited.family == socket.AF_UNIX:
                server = await loop.create_unix_server(
                    lambda: ClientConnection(router), sock=inherited, backlog=1024
                )
                bound: dict[str, Any] = {"address": listen.address}
            else:
                server = await loop.create_server(
                    lambda: ClientConnection(router), sock=inherited, backlog=1024
                )
                host, port = server.sockets[0].getsockname()[:2]
                bound = {"address": host, "port": port}
            self.log("listener_inherited", listen=bound)
        elif listen.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.unix_path)
            server = await loop.create_unix_server(
                lambda: ClientConnection(router), listen.unix_path, backlog=1024
            )
            os.chmod(listen.unix_path, 0o660)
            bound = {"address": listen.address}
        else:
            server = await loop.create_server(
                lambda: ClientConnection(router),
                listen.address,
                listen.port,
                backlog=1024,
                reuse_address=True,
            )
            host, port = server.sockets[0].getsockname()[:2]
            bound = {"address": host, "port": port}
        ingress_servers, ingress_info = await self._start_ingress(loop, background, metrics_on)
        admin: AdminApi | None = None
        ready_info: dict[str, Any] = {"event": "ready", "listen": bound}
        if ingress_info:
            # One ingress: an object, as in the config; several: a list of them.
            ready_info["ingress"] = ingress_info[0] if len(ingress_info) == 1 else ingress_info
        if admin_cfg is not None:
            admin = AdminApi(self, admin_cfg.token_file)
            host, port = await admin.start(admin_cfg.address, admin_cfg.port)
            ready_info["admin"] = {"address": host, "port": port}
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR2, lambda: self._on_sigusr2(server))
        # Everything allocated so far lives for the whole run: move it out of the cyclic
        # collector's reach, so a collection never walks the imported modules and config
        # in the middle of a request (measured: see loadtests/hotpath.py).
        gc.collect()
        gc.freeze()
        self.serving = True
        self.log("ready", {k: v for k, v in ready_info.items() if k != "event"})
        self.ready_cb(ready_info)
        notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving", self.environ)
        try:
            await self.stopping.wait()
        finally:
            self.serving = False
            notify("STOPPING=1\nSTATUS=draining", self.environ)
            self.log("draining")
            if admin is not None:
                await admin.close()
            for task in [*background, *self.syncs.values()]:
                task.cancel()
            if self._reloading is not None:
                self._reloading.cancel()
            server.close()
            for ingress_server in ingress_servers:
                ingress_server.close()
            await _wait_drained(pools, DRAIN_TIMEOUT_S, [i.pool for i in self.ingress.values()])
            for pool in self.pools:
                await pool.close()
            for ing in self.ingress.values():
                ing.pool.close()
                await ing.audit.flush()
            if watcher is not None:
                watcher.stop()
            if self.source is not None:
                await asyncio.to_thread(self.source.close)
            for ring in self.rings.values():
                ring.retire()
            self.log("stopped")

    async def _start_ingress(
        self, loop: asyncio.AbstractEventLoop, background: list[asyncio.Task[None]], timing: bool
    ) -> tuple[list[asyncio.AbstractServer], list[dict[str, Any]]]:
        """Bind every configured ingress listener; returns the servers and what the ready
        line says about them. The key tables are filled from the rings loaded so far."""
        if not self.config.ingress:
            return [], []
        log, warning = await asyncio.to_thread(ingress_audit_log, self.config)
        if warning is not None:
            self.log("ingress_audit_degraded", level="warning", reason=warning)
        audit = RefusalAudit(
            log, on_error=lambda m: self.log("audit_write_failed", level="warning", error=m)
        )
        background.append(loop.create_task(audit.run()))
        self.tables = build_tables(
            self.config.ingress, self.rings, self._overlap, datetime.now(UTC)
        )
        vault = self.config.keystore.vault
        refresh_s = vault.poll_interval_ms / 1000 if vault is not None else 1.0
        servers: list[asyncio.AbstractServer] = []
        info: list[dict[str, Any]] = []
        for cfg in self.config.ingress:
            table = self.tables[cfg.service]
            metrics = self.metrics.ingress[cfg.service]
            metrics.keys_live = len(table.keys)
            pool = LocalPool(
                cfg.upstream_host,
                cfg.upstream_port,
                loop,
                timeout_s=cfg.timeout_ms / 1000,
                max_size=cfg.pool_size,
            )
            ingress = Ingress(
                cfg,
                table,
                pool,
                metrics,
                audit,
                on_unknown_key=self._refresher(cfg.accept),
                refresh_interval_s=refresh_s,
                timing=timing,
            )
            self.ingress[cfg.service] = ingress
            self.log(
                "ingress_keys",
                ingress=cfg.service,
                callers={c: table.caller_key_ids(c) for c in cfg.accept},
            )

            def factory(ing: Ingress = ingress) -> IngressConnection:
                return IngressConnection(ing)

            entry: dict[str, Any] = {"service": cfg.service}
            tls = await asyncio.to_thread(ingress_ssl_context, cfg)
            if cfg.unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(cfg.unix_path)
                srv = await loop.create_unix_server(factory, cfg.unix_path, backlog=1024, ssl=tls)
                os.chmod(cfg.unix_path, 0o660)
                entry["address"] = cfg.address
            else:
                srv = await loop.create_server(
                    factory,
                    cfg.address,
                    cfg.port,
                    backlog=1024,
                    reuse_address=True,
                    reuse_port=True,  # a successor binds it too while this one drains
                    ssl=tls,
                )
                host, port = srv.sockets[0].getsockname()[:2]
                entry.update(address=host, port=port)
            entry["upstream"] = cfg.upstream
            entry["tls"] = tls is not None
            servers.append(srv)
            info.append(entry)
        return servers, info

    def _refresher(self, callers: tuple[str, ...]) -> Callable[[], None]:
        """What an ingress calls on an unknown key id: poll its callers' keys now (the
        watcher reads in its own thread; the ingress never waits for it)."""

        def refresh() -> None:
            watcher = self.watcher
            if watcher is not None:
                for caller in callers:
                    watcher.poll_soon(caller)

        return refresh

    def _on_fallback(self, service: str, used: str, other: str) -> None:
        """Log a fallback once per (service, refused key, retried key), never per
        request: the count is authproxy_key_fallbacks_total."""
        pair = (service, used, other)
        if pair not in self._fallbacks_logged:
            self._fallbacks_logged.add(pair)
            self.log("key_fallback", service=service, refused_key_id=used, retried_key_id=other)

    # -- read-outs for the admin API and the metrics (on the loop, never blocking) -------

    def _bind_state(self) -> None:
        state = self.metrics.state
        state.keys = self._key_gauge
        state.store = self._store_gauge
        state.fallbacks = lambda s: self.services[s].fallbacks
        state.clock_offset_ms = lambda s: float(self.services[s].clock_offset_ms)
        state.upstream_connections = self._pool_size
        state.engine_connections = lambda: self.router.connections if self.router else 0
        state.ready = lambda: self.readiness()[0]
        source = self.source
        if source is not None:
            state.vault_token_ttl = source.token_ttl

    def _pool_size(self, service: str) -> int:
        pool = self.services[service].pool
        return pool.size if isinstance(pool, UpstreamPool) else 0

    def _key_gauge(self, service: str) -> KeyGauge:
        keys = self.services[service].keys
        if keys is None or not keys.ring.keys:
            return KeyGauge(0, None, None, keys.ring.buffer.locked if keys else None)
        newest = keys.ring.keys[-1].meta
        activates = newest.activates_at or newest.created_at
        return KeyGauge(
            len(keys.ring.keys),
            newest.expires_at.timestamp(),
            activates.timestamp(),
            keys.ring.buffer.locked,
        )

    def _store_gauge(self, service: str) -> StoreGauge | None:
        if self.watcher is None:
            return None
        snap = self.watcher.health(service)
        return StoreGauge(
            snap.state.value,
            snap.last_sync.timestamp() if snap.last_sync is not None else None,
            {event.value: count for event, count in snap.error_counts.items()},
        )

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def has_service(self, service: str) -> bool:
        return service in self.services or service in self.config.callers

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: serving, every service has a usable key and a warm upstream pool, and
        its key store is in sync or out of sync for less than the grace period."""
        now = time.time()
        problems: dict[str, str] = {}
        grace = READY_GRACE_MIN_S
        vault = self.config.keystore.vault
        if vault is not None:
            grace = max(grace, READY_GRACE_POLLS * vault.poll_interval_ms / 1000)
        for name, svc in self.services.items():
            if svc.keys is None:
                problems[name] = "no keys loaded"
                continue
            try:
                svc.keys.signer_for(now)
            except NoUsableKey:
                problems[name] = "no usable key"
                continue
            if self._pool_size(name) == 0:
                problems[name] = "upstream pool not warm"
                continue
            if self.watcher is not None:
                snap = self.watcher.health(name)
                if snap.state is not HealthState.IN_SYNC:
                    last = snap.last_sync.timestamp() if snap.last_sync else None
                    if not snap.ready or last is None or now - last > grace:
                        problems[name] = f"key store {snap.state.value}"
        for name, table in self.tables.items():
            if not table.keys:
                problems[f"ingress:{name}"] = "no caller key to verify with"
        if not self.serving:
            problems["sidecar"] = "not serving"
        return not problems, {"problems": problems}

    def keys_report(self) -> dict[str, Any]:
        """Per service: the live keys' public metadata and state. Never a secret."""
        now_dt = datetime.now(UTC)
        report: dict[str, Any] = {}
        for name, svc in self.services.items():
            keys = svc.keys
            ring = keys.ring if keys is not None else None
            signing = None
            if ring is not None:
                with contextlib.suppress(KeyCacheError):
                    signing = ring.signing_key(now_dt)
            entries = []
            for key in ring.keys if ring is not None else ():
                meta = key.meta
                if meta.expired(now_dt):
                    state = "expired"
                elif not meta.activated(now_dt):
                    state = "staged"
                elif key is signing:
                    state = "active"
                else:
                    state = "retiring"
                entries.append(
                    {
                        "key_id": meta.key_id,
                        "version": key.version,
                        "state": state,
                        "algorithm": meta.algorithm,
                        "created_at": meta.created_at_raw,
                        "expires_at": meta.expires_at_raw,
                        "activates_at": meta.activates_at.isoformat()
                        if meta.activates_at
                        else None,
                        "checksum_ok": compute_checksum(
                            meta.key_id, meta.created_at_raw, meta.expires_at_raw, meta.permissions
                        )
                        == meta.checksum,
                    }
                )
            entry: dict[str, Any] = {
                "keys": entries,
                "memory_locked": ring.buffer.locked if ring is not None else None,
                "fallbacks": svc.fallbacks,
            }
            if self.watcher is not None:
                st = self.watcher.status(name)
                entry["store"] = {
                    "state": st.health.state.value,
                    "last_sync": st.last_sync.isoformat() if st.last_sync else None,
                    "revoked_key_ids": sorted(st.revoked_key_ids),
                }
            report[name] = entry
        out: dict[str, Any] = {"backend": self.config.keystore.backend, "services": report}
        if self.tables:
            out["ingress"] = {
                name: {
                    "callers": {c: table.caller_key_ids(c) for c in sorted(table.accept)},
                    "revoked_key_ids": [k.decode("ascii") for k in table.revoked],
                }
                for name, table in self.tables.items()
            }
        return out

    async def revoke(self, service: str, key_id: str) -> bool:
        """Drop ``key_id`` from ``service``'s keys at once; True if a live key was dropped.
        Returns once the new ring signs (the old one is wiped RETIRE_GRACE_S later). An
        ingress accepting ``service`` refuses the key as ``revoked_key`` from now on."""
        for table in self.tables.values():
            if service in table.accept:
                table.mark_revoked(key_id.encode("ascii", "replace"))
        if self.watcher is not None:
            dropped = await self.watcher.revoke_now(service, key_id)
        else:
            ring = self.rings.get(service)
            if ring is None or key_id not in ring.key_ids():
                self.log("key_revoked", service=service, key_id=key_id, held=False)
                return False
            keep = [k for k in ring.keys if k.key_id != key_id]
            overlap = timedelta(
                hours=self.config.api_key_policy.global_settings.rotation_overlap_hours
            )
            new = await asyncio.to_thread(
                build_ring,
                service,
                (),
                now=datetime.now(UTC),
                overlap=overlap,
                require_lock=self.config.memory.require_memory_lock,
                carried=keep,
            )
            self.log("key_revoked", service=service, key_id=key_id, held=True)
            self._on_ring(service, new, ring)
            dropped = True
        if dropped:
            revocations = self.metrics.state.revocations
            revocations[service] = revocations.get(service, 0) + 1
        if self._swaps:
            await asyncio.gather(*list(self._swaps), return_exceptions=True)
        return dropped

    async def _sample_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        lag = self.metrics.state.loop_lag_s
        while True:
            start = loop.time()
            await asyncio.sleep(LOOP_LAG_INTERVAL_S)
            lag[0] = max(0.0, loop.time() - start - LOOP_LAG_INTERVAL_S)


class _FutureSink:
    """Receives one exchange's outcome into a future (the clock probe's)."""

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future

    def upstream_response(self, status: int, raw: bytes, passthrough: bool) -> None:
        if self.future.done():
            return
        if status != 200:
            self.future.set_exception(ValueError(f"time endpoint answered HTTP {status}"))
        else:
            self.future.set_result(ParsedResponse(raw).body)

    def upstream_failed(self, error: ProxyError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _time_probe(svc: ServiceRuntime) -> Callable[[], asyncio.Future[float]]:
    """GET the venue's time endpoint over the service's pool; resolves to epoch ms."""
    endpoint = svc.venue.time_endpoint
    assert endpoint is not None
    request = b"GET %s HTTP/1.1\r\n%sAccept: application/json\r\n\r\n" % (
        endpoint.path,
        svc.host_line,
    )

    def probe() -> asyncio.Future[float]:
        loop = asyncio.get_running_loop()
        body: asyncio.Future[bytes] = loop.create_future()
        pool = svc.pool
        assert isinstance(pool, UpstreamPool)
        pool.submit(Exchange(_FutureSink(body), request, b"GET"))
        result: asyncio.Future[float] = loop.create_future()

        def done(f: asyncio.Future[bytes]) -> None:
            if result.done():
                return
            if f.cancelled():
                result.cancel()
            elif (exc := f.exception()) is not None:
                result.set_exception(exc)
            else:
                try:
                    result.set_result(endpoint.parse(f.result()))
                except (ValueError, TypeError) as err:
                    result.set_exception(ValueError(f"time endpoint: {err}"))

        body.add_done_callback(done)
        return result

    return probe


async def _wait_drained(
    pools: list[UpstreamPool], timeout: float, local: list[LocalPool] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and (
        any(p.busy or p.waiters for p in pools) or any(p.in_flight for p in local or ())
    ):
        await asyncio.sleep(0.01)


def _print_ready(info: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The hot path's loop: uvloop (the only module that imports it)."""
    import uvloop

    return uvloop.new_event_loop()


def run_sidecar(config: Config, *, environ: Mapping[str, str] | None = None) -> None:
    loop = new_event_loop()
    try:
        loop.run_until_complete(Sidecar(config, environ=environ).run())
    finally:
        loop.close()
