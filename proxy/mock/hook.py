"""The mock-upstream hook: how the proxy validates and starts mock providers without importing them.

Registered as entry point ``mock`` in the group ``llmproxy.mock_upstream``
(see :mod:`llmproxy.runtime.mock_hook`, which loads it only when a config has
``mock_upstreams``). ``options`` is one ``mock_upstreams[i]`` mapping
without ``name``, ``host`` and ``port``: the fields of
:func:`~.config.mock_config_from_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmproxy.mock.config import mock_config_from_dict
from llmproxy.mock.server import MockServer, serve_mock, start_mock

__all__ = ["MockHook"]


class MockHook:
    """Validate, start or serve a mock provider from a config mapping (stateless; never instantiated)."""

    @staticmethod
    def validate(options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the bad field (``keys.<key>.times: ...``) if ``options`` is invalid."""
        mock_config_from_dict(options)

    @staticmethod
    async def start(host: str, port: int, options: Mapping[str, Any]) -> MockServer:
        """Start a mock on the running loop (``port`` 0 picks one; see ``.port``); ``.close()`` stops it."""
        return await start_mock(host, port, mock_config_from_dict(options))

    @staticmethod
    def serve(host: str, port: int, options: Mapping[str, Any]) -> None:
        """Serve a mock on uvloop until SIGINT or SIGTERM (blocking); ``ValueError`` on bad options."""
        serve_mock(host, port, mock_config_from_dict(options))
