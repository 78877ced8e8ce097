"""What one server-sent event of a provider's stream means to failover.

Failover holds a successful stream (head and events) until the first event
that shows the client content, so a stream that fails or ends before it can
be retried invisibly. :func:`classify` decides that per event, on the parsed
event (name and JSON ``data``), for the three stream protocols:

=================  =====================================================  ==========================
protocol           content (:attr:`Kind.CONTENT`)                         end / error
=================  =====================================================  ==========================
OpenAI chat        ``choices[*].delta`` with a non-empty ``content``,     ``data: [DONE]``;
(and legacy        ``refusal``, ``reasoning_content``, ``reasoning``,     ``data: {"error": ...}``
completions)       ``tool_calls``, ``function_call`` or ``audio``;
                   ``choices[*].text`` non-empty
Anthropic          ``content_block_delta`` with non-empty ``text``,       ``message_stop``;
messages           ``partial_json``, ``thinking``, ``signature`` or a     ``event: error`` /
                   citation; ``content_block_start`` of a tool use        ``"type": "error"``
                   (``tool_use``, ``server_tool_use``, ``mcp_tool_use``),
                   a server tool's result, or a non-empty text/thinking
OpenAI Responses   any ``response.*.delta`` with a non-empty ``delta``    ``response.completed``,
                   (output text, refusal, function-call arguments,        ``response.incomplete``;
                   reasoning, audio ...); ``response.output_item.added``  ``response.failed``,
                   of a tool call (an item type ending in ``_call``)      ``event: error``
=================  =====================================================  ==========================

A role-only first chunk, ``"content": ""``, keep-alives (``ping``,
``response.created``, ``message_start``) and comments are
:attr:`Kind.NOTHING`. A tool-use block start counts as content because it
is the first thing a client sees of a tool call: its SDK reports the tool's
name and id from it, so the stream can no longer be replaced invisibly.

Cost: the event name is read first; ``data`` is parsed with orjson only when
a byte check finds a marker that content, an end or an error must contain
(:data:`_MARKERS`), and only while a stream is held (the filter stops asking
at its first content).
"""

from __future__ import annotations

import enum
import re
from typing import Any

import orjson

from llmproxy import parse_event

__all__ = ["Kind", "classify"]


class Kind(enum.Enum):
    """What an event means for a held stream."""

    #: Nothing the client would see yet (role, empty delta, keep-alive, metadata).
    NOTHING = "nothing"
    #: The first thing the client sees: release the stream.
    CONTENT = "content"
    #: A normal end of the stream.
    END = "end"
    #: The provider reports an error in the stream.
    ERROR = "error"


_END_NAMES = frozenset({b"message_stop", b"response.completed", b"response.incomplete"})
_ERROR_NAMES = frozenset({b"error", b"response.failed"})
#: Bedrock ConverseStream, as the core's event-stream decoder names its events (``event: <eventType>``):
#: a delta or a tool-use start is content, ``messageStop``/``metadata`` the end.
_BEDROCK_CONTENT_NAMES = frozenset({b"contentBlockDelta", b"contentBlockStart"})
_BEDROCK_END_NAMES = frozenset({b"messageStop", b"metadata"})
_END_TYPES = frozenset(name.decode() for name in _END_NAMES)
_ERROR_TYPES = frozenset(name.decode() for name in _ERROR_NAMES)

# Every event that can be content, an end or an error has one of these in its
# data (whatever the whitespace): chat and Anthropic deltas and Responses
# ``*.delta`` types ``delta``; legacy completions ``"text"``; tool-use block
# starts ``_use``, server tool results ``_result``, Responses tool-call items
# ``_call``; error envelopes ``error``; end types ``message_stop`` and
# ``response.``. Anything else (``ping``, ``message_start`` ...) is skipped
# without parsing.
_MARKERS = (b"delta", b'"text"', b"error", b"_use", b"_result", b"_call", b"message_stop", b"response.")
_MARKER_SEARCH = re.compile(b"|".join(re.escape(marker) for marker in _MARKERS)).search

# OpenAI chat ``choices[*].delta`` fields that a client shows.
_CHAT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning", "tool_calls", "function_call", "audio")
# Anthropic ``content_block_delta`` delta fields (text, input_json, thinking, signature, citations).
_BLOCK_DELTA_FIELDS = ("text", "partial_json", "thinking", "signature", "citation")
_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def classify(raw: bytes) -> Kind:
    """Classify one raw SSE event (terminator optional)."""
    event = parse_event(raw)
    name = event.event
    if name is not None:
        if name in _ERROR_NAMES:
            return Kind.ERROR
        if name in _END_NAMES or name in _BEDROCK_END_NAMES:
            return Kind.END
        if name in _BEDROCK_CONTENT_NAMES:
            return Kind.CONTENT
    data = event.data.strip()
    if data == b"[DONE]":
        return Kind.END
    if not data.startswith(b"{") or _MARKER_SEARCH(data) is None:
        return Kind.NOTHING
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Kind.NOTHING
    if not isinstance(payload, dict):
        return Kind.NOTHING
    return _classify_payload(payload)


def _classify_payload(payload: dict[str, Any]) -> Kind:
    if payload.get("error"):  # OpenAI's {"error": {...}}; "error": null is not one
        return Kind.ERROR
    kind = payload.get("type")
    if isinstance(kind, str):
        if kind in _ERROR_TYPES:
            return Kind.ERROR
        if kind in _END_TYPES:
            return Kind.END
        if kind == "content_block_delta":
            return _any_field(payload.get("delta"), _BLOCK_DELTA_FIELDS)
        if kind == "content_block_start":
            return _block_start(payload.get("content_block"))
        if kind.startswith("response."):
            return _responses_event(kind, payload)
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if _any_field(choice.get("delta"), _CHAT_FIELDS) is Kind.CONTENT:
                return Kind.CONTENT
            if _present(choice.get("text")):  # legacy completions
                return Kind.CONTENT
    return Kind.NOTHING


def _present(value: Any) -> bool:
    """A field that shows the client something: not None, not ``""``, ``[]`` or ``{}``."""
    return value is not None and value != "" and value != [] and value != {}


def _any_field(delta: Any, fields: tuple[str, ...]) -> Kind:
    if isinstance(delta, dict):
        for field in fields:
            value = delta.get(field)
            if value is not None and value != "" and value != [] and value != {}:  # _present, inlined
                return Kind.CONTENT
    return Kind.NOTHING


def _block_start(block: Any) -> Kind:
    if not isinstance(block, dict):
        return Kind.NOTHING
    kind = block.get("type")
    if isinstance(kind, str) and (kind in _TOOL_BLOCKS or kind.endswith("_tool_result")):
        return Kind.CONTENT
    return _any_field(block, ("text", "thinking"))


def _responses_event(kind: str, payload: dict[str, Any]) -> Kind:
    if kind.endswith(".delta"):
        return Kind.CONTENT if _present(payload.get("delta")) else Kind.NOTHING
    if kind == "response.output_item.added":
        item = payload.get("item")
        if isinstance(item, dict) and str(item.get("type", "")).endswith("_call"):
            return Kind.CONTENT
    return Kind.NOTHING
