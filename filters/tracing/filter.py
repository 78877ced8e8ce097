"""The ``tracing`` filter: W3C trace context and OpenTelemetry GenAI spans, exported over OTLP/HTTP.

Place it after ``routing`` and ``failover`` in the chain: its
``on_request_body`` then sees where the first attempt goes, and its
``on_attempt_complete`` (after failover re-pointed the request in a response
hook) where the next one goes; metering (first in the chain) has settled
each attempt's usage before this filter's ``on_attempt_complete``, and the
exchange's before its ``on_exchange_complete``. Per exchange:

* ``on_request_body``: reads ``traceparent`` / ``tracestate``
  (:mod:`.propagation`; a malformed one is replaced and counted in
  ``llmproxy_tracing_traceparent_invalid_total``), draws the trace id, the
  SERVER span id and the first CLIENT span id, sets the upstream request's
  ``traceparent`` to that CLIENT span; notes the GenAI operation (by path),
  the requested model, the request parameters (``max_tokens``,
  ``temperature``, ...: the values read from the JSON the core parsed once,
  checked and named in the export thread) and the first
  attempt's provider and upstream model;
* ``on_attempt_complete``: copies the attempt (status, error, usage, the
  response id, model and finish reasons routing read) into the record; a
  retried attempt's successor gets a fresh CLIENT span id in its
  ``traceparent`` (siblings under the SERVER span);
* ``on_exchange_complete``: the record goes to the export queue
  (:mod:`.pipeline`); the spans are planned and encoded there, off the event
  loop (:mod:`.spans`, :mod:`.otlp`).

No response body is looked at, unless ``content: true``
(:class:`CapturingFilter`: an observer keeps references to the relayed
bytes, merged into the completion in the export thread).

With no exporter configured (no ``endpoint``, no
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``, or
``OTEL_SDK_DISABLED=true`` / ``OTEL_TRACES_EXPORTER=none``) the filter only
propagates: a valid ``traceparent`` goes upstream unchanged, a missing or
malformed one is replaced by a new (unsampled) one; no span is built.

Config::

    - name: tracing
      config:
        endpoint: http://collector:4318/v1/traces  # default: the OTEL_EXPORTER_OTLP_* variables
        headers: {}             # extra headers for the collector (e.g. an API key: use ${ENV})
        service_name: llmproxy  # default: OTEL_SERVICE_NAME, else llmproxy
        timeout: 5              # seconds per export, retries included
        max_queue: 2048         # exchanges waiting for export; past it, dropped and counted
        batch_size: 256         # exchanges per export request
        schedule_delay: 1.0     # seconds between exports of a partial batch
        content: false          # record prompts and completions (gen_ai.input/output.messages)
        redact_patterns: []     # regexes replaced by [REDACTED] in recorded content
        redact_defaults: true   # also redact API keys, bearer tokens and private keys by shape
        max_content_chars: 65536
        sample_ratio: 1.0       # share of new traces recorded (default: OTEL_TRACES_SAMPLER(_ARG), else 1)
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import Counter

from llmproxy import (
    Action,
    Attempt,
    ConfigError,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    InvalidJSON,
    Outcome,
    Section,
    __version__,
)
from llmproxy.filters.names import ROUTE
from llmproxy.filters.routing import RouteDecision, RoutingFactory
from llmproxy.filters.tracing import semconv as sc
from llmproxy.filters.tracing.content import DEFAULT_PATTERNS, Redactor
from llmproxy.filters.tracing.export import exporter_for
from llmproxy.filters.tracing.pipeline import SpanPipeline
from llmproxy.filters.tracing.propagation import (
    TRACEPARENT,
    TRACESTATE,
    Parent,
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse,
)
from llmproxy.filters.tracing.spans import REQUEST_KEYS, AttemptRecord, AttemptTarget, ExchangeTrace, SpanSettings
from llmproxy.filters.tracing.transport import lighten

__all__ = ["CapturingFilter", "PropagatingFilter", "TracingFactory", "TracingFilter"]

log = logging.getLogger("llmproxy.tracing")

#: Client credential fields whose values are redacted from recorded content.
_CREDENTIALS = (b"authorization", b"x-api-key", b"api-key")
_DROP_NONE: frozenset[bytes] = frozenset()
_DROP_PARENT = frozenset({TRACEPARENT})
_DROP_STATE = frozenset({TRACESTATE})  # a tracestate without a traceparent
_DROP_BOTH = frozenset({TRACEPARENT, TRACESTATE})
#: The most bytes of a request body, and of a response, kept for content capture
#: (a longer completion is recorded as far as it was kept).
_MAX_CAPTURED = 1024 * 1024


def _incoming(exchange: Exchange) -> tuple[Parent | None, frozenset[bytes]]:
    """The client's trace parent, and the fields to drop before ours is set.

    ``traceparent`` goes when the client sent one; ``tracestate`` too when the
    ``traceparent`` is invalid (it must not be read, nor passed on, without one).
    """
    parents: list[bytes] = []
    states: list[bytes] = []
    for name, value in exchange.request.headers.raw():
        if name == TRACEPARENT:
            parents.append(value)
        elif name == TRACESTATE:
            states.append(value)
    if not parents:
        return None, _DROP_STATE if states else _DROP_NONE
    parent = parse(parents, states)
    return parent, _DROP_PARENT if parent is not None else _DROP_BOTH


def _send(exchange: Exchange, drop: frozenset[bytes], value: bytes) -> None:
    """Set the upstream ``traceparent`` (generated hex: it needs no field check, see ``Headers.edit_raw``)."""
    exchange.request.headers.edit_raw(drop, ((TRACEPARENT, value),))


class PropagatingFilter(Filter):
    """No exporter: pass a valid ``traceparent`` on, replace a missing or malformed one (counted)."""

    factory: TracingFactory
    __slots__ = ()

    def on_request_headers(self, exchange: Exchange) -> Action:
        parent, drop = _incoming(exchange)
        if parent is None:
            if drop is _DROP_BOTH:
                self.factory.invalid_traceparent.inc()
            _send(exchange, drop, format_traceparent(new_trace_id(), new_span_id(), False))
        return Action.CONTINUE


class TracingFilter(Filter):
    """Per-exchange tracing state (see the module docstring)."""

    factory: TracingFactory

    __slots__ = ("_trace",)

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self._trace: ExchangeTrace | None = None

    def _start(self, exchange: Exchange) -> ExchangeTrace:
        parent, drop = _incoming(exchange)
        if drop is _DROP_BOTH:
            self.factory.invalid_traceparent.inc()
        if parent is None:
            ratio = self.factory.sample_ratio
            trace = ExchangeTrace(new_trace_id(), new_span_id(), None, ratio >= 1.0 or random.random() < ratio)
        else:
            trace = ExchangeTrace(parent.trace_id, new_span_id(), parent, parent.sampled)
        span_id = trace.next_span_id = new_span_id()
        _send(exchange, drop, format_traceparent(trace.trace_id, span_id, trace.sampled))
        self._trace = trace
        return trace

    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action:
        trace = self._start(exchange)
        if not trace.sampled:
            return Action.CONTINUE
        trace.next_target = _target(exchange)
        operation = sc.operation_for(exchange.client_path)
        trace.operation = operation
        if operation is None:
            return Action.CONTINUE
        route = exchange.vars.get(ROUTE)
        if isinstance(route, RouteDecision):
            trace.requested_model = route.requested_model
        try:
            payload = exchange.request_json()  # parsed once, for every filter
        except InvalidJSON:
            return Action.CONTINUE
        if isinstance(payload, dict):
            if not trace.requested_model and isinstance(payload.get("model"), str):
                trace.requested_model = payload["model"]
            trace.request_values = tuple(map(payload.get, REQUEST_KEYS))  # checked in the export thread
        return Action.CONTINUE

    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> None:
        trace = self._trace
        if trace is None:
            return
        if trace.sampled:
            trace.attempts.append(AttemptRecord.of(attempt, trace.next_span_id, trace.next_target))
        if attempt.outcome is Outcome.RETRIED:
            # the next attempt is a sibling under the SERVER span; failover has re-pointed it already
            span_id = trace.next_span_id = new_span_id()
            _send(exchange, _DROP_PARENT, format_traceparent(trace.trace_id, span_id, trace.sampled))
            if trace.sampled:
                trace.next_target = _target(exchange)

    def on_exchange_complete(self, exchange: Exchange) -> None:
        trace = self._trace
        if trace is None:  # an earlier filter answered before this one ran
            trace = self._start(exchange)
        if not trace.sampled:
            return
        now = time.perf_counter()
        trace.offset_ns = time.time_ns() - int(now * 1e9)
        trace.end = now
        trace.start = exchange.started_at
        trace.first_byte = exchange.first_byte_at
        trace.method = exchange.request.method
        trace.path = exchange.client_path
        trace.client_addr = exchange.client_addr
        trace.request_id = exchange.id
        trace.client_protocol = exchange.client_protocol
        trace.is_sse = exchange.is_sse
        response = exchange.response
        trace.status = response.status if response is not None and exchange.response_started else None
        error = exchange.error
        if error is not None:
            trace.error_type = error.code or type(error).__name__
        if trace.operation is None:
            trace.operation = sc.operation_for(exchange.client_path)
        self.factory.pipeline.submit(trace)


class CapturingFilter(TracingFilter):
    """``content: true``: also keeps the client's request body and the relayed bytes (an observer)."""

    mutates_response_body: ClassVar[bool] = False

    __slots__ = ()

    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action:
        super().on_request_body(exchange, body, end_of_stream)
        trace = self._trace
        if trace is not None and trace.sampled:
            trace.chunks = []
            trace.client_secrets = tuple(
                value.decode("latin-1").removeprefix("Bearer ").strip()
                for name, value in exchange.request.headers.raw()
                if name in _CREDENTIALS
            )
            if len(exchange.request.body) <= _MAX_CAPTURED:
                trace.body = exchange.request.body  # the client's bytes (a rewrite is serialised at send)
        return Action.CONTINUE

    def on_response_headers(self, exchange: Exchange) -> Action:
        trace = self._trace
        response = exchange.response
        if trace is None or trace.chunks is None or (response is not None and response.status >= 400):
            exchange.skip_response_body(self)  # nothing to record (an error body is no completion)
        else:
            trace.chunks = []  # a new attempt: an earlier one's bytes never reached the client
            trace.captured = 0
        return Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        trace = self._trace
        if data and trace is not None and trace.chunks is not None:
            trace.chunks.append(data)
            trace.captured += len(data)
            if trace.captured > _MAX_CAPTURED:  # the record waits in the queue: keep it bounded
                exchange.skip_response_body(self)
        return Action.CONTINUE


