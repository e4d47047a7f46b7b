"""Configuration: one YAML file, validated into frozen dataclasses.

The field names are the contract of DESIGN.md. Validation names the failing field path
and the reason (``services.binance_spot_trading.upstream: must be an https URL``). Nothing
here touches the network; reading the file and checking that referenced files exist is
all the I/O it does. Secrets are never in the config, only references to them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from proxy.errors import ConfigError

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any order payload, bounds memory per request
DEFAULT_TIMEOUT_MS = 2000
DEFAULT_RECV_WINDOW_MS = 5000  # Binance's own default
MAX_RECV_WINDOW_MS = 60000  # Binance refuses larger windows
DEFAULT_POOL_SIZE = 2  # warm connections per upstream; one engine connection needs one
MAX_POOL_SIZE = 64
MAX_ON_LIMIT_WAIT_MS = 60_000  # on_limit.wait_ms: beyond a minute an order is stale anyway
# ingress: docs/internal-auth.md's window (±30 s) and nonce bound; a window above five
# minutes would make a captured request replayable for too long to call it "fresh".
DEFAULT_MAX_SKEW_MS = 30_000
MAX_MAX_SKEW_MS = 300_000
DEFAULT_NONCE_CAPACITY = 100_000
MAX_NONCE_CAPACITY = 10_000_000  # ~1 GB of nonces: beyond that the bound bounds nothing
DEFAULT_INGRESS_POOL = 8  # keep-alive connections to the protected service, at most

Backend = Literal["file", "vault"]
AuthMethod = Literal["token", "approle", "kubernetes"]


# --- the dataclasses ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenConfig:
    address: str  # an IP address, or "unix:/path"
    port: int
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int = 1024  # beyond: 503 too_many_connections (connection floods)
    header_timeout_ms: int = 10_000  # a request head must arrive within this (slow-loris)
    body_timeout_ms: int = 30_000  # and its body within this
    # unix socket: peers allowed by uid or gid (SO_PEERCRED); unset: whoever can open it
    allow_uids: tuple[int, ...] | None = None
    allow_gids: tuple[int, ...] | None = None
    # TCP: loopback only unless this is true (then use client tokens)
    allow_remote: bool = False

    @property
    def unix_path(self) -> str | None:
        return self.address[5:] if self.address.startswith("unix:") else None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """An engine that must present a token (``X-Authproxy-Token``): the token lives in a
    file (never in the config); ``services`` limits what it may use (None: all)."""

    name: str
    token_file: Path
    services: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    address: str
    port: int
    # The admin token (bearer) for state-changing calls such as revoking a key; without
    # it those calls are refused. Read-only endpoints need no token (loopback only).
    token_file: Path | None = None
    # Per-request metrics on the hot path (/metrics still serves the scrape-time gauges
    # when off); the switch lets loadtests.bench measure what the observations cost.
    metrics: bool = True


@dataclass(frozen=True, slots=True)
class FileStoreConfig:
    path: Path
    kek_file: Path | None
    passphrase_env: str | None


@dataclass(frozen=True, slots=True)
class VaultAuthConfig:
    method: AuthMethod
    token_file: Path | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    role: str | None = None
    jwt_file: Path | None = None


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str
    mount_path: str
    path_prefix: str
    tls_verify: bool
    tls_ca_cert: Path | None
    auth: VaultAuthConfig
    poll_interval_ms: int


@dataclass(frozen=True, slots=True)
class KeystoreConfig:
    backend: Backend
    file: FileStoreConfig | None
    vault: VaultConfig | None


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    require_memory_lock: bool = False
    lock_all: bool = False


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    venue: str
    key_type: str
    upstream: str
    route: str
    ca_file: Path | None
    timeout_ms: int
    recv_window_ms: int
    pool_size: int
    clock_sync: bool = True
    # The key type's rate_limits from the policy unless overridden here.
    rate_limit: RateLimits | None = None
    # on_limit: {wait_ms: N}: hold a request over the budget up to N ms for room before
    # refusing it (0, the default: refuse at once with 429 and Retry-After).
    on_limit_wait_ms: int = 0
    # allow: ["METHOD /path", ...] beyond the venue's endpoints the key type permits
    # (proxy.access); the key type's permissions, copied from the policy.
    allow: tuple[str, ...] = ()
    permissions: tuple[str, ...] = ()

    @property
    def upstream_host(self) -> str:
        host = urlsplit(self.upstream).hostname
        assert host is not None  # validated at load
        return host

    @property
    def upstream_port(self) -> int:
        return urlsplit(self.upstream).port or 443

    @property
    def host_header(self) -> str:
        """The ``Host`` header the venue expects: host, with the port only when not 443."""
        netloc = urlsplit(self.upstream).netloc
        return netloc[:-4] if netloc.endswith(":443") else netloc


@dataclass(frozen=True, slots=True)
class IngressConfig:
    """One ingress listener: verifies HFT-AUTH-V1 in front of a local internal service."""

    service: str  # the internal service it protects (a name for logs, metrics, audit)
    address: str  # an IP address, or "unix:/path"
    port: int
    upstream: str  # http://<loopback>:PORT, normalized
    accept: tuple[str, ...]  # callers whose keys verify (key names in the store)
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    nonce_capacity: int = DEFAULT_NONCE_CAPACITY
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    pool_size: int = DEFAULT_INGRESS_POOL
    # tls: {cert_file, key_file}: callers on other hosts reach the ingress over TLS (the
    # signature authenticates, it does not hide the body); required off loopback.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def unix_path(self) -> str | None:
        return self.address[5:] if self.address.startswith("unix:") else None

    @property
    def upstream_host(self) -> str:
        host = urlsplit(self.upstream).hostname
        assert host is not None  # validated at load
        return host

    @property
    def upstream_port(self) -> int:
        port = urlsplit(self.upstream).port
        assert port is not None  # validated at load
        return port


@dataclass(frozen=True, slots=True)
class RateLimits:
    requests_per_second: int | None
    requests_per_minute: int | None


@dataclass(frozen=True, slots=True)
class KeyTypePolicy:
    validity_days: int
    rotation_required: bool
    auto_rotate: bool
    permissions: tuple[str, ...]
    rate_limits: RateLimits


@dataclass(frozen=True, slots=True)
class GlobalSettings:
    default_validity_days: int
    rotation_overlap_hours: int
    minimum_key_length: int
    hash_algorithm: str


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    schedule: str | None
    notification_email: str | None
    pre_rotation_warning_days: int
    emergency_rotation_enabled: bool


@dataclass(frozen=True, slots=True)
class AuditPolicy:
    log_level: str
    log_destination: str | None
    syslog_enabled: bool
    syslog_facility: str | None
    retention_days: int | None


@dataclass(frozen=True, slots=True)
class ApiKeyPolicy:
    global_settings: GlobalSettings
    key_types: Mapping[str, KeyTypePolicy]
    storage: Mapping[str, Any]
    rotation: RotationPolicy
    audit: AuditPolicy


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig
    admin: AdminConfig | None
    keystore: KeystoreConfig
    memory: MemoryConfig
    services: Mapping[str, ServiceConfig]
    api_key_policy: ApiKeyPolicy
    # Where signers keep state across restarts (Kraken/Gemini nonce high-water marks).
    state_dir: Path | None = None
    # Ingress listeners verifying internal callers (docs/ingress.md); none by default.
    ingress: tuple[IngressConfig, ...] = ()
    # Engines that must present a token; None: any local caller the listener admits.
    clients: tuple[ClientConfig, ...] | None = None
    source: Path | None = field(default=None, compare=False)

    @property
    def callers(self) -> tuple[str, ...]:
        """Every caller some ingress accepts, once each, in config order."""
        return tuple(dict.fromkeys(c for ing in self.ingress for c in ing.accept))

    def effective(self) -> dict[str, Any]:
        """The effective configuration as plain data, for ``check-config``.

        The config never holds secrets (only paths and env var names), so this is safe
        to print.
        """
        data = asdict(self)
        data.pop("source", None)
        plain: dict[str, Any] = _plain(data)
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --- YAML loading -------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: a silently shadowed field is a trap."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node)
    return result


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_config(path: Path) -> Config:
    """Read and validate ``path``. Raises ConfigError naming the field path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
    return parse_config(text, source=path)


