"""The proxy's exception tree.

Every error the sidecar answers itself carries a stable machine ``code`` and an HTTP
status hint; the listener turns it into the JSON error contract of DESIGN.md. Grouped by
what the caller does about it, not by where it happened.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the sidecar reports to an engine or an operator."""

    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(ProxyError):
    """The configuration is invalid; ``path`` names the offending field."""

    code = "invalid_config"
    status = 500

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


# --- Errors caused by the engine's request: it must fix the request. ---------------------


class BadRequest(ProxyError):
    code = "bad_request"
    status = 400


class Unauthorized(ProxyError):
    """The listener requires a client token and this request has none it knows."""

    code = "unauthorized"
    status = 401


class UnknownRoute(ProxyError):
    code = "unknown_route"
    status = 404


class Forbidden(ProxyError):
    code = "forbidden"
    status = 403


class BodyTooLarge(ProxyError):
    code = "body_too_large"
    status = 413


class HeadersTooLarge(ProxyError):
    code = "headers_too_large"
    status = 431


class RequestTimeout(ProxyError):
    """A request started but did not arrive whole in time (slow-loris)."""

    code = "request_timeout"
    status = 408


# --- Errors of the sidecar's state or its upstream: the engine may retry later. ---------


class RateLimited(ProxyError):
    """Over the service's budget, or the venue said stop: ``retry_after_ms`` until it may
    go out (answered as ``Retry-After``, whole seconds rounded up)."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class TooManyConnections(ProxyError):
    """The listener is at its connection cap; this connection is closed at once."""

    code = "too_many_connections"
    status = 503


class NoUsableKey(ProxyError):
    code = "no_usable_key"
    status = 503


class UpstreamUnavailable(ProxyError):
    """The venue refused or reset the connection, or TLS failed."""

    code = "upstream_unavailable"
    status = 502


class UpstreamTimeout(ProxyError):
    code = "upstream_timeout"
    status = 504


class SigningError(ProxyError):
    """A request cannot be signed as the venue requires (bad key material, bad input)."""

    code = "signing_failed"
    status = 500
