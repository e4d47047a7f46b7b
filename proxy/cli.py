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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keycache.errors import KeyCacheError
from keycache.filestore import KeyFile
from proxy.config import Config, load_config
from proxy.errors import ConfigError, ProxyError

EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure (startup, I/O)
EXIT_CONFIG = 2  # invalid config or usage
EXIT_KEYSTORE = 3  # the key store refused (bad record, cannot decrypt, permissions)


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

    demo = sub.add_parser("demo", help="run a local venue simulator and the sidecar, send orders")
    demo.add_argument("--orders", type=int, default=2000)
    demo.add_argument("--connections", type=int, default=4)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
    except ConfigError as exc:
        print(f"authproxy: config error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except KeyCacheError as exc:
        print(f"authproxy: key store error ({exc.code}): {exc}", file=sys.stderr)
        code = EXIT_KEYSTORE
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

        run_sidecar(load_config(args.config))
        return EXIT_OK
    if args.command == "sign":
        return _sign(args)
    if args.command == "keys":
        config = load_config(args.config)
        if args.keys_command == "import":
            return _keys_import(config, args.service)
        return _keys_list(config)
    if args.command == "demo":
        from proxy.demo import run_demo

        return run_demo(orders=args.orders, connections=args.connections)
    raise AssertionError(args.command)


def _key_file(config: Config) -> KeyFile:
    from proxy.runtime import open_key_file

    if config.keystore.backend != "file" or config.keystore.file is None:
        raise ConfigError("keystore.backend", "this command needs the file backend in this version")
    return open_key_file(config.keystore.file, os.environ)


def _keys_import(config: Config, service: str) -> int:
    if service not in config.services:
        raise ConfigError("services", f"no service named {service}")
    try:
        record = json.load(sys.stdin)
    except json.JSONDecodeError as exc:
        raise ConfigError("stdin", f"not a JSON key record ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError("stdin", "must be one JSON object (a key record)")
    keyfile = _key_file(config)
    try:
        version = keyfile.add_version(service, record)
    finally:
        keyfile.close()
    print(json.dumps({"service": service, "version": version, "key_id": record.get("key_id")}))
    return EXIT_OK


def _keys_list(config: Config) -> int:
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
