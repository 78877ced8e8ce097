"""Admin endpoints: ``GET /metrics`` (Prometheus) and filter-provided ``/admin/...`` pages.

Admin paths are answered by the connection itself, like ``/healthz``: no
filter runs for them, and only clients whose address is in
``server.admin_allow`` (loopback by default) get an answer; everyone else
gets the same 404 as for any unknown path, so the endpoints do not even
show they exist.

Metrics use prometheus_client with one registry per worker
(:class:`~llmproxy.runtime.multiproc.WorkerRegistry`): the core's exchange
metrics (:mod:`llmproxy.runtime.metrics`, counted once per exchange) and
what filters register through ``FactoryContext.metrics``; admin pages come
from ``FactoryContext.add_admin_page``. With several workers a scrape shows
the sum over all of them (:mod:`llmproxy.runtime.multiproc`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from prometheus_client import generate_latest

from llmproxy.runtime import multiproc
from llmproxy.runtime.metrics import ExchangeMetrics
from llmproxy.runtime.multiproc import WorkerRegistry

__all__ = ["AdminPages", "JsonPage"]

#: A page handler returns the JSON-serialisable document to answer with.
JsonPage = Callable[[], Any]


class AdminPages:
    """The admin routes of one worker and who may reach them."""

    def __init__(self, allow: Iterable[str] = ("127.0.0.1", "::1"), metrics: ExchangeMetrics | None = None) -> None:
        """``metrics``: the core's exchange metrics to export (a reload passes the previous
        generation's on)."""
        entries = tuple(allow)
        #: Exact client addresses (one set lookup) and the networks of CIDR entries.
        self.allow = frozenset(e for e in entries if "/" not in e)
        self.networks = tuple(ipaddress.ip_network(e, strict=False) for e in entries if "/" in e)
        self.registry = WorkerRegistry()
        #: The core's exchange metrics (the driver counts every exchange here); a reload's new
        #: generation keeps counting on the previous one's (so counters never reset).
        if metrics is None:
            self.metrics = ExchangeMetrics(self.registry)
            self.metrics.publish_to(multiproc.folder())  # several workers: scrapes sum them
        else:
            self.metrics = metrics
            self.registry.register(metrics)
        self._pages: dict[bytes, JsonPage] = {}
        #: Paths answered here (GET only); checked with one dict lookup per request.
        self.paths: frozenset[bytes] = frozenset({b"/metrics"})

    def add_page(self, path: str, page: JsonPage) -> None:
        """Serve ``page()`` as JSON at ``GET path`` (which must start with ``/admin/``)."""
        if not path.startswith("/admin/"):
            raise ValueError(f"admin pages live under /admin/, not {path!r}")
        self._pages[path.encode("ascii")] = page
        self.paths = self.paths | {path.encode("ascii")}

    def allows(self, client: str) -> bool:
        """Whether ``client`` (an IP address as the socket reports it) may see admin pages.

        A client a dual-stack socket reports as IPv4-mapped (``::ffff:127.0.0.1``)
        is the IPv4 address for exact entries and networks alike.
        """
        if client in self.allow:
            return True
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
            if str(address) in self.allow:
                return True
        return any(address.version == net.version and address in net for net in self.networks)

    def answer(self, path: bytes, client: str) -> tuple[int, bytes, bytes] | None:
        """``(status, content type, body)`` for an allowed client, None to treat as unknown."""
        if not self.allows(client):
            return None
        if path == b"/metrics":
            return 200, b"text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry.scrape_registry())
        page = self._pages.get(path)
        if page is None:
            return None
        return 200, b"application/json", orjson.dumps(page(), option=orjson.OPT_INDENT_2)
