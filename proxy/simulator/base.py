"""What every venue module offers the simulator server, and the few types they share.

A venue module (``binance.py``, later others) imports only this module from the package;
``server.py`` imports the venue modules. That keeps the dependency one-way, so adding a
venue is adding a file and one line in ``server.VENUE_FACTORIES``.

The simulator is an *independent oracle* for the sidecar's signers: nothing here, nor in a
venue module, may import ``keycache`` or any other ``proxy`` module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from aiohttp import web

Clock = Callable[[], int]
"""Returns the simulator's notion of *now*, in integer milliseconds since the Unix epoch.

Passed in (never read from ``time`` directly) so tests can pin it and ``--clock-offset-ms``
can skew it."""

Verdict = str | int
"""``"ok"`` when the request was accepted, else the venue's error code (Binance: ``-1022``)
or, for requests no venue handled, the HTTP status."""


class SimulatorError(Exception):
    """Root of the simulator's exceptions: a stable machine ``code`` and an HTTP status hint."""

    code: ClassVar[str] = "simulator_error"
    status_hint: ClassVar[int] = 500


class KeySetError(SimulatorError):
    """A keys document (file or ``POST /__sim/keys`` body) is malformed.

    ``path`` names the offending field, e.g. ``binance[2].public_key``.
    """

    code: ClassVar[str] = "bad_key_set"
    status_hint: ClassVar[int] = 400

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(slots=True)
class RequestNote:
    """What a handler decided about one request, read by the request log after it answers.

    Mutable on purpose: the server's middleware creates one per request and the handler
    fills it in. Holds only public data (the API key string is the key's public id).
    """

    api_key: str | None = None
    verdict: Verdict = "ok"
    algorithm: str | None = None


NOTE_KEY: web.RequestKey[RequestNote] = web.RequestKey("simulator_note", RequestNote)


def note_of(request: web.Request) -> RequestNote:
    """Return the request's :class:`RequestNote`, creating one if no middleware did."""
    note = request.get(NOTE_KEY)
    if note is None:
        note = RequestNote()
        request[NOTE_KEY] = note
    return note


def compact_json(obj: Any) -> str:
    """Serialize like the venues do: no spaces after separators."""
    return json.dumps(obj, separators=(",", ":"))


class Commit(Protocol):
    """Installs a key set that was already validated; cannot fail."""

    def __call__(self) -> None: ...


class Venue(Protocol):
    """One simulated venue: its routes and the key set it verifies against.

    All methods run on the event loop thread and never block.
    """

    @property
    def name(self) -> str:
        """The venue's name, also its top-level field in a keys document."""
        ...

    def routes(self) -> Sequence[web.RouteDef]:
        """The aiohttp routes this venue serves."""
        ...

    def prepare_keys(self, entries: object, path: str) -> Commit:
        """Validate ``entries`` (this venue's list in a keys document).

        Returns a function that swaps the new key set in. Raises :class:`KeySetError`
        naming the field under ``path`` if anything is malformed; then nothing changes.
        """
        ...

    def revoke_key(self, api_key: str) -> bool:
        """Forget ``api_key`` at once; return whether this venue knew it."""
        ...

    def api_keys(self) -> list[str]:
        """The API key ids currently accepted (public ids, never secrets)."""
        ...


K = TypeVar("K")


class SwappedKeys(Generic[K]):
    """The key management of the :class:`Venue` protocol, for a venue whose keys are one
    mapping swapped whole and never changed in place (a request that read the mapping
    keeps a consistent view). Subclasses set ``_keys`` and name their parser in
    ``_parse_keys``."""

    _keys: Mapping[str, K]

    def _parse_keys(self, entries: object, path: str) -> Mapping[str, K]:
        raise NotImplementedError

    def prepare_keys(self, entries: object, path: str) -> Commit:
        """Validate ``entries``; the returned function swaps them in. See :class:`Venue`."""
        keys = self._parse_keys(entries, path)

        def commit() -> None:
            self._keys = keys

        return commit

    def revoke_key(self, api_key: str) -> bool:
        """Drop ``api_key`` at once; True if it was known."""
        if api_key not in self._keys:
            return False
        self._keys = {k: v for k, v in self._keys.items() if k != api_key}
        return True

    def api_keys(self) -> list[str]:
        """The accepted API key ids (public, never secrets)."""
        return sorted(self._keys)
