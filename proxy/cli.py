"""The ``authproxy`` command line: the only module that parses arguments or exits.

Exit codes are named below; errors print one line to stderr, never a secret.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from keycache.errors import KeyCacheError, KeyStoreConflict
from keycache.filestore import KeyFile
from keycache.record import KeyMeta
from keycache.store import FileStore, KeyStore, VaultStore
from proxy import lifecycle
from proxy.audit import AuditLog
from proxy.config import Config, load_config
from proxy.errors import ConfigError, ProxyError
from proxy.lifecycle import AdminSidecar, Context

EXIT_OK = 0
GIL_SWITCH_INTERVAL_S = 0.0001  # serve: see the comment where it is set
EXIT_FAILURE = 1  # a runtime failure (startup, I/O)
EXIT_CONFIG = 2  # invalid config or usage
EXIT_KEYSTORE = 3  # the key store refused (bad record, cannot decrypt, permissions)
EXIT_CONFLICT = 4  # a check-and-set lost: another writer changed the key first
EXIT_VERIFY = 5  # keys verify found a problem


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="authproxy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config", required=True, type=Path)

    check = sub.add_parser("check-config", help="validate a config and print it (no secrets)")
    check.add_argument("file", type=Path)

    sign = sub.add_parser("sign", help="dry run: print the request the sidecar would send")
    sign.add_argument("--config", required=True, type=Path)
    sign.add_argument("--service", required=True)
    sign.add_argument("--method", required=True)
    sign.add_argument("--url", required=True, help="venue path and query, e.g. /api/v3/order?x=1")
    sign.add_argument("--body", default="")
    sign.add_argument("--header", action="append", default=[], help="NAME:VALUE, repeatable")
    sign.add_argument("--timestamp", type=int, help="milliseconds since the epoch (default: now)")

    keys = sub.add_parser("keys", help="key lifecycle against the configured store")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    imp = ksub.add_parser("import", help="add one key record (JSON on stdin) as the next version")
    imp.add_argument("--config", required=True, type=Path)
    imp.add_argument("--service", required=True)
    lst = ksub.add_parser("list", help="list key metadata (never secrets)")
    lst.add_argument("--config", required=True, type=Path)
    gen = ksub.add_parser(
        "generate", help="make a key we issue, or a staged key pair (prints only the public key)"
    )
    gen.add_argument("--service", required=True)
    gen.add_argument("--algorithm", choices=["ed25519", "rsa", "es256"])
    act = ksub.add_parser("activate", help="activate a staged key pair under the venue's key id")
    act.add_argument("--service", required=True)
    act.add_argument(
        "--key-id", required=True, help="the API key the venue gave for the public key"
    )
    rot = ksub.add_parser("rotate", help="write the next version (check-and-set)")
    rot.add_argument("--service", required=True)
    rot.add_argument("--emergency", action="store_true", help="revoke the old keys at once")
    rot.add_argument(
        "--from-stdin", action="store_true", help="the venue's new key record (JSON) on stdin"
    )
    rev = ksub.add_parser("revoke", help="remove a key, add it to the revocation list")
    rev.add_argument("--service", required=True)
    rev.add_argument("--key-id", required=True)
    ver = ksub.add_parser("verify", help="check keys against the policy and the running sidecar")
    sch = ksub.add_parser("schedule", help="report the seed's rotation-schedule JSON")
    sch.add_argument("file", type=Path)
    sch.add_argument("--today", type=date.fromisoformat, help="YYYY-MM-DD (default: today, UTC)")
    for cmd in (imp, lst, gen, act, rot, rev, ver, sch):
        if cmd is not imp and cmd is not lst:
            cmd.add_argument("--config", required=cmd is not sch, type=Path)
        cmd.add_argument(
            "--audit-log",
            type=Path,
            help="audit log path (default: api_key_policy.audit.log_destination)",
        )

    rotator = sub.add_parser("rotator", help="scheduled rotation of the keys we issue")
    rotator.add_argument("--config", required=True, type=Path)
    rotator.add_argument("--once", action="store_true", help="one pass, then exit")
    rotator.add_argument(
        "--interval", type=float, default=60.0, help="seconds between passes (default 60)"
    )
    rotator.add_argument("--audit-log", type=Path)

    demo = sub.add_parser("demo", help="run a local venue simulator and the sidecar, send orders")
    demo.add_argument("--orders", type=int, default=120, help="in all (Binance: 100 per 10 s)")
    demo.add_argument("--connections", type=int, default=4)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
    except ConfigError as exc:
        print(f"authproxy: config error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except KeyStoreConflict as exc:
        print(
            f"authproxy: lost the race: another writer made version {exc.current_version} "
            f"first ({exc.code})",
            file=sys.stderr,
        )
        code = EXIT_CONFLICT
    except KeyCacheError as exc:
        print(f"authproxy: key store error ({exc.code}): {exc}", file=sys.stderr)
        code = EXIT_KEYSTORE
    except OSError as exc:
        print(f"authproxy: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        code = EXIT_FAILURE
    except ProxyError as exc:
        print(f"authproxy: {exc.code}: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = EXIT_FAILURE
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        config = load_config(args.file)
        print(json.dumps(config.effective(), indent=2, sort_keys=True))
        return EXIT_OK
    if args.command == "serve":
        from proxy.runtime import run_sidecar

        # Key loading, Vault reads and signer construction run in threads; a thread holding
        # the GIL keeps the event loop waiting up to the switch interval (5 ms by default,
        # seen as latency spikes at a key swap). 100 µs bounds that wait; the extra GIL
        # hand-offs happen only while such a thread runs.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        run_sidecar(load_config(args.config))
        return EXIT_OK
    if args.command == "sign":
        return _sign(args)
    if args.command == "keys":
        if args.keys_command == "schedule" and args.config is None:
            return _keys_schedule(args, None)
        config = load_config(args.config)
        if args.keys_command == "list":
            return _keys_list(config)
        return _keys_lifecycle(args, config)
    if args.command == "rotator":
        return _rotator(args, load_config(args.config))
    if args.command == "demo":
        from proxy.demo import run_demo

        return run_demo(orders=args.orders, connections=args.connections)
    raise AssertionError(args.command)


def _key_file(config: Config) -> KeyFile:
    from proxy.runtime import open_key_file

    if config.keystore.backend != "file" or config.keystore.file is None:
        raise ConfigError("keystore.backend", "this command needs the file backend in this version")
    return open_key_file(config.keystore.file, os.environ)


def _read_stdin_record() -> dict[str, object]:
    try:
        record = json.load(sys.stdin)
    except json.JSONDecodeError as exc:
        raise ConfigError("stdin", f"not a JSON key record ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError("stdin", "must be one JSON object (a key record)")
    return record


def _open_store(config: Config) -> KeyStore:
    if config.keystore.backend == "vault":
        from keycache.vault import VaultSource

        assert config.keystore.vault is not None
        return VaultStore(VaultSource.from_config(config.keystore.vault))
    return FileStore(_key_file(config))


def _audit_log(config: Config, override: Path | None) -> AuditLog:
    audit = config.api_key_policy.audit
    path = override
    if path is None and audit.log_destination:
        path = Path(audit.log_destination)
    if path is not None and not path.parent.is_dir():
        if override is not None:
            raise ConfigError("--audit-log", f"directory {path.parent} does not exist")
        # The policy's default (/var/log/hft) is absent on a workstation or in CI: say so
        # on every run rather than refuse to work; syslog (if enabled) still gets it.
        print(
            f"authproxy: warning: audit log directory {path.parent} does not exist; "
            "audit events go to syslog only (pass --audit-log PATH)",
            file=sys.stderr,
        )
        path = None
    facility = audit.syslog_facility if audit.syslog_enabled else None
    return AuditLog(path, facility)


def _context(config: Config, audit_override: Path | None) -> Context:
    admin = config.admin
    sidecar = AdminSidecar(
        admin.address if admin else "127.0.0.1",
        admin.port if admin else 0,
        admin.token_file if admin else None,
    )
    return Context(config, _open_store(config), _audit_log(config, audit_override), sidecar)


def _keys_lifecycle(args: argparse.Namespace, config: Config) -> int:
    command: str = args.keys_command
    record = _read_stdin_record() if command == "import" else None
    ctx = _context(config, args.audit_log)
    code = EXIT_OK
    try:
        out: object
        if command == "import":
            assert record is not None
            out = lifecycle.import_record(ctx, args.service, record)
        elif command == "generate":
            out = lifecycle.generate(ctx, args.service, args.algorithm)
        elif command == "activate":
            out = lifecycle.activate(ctx, args.service, args.key_id)
        elif command == "rotate":
            stdin_record = _read_stdin_record() if args.from_stdin else None
            out = lifecycle.rotate(ctx, args.service, emergency=args.emergency, record=stdin_record)
        elif command == "revoke":
            out = lifecycle.revoke(ctx, args.service, args.key_id)
        elif command == "verify":
            ok, out = lifecycle.verify(ctx)
            code = EXIT_OK if ok else EXIT_VERIFY
        elif command == "schedule":
            return _keys_schedule(args, ctx)
        else:
            raise AssertionError(command)
    finally:
        ctx.store.close()
    for warning in ctx.warnings or []:
        print(f"authproxy: warning: {warning}", file=sys.stderr)
    if command == "generate" and isinstance(out, dict) and "public_key" in out:
        # The public key, exactly as the venue's registration page wants it pasted.
        print(json.dumps({k: v for k, v in out.items() if k != "public_key"}))
        print(out["public_key"], end="")
    else:
        print(json.dumps(out, indent=2 if command == "verify" else None))
    return code


def _keys_schedule(args: argparse.Namespace, ctx: Context | None) -> int:
    try:
        doc = json.loads(args.file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(args.file), f"not JSON ({exc.msg})") from None
    today = args.today or datetime.now(UTC).date()
    created: dict[str, datetime | None] = {}
    if ctx is not None:
        names = [n for n in ctx.config.services]
        created = lifecycle.store_created_times(ctx.store, names)
    print(json.dumps(lifecycle.schedule_report(doc, today, created), indent=2))
    return EXIT_OK


def _rotator(args: argparse.Namespace, config: Config) -> int:
    while True:
        ctx = _context(config, args.audit_log)
        try:
            results = lifecycle.run_rotator_once(ctx)
        finally:
            ctx.store.close()
        for warning in ctx.warnings or []:
            print(f"authproxy: warning: {warning}", file=sys.stderr)
        print(json.dumps(results), flush=True)
        if args.once:
            return EXIT_OK
        time.sleep(args.interval)


def _keys_list(config: Config) -> int:
    metas: dict[str, list[tuple[int, KeyMeta]]] = {}
    if config.keystore.backend == "vault":
        store = _open_store(config)
        try:
            for name in config.services:
                versions = store.live_versions(name)
                if versions:
                    metas[name] = versions
        finally:
            store.close()
    else:
        keyfile = _key_file(config)
        try:
            metas = keyfile.list_meta() if keyfile.exists() else {}
        finally:
            keyfile.close()
    out: list[dict[str, Any]] = []
    for service, versions in sorted(metas.items()):
        for version, meta in versions:
            out.append(
                {
                    "service": service,
                    "version": version,
                    "key_id": meta.key_id,
                    "algorithm": meta.algorithm,
                    "created_at": meta.created_at.isoformat(),
                    "expires_at": meta.expires_at.isoformat(),
                    "activates_at": meta.activates_at.isoformat() if meta.activates_at else None,
                    "permissions": list(meta.permissions),
                    "checksum": meta.checksum,
                }
            )
    print(json.dumps(out, indent=2))
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    from keycache.ring import build_ring
    from proxy.runtime import build_services
    from proxy.service import encode_request_headers

    config = load_config(args.config)
    if args.service not in config.services:
        raise ConfigError("services", f"no service named {args.service}")
    keyfile = _key_file(config)
    try:
        stored = keyfile.load()
    finally:
        keyfile.close()
    now = time.time() if args.timestamp is None else args.timestamp / 1000
    versions = stored.get(args.service)
    if not versions:
        raise ProxyError(f"service {args.service} has no key", code="no_usable_key")
    overlap = timedelta(hours=config.api_key_policy.global_settings.rotation_overlap_hours)
    ring = build_ring(args.service, versions, now=datetime.fromtimestamp(now, UTC), overlap=overlap)
    try:
        service = build_services(config, {args.service: ring})[args.service]
        url: str = args.url
        if not url.startswith("/"):
            raise ConfigError("--url", "must start with /")
        path, _, query = url.encode().partition(b"?")
        headers = []
        for h in args.header:
            name, sep, value = h.partition(":")
            if not sep:
                raise ConfigError("--header", "must be NAME:VALUE")
            headers.append((name.strip().encode(), value.strip().encode()))
        data = service.prepare(
            args.method.upper().encode(),
            path,
            query,
            encode_request_headers(headers),
            args.body.encode(),
            now,
        )
    finally:
        ring.retire()
    print(json.dumps(describe_request(data, service.config.upstream), indent=2))
    return EXIT_OK


def describe_request(data: bytes, upstream: str) -> dict[str, Any]:
    """Split serialized request bytes back into method, url, headers and body."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [list(line.split(": ", 1)) for line in lines[1:]]
    return {
        "method": method,
        "url": upstream + target,
        "headers": headers,
        "body": body.decode("utf-8", "replace"),
    }
