"""A relayed response merged into the complete message it is equivalent to.

Where :mod:`~llmproxy.filters.metering.relayed` pulls the text out of what
was relayed (to count it), :func:`merged_response` rebuilds the whole
response object a non-streamed call would have returned, in the client's
protocol: what a trace records as the completion, and what a golden test
can compare.

* ``openai`` stream (chat completion chunks) -> a ``chat.completion``:
  per choice (``index``) the concatenated ``content`` (and
  ``reasoning_content``), the tool calls merged by their ``index`` (``id``,
  ``type`` and ``function.name`` from their first delta, the
  ``function.arguments`` pieces concatenated: parallel tool calls stay
  apart), the ``finish_reason``; ``id``, ``model``, ``created``,
  ``system_fingerprint`` and the last ``usage``;
* ``anthropic`` stream -> a ``message``: ``message_start``'s message with
  its content blocks rebuilt by ``index`` (``text`` from ``text_delta``,
  ``tool_use`` ``input`` parsed from the concatenated ``partial_json``,
  ``thinking`` and its ``signature``), ``stop_reason`` / ``stop_sequence``
  from ``message_delta``, usage merged (later counts replace earlier);
* a JSON body: the body itself.

Linear in the bytes; never raises (malformed events are skipped; a body or
tool input that does not parse is kept as its text). None when nothing
could be rebuilt. Runs off the event loop (the tracing export thread).
"""

from __future__ import annotations

from typing import Any

import orjson

from llmproxy import split_events
from llmproxy.filters.metering.relayed import event_data

__all__ = ["merged_response"]


def _loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _events(chunks: list[bytes]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for raw in split_events(b"".join(chunks)):
        data = event_data(raw)
        if data and data != b"[DONE]":
            obj = _loads(data)
            if isinstance(obj, dict):
                out.append(obj)
    return out


# --- OpenAI ------------------------------------------------------------------------------


class _Choice:
    __slots__ = ("content", "finish_reason", "reasoning", "role", "tools")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def take(self, delta: dict[str, Any]) -> None:
        role = delta.get("role")
        if isinstance(role, str):
            self.role = role
        for key, parts in (
            ("content", self.content),
            ("reasoning_content", self.reasoning),
            ("reasoning", self.reasoning),
        ):
            value = delta.get(key)
            if isinstance(value, str):
                parts.append(value)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    self._tool(call, position)

    def _tool(self, call: dict[str, Any], position: int) -> None:
        index = call.get("index")
        key = index if type(index) is int else position
        merged = self.tools.get(key)
        if merged is None:
            merged = self.tools[key] = {"id": None, "type": "function", "name": None, "arguments": []}
        for field in ("id", "type"):
            value = call.get(field)
            if isinstance(value, str) and value:
                merged[field] = value
        function = call.get("function")
        if isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name:
                merged["name"] = name
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                merged["arguments"].append(arguments)

    def result(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.content) if self.content else None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tools:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": call["type"],
                    "function": {"name": call["name"], "arguments": "".join(call["arguments"])},
                }
                for _, call in sorted(self.tools.items())
            ]
        return {"index": index, "message": message, "finish_reason": self.finish_reason}


def _openai_stream(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not events:
        return None
    out: dict[str, Any] = {"id": None, "object": "chat.completion", "created": None, "model": None}
    choices: dict[int, _Choice] = {}
    for event in events:
        for field in ("id", "created", "model", "system_fingerprint"):
            value = event.get(field)
            if value is not None and out.get(field) is None:
                out[field] = value
        usage = event.get("usage")
        if isinstance(usage, dict):
            out["usage"] = usage
        raw_choices = event.get("choices")
        if not isinstance(raw_choices, list):
            continue
        for position, choice in enumerate(raw_choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            key = index if type(index) is int else position
            merged = choices.get(key)
            if merged is None:
                merged = choices[key] = _Choice()
            delta = choice.get("delta")
            if isinstance(delta, dict):
                merged.take(delta)
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                merged.finish_reason = reason
    out["choices"] = [choice.result(index) for index, choice in sorted(choices.items())]
    return out


# --- Anthropic ---------------------------------------------------------------------------


def _anthropic_stream(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    pieces: dict[int, list[str]] = {}
    usage: dict[str, Any] = {}
    for event in events:
        kind = event.get("type")
        if kind == "message_start":
            start = event.get("message")
            if isinstance(start, dict):
                message = dict(start)
                if isinstance(start.get("usage"), dict):
                    usage.update(start["usage"])
        elif kind == "content_block_start":
            block, index = event.get("content_block"), event.get("index")
            if isinstance(block, dict) and type(index) is int:
                blocks[index] = dict(block)
                pieces[index] = []
        elif kind == "content_block_delta":
            delta, index = event.get("delta"), event.get("index")
            if not isinstance(delta, dict) or type(index) is not int:
                continue
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            dtype = delta.get("type")
            if dtype == "text_delta" and isinstance(delta.get("text"), str):
                block["text"] = block.get("text", "") + delta["text"]
            elif dtype == "input_json_delta" and isinstance(delta.get("partial_json"), str):
                pieces.setdefault(index, []).append(delta["partial_json"])
            elif dtype == "thinking_delta" and isinstance(delta.get("thinking"), str):
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
            elif dtype == "signature_delta" and isinstance(delta.get("signature"), str):
                block["signature"] = block.get("signature", "") + delta["signature"]
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                if message is None:
                    message = {}
                for field in ("stop_reason", "stop_sequence"):
                    if field in delta:
                        message[field] = delta[field]
            if isinstance(event.get("usage"), dict):
                usage.update((k, v) for k, v in event["usage"].items() if v is not None)
    if message is None and not blocks:
        return None
    out: dict[str, Any] = message if message is not None else {"type": "message", "role": "assistant"}
    content: list[dict[str, Any]] = []
    for index, block in sorted(blocks.items()):
        parts = pieces.get(index)
        if block.get("type") in ("tool_use", "server_tool_use") and parts:
            text = "".join(parts)
            parsed = _loads(text)
            block["input"] = parsed if parsed is not None else text
        content.append(block)
    out["content"] = content
    if usage:
        out["usage"] = usage
    return out


_STREAMS = {"openai": _openai_stream, "anthropic": _anthropic_stream}


def merged_response(chunks: list[bytes], protocol: str, is_sse: bool) -> dict[str, Any] | None:
    """The complete response equivalent to the relayed ``chunks``; see the module docstring.

    ``protocol`` is the client's (``"openai"`` or ``"anthropic"``); ``is_sse``
    says the chunks are an event stream (else they are pieces of one JSON body).
    """
    if not is_sse:
        body = _loads(b"".join(chunks))
        return body if isinstance(body, dict) else None
    merge = _STREAMS.get(protocol)
    return merge(_events(chunks)) if merge is not None else None
