"""The span pipeline: a bounded queue on the event loop, one export thread, drops counted.

The SDK's ``BatchSpanProcessor`` takes finished ``Span`` objects (built
through the tracer, context variables and all) and logs a warning for
every span it drops. Here the loop side is one ``deque.append`` under an
uncontended lock per finished exchange (:meth:`SpanPipeline.submit`): the
exchange's trace record goes in as collected, and the export thread turns
records into spans, encodes them (OTLP protobuf) and sends them
(:mod:`.export`). So:

* nothing on the loop waits for the collector, ever; a full queue drops the
  record (``reason="queue_full"``), an export that fails or times out drops
  its batch (``reason="export_failed"``), a record that cannot be built
  (a bug) drops its spans (``reason="build_failed"``); all counted in
  ``llmproxy_tracing_spans_dropped_total``, sent spans in
  ``llmproxy_tracing_spans_exported_total``;
* the collector being down is logged once when it starts failing and once
  when it recovers, never per batch;
* :meth:`SpanPipeline.close` exports what is queued within a bounded time,
  then stops the exporter (its retry backoff is abandoned) and counts what
  is left as dropped (``reason="shutdown"``). The thread is a daemon: an
  export stuck in a socket cannot keep the process alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from llmproxy.filters.tracing.export import BatchExport
from llmproxy.filters.tracing.spans import ExchangeTrace

__all__ = ["SpanPipeline"]

log = logging.getLogger("llmproxy.tracing")

R = ExchangeTrace


class SpanPipeline:
    """Queue records on the loop, build and export their spans in one daemon thread (see the module docstring)."""

    def __init__(
        self,
        exporter: BatchExport,
        *,
        dropped: Callable[[str, int], None],
        exported: Callable[[int], None],
        max_queue: int = 2048,
        batch_size: int = 256,
        delay: float = 1.0,
        name: str = "llmproxy-tracing",
    ) -> None:
        self._exporter = exporter
        self._dropped = dropped
        self._exported = exported
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._delay = delay
        self._queue: deque[R] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._failing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def start(self) -> None:
        """Start the export thread (idempotent)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, record: R) -> None:
        """Queue one record; never blocks (a full queue drops it, counted). For the event loop."""
        cond = self._cond
        with cond:
            queue = self._queue
            if self._closing or len(queue) >= self._max_queue:
                full = True
            else:
                full = False
                queue.append(record)
                if len(queue) == self._batch_size:
                    cond.notify()
        if full:
            self._dropped("queue_full" if not self._closing else "shutdown", record.span_count)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was exported (or dropped); False on timeout. For tests."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
        while time.monotonic() < deadline:
            with self._cond:
                if not self._queue and not self._busy:
                    return True
                self._cond.notify()
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 2.0) -> None:
        """Export what is queued within ``timeout`` seconds, then stop (see the module docstring)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._started:
            self._thread.join(timeout)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        if left:
            self._dropped("shutdown", sum(record.span_count for record in left))
        try:
            self._exporter.shutdown()  # aborts a retry backoff still running in the thread
        except Exception:
            log.debug("span exporter shutdown failed", exc_info=True)

    # -- the export thread ------------------------------------------------------------------
    def _take(self) -> list[R] | None:
        """The next batch (waiting up to ``delay`` for a full one); None when closed and empty."""
        with self._cond:
            self._busy = False
            queue = self._queue
            if len(queue) < self._batch_size and not self._closing:
                self._cond.wait(self._delay)
            if not queue:
                return None if self._closing else []
            count = min(len(queue), self._batch_size)
            batch = [queue.popleft() for _ in range(count)]
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._export(batch)

    def _export(self, batch: list[R]) -> None:
        outcome = self._exporter.export(batch, self._unbuilt)
        if outcome.unbuilt:
            self._dropped("build_failed", outcome.unbuilt)
        if outcome.sent:
            self._exported(outcome.sent)
            if self._failing:
                self._failing = False
                log.warning("tracing: span export works again")
        if outcome.failed:
            self._dropped("export_failed", outcome.failed)
            if not self._failing:
                self._failing = True
                log.warning(
                    "tracing: span export failed (collector down, slow or refusing); spans are dropped and counted"
                )

    @staticmethod
    def _unbuilt(record: R) -> None:
        log.exception("could not encode the spans of exchange %s", record.request_id)
