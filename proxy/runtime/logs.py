"""Process logging: one line per record on stderr, every line naming its worker.

``llmproxy serve`` calls :func:`setup` once; each worker calls
:func:`set_worker` when it starts (the supervisor's own lines say
``main``). Two formats:

* text (``access_log: text`` or ``off``), for people::

      2026-12-03 12:00:00,123 INFO w0 llmproxy.access 127.0.0.1 "POST /v1/chat/completions" 200 ...

* JSON (``access_log: json``), for machines: every line is one JSON object
  with ``ts`` (RFC 3339 UTC, milliseconds), ``level``, ``logger``,
  ``worker`` and ``message`` (``exc`` with the traceback when there is one).
  An access record is itself such an object (the access log's fields at the
  top level, see :mod:`llmproxy.runtime.accesslog`) and is written as is.

Formatting happens in the handler, only for records the level lets
through; callers pass lazy ``%`` arguments (or check ``isEnabledFor``) so a
disabled level costs nothing on the hot path.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import orjson

__all__ = ["JsonFormatter", "current_worker", "set_worker", "setup", "timestamp"]

#: This process's worker id as logs show it (``main`` until :func:`set_worker`).
_worker = "main"

TEXT_FORMAT = "%(asctime)s %(levelname)s w%(worker)s %(name)s %(message)s"


def set_worker(worker_id: int | str) -> None:
    """Name this process's worker in every log line from now on."""
    global _worker
    _worker = str(worker_id)


def current_worker() -> str:
    """This process's worker id as the logs show it."""
    return _worker


def timestamp(seconds: float | None = None) -> str:
    """``seconds`` (default: now) as RFC 3339 UTC with milliseconds: ``2026-12-03T12:00:00.123Z``."""
    now = time.time() if seconds is None else seconds
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class _WorkerStamp(logging.Filter):
    """Puts the worker id on every record a handler formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = _worker
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "json_line", False):
            return record.getMessage()  # an access record: already one complete object
        line: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "worker": getattr(record, "worker", _worker),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup(level: str, json: bool = False, stream: TextIO | None = None) -> None:
    """Log records of ``level`` and above to ``stream`` (stderr), as text or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_WorkerStamp())
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