def parse_config(text: str, *, source: Path | None = None) -> Config:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {exc}") from exc
    base = source.parent if source is not None else Path.cwd()
    return _Validator(base).config(raw, source)


# --- validation ---------------------------------------------------------------------------


def _name_ok(name: str) -> bool:
    return bool(name) and name.replace("_", "").replace("-", "").isalnum()


def _check_ports(config: Config) -> None:
    """Two listeners on one fixed address and port cannot both bind: say which."""
    taken: dict[tuple[str, int], str] = {}
    listeners: list[tuple[str, str, int]] = [("listen", config.listen.address, config.listen.port)]
    if config.admin is not None:
        listeners.append(("admin", config.admin.address, config.admin.port))
    for i, ing in enumerate(config.ingress):
        where = f"ingress[{i}]" if len(config.ingress) > 1 else "ingress"
        listeners.append((where, ing.address, ing.port))
    for where, address, port in listeners:
        key = (address, port)
        if address.startswith("unix:"):
            key = (address, 0)
        elif port == 0:
            continue
        if key in taken:
            field_name = "address" if address.startswith("unix:") else "port"
            raise ConfigError(f"{where}.{field_name}", f"already used by {taken[key]}")
        taken[key] = where


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Validator:
    """Turns the parsed YAML tree into dataclasses, naming the path of every failure.

    Relative file paths are resolved against the config file's directory.
    """

    def __init__(self, base: Path) -> None:
        self.base = base

    # primitives
    def mapping(self, value: Any, path: str, allowed: set[str] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(path, "must be a mapping")
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, got {key!r}")
            if allowed is not None and key not in allowed:
                raise ConfigError(_join(path, key), "unknown field")
        return value

    def req(self, m: dict[str, Any], key: str, path: str, conv: Callable[[Any, str], T]) -> T:
        if key not in m or m[key] is None:
            raise ConfigError(_join(path, key), "is required")
        return conv(m[key], _join(path, key))

    def opt(
        self, m: dict[str, Any], key: str, path: str, conv: Callable[[Any, str], T], default: T
    ) -> T:
        if key not in m or m[key] is None:
            return default
        return conv(m[key], _join(path, key))

    @staticmethod
    def string(value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, "must be a non-empty string")
        return value

    @staticmethod
    def boolean(value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(path, "must be true or false")
        return value

    @staticmethod
    def integer(value: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, "must be an integer")
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ConfigError(path, f"must be {bound}")
        return value

    def ranged(self, lo: int, hi: int | None = None) -> Callable[[Any, str], int]:
        return lambda v, p: self.integer(v, p, lo, hi)

    def filepath(self, value: Any, path: str) -> Path:
        p = Path(self.string(value, path)).expanduser()
        return p if p.is_absolute() else self.base / p

    def existing_file(self, value: Any, path: str) -> Path:
        p = self.filepath(value, path)
        if not p.is_file():
            raise ConfigError(path, f"file not found: {p}")
        return p

    @staticmethod
    def string_list(value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(path, "must be a list of non-empty strings")
        return tuple(value)

    def address(self, value: Any, path: str, *, unix_ok: bool) -> str:
        text = self.string(value, path)
        if text.startswith("unix:"):
            if not unix_ok:
                raise ConfigError(path, "a unix socket is not supported here")
            if not text[5:].startswith("/"):
                raise ConfigError(path, "unix socket path must be absolute (unix:/path)")
            return text
        if text == "localhost":
            return "127.0.0.1"
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(path, "must be an IP address or unix:/path") from None
        return text

    # sections
    def config(self, raw: Any, source: Path | None) -> Config:
        top = self.mapping(
            raw,
            "",
            {
                "listen",
                "admin",
                "keystore",
                "memory",
                "services",
                "api_key_policy",
                "state_dir",
                "ingress",
                "clients",
            },
        )
        policy = self.req(top, "api_key_policy", "", self.policy)
        no_ingress: tuple[IngressConfig, ...] = ()
        ingress = self.opt(top, "ingress", "", self.ingress_list, no_ingress)
        no_services: dict[str, Any] = {}
        services_raw = self.opt(top, "services", "", self.mapping, no_services)
        if not services_raw and not ingress:
            # A sidecar only in front of an internal service signs nothing: no services.
            raise ConfigError("services", "at least one service is required (or an ingress)")
        if ingress and policy.global_settings.rotation_overlap_hours < 1:
            # The retiring key must keep verifying while callers switch keys.
            raise ConfigError(
                "api_key_policy.global_settings.rotation_overlap_hours",
                "must be at least 1 when an ingress verifies callers",
            )
        services = {
            name: self.service(name, value, f"services.{name}", policy)
            for name, value in services_raw.items()
        }
        seen: dict[str, str] = {}
        for svc in services.values():
            if svc.route in seen:
                raise ConfigError(
                    f"services.{svc.name}.route",
                    f"{svc.route} is already the route of service {seen[svc.route]}",
                )
            seen[svc.route] = svc.name
        config = Config(
            listen=self.req(top, "listen", "", self.listen),
            admin=self.opt(top, "admin", "", self.admin, None),
            keystore=self.req(top, "keystore", "", self.keystore),
            memory=self.opt(top, "memory", "", self.memory, MemoryConfig()),
            services=services,
            api_key_policy=policy,
            state_dir=self.opt(top, "state_dir", "", self.filepath, None),
            ingress=ingress,
            clients=self.opt(top, "clients", "", self.clients, None),
            source=source,
        )
        for client in config.clients or ():
            for i, name in enumerate(client.services or ()):
                if name not in services:
                    raise ConfigError(f"clients.{client.name}.services[{i}]", "no such service")
        _check_ports(config)
        return config

    def ingress_list(self, value: Any, path: str) -> tuple[IngressConfig, ...]:
        """``ingress:`` is one listener (a mapping) or several (a list of them)."""
        if isinstance(value, list):
            if not value:
                raise ConfigError(path or "ingress", "must not be an empty list")
            items = [self.ingress(v, f"ingress[{i}]") for i, v in enumerate(value)]
        else:
            items = [self.ingress(value, "ingress")]
        seen: dict[str, str] = {}
        for i, item in enumerate(items):
            where = f"ingress[{i}]" if isinstance(value, list) else "ingress"
            if item.service in seen:
                raise ConfigError(
                    f"{where}.service",
                    f"{item.service} already has an ingress ({seen[item.service]})",
                )
            seen[item.service] = where
        return tuple(items)

    def ingress(self, value: Any, path: str) -> IngressConfig:
        m = self.mapping(
            value,
            path,
            {
                "service",
                "address",
                "port",
                "upstream",
                "accept",
                "max_skew_ms",
                "nonce_capacity",
                "timeout_ms",
                "max_body_bytes",
                "pool_size",
                "tls",
            },
        )
        service = self.req(m, "service", path, self.string)
        if not _name_ok(service):
            raise ConfigError(_join(path, "service"), "service names are letters, digits, _ and -")
        accept = self.req(m, "accept", path, self.string_list)
        if not accept:
            raise ConfigError(_join(path, "accept"), "at least one caller is required")
        for i, caller in enumerate(accept):
            if not _name_ok(caller) or caller == "_revoked":
                raise ConfigError(
                    f"{_join(path, 'accept')}[{i}]", "caller names are letters, digits, _ and -"
                )
        if len(set(accept)) != len(accept):
            raise ConfigError(_join(path, "accept"), "a caller is listed twice")
        address = self.req(m, "address", path, lambda v, p: self.address(v, p, unix_ok=True))
        tls = self.opt(m, "tls", path, self.tls_files, None)
        off_loopback = not address.startswith("unix:") and not (
            ipaddress.ip_address(address).is_loopback
        )
        if tls is None and off_loopback:
            raise ConfigError(
                _join(path, "tls"), "is required when the ingress listens off loopback"
            )
        return IngressConfig(
            service=service,
            address=address,
            port=self.opt(m, "port", path, self.ranged(0, 65535), 0),
            upstream=self.req(m, "upstream", path, self.local_upstream),
            accept=accept,
            max_skew_ms=self.opt(
                m, "max_skew_ms", path, self.ranged(1, MAX_MAX_SKEW_MS), DEFAULT_MAX_SKEW_MS
            ),
            nonce_capacity=self.opt(
                m,
                "nonce_capacity",
                path,
                self.ranged(1, MAX_NONCE_CAPACITY),
                DEFAULT_NONCE_CAPACITY,
            ),
            timeout_ms=self.opt(m, "timeout_ms", path, self.ranged(1, 600_000), DEFAULT_TIMEOUT_MS),
            max_body_bytes=self.opt(
                m, "max_body_bytes", path, self.ranged(0, 1 << 30), DEFAULT_MAX_BODY_BYTES
            ),
            pool_size=self.opt(
                m, "pool_size", path, self.ranged(1, MAX_POOL_SIZE), DEFAULT_INGRESS_POOL
            ),
            tls_cert_file=tls[0] if tls else None,
            tls_key_file=tls[1] if tls else None,
        )

    def tls_files(self, value: Any, path: str) -> tuple[Path, Path]:
        m = self.mapping(value, path, {"cert_file", "key_file"})
        return (
            self.req(m, "cert_file", path, self.existing_file),
            self.req(m, "key_file", path, self.existing_file),
        )

    def local_upstream(self, value: Any, path: str) -> str:
        """``http://<loopback IP or localhost>:PORT``: the protected service is local,
        and the hop after verification is plain HTTP, so it must never leave the host."""
        text = self.string(value, path)
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or not port:
            raise ConfigError(path, "must be http://127.0.0.1:PORT (a loopback address and port)")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError(path, "must be http://host:port with no path or query")
        host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(path, "the protected service must be on loopback (127.0.0.1, ::1)")
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def listen(self, value: Any, path: str) -> ListenConfig:
        m = self.mapping(
            value,
            path,
            {
                "address",
                "port",
                "max_body_bytes",
                "max_connections",
                "header_timeout_ms",
                "body_timeout_ms",
                "allow_uids",
                "allow_gids",
                "allow_remote",
            },
        )
        address = self.req(m, "address", path, lambda v, p: self.address(v, p, unix_ok=True))
        allow_remote = self.opt(m, "allow_remote", path, self.boolean, False)
        if (
            not address.startswith("unix:")
            and not allow_remote
            and not ipaddress.ip_address(address).is_loopback
        ):
            raise ConfigError(
                _join(path, "address"),
                "the engine listener is loopback or a unix socket unless allow_remote: true",
            )
        uids = self.opt(m, "allow_uids", path, self.id_list, None)
        gids = self.opt(m, "allow_gids", path, self.id_list, None)
        if (uids is not None or gids is not None) and not address.startswith("unix:"):
            raise ConfigError(
                _join(path, "allow_uids" if uids is not None else "allow_gids"),
                "peer credentials exist on a unix socket only (address: unix:/path)",
            )
        return ListenConfig(
            address=address,
            port=self.opt(m, "port", path, self.ranged(0, 65535), 0),
            max_body_bytes=self.opt(
                m, "max_body_bytes", path, self.ranged(0, 1 << 30), DEFAULT_MAX_BODY_BYTES
            ),
            max_connections=self.opt(m, "max_connections", path, self.ranged(1, 1 << 20), 1024),
            header_timeout_ms=self.opt(
                m, "header_timeout_ms", path, self.ranged(100, 600_000), 10_000
            ),
            body_timeout_ms=self.opt(m, "body_timeout_ms", path, self.ranged(100, 600_000), 30_000),
            allow_uids=uids,
            allow_gids=gids,
            allow_remote=allow_remote,
        )

    def id_list(self, value: Any, path: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise ConfigError(path, "must be a non-empty list of numeric ids")
        return tuple(self.ranged(0, (1 << 32) - 1)(v, f"{path}[{i}]") for i, v in enumerate(value))

    def clients(self, value: Any, path: str) -> tuple[ClientConfig, ...]:
        m = self.mapping(value, path)
        out = []
        for name, spec in m.items():
            where = _join(path, str(name))
            c = self.mapping(spec, where, {"token_file", "services"})
            services = self.opt(c, "services", where, self.string_list, None)
            out.append(
                ClientConfig(
                    name=str(name),
                    token_file=self.req(c, "token_file", where, self.existing_file),
                    services=tuple(services) if services is not None else None,
                )
            )
        if not out:
            raise ConfigError(path, "must name at least one client")
        return tuple(out)

    def allow_list(self, value: Any, path: str) -> tuple[str, ...]:
        from proxy.access import compile_pattern

        lines = self.string_list(value, path)
        for i, line in enumerate(lines):
            try:
                compile_pattern(line)
            except ValueError as exc:
                raise ConfigError(f"{path}[{i}]", str(exc)) from None
        return tuple(lines)

    def admin(self, value: Any, path: str) -> AdminConfig:
        m = self.mapping(value, path, {"address", "port", "token_file", "metrics"})
        addr = self.req(m, "address", path, lambda v, p: self.address(v, p, unix_ok=False))
        if not ipaddress.ip_address(addr).is_loopback:
            raise ConfigError(_join(path, "address"), "the admin API listens on loopback only")
        return AdminConfig(
            address=addr,
            port=self.opt(m, "port", path, self.ranged(0, 65535), 0),
            token_file=self.opt(m, "token_file", path, self.filepath, None),
            metrics=self.opt(m, "metrics", path, self.boolean, True),
        )

    def keystore(self, value: Any, path: str) -> KeystoreConfig:
        m = self.mapping(value, path, {"backend", "file", "vault"})
        backend = self.req(m, "backend", path, self.string)
        if backend not in ("file", "vault"):
            raise ConfigError(_join(path, "backend"), "must be file or vault")
        file_cfg = self.opt(m, "file", path, self.file_store, None)
        vault_cfg = self.opt(m, "vault", path, self.vault, None)
        if backend == "file" and file_cfg is None:
            raise ConfigError(_join(path, "file"), "is required when backend is file")
        if backend == "vault" and vault_cfg is None:
            raise ConfigError(_join(path, "vault"), "is required when backend is vault")
        return KeystoreConfig(backend=backend, file=file_cfg, vault=vault_cfg)  # type: ignore[arg-type]

    def file_store(self, value: Any, path: str) -> FileStoreConfig:
        m = self.mapping(value, path, {"path", "kek_file", "passphrase_env"})
        kek = self.opt(m, "kek_file", path, self.filepath, None)
        env = self.opt(m, "passphrase_env", path, self.string, None)
        if (kek is None) == (env is None):
            raise ConfigError(path, "set exactly one of kek_file and passphrase_env")
        return FileStoreConfig(
            path=self.req(m, "path", path, self.filepath), kek_file=kek, passphrase_env=env
        )

    def vault(self, value: Any, path: str) -> VaultConfig:
        m = self.mapping(
            value,
            path,
            {
                "address",
                "mount_path",
                "path_prefix",
                "tls_verify",
                "tls_ca_cert",
                "auth",
                "poll_interval_ms",
            },
        )
        address = self.req(m, "address", path, self.string)
        parts = urlsplit(address)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(_join(path, "address"), "must be an http(s) URL")
        return VaultConfig(
            address=address,
            mount_path=self.opt(m, "mount_path", path, self.string, "secret").strip("/"),
            path_prefix=self.opt(m, "path_prefix", path, self.string, "api_keys").strip("/"),
            tls_verify=self.opt(m, "tls_verify", path, self.boolean, True),
            tls_ca_cert=self.opt(m, "tls_ca_cert", path, self.filepath, None),
            auth=self.req(m, "auth", path, self.vault_auth),
            poll_interval_ms=self.opt(m, "poll_interval_ms", path, self.ranged(50), 1000),
        )

    def vault_auth(self, value: Any, path: str) -> VaultAuthConfig:
        m = self.mapping(
            value,
            path,
            {"method", "token_file", "role_id_file", "secret_id_file", "role", "jwt_file"},
        )
        method = self.req(m, "method", path, self.string)
        needs = {
            "token": ("token_file",),
            "approle": ("role_id_file", "secret_id_file"),
            "kubernetes": ("role", "jwt_file"),
        }
        if method not in needs:
            raise ConfigError(_join(path, "method"), "must be token, approle or kubernetes")
        for key in needs[method]:
            if key not in m:
                raise ConfigError(_join(path, key), f"is required for auth method {method}")
        return VaultAuthConfig(
            method=method,  # type: ignore[arg-type]
            token_file=self.opt(m, "token_file", path, self.filepath, None),
            role_id_file=self.opt(m, "role_id_file", path, self.filepath, None),
            secret_id_file=self.opt(m, "secret_id_file", path, self.filepath, None),
            role=self.opt(m, "role", path, self.string, None),
            jwt_file=self.opt(m, "jwt_file", path, self.filepath, None),
        )

    def memory(self, value: Any, path: str) -> MemoryConfig:
        m = self.mapping(value, path, {"require_memory_lock", "lock_all"})
        return MemoryConfig(
            require_memory_lock=self.opt(m, "require_memory_lock", path, self.boolean, False),
            lock_all=self.opt(m, "lock_all", path, self.boolean, False),
        )

    def service(self, name: Any, value: Any, path: str, policy: ApiKeyPolicy) -> ServiceConfig:
        from proxy.signers import VENUES  # the registry; imported late to keep config light

        if not isinstance(name, str) or not _name_ok(name):
            raise ConfigError(path, "service names are letters, digits, _ and -")
        m = self.mapping(
            value,
            path,
            {
                "venue",
                "key_type",
                "upstream",
                "route",
                "ca_file",
                "timeout_ms",
                "recv_window_ms",
                "pool_size",
                "clock_sync",
                "rate_limit",
                "on_limit",
                "allow",
            },
        )
        venue = self.req(m, "venue", path, self.string)
        if venue not in VENUES:
            raise ConfigError(_join(path, "venue"), f"must be one of {', '.join(sorted(VENUES))}")
        key_type = self.req(m, "key_type", path, self.string)
        if key_type not in policy.key_types:
            raise ConfigError(
                _join(path, "key_type"),
                f"must be one of api_key_policy.key_types ({', '.join(sorted(policy.key_types))})",
            )
        upstream = self.req(m, "upstream", path, self.string)
        parts = urlsplit(upstream)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme != "https" or not parts.hostname or not port_ok:
            raise ConfigError(_join(path, "upstream"), "must be an https URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError(
                _join(path, "upstream"), "must be scheme://host[:port] with no path or query"
            )
        route = self.req(m, "route", path, self.string)
        if not route.startswith("/") or route.count("/") != 1 or len(route) < 2:
            # One path segment, so routing is a single dict lookup on the hot path.
            raise ConfigError(_join(path, "route"), "must be one path segment like /binance")
        return ServiceConfig(
            name=name,
            venue=venue,
            key_type=key_type,
            upstream=upstream.rstrip("/"),
            route=route,
            ca_file=self.opt(m, "ca_file", path, self.existing_file, None),
            timeout_ms=self.opt(m, "timeout_ms", path, self.ranged(1, 600_000), DEFAULT_TIMEOUT_MS),
            recv_window_ms=self.opt(
                m,
                "recv_window_ms",
                path,
                self.ranged(1, MAX_RECV_WINDOW_MS),
                DEFAULT_RECV_WINDOW_MS,
            ),
            pool_size=self.opt(
                m, "pool_size", path, self.ranged(1, MAX_POOL_SIZE), DEFAULT_POOL_SIZE
            ),
            clock_sync=self.opt(m, "clock_sync", path, self.boolean, True),
            rate_limit=self.opt(m, "rate_limit", path, self.rate_limits, None)
            or policy.key_types[key_type].rate_limits,
            on_limit_wait_ms=self.opt(m, "on_limit", path, self.on_limit, 0),
            allow=self.opt(m, "allow", path, self.allow_list, ()),
            permissions=policy.key_types[key_type].permissions,
        )

    def on_limit(self, value: Any, path: str) -> int:
        m = self.mapping(value, path, {"wait_ms"})
        return self.req(m, "wait_ms", path, self.ranged(0, MAX_ON_LIMIT_WAIT_MS))

    def rate_limits(self, value: Any, path: str) -> RateLimits:
        m = self.mapping(value, path, {"requests_per_second", "requests_per_minute"})
        return RateLimits(
            requests_per_second=self.opt(m, "requests_per_second", path, self.ranged(1), None),
            requests_per_minute=self.opt(m, "requests_per_minute", path, self.ranged(1), None),
        )

    # the seed's api_key_policy block
    def policy(self, value: Any, path: str) -> ApiKeyPolicy:
        path = "api_key_policy"
        m = self.mapping(
            value, path, {"global_settings", "key_types", "storage", "rotation", "audit"}
        )
        key_types_raw = self.req(m, "key_types", path, self.mapping)
        if not key_types_raw:
            raise ConfigError(_join(path, "key_types"), "at least one key type is required")
        return ApiKeyPolicy(
            global_settings=self.req(m, "global_settings", path, self.global_settings),
            key_types={
                k: self.key_type(v, f"{path}.key_types.{k}") for k, v in key_types_raw.items()
            },
            storage=self.opt(m, "storage", path, self.mapping, {}),
            rotation=self.req(m, "rotation", path, self.rotation),
            audit=self.req(m, "audit", path, self.audit),
        )

    def global_settings(self, value: Any, path: str) -> GlobalSettings:
        m = self.mapping(
            value,
            path,
            {
                "default_validity_days",
                "rotation_overlap_hours",
                "minimum_key_length",
                "hash_algorithm",
            },
        )
        return GlobalSettings(
            default_validity_days=self.opt(m, "default_validity_days", path, self.ranged(1), 90),
            rotation_overlap_hours=self.opt(m, "rotation_overlap_hours", path, self.ranged(0), 24),
            minimum_key_length=self.opt(m, "minimum_key_length", path, self.ranged(1), 256),
            hash_algorithm=self.opt(m, "hash_algorithm", path, self.string, "SHA-256"),
        )

    def key_type(self, value: Any, path: str) -> KeyTypePolicy:
        m = self.mapping(
            value,
            path,
            {"validity_days", "rotation_required", "auto_rotate", "permissions", "rate_limits"},
        )
        rl_path = _join(path, "rate_limits")
        rl: dict[str, Any] = self.mapping(
            m.get("rate_limits") or {}, rl_path, {"requests_per_second", "requests_per_minute"}
        )
        return KeyTypePolicy(
            validity_days=self.req(m, "validity_days", path, self.ranged(1)),
            rotation_required=self.opt(m, "rotation_required", path, self.boolean, True),
            auto_rotate=self.opt(m, "auto_rotate", path, self.boolean, False),
            permissions=self.opt(m, "permissions", path, self.string_list, ()),
            rate_limits=RateLimits(
                requests_per_second=self.opt(
                    rl, "requests_per_second", rl_path, self.ranged(1), None
                ),
                requests_per_minute=self.opt(
                    rl, "requests_per_minute", rl_path, self.ranged(1), None
                ),
            ),
        )

    def rotation(self, value: Any, path: str) -> RotationPolicy:
        m = self.mapping(
            value,
            path,
            {
                "schedule",
                "notification_email",
                "pre_rotation_warning_days",
                "emergency_rotation_enabled",
            },
        )
        return RotationPolicy(
            schedule=self.opt(m, "schedule", path, self.string, None),
            notification_email=self.opt(m, "notification_email", path, self.string, None),
            pre_rotation_warning_days=self.opt(
                m, "pre_rotation_warning_days", path, self.ranged(0), 7
            ),
            emergency_rotation_enabled=self.opt(
                m, "emergency_rotation_enabled", path, self.boolean, True
            ),
        )

    def audit(self, value: Any, path: str) -> AuditPolicy:
        m = self.mapping(
            value,
            path,
            {"log_level", "log_destination", "syslog_enabled", "syslog_facility", "retention_days"},
        )
        level = self.opt(m, "log_level", path, self.string, "INFO")
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(_join(path, "log_level"), "must be DEBUG, INFO, WARNING or ERROR")
        return AuditPolicy(
            log_level=level,
            log_destination=self.opt(m, "log_destination", path, self.string, None),
            syslog_enabled=self.opt(m, "syslog_enabled", path, self.boolean, False),
            syslog_facility=self.opt(m, "syslog_facility", path, self.string, None),
            retention_days=self.opt(m, "retention_days", path, self.ranged(1), None),
        )