def _target(exchange: Exchange) -> AttemptTarget | None:
    """Where routing points the next attempt: its provider (GenAI name) and upstream model."""
    route = exchange.vars.get(ROUTE)
    if isinstance(route, RouteDecision) and route.target is not None:
        kind = route.target.provider.adapter.type_name
        return AttemptTarget(sc.PROVIDERS.get(kind, kind), route.model)
    return None


def _endpoint(configured: str, environ: Mapping[str, str]) -> str:
    """The OTLP/HTTP traces URL: the config's, else the standard variables' ("" for none)."""
    if configured:
        return configured
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + "/v1/traces"
    return ""


def _disabled(environ: Mapping[str, str]) -> bool:
    return (
        environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none"
    )


def _env_ratio(environ: Mapping[str, str]) -> float:
    """The root sampling ratio of ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (1 when unset).

    Decisions are always parent-based: a client's sampled flag is followed.
    """
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))
        except ValueError:
            return 1.0
        return min(max(ratio, 0.0), 1.0)
    return 1.0


def _url(value: str) -> str | None:
    return None if re.match(r"^https?://[^/\s]+", value) else "must be an http:// or https:// URL"


def _compiles(patterns: list[Any]) -> str | None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            return "must be a list of regular expressions (strings)"
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"{pattern!r} is not a valid regular expression: {exc}"
    return None


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


