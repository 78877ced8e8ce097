"""How a batch of exchange records reaches the collector: two interchangeable strategies.

* :class:`WireExport` (the default): spans written as OTLP protobuf straight
  from the records by :class:`~.otlp.ExchangeWriter`, and posted by the
  SDK exporter's HTTP client (its endpoint, headers, TLS, compression,
  timeout and retry with backoff, from the config and the standard
  ``OTEL_EXPORTER_OTLP_*`` variables). That client is the exporter's
  private ``_client`` attribute; an exporter without one gets
  :class:`SdkExport` instead (``exporter_for``).
* :class:`SdkExport`: ``ReadableSpan`` objects (:func:`~.spans.build_spans`)
  through any SDK ``SpanExporter``'s public ``export``: slower, and the
  reference a test compares :class:`WireExport`'s bytes with.

Both run in the pipeline's export thread and return an :class:`Outcome`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from llmproxy.filters.tracing.otlp import ExchangeWriter
from llmproxy.filters.tracing.spans import ExchangeTrace, SpanSettings, build_spans

__all__ = ["BatchExport", "Outcome", "SdkExport", "WireExport", "exporter_for"]


@dataclass(slots=True)
class Outcome:
    """What became of one batch's spans."""

    sent: int = 0  # spans the collector accepted
    failed: int = 0  # spans of a batch the collector did not accept (or never answered for)
    unbuilt: int = 0  # spans of records that could not be encoded (a bug: logged)


class BatchExport(Protocol):
    def export(self, records: list[ExchangeTrace], on_error: Callable[[ExchangeTrace], None]) -> Outcome: ...

    def shutdown(self) -> None: ...


class WireExport:
    """Hand-encoded OTLP through the SDK exporter's HTTP client (see the module docstring)."""

    def __init__(self, exporter: Any, settings: SpanSettings) -> None:
        self._exporter = exporter
        self._client = exporter._client
        self._settings = settings
        resource = settings.resource
        scope = settings.scope
        self._encoder = ExchangeWriter(dict(resource.attributes), scope.name, scope.version or "")

    def encode(self, records: list[ExchangeTrace], on_error: Callable[[ExchangeTrace], None]) -> tuple[bytes, int, int]:
        """``(request bytes, spans encoded, spans that could not be)``."""
        encoder, settings = self._encoder, self._settings
        parts: list[bytes] = []
        count = unbuilt = 0
        for record in records:
            try:
                parts.append(encoder.exchange(record, settings))
                count += record.span_count
            except Exception:
                on_error(record)
                unbuilt += record.span_count
        return encoder.request(parts), count, unbuilt

    def export(self, records: list[ExchangeTrace], on_error: Callable[[ExchangeTrace], None]) -> Outcome:
        data, count, unbuilt = self.encode(records, on_error)
        if not count:
            return Outcome(unbuilt=unbuilt)
        try:
            ok = bool(self._client.export(data).success)
        except Exception:
            ok = False
        return Outcome(count, 0, unbuilt) if ok else Outcome(0, count, unbuilt)

    def shutdown(self) -> None:
        self._exporter.shutdown()


class SdkExport:
    """``ReadableSpan`` objects through a ``SpanExporter`` (see the module docstring)."""

    def __init__(self, exporter: SpanExporter, settings: SpanSettings) -> None:
        self._exporter = exporter
        self._settings = settings

    def export(self, records: list[ExchangeTrace], on_error: Callable[[ExchangeTrace], None]) -> Outcome:
        spans: list[ReadableSpan] = []
        unbuilt = 0
        for record in records:
            try:
                spans.extend(build_spans(record, self._settings))
            except Exception:
                on_error(record)
                unbuilt += record.span_count
        if not spans:
            return Outcome(unbuilt=unbuilt)
        try:
            ok = self._exporter.export(spans) is SpanExportResult.SUCCESS
        except Exception:
            ok = False
        return Outcome(len(spans), 0, unbuilt) if ok else Outcome(0, len(spans), unbuilt)

    def shutdown(self) -> None:
        self._exporter.shutdown()


def exporter_for(exporter: SpanExporter, settings: SpanSettings) -> BatchExport:
    """:class:`WireExport` over the exporter's HTTP client when it has one, else :class:`SdkExport`."""
    client = getattr(exporter, "_client", None)
    if client is not None and callable(getattr(client, "export", None)):
        return WireExport(exporter, settings)
    return SdkExport(exporter, settings)
