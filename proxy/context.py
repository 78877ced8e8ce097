"""What the runtime hands every filter factory (:class:`FactoryContext`).

The filter API (:mod:`llmproxy.filter`) only names this type; the runtime
builds one per worker with its store, upstream client, metrics registry
and admin pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from llmproxy.runtime.admin import AdminPages
from llmproxy.upstream import UpstreamPool
from llmproxy.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from llmproxy.filter import FilterFactory
    from llmproxy.state.store import SharedStore

__all__ = ["FactoryContext"]

F = TypeVar("F", bound="FilterFactory")

log = logging.getLogger("llmproxy.filter")


class FactoryContext:
    """What the runtime hands a factory: the shared store, the upstream client, metrics, admin pages, ticks."""

    def __init__(
        self,
        store: SharedStore,
        worker_id: int = 0,
        mock_ports: Mapping[str, tuple[str, int]] | None = None,
        admin: AdminPages | None = None,
        upstream: UpstreamClient | None = None,
        config_file: str = "",
        *,
        workers: int = 1,
    ) -> None:
        self.store = store
        #: The config file the chain is built from ("" when there is none). A filter resolves
        #: the relative paths of its section against this file's folder (``config_dir``).
        self.config_file = config_file
        self.worker_id = worker_id
        #: How many worker processes serve this config (``server.workers``): a filter whose
        #: state must be exact across workers refuses a per-process store when it is above 1.
        self.workers = workers
        #: The core's upstream client (the worker's pool, timeouts, TLS): for a filter that
        #: must call a provider itself (health probes, remote checks).
        self.upstream = upstream or UpstreamClient(UpstreamPool())
        self._admin = admin or AdminPages()
        #: The worker's Prometheus registry: register collectors here.
        self.metrics = self._admin.registry
        #: The factories built so far, in chain order (a factory sees those before it).
        self.factories: list[FilterFactory] = []
        #: Where each configured mock upstream listens, to resolve ``mock://NAME`` URLs.
        self.mock_ports: Mapping[str, tuple[str, int]] = mock_ports or {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def config_dir(self) -> Path:
        """The folder of :attr:`config_file` (the working directory when there is none)."""
        return Path(self.config_file).parent if self.config_file else Path()

    def find_factory(self, kind: type[F]) -> F | None:
        """The first factory of type ``kind`` earlier in the chain, if any."""
        for factory in self.factories:
            if isinstance(factory, kind):
                return factory
        return None

    def declare_models(self, names: Iterable[str]) -> None:
        """Say which model names (from the filter's config) may appear as ``model`` metric labels.

        Any other name, whatever a client sends, is counted as ``other`` in the
        core's metrics and in :meth:`model_label`, so label sets stay bounded.
        """
        self._admin.metrics.models.declare(names)

    def model_label(self, name: str | None) -> str:
        """``name`` as a ``model`` label value: itself when declared, ``other`` when not, ``-`` when empty.

        Filters label their own metrics with it (cheap: one set lookup).
        """
        return self._admin.metrics.models(name)

    def add_admin_page(self, path: str, page: Callable[[], Any]) -> None:
        """Serve ``page()`` as JSON at ``GET path`` (under ``/admin/``, admin clients only)."""
        self._admin.add_page(path, page)

    def every(self, interval: float, tick: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``tick`` every ``interval`` seconds until shutdown (proxy-wasm's on_tick).

        Exceptions are logged; the next tick still runs.
        """

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await tick()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("tick %s failed", name)

        self._tasks.append(asyncio.get_running_loop().create_task(loop(), name=name))

    async def cancel_tasks(self) -> None:
        """Stop every background task started through :meth:`every`."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
