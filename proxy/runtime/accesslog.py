"""The access log: one line per exchange, plain or JSON, never a secret.

A line names method, path (query string dropped: it may carry keys),
status, upstream target name, attempts, duration, bytes in and out, the
request id and the error code when there was one. When the ``metering``
filter set ``exchange.usage`` it also names the model asked for and the
upstream model, provider, key id, tokens in/out/cached, cost (``?`` when
unknown), time to first byte and whether the reply was a stream. Nothing is
formatted when the ``llmproxy.access`` logger is disabled for INFO.

JSON mode writes one JSON object per exchange (``ts``, ``level``,
``logger``, ``worker`` then the fields above); :mod:`llmproxy.runtime.logs`
writes it as the whole line. Text mode leaves the time and the worker to the
log format.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson

from llmproxy.filters.names import PRINCIPAL
from llmproxy.runtime.logs import current_worker, timestamp

if TYPE_CHECKING:
    from llmproxy.exchange import Exchange

__all__ = ["AccessLog"]

#: Tells the JSON formatter that the message is the whole line.
_JSON_LINE = {"json_line": True}


class AccessLog:
    """Writes one record per finished exchange to the ``llmproxy.access`` logger."""

    def __init__(self, json_lines: bool = False, logger: logging.Logger | None = None, enabled: bool = True) -> None:
        self.json_lines = json_lines
        self.logger = logger or logging.getLogger("llmproxy.access")
        #: ``access_log: off`` (per proxy: the logger itself is shared by every proxy in a process).
        self.enabled = enabled

    def record(self, ex: Exchange) -> None:
        """Log ``ex`` (cheap no-op when off or when INFO is disabled)."""
        logger = self.logger
        if not self.enabled or not logger.isEnabledFor(logging.INFO):
            return
        request = ex.request
        path = ex.client_path.split("?", 1)[0]
        status = (
            ex.error.status
            if ex.error is not None and not ex.response_started
            else (ex.response.status if ex.response is not None else 0)
        )
        upstream = ex.upstream.name if ex.upstream is not None else ex.vars.get("upstream", "-")
        error = ex.error.code if ex.error is not None else None
        duration_ms = round(ex.elapsed * 1000, 3)
        usage = ex.usage
        principal = ex.vars.get(PRINCIPAL)
        who: str | None = principal.name if principal is not None else None
        ttft_ms = round((ex.first_byte_at - ex.started_at) * 1000, 3) if ex.first_byte_at else None
        if self.json_lines:
            record: dict[str, object] = {
                "ts": timestamp(),
                "level": "info",
                "logger": logger.name,
                "worker": current_worker(),
                "method": request.method,
                "path": path,
                "status": status,
                "upstream": upstream,
                "attempts": ex.attempts,
                "duration_ms": duration_ms,
                "bytes_in": ex.bytes_received,
                "bytes_out": ex.bytes_sent,
                "request_id": ex.id,
                "client": ex.client_addr,
                "principal": who,
                "error": error,
            }
            if usage is not None:
                record.update(
                    model=usage.requested_model or usage.model,
                    upstream_model=usage.model,
                    provider=usage.provider,
                    key_id=usage.key_id,
                    tokens_in=usage.input_tokens,
                    tokens_out=usage.output_tokens,
                    tokens_cached=usage.cache_read_tokens,
                    tokens_source=usage.output_source.value,
                    cost=float(usage.cost.total) if usage.cost is not None else None,
                    ttft_ms=ttft_ms,
                    stream=ex.is_sse,
                )
            logger.info("%s", orjson.dumps(record).decode(), extra=_JSON_LINE)
            return
        metered = ""
        if usage is not None:
            cost = f"{usage.cost.total:.6f}" if usage.cost is not None else "?"
            metered = (
                f" model={usage.requested_model or usage.model or '-'} upstream_model={usage.model or '-'}"
                f" provider={usage.provider or '-'} key={usage.key_id or '-'} tokens_in={usage.input_tokens}"
                f" tokens_out={usage.output_tokens} tokens_cached={usage.cache_read_tokens} cost={cost}"
                f" ttft={'-' if ttft_ms is None else f'{ttft_ms:.3f}ms'} stream={'yes' if ex.is_sse else 'no'}"
            )
        logger.info(
            '%s "%s %s" %s upstream=%s attempts=%d %.3fms in=%d out=%d id=%s principal=%s%s%s',
            ex.client_addr,
            request.method,
            path,
            status,
            upstream,
            ex.attempts,
            duration_ms,
            ex.bytes_received,
            ex.bytes_sent,
            ex.id,
            who or "-",
            metered,
            f" error={error}" if error else "",
        )
