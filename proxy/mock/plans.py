"""The reply plan of one provider request: pacing, status and fault.

Content knobs: ``x-mock-reply`` (the reply text, instead of the vocabulary
words), ``x-mock-tool-args`` (every tool call's arguments carry this text;
with no ``x-mock-tool-calls`` it makes one call) and ``x-mock-chunk-chars``
(characters per streamed text or argument event; by default a given reply is
streamed word by word and arguments in three fragments).

Precedence: ``x-mock-status``/``x-mock-fault`` request headers, then
``require_key`` (401), then the :class:`~.config.KeyBehaviour` of the
request's API key. A fault wins over a status when both are given. A bad
``x-mock-*`` value raises :class:`BadHeader` (answered with 400 naming the
header).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from llmproxy.mock.config import FAULTS, MAX_TOKENS, MockConfig

__all__ = ["BadHeader", "Plan", "Planner", "credential_of"]

_MAX_TOOL_CALLS: Final = 128
_MAX_CHUNK_CHARS: Final = 1 << 20
_DEFAULT_STALL_AFTER: Final = 2


@dataclass(slots=True)
class Plan:
    """Per-request pacing and fault, resolved from headers, auth and key behaviours."""

    tokens: int
    ttft: float
    itl: float
    tool_calls: int = 0
    stall_after: int = _DEFAULT_STALL_AFTER
    status: int | None = None
    retry_after: float | None = None
    fault: str | None = None
    reason: str = ""
    reply: str | None = None
    tool_args: str | None = None
    chunk_chars: int = 0
    #: An unpaced stream's body as one chunk holding every event (``x-mock-sse-framing: whole``)
    #: instead of one chunk per event (``events``, the default, as providers flush).
    sse_whole: bool = False


class BadHeader(Exception):
    """An ``x-mock-*`` header with a bad value; answered with 400."""


def _header_int(headers: dict[str, str], name: str, lo: int, hi: int) -> int | None:
    """The integer value of header ``name`` in ``[lo, hi]``, None if absent; raise ``BadHeader``."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise BadHeader(f"{name} must be an integer in {lo}..{hi}, got {raw!r}")
    return value


def _header_float(headers: dict[str, str], name: str) -> float | None:
    """The non-negative number in header ``name``, None if absent; raise ``BadHeader``."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise BadHeader(f"{name} must be a non-negative number, got {raw!r}")
    return value


def credential_of(headers: dict[str, str]) -> str | None:
    """The API key a request carries (``authorization`` Bearer, ``x-api-key``, ``api-key``, ``x-goog-api-key``)."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, rest = auth.partition(" ")
        if scheme == "AWS4-HMAC-SHA256":  # SigV4 (Bedrock): the access key id
            return rest.partition("Credential=")[2].partition("/")[0] or None
        return rest.strip() if scheme.lower() == "bearer" else auth
    key = headers.get("x-api-key")
    if key is None:
        key = headers.get("api-key")
    return key if key is not None else headers.get("x-goog-api-key")


class Planner:
    """Resolves each provider request's :class:`Plan`; owns the per-key fault counters.

    One per server, so two servers never share counters. It reads
    ``config`` on every request, so a test may change ``config.keys`` live.
    """

    __slots__ = ("_key_hits", "config")

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self._key_hits: dict[str, int] = {}

    def plan(self, headers: dict[str, str], credential: str | None, mocked: bool) -> Plan:
        """Resolve pacing and fault: headers win over auth, auth over key behaviours.

        ``mocked`` is False when no ``x-mock-*`` header is present (the fast path).
        """
        cfg = self.config
        if not mocked:
            return self._key_plan(Plan(cfg.tokens, cfg.ttft, cfg.itl), credential)
        tokens = _header_int(headers, "x-mock-tokens", 0, MAX_TOKENS)
        ttft = _header_float(headers, "x-mock-ttft-ms")
        itl = _header_float(headers, "x-mock-itl-ms")
        plan = Plan(
            tokens=cfg.tokens if tokens is None else tokens,
            ttft=cfg.ttft if ttft is None else ttft / 1000,
            itl=cfg.itl if itl is None else itl / 1000,
        )
        plan.tool_calls = _header_int(headers, "x-mock-tool-calls", 0, _MAX_TOOL_CALLS) or 0
        plan.reply = headers.get("x-mock-reply")
        plan.tool_args = headers.get("x-mock-tool-args")
        if plan.tool_args is not None and not plan.tool_calls:
            plan.tool_calls = 1
        plan.chunk_chars = _header_int(headers, "x-mock-chunk-chars", 1, _MAX_CHUNK_CHARS) or 0
        framing = headers.get("x-mock-sse-framing")
        if framing is not None and framing not in ("events", "whole"):
            raise BadHeader(f"x-mock-sse-framing must be 'events' or 'whole', got {framing!r}")
        plan.sse_whole = framing == "whole"
        stall_after = _header_int(headers, "x-mock-stall-after", 0, MAX_TOKENS)
        if stall_after is not None:
            plan.stall_after = stall_after
        status = _header_int(headers, "x-mock-status", 400, 599)
        fault = headers.get("x-mock-fault")
        if fault is not None and fault not in FAULTS:
            raise BadHeader(f"x-mock-fault must be one of {sorted(FAULTS)}, got {fault!r}")
        if status is not None or fault is not None:
            plan.status, plan.fault = status, fault
            plan.retry_after = _header_float(headers, "x-mock-retry-after")
            plan.reason = f"mock: injected {status} (x-mock-status)"
            return plan
        return self._key_plan(plan, credential)

    def _key_plan(self, plan: Plan, credential: str | None) -> Plan:
        """Apply ``require_key`` and the credential's :class:`KeyBehaviour` to ``plan``."""
        cfg = self.config
        behaviour = cfg.keys.get(credential) if credential is not None else None
        if cfg.require_key and behaviour is None and credential not in cfg.valid_keys:
            plan.status = 401
            plan.reason = "Incorrect API key provided." if credential else "Missing API key."
            return plan
        if behaviour is not None and (behaviour.status is not None or behaviour.fault is not None):
            assert credential is not None
            hits = self._key_hits.get(credential, 0)
            if behaviour.times is None or hits < behaviour.times:
                self._key_hits[credential] = hits + 1
                plan.status, plan.fault, plan.retry_after = behaviour.status, behaviour.fault, behaviour.retry_after
                plan.reason = f"mock: injected {behaviour.status} for this API key"
        return plan
