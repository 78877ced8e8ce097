"""Admin endpoints: ``GET /metrics`` (Prometheus) and filter-provided ``/admin/...`` pages.

Admin paths are answered by the connection itself, like ``/healthz``: no
filter runs for them, and only clients whose address is in
``server.admin_allow`` (loopback by default) get an answer; everyone else
gets the same 404 as for any unknown path, so the endpoints do not even
show they exist.

Metrics use prometheus_client with one registry per worker. The core's own
counters are plain integers bumped once per exchange (no label lookups on
the hot path) and turned into metric families only when scraped. Filters
register collectors through ``FactoryContext.metrics`` and admin pages
through ``FactoryContext.add_admin_page``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["AdminPages", "CoreStats", "JsonPage"]

#: A page handler returns the JSON-serialisable document to answer with.
JsonPage = Callable[[], Any]


class CoreStats(Collector):
    """Per-worker exchange counters, exported as ``llmproxy_*`` metrics."""

    def __init__(self) -> None:
        self.responses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.attempts = 0
        self.in_flight = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.seconds = 0.0

    def collect(self) -> Iterator[Metric]:
        responses = CounterMetricFamily(
            "llmproxy_responses", "Exchanges finished, by response status", labels=["status"]
        )
        for status, count in sorted(self.responses.items()):
            responses.add_metric([str(status)], count)
        yield responses
        errors = CounterMetricFamily("llmproxy_errors", "Exchanges that ended with an error, by code", labels=["code"])
        for code, count in sorted(self.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily(
            "llmproxy_upstream_attempts", "Upstream attempts, retries included", value=self.attempts
        )
        yield GaugeMetricFamily("llmproxy_in_flight", "Exchanges in progress", value=self.in_flight)
        yield CounterMetricFamily("llmproxy_received_bytes", "Request body bytes received", value=self.bytes_in)
        yield CounterMetricFamily("llmproxy_sent_bytes", "Response body bytes sent", value=self.bytes_out)
        yield CounterMetricFamily("llmproxy_exchange_seconds", "Total time spent in exchanges", value=self.seconds)


class AdminPages:
    """The admin routes of one worker and who may reach them."""

    def __init__(self, allow: Iterable[str] = ("127.0.0.1", "::1"), stats: CoreStats | None = None) -> None:
        """``stats``: the core counters to export (a reload passes the previous generation's on)."""
        entries = tuple(allow)
        #: Exact client addresses (one set lookup) and the networks of CIDR entries.
        self.allow = frozenset(e for e in entries if "/" not in e)
        self.networks = tuple(ipaddress.ip_network(e, strict=False) for e in entries if "/" in e)
        self.registry = CollectorRegistry(auto_describe=False)
        self.stats = stats if stats is not None else CoreStats()
        self.registry.register(self.stats)
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
            return 200, b"text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry)
        page = self._pages.get(path)
        if page is None:
            return None
        return 200, b"application/json", orjson.dumps(page(), option=orjson.OPT_INDENT_2)
