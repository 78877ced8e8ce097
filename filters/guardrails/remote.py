"""Remote checks: a rule whose verdict comes from an HTTP service, called through the core's upstream client.

The service gets ``POST <url><path>`` with ``{"rule", "model", "messages",
"system"}`` (``messages`` is the request's ``messages`` or Responses
``input``, ``system`` its ``system`` or ``instructions``, after local
redaction) and answers ``{"flagged": bool, "reason": str}``. A non-2xx
reply, a body that is not that, a connection failure or no answer within
``timeout`` seconds is a failure: a fail-open rule lets the request through
(logged), a fail-closed one refuses it with 503 ``guardrail_unavailable``.
Rules naming the same URL and path share one call per request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from llmproxy import FactoryContext, UpstreamError, UpstreamTarget
from llmproxy.filters.guardrails.rules import RemoteCheck

__all__ = ["Verdict", "call_remote", "remote_target"]

log = logging.getLogger("llmproxy.guardrails")

_HEADERS = ((b"content-type", b"application/json"), (b"accept", b"application/json"))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the service said: ``flagged``, or ``failed`` (with a reason to log) when it could not say."""

    flagged: bool
    failed: bool = False
    reason: str = ""


def remote_target(check: RemoteCheck, name: str, context: FactoryContext) -> UpstreamTarget:
    """The upstream target of ``check`` (resolving ``mock://``)."""
    target: UpstreamTarget = check.settings.target(f"guardrail:{name}", context.mock_ports)
    return target


async def call_remote(
    context: FactoryContext, target: UpstreamTarget, check: RemoteCheck, rule: str, payload: dict[str, Any]
) -> Verdict:
    """One call; every failure (status, body, connection, timeout) is a ``failed`` verdict, never an exception."""
    body = orjson.dumps({"rule": rule, **payload})
    try:
        reply = await asyncio.wait_for(
            context.upstream.request(target, "POST", check.path, headers=_HEADERS, body=body, max_body=65536),
            check.timeout,
        )
    except TimeoutError:
        return Verdict(False, True, f"no answer within {check.timeout:g}s")
    except UpstreamError as exc:
        return Verdict(False, True, exc.message)
    if not 200 <= reply.status < 300:
        return Verdict(False, True, f"status {reply.status}")
    try:
        answer = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return Verdict(False, True, "reply is not JSON")
    if not isinstance(answer, dict) or not isinstance(answer.get("flagged"), bool):
        return Verdict(False, True, "reply has no boolean 'flagged'")
    reason = answer.get("reason")
    return Verdict(answer["flagged"], False, reason if isinstance(reason, str) else "")
