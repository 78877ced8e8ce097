"""Ending a stream cleanly when a hard budget's allowance is used up mid-flight.

A stream admitted under a hard budget gets an output *allowance* (the
tokens its reservation granted beyond the prompt). :class:`StreamCap`
counts the output of each SSE event as it is relayed (the text, reasoning
and tool-call arguments of the event, with metering's tokenizer) and, at
the first event that would take the count past the allowance, drops that
event and everything after it and puts the protocol's own ending in its
place, so both SDKs see a normal end:

* OpenAI chat: a chunk with ``finish_reason: "length"``, a usage chunk
  (``choices: []``) and ``data: [DONE]``;
* Anthropic messages: ``content_block_stop`` for an open block,
  ``message_delta`` with ``stop_reason: "max_tokens"`` and the usage, and
  ``message_stop``.

Counting is lazy, so a stream far from its allowance costs no parsing: a
token is at least one byte of the event that carries it (tiktoken's
encodings are byte-level; JSON escapes only lengthen text), so events are
only kept aside (references, no copies) while the tokens counted so far plus
the bytes kept aside fit in the allowance; they are parsed and counted when
the next event would not fit (or too much is kept aside), and that event is
then counted exactly. The count is the same as counting every event, and
what is kept aside can never cross the allowance.

The filter sits after routing in the chain, so on the response side it sees
the *provider's* protocol: the ending is written in it and routing
translates it (and reads its usage) like any provider event.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmproxy import parse_event, split_events
from llmproxy.filters.metering.tokenizer import text_counter

__all__ = ["StreamCap"]

#: Bytes of events kept aside uncounted at most (then they are counted, in one go).
_PENDING_BYTES = 65536


def _openai_text(obj: dict[str, Any]) -> str:
    choices = obj.get("choices")
    if type(choices) is list and len(choices) == 1:  # the common chunk: one choice, text only
        delta = choices[0].get("delta") if type(choices[0]) is dict else None
        if type(delta) is dict and "tool_calls" not in delta and "reasoning_content" not in delta:
            content = delta.get("content")
            if "reasoning" not in delta:
                return content if type(content) is str else ""
    out: list[str] = []
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            continue
        for key in ("content", "reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str):
                out.append(value)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                out += [v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str)]
    return "".join(out)


def _anthropic_text(obj: dict[str, Any]) -> str:
    if obj.get("type") != "content_block_delta":
        return ""
    delta = obj.get("delta") or {}
    if not isinstance(delta, dict):
        return ""
    for key in ("text", "partial_json", "thinking"):
        value = delta.get(key)
        if isinstance(value, str):
            return value
    return ""


class StreamCap:
    """One stream's output allowance (see the module docstring)."""

    __slots__ = (
        "allowance",
        "count",
        "cut",
        "id",
        "input_tokens",
        "model",
        "open_block",
        "pending",
        "pending_bytes",
        "protocol",
        "upstream_model",
        "used",
    )

    def __init__(self, protocol: str, model: str, allowance: int, input_tokens: int) -> None:
        self.protocol = protocol
        self.model = model
        self.count = text_counter(model)
        self.allowance = allowance
        self.input_tokens = input_tokens
        self.used = 0
        self.cut = False
        self.id = ""
        self.upstream_model = model
        #: Anthropic: the index of the content block that is open (-1: none).
        self.open_block = -1
        #: Events relayed but not counted yet, and their size: ``used + pending_bytes`` never
        #: exceeds the allowance (see the module docstring).
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def feed(self, event: bytes) -> bytes | None:
        """One whole SSE event: None to pass it on, or the bytes to send instead (the ending)."""
        if self.cut:
            return b""
        if self._keep_aside(event):
            return None
        self._flush()
        return self._count(event)

    def feed_batch(self, data: bytes) -> bytes | None:
        """One or more whole SSE events (a read's worth): None to pass them on as they are, or
        the bytes to send instead (the events before the cut, then the ending)."""
        if self.cut:
            return b""
        if self._keep_aside(data):
            return None
        self._flush()
        events = split_events(data)
        for i, event in enumerate(events):
            replaced = self.feed(event)
            if replaced is not None:
                return b"".join(events[:i]) + replaced
        return None

    def _keep_aside(self, data: bytes) -> bool:
        """Keep ``data`` (whole events) uncounted if it cannot cross the allowance even at one
        token per byte; False when it must be counted now."""
        pending = self.pending_bytes + len(data)
        if self.used + pending <= self.allowance and pending <= _PENDING_BYTES:
            self.pending.append(data)
            self.pending_bytes = pending
            return True
        return False

    def _flush(self) -> None:
        """Count what was kept aside (never cuts: it fits even at one token per byte)."""
        for earlier in self.pending:
            for event in split_events(earlier):
                self._count(event)
        self.pending = []
        self.pending_bytes = 0

    def _count(self, event: bytes) -> bytes | None:
        """Count one event exactly: None to pass it on, or the ending that replaces it."""
        if event.startswith(b"data: {") and event.find(b"\n") == len(event) - 2 and 13 not in event:
            data = event[6:-2]  # one LF-ended data line, the usual OpenAI chunk
        else:
            data = parse_event(event).data
        if not data.startswith(b"{"):
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        if self.protocol == "anthropic":
            kind = obj.get("type")
            if kind == "message_start":
                message = obj.get("message") or {}
                if isinstance(message, dict):
                    self.id = str(message.get("id") or "")
                    self.upstream_model = str(message.get("model") or self.model)
            elif kind == "content_block_start":
                self.open_block = int(obj.get("index") or 0)
            elif kind == "content_block_stop":
                self.open_block = -1
            text = _anthropic_text(obj)
        else:
            if not self.id:  # every chunk repeats them: the first that has them is enough
                self.id = str(obj.get("id") or "")
                self.upstream_model = str(obj.get("model") or self.upstream_model)
            text = _openai_text(obj)
        if not text:
            return None
        tokens = self.count(text)
        if self.used + tokens <= self.allowance:
            self.used += tokens
            return None
        self.cut = True
        return self.ending()

    def ending(self) -> bytes:
        """The protocol's ending events, with the usage relayed so far."""
        if self.protocol == "anthropic":
            out = b""
            if self.open_block >= 0:
                out += b"event: content_block_stop\ndata: " + orjson.dumps(
                    {"type": "content_block_stop", "index": self.open_block}
                )
                out += b"\n\n"
            delta = {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                "usage": {"output_tokens": self.used},
            }
            out += b"event: message_delta\ndata: " + orjson.dumps(delta) + b"\n\n"
            out += b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
            return out
        base = {"id": self.id or "chatcmpl-llmproxy", "object": "chat.completion.chunk", "created": 0}
        base["model"] = self.upstream_model
        finish = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        usage = {
            **base,
            "choices": [],
            "usage": {
                "prompt_tokens": self.input_tokens,
                "completion_tokens": self.used,
                "total_tokens": self.input_tokens + self.used,
            },
        }
        return b"data: " + orjson.dumps(finish) + b"\n\ndata: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"
