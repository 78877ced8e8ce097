"""Rewriting a response stream's events so no flagged span is ever emitted.

A :class:`StreamGuard` takes the client-protocol events of one stream (the
guardrails filter sits before routing, so translated events reach it) and
routes each text delta into its channel's :class:`~.scanner.StreamScanner`:

=============  ==============================================  ===========================
API            text deltas (channel)                           channel ends at
=============  ==============================================  ===========================
chat           ``choices[i].delta.content`` (i),               ``finish_reason`` of choice i
               ``...tool_calls[j].function.arguments`` (i, j)
completions    ``choices[i].text`` (i)                         ``finish_reason`` of choice i
messages       ``content_block_delta`` ``text_delta.text``,    ``content_block_stop``
               ``input_json_delta.partial_json``,
               ``thinking_delta.thinking`` (block index)
responses      ``response.output_text.delta`` (item, part),    ``.done`` of that text or
               ``response.function_call_arguments.delta``      arguments
=============  ==============================================  ===========================

Each delta event is passed on with the text its scanner released (possibly
empty), so the event sequence is unchanged; when a channel ends, its held
rest goes out in one more delta event of the same shape, just before the
event that ends it. Events that repeat the whole text (Responses ``.done``
events, ``response.completed``) carry the whole text's redaction, which
equals what was streamed. Other events pass through untouched. A ``block``
span raises :class:`~.scanner.Blocked`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from llmproxy import format_event, parse_event
from llmproxy.filters.guardrails.rules import RuleSet
from llmproxy.filters.guardrails.scanner import Blocked, StreamScanner
from llmproxy.filters.guardrails.texts import fix_output_item

__all__ = ["StreamGuard"]

_MESSAGE_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


def _fields(raw: bytes) -> tuple[bytes | None, bytes]:
    """``raw``'s event name and data, as :func:`parse_event` reads them; the shapes every provider
    sends (one ``data:`` line, after one ``event:`` line or not) are sliced without splitting lines."""
    end = len(raw) - 2
    if raw.endswith(b"\n\n") and b"\r" not in raw:
        if raw.startswith(b"data: "):
            if raw.find(b"\n", 6) == end:
                return None, raw[6:end]
        elif raw.startswith(b"event: "):
            line = raw.find(b"\n", 7)
            if raw.startswith(b"data: ", line + 1) and raw.find(b"\n", line + 7) == end:
                return raw[7:line], raw[line + 7 : end]
    event = parse_event(raw)
    return event.event, event.data


class _Channel:
    __slots__ = ("scanner", "template")

    def __init__(self, scanner: StreamScanner) -> None:
        self.scanner = scanner
        #: How to emit a flush: (event name, payload builder args), set per API.
        self.template: Any = None


class StreamGuard:
    """One response stream's channels (see the module docstring)."""

    __slots__ = ("_channels", "_handle", "api", "rules", "window")

    def __init__(self, rules: RuleSet, window: int, api: str) -> None:
        self.rules = rules
        self.window = window
        self.api = api
        self._channels: dict[tuple[Any, ...], _Channel] = {}
        #: The API's event handler (a plain function: no bound method kept on ``self``).
        self._handle: Callable[[StreamGuard, bytes, bytes | None, dict[str, Any], list[bytes]], None] = getattr(
            StreamGuard, "_" + api
        )

    def scanners(self) -> list[StreamScanner]:
        """Every channel's scanner (hits, held characters, waits)."""
        return [c.scanner for c in self._channels.values()]

    def _feed(self, key: tuple[Any, ...], text: str, template: Any) -> str:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = _Channel(StreamScanner(self.rules, self.window))
        channel.template = template
        return channel.scanner.feed(text)

    def _flush(self, key: tuple[Any, ...]) -> tuple[str, Any]:
        channel = self._channels.get(key)
        if channel is None:
            return "", None
        return channel.scanner.finish(), channel.template

    def feed(self, raw_events: list[bytes]) -> bytes:
        """The events to send for ``raw_events`` (whole events). Raises :class:`Blocked`."""
        out: list[bytes] = []
        handle = self._handle
        for raw in raw_events:
            name, data = _fields(raw)
            if not data or data[:1] != b"{":
                if data == b"[DONE]":
                    out.extend(self._flush_all())
                out.append(raw)
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                out.append(raw)
                continue
            if not isinstance(obj, dict):
                out.append(raw)
                continue
            handle(self, raw, name, obj, out)
        return out[0] if len(out) == 1 else b"".join(out)

    def finish(self) -> bytes:
        """Flush every channel still open (a stream that ended without closing them)."""
        return b"".join(self._flush_all())

    def _flush_all(self) -> list[bytes]:
        out: list[bytes] = []
        for key in list(self._channels):
            self._emit_flush(key, out)
        return out

    def _emit_flush(self, key: tuple[Any, ...], out: list[bytes]) -> None:
        tail, template = self._flush(key)
        if not tail:
            return
        api = self.api
        if api in ("chat", "completions"):
            obj, index = template
            envelope = {k: v for k, v in obj.items() if k not in ("choices", "usage")}
            if key[0] == "t":
                delta: dict[str, Any] = {"tool_calls": [{"index": key[2], "function": {"arguments": tail}}]}
            else:
                delta = {"content": tail}
            choice: dict[str, Any] = {"index": index, "finish_reason": None}
            if api == "chat":
                choice["delta"] = delta
            else:
                choice["text"] = tail
            out.append(format_event(orjson.dumps({**envelope, "choices": [choice]})))
        elif api == "messages":
            kind, index = template
            payload = {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": kind, _MESSAGE_FIELDS[kind]: tail},
            }
            out.append(format_event(orjson.dumps(payload), b"content_block_delta"))
        else:
            name, obj = template
            out.append(format_event(orjson.dumps({**obj, "delta": tail}), name))

    # -- per API -----------------------------------------------------------------------
    def _chat(self, raw: bytes, name: bytes | None, obj: dict[str, Any], out: list[bytes]) -> None:
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            out.append(raw)
            return
        field = "content" if self.api == "chat" else "text"
        if len(choices) == 1:  # most chunks: one choice's text, its channel open (what the loop below does)
            choice = choices[0]
            if isinstance(choice, dict) and not choice.get("finish_reason"):
                delta = choice.get("delta") if self.api == "chat" else choice
                if isinstance(delta, dict) and "tool_calls" not in delta:
                    text = delta.get(field)
                    if isinstance(text, str) and text:
                        index = choice.get("index", 0)
                        delta[field] = self._feed(("c", index), text, (obj, index))
                        out.append(format_event(orjson.dumps(obj), name))
                        return
        #: channel -> (mapping, key) where this event carried its text
        fed: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
        ends: list[Any] = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta") if self.api == "chat" else choice
            if isinstance(delta, dict):
                text = delta.get(field)
                if isinstance(text, str) and text:
                    key: tuple[Any, ...] = ("c", index)
                    delta[field] = self._feed(key, text, (obj, index))
                    fed[key] = (delta, field)
                for call in delta.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    args = fn.get("arguments") if isinstance(fn, dict) else None
                    if isinstance(fn, dict) and isinstance(args, str) and args:
                        key = ("t", index, call.get("index", 0))
                        fn["arguments"] = self._feed(key, args, (obj, index))
                        fed[key] = (fn, "arguments")
            if choice.get("finish_reason"):
                ends.append(index)
        for key in [k for k in self._channels if k[1] in ends] if ends else ():
            where = fed.get(key)
            if where is None:
                self._emit_flush(key, out)
            else:
                tail, _ = self._flush(key)
                where[0][where[1]] += tail
        out.append(format_event(orjson.dumps(obj), name) if fed else raw)

    _completions = _chat

    def _messages(self, raw: bytes, name: bytes | None, obj: dict[str, Any], out: list[bytes]) -> None:
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            field = _MESSAGE_FIELDS.get(delta.get("type", "")) if isinstance(delta, dict) else None
            if field is not None and isinstance(delta, dict) and isinstance(delta.get(field), str):
                index = obj.get("index", 0)
                delta[field] = self._feed(("b", index), delta[field], (delta["type"], index))
                out.append(format_event(orjson.dumps(obj), name))
                return
        elif kind == "content_block_stop":
            self._emit_flush(("b", obj.get("index", 0)), out)
        elif kind == "message_stop":
            out.extend(self._flush_all())
        out.append(raw)

    def _responses(self, raw: bytes, name: bytes | None, obj: dict[str, Any], out: list[bytes]) -> None:
        kind = obj.get("type")
        if kind == "response.output_text.delta" or kind == "response.function_call_arguments.delta":
            text = obj.get("delta")
            if isinstance(text, str) and text:
                key = ("r", kind, obj.get("output_index", 0), obj.get("content_index", 0))
                obj["delta"] = self._feed(key, text, (name, obj))
                out.append(format_event(orjson.dumps(obj), name))
                return
            out.append(raw)
            return
        changed = False
        if kind == "response.output_text.done" or kind == "response.function_call_arguments.done":
            delta_kind = kind[: -len("done")] + "delta"
            self._emit_flush(("r", delta_kind, obj.get("output_index", 0), obj.get("content_index", 0)), out)
            field = "text" if kind == "response.output_text.done" else "arguments"
            if isinstance(obj.get(field), str):
                new = self._whole(obj[field])
                changed = new is not obj[field]
                obj[field] = new
        elif kind == "response.content_part.done":
            part = obj.get("part")
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                new = self._whole(part["text"])
                changed = new is not part["text"]
                part["text"] = new
        elif kind == "response.output_item.done":
            changed = fix_output_item(obj.get("item"), self._whole)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            out.extend(self._flush_all())
            response = obj.get("response")
            if isinstance(response, dict):
                for item in response.get("output") or ():
                    changed |= fix_output_item(item, self._whole)
        out.append(format_event(orjson.dumps(obj), name) if changed else raw)

    def _whole(self, text: str) -> str:
        """A whole text repeated at the end: its redaction (its spans were counted when streamed)."""
        new, spans = self.rules.apply(text)
        for span in spans:
            rule = self.rules.rules[span.rule]
            if rule.action == "block":
                raise Blocked(rule.name)
        return new if spans and new != text else text
