"""Finding the mock-upstream hook: the only way the runtime reaches the offline mock provider.

The runtime (:mod:`llmproxy.runtime.config`, :mod:`llmproxy.runtime.app`, :mod:`llmproxy.runtime.cli`) never
imports the mock package. When, and only when, a config has
``mock_upstreams``, :func:`load_mock_hook` loads the entry point ``mock``
of the group ``llmproxy.mock_upstream`` (this project registers
``llmproxy.mock:MockHook`` there in ``setup.cfg``). An installation whose
metadata predates the group (an editable install of an older checkout)
falls back to importing :data:`FALLBACK` by name. Either way the import is
dynamic: nothing here names the mock package in an ``import`` statement.

A hook is any object with the three calls of :class:`MockUpstreamHook`;
``options`` is one ``mock_upstreams[i]`` mapping without ``name``, ``host``
and ``port``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final, Protocol, cast

__all__ = ["ENTRY_POINT_GROUP", "FALLBACK", "MockHookError", "MockUpstreamHook", "RunningMock", "load_mock_hook"]

ENTRY_POINT_GROUP: Final = "llmproxy.mock_upstream"
ENTRY_POINT_NAME: Final = "mock"
#: ``module:attribute`` imported when no entry point is registered (relative to
#: this package, so it follows the package if it is renamed).
FALLBACK: Final = "llmproxy.mock:MockHook"


class RunningMock(Protocol):
    """A started mock provider."""

    @property
    def port(self) -> int:
        """The port it listens on (the real one when started with port 0)."""
        ...

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        ...


class MockUpstreamHook(Protocol):
    """What the runtime asks of a mock provider."""

    def validate(self, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the bad field (``field: reason``) if ``options`` is invalid."""
        ...

    def start(self, host: str, port: int, options: Mapping[str, Any]) -> Awaitable[RunningMock]:
        """Start a mock on the running loop (``port`` 0 picks a free one)."""
        ...

    def serve(self, host: str, port: int, options: Mapping[str, Any]) -> None:
        """Serve a mock until SIGINT or SIGTERM (blocking)."""
        ...


class MockHookError(Exception):
    """The mock-upstream hook cannot be loaded or is not a hook: says which and why."""


_CALLS: Final = ("validate", "start", "serve")


def load_mock_hook() -> MockUpstreamHook:
    """The registered mock-upstream hook (or :data:`FALLBACK`); raises :class:`MockHookError`."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT_NAME]
    ep = found[0] if found else EntryPoint(name=ENTRY_POINT_NAME, value=FALLBACK, group=ENTRY_POINT_GROUP)
    try:
        obj: object = ep.load()
    except Exception as exc:  # an import error in the hook must not be a traceback
        raise MockHookError(
            f"mock upstream hook cannot be loaded from {ep.value}: {type(exc).__name__}: {exc}"
        ) from exc
    missing = [name for name in _CALLS if not callable(getattr(obj, name, None))]
    if missing:
        raise MockHookError(f"mock upstream hook {ep.value} has no {', '.join(missing)}")
    return cast(MockUpstreamHook, obj)
