"""What a provider's response says about itself: its id, model and finish reasons, by byte search.

Routing reads them on the provider's side of a translation (the provider's
own id and model), without parsing: the first ``"id"`` and ``"model"``
string values of a JSON body or of a stream's first event are the
response's (both protocols put them before any content, and a quoted key
inside a JSON string is escaped, so it cannot match), and every
``"finish_reason"`` (OpenAI, one per choice) or ``"stop_reason"``
(Anthropic) string value is a finish reason (their ``null`` placeholders do
not match). A batch is searched for a reason only when a C-speed substring
check says one can be there, so a stream's events cost two ``in`` tests
each (``bytes.find``: ``in`` costs an exception on CPython 3.11). The results
go on the :class:`~llmproxy.Attempt`.
"""

from __future__ import annotations

import re
from typing import Any

from llmproxy import Attempt

__all__ = ["may_finish", "take_finish", "take_head", "take_json"]

_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_FINISH = re.compile(rb'"(?:finish_reason|stop_reason)"\s*:\s*"([^"\\]{1,64})"')


def may_finish(data: bytes) -> bool:
    """``data`` may hold a finish reason (a string one: ``null`` placeholders do not count)."""
    return data.find(b'_reason":"') >= 0 or data.find(b'_reason": "') >= 0  # (find: see RoutingFilter)


def take_head(attempt: Attempt, data: bytes) -> None:
    """The response id and model from the first JSON object in ``data`` (a body or a batch of events)."""
    found = _ID.search(data)
    if found is None:
        return
    attempt.response_id = found.group(1).decode("utf-8", "replace")
    model = _MODEL.search(data)
    if model is not None:
        attempt.response_model = model.group(1).decode("utf-8", "replace")


def take_finish(attempt: Attempt, data: bytes) -> None:
    """Every finish reason in ``data``, after those already found."""
    found = tuple(m.group(1).decode("utf-8", "replace") for m in _FINISH.finditer(data))
    if found:
        attempt.finish_reasons += found


def take_json(attempt: Attempt, body: Any) -> None:
    """The facts of a parsed JSON response (either protocol)."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("id"), str):
        attempt.response_id = body["id"]
    if isinstance(body.get("model"), str):
        attempt.response_model = body["model"]
    reason = body.get("stop_reason")
    if isinstance(reason, str):
        attempt.finish_reasons = (reason,)
    choices = body.get("choices")
    if isinstance(choices, list):
        attempt.finish_reasons = tuple(
            c["finish_reason"] for c in choices if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
        )
