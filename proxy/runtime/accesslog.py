"""The access log: one line per exchange, plain or JSON, never a secret.

A line names method, path (query string dropped: it may carry keys),
status, upstream target name, attempts, duration, bytes in and out, the
request id and the error code when there was one. Nothing is formatted
when the ``llmproxy.access`` logger is disabled for INFO.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from llmproxy.exchange import Exchange

__all__ = ["AccessLog"]


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
        if self.json_lines:
            logger.info(
                "%s",
                orjson.dumps(
                    {
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
                        "error": error,
                    }
                ).decode(),
            )
        else:
            logger.info(
                '%s "%s %s" %s upstream=%s attempts=%d %.3fms in=%d out=%d id=%s%s',
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
                f" error={error}" if error else "",
            )
