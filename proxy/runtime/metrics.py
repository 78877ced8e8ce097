"""The core's exchange metrics: counted once per exchange, in one place.

:meth:`ExchangeMetrics.exchange_done` is called by the exchange driver
(:func:`llmproxy.engine.cycle.run_exchange`) after the filters'
``on_exchange_complete`` hooks (so the ``metering`` filter's
``exchange.usage`` is there), on every path. It observes every histogram and
bumps every counter of the exchange at once; label children are looked up
once per label set and cached (``labels()`` takes a lock and validates its
values on every call).

Histograms use the OpenTelemetry GenAI semantic conventions' buckets:

* ``llmproxy_request_duration_seconds{route,provider,model}``
  (``gen_ai.server.request.duration``);
* ``llmproxy_time_to_first_token_seconds{provider,model}`` (streams only,
  ``gen_ai.server.time_to_first_token``);
* ``llmproxy_time_per_output_token_seconds{provider,model}`` (streams with
  two output tokens or more: from the first byte to the end, per token after
  the first; ``gen_ai.server.time_per_output_token``);
* ``llmproxy_token_usage_tokens{provider,model,type}`` with ``type`` one of
  ``input``, ``output``, ``cached_input``, ``reasoning``
  (``gen_ai.client.token.usage``);
* ``llmproxy_overhead_seconds{route}``: the exchange's time minus its
  attempts' (the time spent in the proxy, not waiting on the provider).

Labels are bounded: ``route`` is a served path (or ``other``), ``model`` a
name a filter declared from its config (:class:`ModelLabels`; anything a
client made up is ``other``), ``provider`` a configured upstream's name,
``principal`` and ``team`` configured ones, ``status`` an HTTP status.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from llmproxy.errors import RateLimited
from llmproxy.filters.names import PRINCIPAL

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from llmproxy.exchange import Exchange

__all__ = [
    "DURATION_BUCKETS",
    "OVERHEAD_BUCKETS",
    "OVERHEAD_HEADER",
    "TOKEN_BUCKETS",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "ExchangeMetrics",
    "ModelLabels",
]

#: ``gen_ai.server.request.duration`` / ``gen_ai.client.operation.duration`` (seconds).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
#: ``gen_ai.server.time_to_first_token`` (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: ``gen_ai.server.time_per_output_token`` (seconds).
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
#: ``gen_ai.client.token.usage`` (tokens).
TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
#: The proxy's own time per exchange: tens of microseconds to tens of milliseconds.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

#: The opt-in response header (``server.overhead_header``): milliseconds spent in the proxy.
OVERHEAD_HEADER = "x-llmproxy-overhead-ms"

#: The label value of a model no filter declared.
OTHER = "other"
#: The label value when there is nothing to name (no model, no provider, no principal).
NONE = "-"


class ModelLabels:
    """The model names that may appear as a ``model`` label value (one worker's).

    Filters declare the names their config knows (routing: the client-facing
    names and the upstream models they map to) through
    :meth:`llmproxy.FactoryContext.declare_models`; every other name is
    folded into ``other``, so a client sending random model names cannot
    grow the label sets.
    """

    def __init__(self) -> None:
        self.known: set[str] = set()

    def declare(self, names: Iterable[str]) -> None:
        self.known.update(n for n in names if n)

    def __call__(self, name: str | None) -> str:
        """``name`` as a label value: itself when declared, ``-`` when empty, else ``other``."""
        if not name:
            return NONE
        return name if name in self.known else OTHER


class ExchangeMetrics:
    """The core's per-exchange metrics of one worker (see the module docstring)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        routes: Iterable[str] = (),
        prefixes: Iterable[str] = (),
        models: ModelLabels | None = None,
    ) -> None:
        self.models = models or ModelLabels()
        self.routes = frozenset(routes)
        self.prefixes = tuple(prefixes)
        r = registry
        self.requests = Counter(
            "llmproxy_requests",
            "Exchanges finished, by route, response status (499: the client went away first), "
            "provider, client-facing model and principal",
            ["route", "status", "provider", "model", "principal"],
            registry=r,
        )
        self.errors = Counter("llmproxy_errors", "Exchanges that ended with an error, by code", ["code"], registry=r)
        self.attempts = Counter(
            "llmproxy_upstream_attempts",
            "Upstream attempts, retries included, by provider and outcome (completed, retried, failed, abandoned)",
            ["provider", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "llmproxy_retries",
            "Attempts after the first, by the provider retried on and why the attempt before ended "
            "(its status, or its error code)",
            ["provider", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "llmproxy_fallbacks",
            "Attempts sent to another provider than the attempt before, by the provider fallen back to",
            ["provider"],
            registry=r,
        )
        self.rate_limited = Counter(
            "llmproxy_rate_limited",
            "Requests refused with 429 by the proxy (rate limits, spent budgets: code insufficient_quota), "
            "by principal and code",
            ["principal", "code"],
            registry=r,
        )
        self.spent_tokens = Counter(
            "llmproxy_spent_tokens",
            "Tokens metered, by principal, team, client-facing model and type",
            ["principal", "team", "model", "type"],
            registry=r,
        )
        self.spent_usd = Counter(
            "llmproxy_spent_usd",
            "US dollars spent (priced models only), by principal, team and client-facing model",
            ["principal", "team", "model"],
            registry=r,
        )
        self.bytes_in = Counter("llmproxy_received_bytes", "Request body bytes received", registry=r)
        self.bytes_out = Counter("llmproxy_sent_bytes", "Response body bytes sent", registry=r)
        self.in_flight = Gauge("llmproxy_in_flight", "Exchanges in progress", registry=r, multiprocess_mode="livesum")
        self.streams = Gauge(
            "llmproxy_streams_in_flight",
            "Event streams being relayed to clients",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Gauge(
            "llmproxy_connections", "Client connections open", registry=r, multiprocess_mode="livesum"
        )
        self.duration = Histogram(
            "llmproxy_request_duration_seconds",
            "Exchange duration, from the request head to the response's end",
            ["route", "provider", "model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llmproxy_time_to_first_token_seconds",
            "Streams: time from the request head to the first response byte sent",
            ["provider", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "llmproxy_time_per_output_token_seconds",
            "Streams: time from the first response byte to the end, per output token after the first",
            ["provider", "model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens = Histogram(
            "llmproxy_token_usage_tokens",
            "Tokens per exchange, by provider, upstream model and type (input, output, cached_input, reasoning)",
            ["provider", "model", "type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llmproxy_overhead_seconds",
            "Time spent in the proxy per exchange: its duration minus its upstream attempts'",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        # (metric id, label values) -> child: a dict lookup instead of labels() per exchange
        self._children: dict[tuple[Any, ...], Any] = {}
        self._in_flight = self.in_flight
        self._streams = self.streams
        self._connections = self.connections
        self._bytes_in = self.bytes_in
        self._bytes_out = self.bytes_out

    def set_routes(self, routes: Iterable[str], prefixes: Iterable[str]) -> None:
        """The paths served (``route`` label values) and the prefixes of paths with an id."""
        self.routes = frozenset(routes)
        self.prefixes = tuple(prefixes)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def route(self, path: str) -> str:
        """``path`` (query string dropped) as a ``route`` label value."""
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        if path in self.routes:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return prefix + "{id}"
        return OTHER

    # -- gauges, bumped by the core where things start and end ----------------------
    def connection_opened(self) -> None:
        self._connections.inc()

    def connection_closed(self) -> None:
        self._connections.dec()

    def exchange_started(self) -> None:
        self._in_flight.inc()

    def stream_started(self) -> None:
        """An event stream's head went downstream (matched by :meth:`exchange_done`)."""
        self._streams.inc()

    # -- once per exchange ---------------------------------------------------------
    def exchange_done(self, ex: Exchange) -> None:
        """Count ``ex`` (finished, its end hooks run) in every metric: once, on every path."""
        now = time.perf_counter()
        self._in_flight.dec()
        child = self._child
        elapsed = now - ex.started_at
        route = self.route(ex.client_path)
        usage = ex.usage
        history = ex.attempt_history
        last = history[-1] if history else None
        if usage is not None and usage.provider:
            provider = usage.provider
        else:
            provider = last.target.name if last is not None else NONE
        models = self.models
        requested = models((usage.requested_model if usage is not None else "") or ex.model)
        principal_obj = ex.vars.get(PRINCIPAL)
        principal = principal_obj.name if principal_obj is not None else NONE
        error = ex.error
        status = ex.response.status if ex.response is not None and ex.response_started else 499
        child(self.requests, route, str(status), provider, requested, principal).inc()
        if error is not None:
            code = error.code or "error"
            child(self.errors, code).inc()
            if isinstance(error, RateLimited):  # refused by the proxy (a provider's 429 is relayed)
                child(self.rate_limited, principal, code).inc()
        upstream_time = 0.0
        before: Any = None
        for attempt in history:
            upstream_time += attempt.duration
            if attempt.head_sent and attempt.is_sse:
                self._streams.dec()  # (stream_started counted it)
            name = attempt.target.name
            child(self.attempts, name, attempt.outcome.value).inc()
            if before is not None:
                why = before.error.code if before.error is not None and before.error.code else str(before.status)
                child(self.retries, name, why).inc()
                if before.target.name != name:
                    child(self.fallbacks, name).inc()
            before = attempt
        upstream_model = models(usage.model) if usage is not None else requested
        child(self.duration, route, provider, upstream_model).observe(elapsed)
        child(self.overhead, route).observe(max(0.0, elapsed - upstream_time))
        if ex.bytes_received:
            self._bytes_in.inc(ex.bytes_received)
        if ex.bytes_sent:
            self._bytes_out.inc(ex.bytes_sent)
        if ex.is_sse and ex.first_byte_at:
            child(self.ttft, provider, upstream_model).observe(ex.first_byte_at - ex.started_at)
            if usage is not None and usage.output_tokens > 1:
                per_token = (now - ex.first_byte_at) / (usage.output_tokens - 1)
                child(self.tpot, provider, upstream_model).observe(per_token)
        if usage is None:
            return
        team = (principal_obj.team or NONE) if principal_obj is not None else NONE
        for kind, value in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cached_input", usage.cache_read_tokens),
            ("reasoning", usage.reasoning_tokens),
        ):
            if value or kind in ("input", "output"):
                child(self.tokens, provider, upstream_model, kind).observe(value)
            if value:
                child(self.spent_tokens, principal, team, requested, kind).inc(value)
        if usage.cost is not None:
            child(self.spent_usd, principal, team, requested).inc(float(usage.cost.total))


def overhead_ms(ex: Exchange) -> float:
    """Milliseconds of ``ex`` spent in the proxy so far, for the response head being sent now.

    The time before the current attempt went upstream (request hooks, earlier
    attempts' hooks) plus the time since its response head arrived; earlier
    attempts' own upstream time is not counted. A filter holding a stream's
    head until its first event (failover) makes that wait part of it.
    """
    now = time.perf_counter()
    attempt = ex.attempt
    if attempt is None:
        return (now - ex.started_at) * 1000
    earlier = sum(a.duration for a in ex.attempt_history[:-1])
    before = attempt.started_at - ex.started_at - earlier
    after = now - (attempt.responded_at or now)
    return max(0.0, before + after) * 1000
