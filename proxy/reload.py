"""What a config reload (SIGHUP) may change, and how: pure, over two compiled configs.

A reload swaps the routing table in one reference assignment; requests already routed
finish on the service objects they started with. Per service:

- unchanged: the same runtime object (its pool, key set, limiter and counts) is kept;
- changed, same upstream connection settings (``upstream``, ``ca_file``, ``timeout_ms``,
  ``pool_size``): a new runtime object on the same warm pool and key ring, with the new
  route, limits, allow-list or signing options; the limiter keeps its counts when the
  limits did not change (a reload must not reopen a window the venue is still counting);
- new, or a new upstream: a new pool, warmed before the new table is installed;
- removed: its pool drains and closes after the swap.

Sections the process was built around cannot change without a restart: the listeners
(``listen``, ``admin``, ``ingress``), the key store and memory settings, ``state_dir``. A
reload that changes one is refused as a whole, and the running config keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import Config, ServiceConfig

RESTART_ONLY = ("listen", "admin", "keystore", "memory", "state_dir", "ingress")


def _same_connection(a: ServiceConfig, b: ServiceConfig) -> bool:
    return (a.upstream, a.ca_file, a.timeout_ms, a.pool_size) == (
        b.upstream,
        b.ca_file,
        b.timeout_ms,
        b.pool_size,
    )


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    unchanged: frozenset[str]
    rebuilt: frozenset[str]  # same pool and keys, new settings
    added: frozenset[str]  # new pool (new service, or a new upstream)
    removed: frozenset[str]


def refusal(old: Config, new: Config) -> str | None:
    """Why ``new`` cannot be applied without a restart, or None."""
    changed = [s for s in RESTART_ONLY if getattr(old, s, None) != getattr(new, s, None)]
    if changed:
        return f"{', '.join(changed)} changed: these take effect only on a restart"
    if old.keystore.backend == "vault" and set(new.services) - set(old.services):
        # The watcher reads a fixed set of Vault paths, chosen at start.
        return "a service added on the Vault key store takes effect only on a restart"
    return None


def plan(old: Config, new: Config) -> ReloadPlan:
    unchanged, rebuilt, added = set(), set(), set()
    for name, svc in new.services.items():
        before = old.services.get(name)
        if before is None:
            added.add(name)
        elif before == svc and _policy_of(old, svc) == _policy_of(new, svc):
            unchanged.add(name)
        elif _same_connection(before, svc):
            rebuilt.add(name)
        else:
            added.add(name)
    removed = set(old.services) - set(new.services)
    return ReloadPlan(
        frozenset(unchanged), frozenset(rebuilt), frozenset(added), frozenset(removed)
    )


def _policy_of(config: Config, svc: ServiceConfig) -> object:
    """The part of the policy a service's runtime is built from (its key type)."""
    return config.api_key_policy.key_types.get(svc.key_type)
