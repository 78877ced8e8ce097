"""What was relayed to the client: the completion text, to count when the provider reports no usage.

The metering filter keeps the bytes it relayed for an attempt as a list of
chunks (whole SSE events, or pieces of a JSON body) and, only when the
provider's usage is missing (a stream cut by a client disconnect or an
upstream error, or a provider that sends none), calls
:func:`relayed_output` once at the end of the attempt. It runs in time
linear in the bytes and never raises on bad input.

What is extracted, by the client's protocol:

* ``openai`` stream (chat completion chunks): ``choices[].delta.content``;
  ``delta.reasoning_content`` / ``delta.reasoning`` (OpenAI-compatible
  reasoning); ``delta.tool_calls[].function.name`` and ``.arguments``; the
  legacy completions ``choices[].text``; the last non-null ``usage``;
  complete at ``data: [DONE]``.
* ``openai`` JSON: the same from ``choices[].message`` (and ``.text``).
* ``anthropic`` stream: ``content_block_start`` (a ``tool_use`` block's
  ``name``, any initial ``text``/``thinking``), ``content_block_delta``
  (``text_delta``, ``input_json_delta``, ``thinking_delta``); the usage is
  ``message_start``'s updated by each ``message_delta``'s; complete at
  ``message_stop``.
* ``anthropic`` JSON: ``content[]`` blocks ``text``, ``tool_use`` (``name``
  and the ``input`` as JSON), ``thinking``; ``usage``.

Truncated or malformed data: a JSON body (or an SSE event's data) that does
not parse is scanned leniently for the string values of the keys that hold
text (``content``, ``text`` -> text; ``arguments``, ``partial_json`` ->
tool arguments; ``thinking``, ``reasoning_content``, ``reasoning`` ->
reasoning), the last of which may be cut mid-way; tool names and an
Anthropic ``tool_use`` ``input`` object are not recovered that way. Such an
output is never ``complete``. SSE is framed as the spec allows (LF, CRLF or
CR line ends, multi-line ``data:`` fields, events split across chunks) by
:func:`llmproxy.split_events`; an unterminated last event is read too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from llmproxy import parse_event, split_events

__all__ = ["RelayedOutput", "event_data", "relayed_output"]


@dataclass(slots=True)
class RelayedOutput:
    """The completion the client received; see the module docstring."""

    #: Assistant text.
    text: str = ""
    #: Tool-call names and arguments (OpenAI) / tool_use names and input JSON (Anthropic), concatenated.
    tool_arguments: str = ""
    #: Reasoning / thinking text.
    reasoning: str = ""
    #: A usage object found in the relayed data (None when there was none).
    provider_usage: dict[str, Any] | None = None
    #: The stream reached its end marker, or the JSON body parsed whole.
    complete: bool = False


class _Parts:
    """Accumulates pieces in lists (joined once: linear however many deltas)."""

    __slots__ = ("complete", "reasoning", "text", "tools", "usage")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tools: list[str] = []
        self.reasoning: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.complete = False

    def result(self) -> RelayedOutput:
        return RelayedOutput(
            "".join(self.text), "".join(self.tools), "".join(self.reasoning), self.usage, self.complete
        )


def _add(out: list[str], value: object) -> None:
    if isinstance(value, str) and value:
        out.append(value)


# --- OpenAI ------------------------------------------------------------------------------


def _openai_choice(parts: _Parts, body: dict[str, Any]) -> None:
    """One chat completion chunk's delta, or one JSON choice's message (``body``)."""
    _add(parts.text, body.get("content"))
    _add(parts.reasoning, body.get("reasoning_content"))
    _add(parts.reasoning, body.get("reasoning"))
    calls = body.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                _add(parts.tools, function.get("name"))
                _add(parts.tools, function.get("arguments"))


def _openai(parts: _Parts, obj: dict[str, Any], key: str) -> None:
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            body = choice.get(key)
            if isinstance(body, dict):
                _openai_choice(parts, body)
            _add(parts.text, choice.get("text"))  # legacy completions
    usage = obj.get("usage")
    if isinstance(usage, dict):
        parts.usage = usage


def _openai_event(parts: _Parts, obj: dict[str, Any]) -> None:
    _openai(parts, obj, "delta")


def _openai_json(parts: _Parts, obj: dict[str, Any]) -> None:
    _openai(parts, obj, "message")


# --- Anthropic ---------------------------------------------------------------------------


def _anthropic_event(parts: _Parts, obj: dict[str, Any]) -> None:
    kind = obj.get("type")
    if kind == "content_block_delta":
        delta = obj.get("delta")
        if isinstance(delta, dict):
            dtype = delta.get("type")
            if dtype == "text_delta":
                _add(parts.text, delta.get("text"))
            elif dtype == "input_json_delta":
                _add(parts.tools, delta.get("partial_json"))
            elif dtype == "thinking_delta":
                _add(parts.reasoning, delta.get("thinking"))
    elif kind == "content_block_start":
        block = obj.get("content_block")
        if isinstance(block, dict):
            btype = block.get("type")
            if btype == "tool_use" or btype == "server_tool_use":
                _add(parts.tools, block.get("name"))
            elif btype == "text":
                _add(parts.text, block.get("text"))
            elif btype == "thinking":
                _add(parts.reasoning, block.get("thinking"))
    elif kind == "message_start":
        message = obj.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        if isinstance(usage, dict):
            parts.usage = dict(usage)
    elif kind == "message_delta":
        usage = obj.get("usage")
        if isinstance(usage, dict):
            parts.usage = {**(parts.usage or {}), **usage}
    elif kind == "message_stop":
        parts.complete = True


def _anthropic_json(parts: _Parts, obj: dict[str, Any]) -> None:
    content = obj.get("content")
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            btype = block.get("type")
            if btype == "text":
                _add(parts.text, block.get("text"))
            elif btype == "tool_use" or btype == "server_tool_use":
                _add(parts.tools, block.get("name"))
                if "input" in block:
                    parts.tools.append(orjson.dumps(block["input"]).decode())
            elif btype == "thinking":
                _add(parts.reasoning, block.get("thinking"))
    usage = obj.get("usage")
    if isinstance(usage, dict):
        parts.usage = usage


_EVENT = {"openai": _openai_event, "anthropic": _anthropic_event}
_JSON = {"openai": _openai_json, "anthropic": _anthropic_json}

# --- lenient scan of data that does not parse --------------------------------------------

#: A key that holds text, then its string value: escapes skipped, the closing quote optional
#: (the value may be cut by the truncation). Linear: no nested quantifier can backtrack.
_STRING_FIELD = re.compile(
    r'"(content|text|arguments|partial_json|thinking|reasoning_content|reasoning)"\s*:\s*"'
    r'([^"\\]*(?:\\.[^"\\]*)*)(\\?)'
)
_FIELD_KIND = {
    "content": "text",
    "text": "text",
    "arguments": "tools",
    "partial_json": "tools",
    "thinking": "reasoning",
    "reasoning_content": "reasoning",
    "reasoning": "reasoning",
}
#: A cut escape at the end of a truncated value (``\``, ``\u12``).
_CUT_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{0,3})?$")


def _unescape(raw: str) -> str:
    try:
        value: object = orjson.loads(f'"{raw}"')
    except orjson.JSONDecodeError:
        try:
            value = orjson.loads(f'"{_CUT_ESCAPE.sub("", raw)}"')
        except orjson.JSONDecodeError:
            return raw  # an invalid escape (e.g. a lone surrogate): the raw text counts about the same
    return value if isinstance(value, str) else ""


def _scan(parts: _Parts, data: bytes) -> None:
    """Collect the text-bearing string values of JSON that does not parse."""
    text = data.decode("utf-8", "replace")
    for match in _STRING_FIELD.finditer(text):
        _add(getattr(parts, _FIELD_KIND[match.group(1)]), _unescape(match.group(2)))


# --- entry point -------------------------------------------------------------------------


def _loads(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def event_data(raw: bytes) -> bytes:
    """The ``data`` of one raw event.

    Fast path for the shapes providers send, ``[event: NAME\\n]data: JSON\\n\\n``
    (LF only, one data line); anything else goes through :func:`llmproxy.parse_event`.
    """
    if 13 not in raw and raw.endswith(b"\n\n"):  # no CR (13; an int test is a plain byte scan)
        at = 0
        if raw.startswith(b"event:"):
            at = raw.find(b"\n") + 1
        if raw.startswith(b"data: ", at) and raw.find(b"\n", at) == len(raw) - 2:
            return raw[at + 6 : -2]
    return parse_event(raw).data


def relayed_output(chunks: list[bytes], protocol: Literal["openai", "anthropic"] | str, is_sse: bool) -> RelayedOutput:
    """The text, tool arguments, reasoning and usage in what was relayed; see the module docstring.

    ``chunks`` are the relayed bytes in order (whole SSE events or pieces of a
    JSON body; any split is accepted); ``protocol`` is the client's
    (``"openai"`` or ``"anthropic"``; anything else extracts nothing and
    returns an empty, incomplete output); ``is_sse`` says the response was an
    event stream.
    """
    parts = _Parts()
    on_event = _EVENT.get(protocol)
    on_json = _JSON.get(protocol)
    if on_event is None or on_json is None:
        return parts.result()
    if not is_sse:
        body = b"".join(chunks)
        obj = _loads(body)
        if isinstance(obj, dict):
            on_json(parts, obj)
            parts.complete = True
        else:
            _scan(parts, body)
        return parts.result()
    stream = b"".join(chunks)  # framed in one pass: the split between chunks does not matter
    # an unterminated last event comes last: the client may have read its data lines
    events = split_events(stream)
    done = False
    for raw in events:
        data = event_data(raw)
        if not data:
            continue
        if data == b"[DONE]":
            done = True
            continue
        obj = _loads(data)
        if isinstance(obj, dict):
            on_event(parts, obj)
        else:
            _scan(parts, data)
    if protocol == "openai":
        parts.complete = done
    return parts.result()
