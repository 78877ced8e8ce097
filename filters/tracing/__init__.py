"""The ``tracing`` filter: W3C trace context and OpenTelemetry GenAI spans over OTLP/HTTP.

See :mod:`llmproxy.filters.tracing.filter` (the filter and its config),
:mod:`~llmproxy.filters.tracing.propagation` (``traceparent``),
:mod:`~llmproxy.filters.tracing.spans` (the spans of an exchange),
:mod:`~llmproxy.filters.tracing.pipeline` (the bounded export queue),
:mod:`~llmproxy.filters.tracing.content` (recorded content, redacted) and
:mod:`~llmproxy.filters.tracing.semconv` (attribute names).
"""

from llmproxy.filters.tracing.filter import PropagatingFilter, TracingFactory, TracingFilter

__all__ = ["PropagatingFilter", "TracingFactory", "TracingFilter"]