class TracingFactory(FilterFactory):
    """Settings, exporter and export pipeline of the ``tracing`` filter."""

    filter_class = TracingFilter
    fail_open = True  # tracing never fails an exchange

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        sec = Section(config, "", "")
        environ = os.environ
        try:
            endpoint = sec.get("endpoint", str, "", lambda v: _url(v) if v else None)
            headers = sec.get("headers", dict, {})
            service = sec.get("service_name", str, "") or environ.get("OTEL_SERVICE_NAME", "") or "llmproxy"
            timeout = sec.get("timeout", float, 5.0, _positive)
            max_queue = sec.get("max_queue", int, 2048, _positive)
            batch_size = sec.get("batch_size", int, 256, _positive)
            delay = sec.get("schedule_delay", float, 1.0, _positive)
            self.capture: bool = sec.get("content", bool, False)
            patterns = sec.get("redact_patterns", list, [], _compiles)
            defaults = sec.get("redact_defaults", bool, True)
            max_content = sec.get("max_content_chars", int, 65536, _positive)
            ratio = sec.get("sample_ratio", float, None, lambda v: None if 0 <= v <= 1 else "must be between 0 and 1")
            sec.finish()
        except ConfigError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ValueError("headers: must map header names to string values")
        self.endpoint = "" if _disabled(environ) else _endpoint(endpoint, environ)
        #: The share of new traces (no sampled parent decision from the client) that are recorded.
        self.sample_ratio: float = ratio if ratio is not None else _env_ratio(environ)
        registry = context.metrics
        self.invalid_traceparent = Counter(
            "llmproxy_tracing_traceparent_invalid",
            "Requests whose traceparent was malformed (replaced by a new trace)",
            registry=registry,
        )
        self.dropped = Counter(
            "llmproxy_tracing_spans_dropped",
            "Spans not exported, by reason (queue_full, export_failed, build_failed, shutdown)",
            ["reason"],
            registry=registry,
        )
        self.exported = Counter("llmproxy_tracing_spans_exported", "Spans accepted by the collector", registry=registry)
        self._dropped_children = {
            reason: self.dropped.labels(reason)
            for reason in ("queue_full", "export_failed", "build_failed", "shutdown")
        }
        self.latest = sc.latest_experimental(environ)
        self._patterns = [*(DEFAULT_PATTERNS if defaults else ()), *patterns]
        self._max_content = max_content
        self.settings = SpanSettings(
            Resource.create({SERVICE_NAME: service, SERVICE_VERSION: __version__}),
            InstrumentationScope("llmproxy.filters.tracing", __version__),
            self.latest,
            None,
            max_content,
        )
        self.pipeline: SpanPipeline
        self._shared: Filter | None = None
        if not self.endpoint:
            self.filter_class = PropagatingFilter  # type: ignore[misc,assignment]
            self._shared = PropagatingFilter(self)  # stateless: one for every exchange
            return
        if self.capture:
            self.filter_class = CapturingFilter  # type: ignore[misc]
        exporter: SpanExporter = OTLPSpanExporter(endpoint=self.endpoint, headers=headers or None, timeout=timeout)
        lighten(exporter)  # one kept-alive http.client connection instead of requests (a tenth of the work)
        # the exporter logs every failed batch; the pipeline counts them and logs state changes instead
        quiet = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.CRITICAL)
        self.pipeline = SpanPipeline(
            exporter_for(exporter, self.settings),
            dropped=self._count_dropped,
            exported=self.exported.inc,
            max_queue=max_queue,
            batch_size=batch_size,
            delay=delay,
        )

    def create(self, exchange: Exchange) -> Filter:
        shared = self._shared
        return shared if shared is not None else self.filter_class(self)

    @property
    def enabled(self) -> bool:
        """Spans are built and exported (an endpoint is configured)."""
        return bool(self.endpoint)

    def _count_dropped(self, reason: str, count: int) -> None:
        self._dropped_children[reason].inc(count)

    async def start(self) -> None:
        if not self.enabled:
            return
        if self.capture:
            self.settings.redactor = Redactor(self._patterns, self._known_secrets())
        self.pipeline.start()
        log.info("tracing: exporting spans to %s", self.endpoint)

    def _known_secrets(self) -> list[str]:
        """The provider keys routing holds: never recorded in content."""
        routing = self.context.find_factory(RoutingFactory)
        if routing is None:
            return []
        out: list[str] = []
        for provider in routing.table.providers.values():
            for target in provider.targets:
                out.extend(secret.decode("latin-1") for secret in target.secrets)
        return out

    async def close(self) -> None:
        if self.enabled:
            await asyncio.to_thread(self.pipeline.close, 2.0)
