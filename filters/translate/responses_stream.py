"""The Responses event stream of a Chat Completions stream (and, chained, of an Anthropic one).

* :class:`ChatStreamToResponsesStream` — one Chat Completions chunk stream to
  one Responses event stream (``response.created``, ``response.in_progress``,
  ``response.output_item.added``, ``response.content_part.added``,
  ``response.output_text.delta``, ``response.function_call_arguments.delta``,
  the ``.done`` events, ``response.completed`` with usage;
  ``response.incomplete`` when cut by ``max_output_tokens``; ``error`` then
  ``response.failed`` when the provider's stream reports an error);
* :class:`ChainedStream` — two translators in a row (Anthropic -> Chat ->
  Responses).

The item mapping is :mod:`~llmproxy.filters.translate.responses`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from llmproxy.filters.translate._json import dumps_str, loads_object
from llmproxy.filters.translate.errors import TranslationError
from llmproxy.filters.translate.responses import (
    finish_status,
    message_item,
    new_item_id,
    reasoning_item,
    reasoning_text,
    response_skeleton,
    responses_usage,
)

__all__ = ["ChainedStream", "ChatStreamToResponsesStream", "EventTranslator"]

JsonObject = dict[str, Any]


class EventTranslator(Protocol):
    """What the routing filter drives: ``feed`` per upstream event, ``finish`` at the end."""

    def feed(self, event: bytes | None, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _ToolCall:
    __slots__ = ("args", "call_id", "item_id", "name", "output_index", "prefix")

    def __init__(self, output_index: int, call_id: str, name: str) -> None:
        self.output_index = output_index
        self.item_id = new_item_id("fc_")
        self.call_id = call_id
        self.name = name
        self.args: list[str] = []
        self.prefix = b""


_TEXT_DELTA = b"event: response.output_text.delta\ndata: "
_ARGS_DELTA = b"event: response.function_call_arguments.delta\ndata: "
_REFUSAL_DELTA = b"event: response.refusal.delta\ndata: "
_SUMMARY_DELTA = b"event: response.reasoning_summary_text.delta\ndata: "


class ChatStreamToResponsesStream:
    """Translate one Chat Completions stream into a Responses event stream.

    One instance per response. :meth:`feed` takes each upstream SSE event
    (name or None, ``data:`` bytes) and returns framed ``event: ...\\ndata:
    ...\\n\\n`` bytes (possibly empty); :meth:`finish` ends the stream
    (``response.completed``/``incomplete``, or ``response.failed`` when the
    upstream ended before a ``finish_reason``). After the end,
    :attr:`response` is the final ``response`` object (for storage) and
    :attr:`failed` says whether it failed.

    Items: reasoning deltas open a ``reasoning`` item (one summary part),
    content deltas a ``message`` item (one ``output_text`` part), each new
    tool-call index a ``function_call`` item; an item is closed (its
    ``.done`` events) when an item of another kind opens or the stream ends;
    function-call items stay open until then, so interleaved argument
    fragments of parallel calls each reach their own item.
    """

    __slots__ = (
        "_calls",
        "_finish_reason",
        "_kind",
        "_last_call",
        "_msg_id",
        "_msg_index",
        "_output",
        "_parts",
        "_rs_id",
        "_seq",
        "_skeleton",
        "_started",
        "_summary_prefix",
        "_text_prefix",
        "_thinking",
        "_unindexed",
        "_usage",
        "failed",
        "response",
    )

    def __init__(self, *, request: JsonObject, response_id: str, model: str) -> None:
        self._skeleton = response_skeleton(request, response_id=response_id, model=model, created_at=int(time.time()))
        self._seq = 0
        self._started = False
        self._output: list[JsonObject] = []
        #: The open non-tool item: "", "reasoning" or "message", and its text so far.
        self._kind = ""
        self._parts: list[str] = []
        self._msg_id = ""
        self._msg_index = 0
        self._rs_id = ""
        self._text_prefix = b""
        self._summary_prefix = b""
        #: Thinking blocks (``thinking_blocks`` deltas) of the open reasoning item.
        self._thinking: list[JsonObject] = []
        #: Open function-call items by the chat tool-call index.
        self._calls: dict[int, _ToolCall] = {}
        self._last_call: _ToolCall | None = None
        #: The index given to tool-call deltas that carry none (negative: never a real index).
        self._unindexed = -(1 << 20)
        self._finish_reason: str | None = None
        self._usage: object = None
        self.response: JsonObject | None = None
        self.failed = False

    # -- framing ----------------------------------------------------------------
    def _event(self, kind: str, payload: JsonObject) -> bytes:
        payload["type"] = kind
        payload["sequence_number"] = self._seq
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _delta(self, head: bytes, prefix: bytes, text: str) -> bytes:
        """A delta event from its precomputed head and JSON prefix: only the text is serialised."""
        seq = self._seq
        self._seq = seq + 1
        return head + prefix + dumps_str(text) + b',"sequence_number":' + str(seq).encode() + b"}\n\n"

    def _start(self) -> bytes:
        self._started = True
        response = dict(self._skeleton)
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    # -- items ------------------------------------------------------------------
    def _close_text(self) -> bytes:
        kind = self._kind
        if not kind:
            return b""
        self._kind = ""
        text = "".join(self._parts)
        self._parts = []
        index = self._msg_index
        if kind == "refusal":
            part = {"type": "refusal", "refusal": text}
            item = {**message_item("", item_id=self._msg_id), "content": [part]}
            out = self._event(
                "response.refusal.done",
                {"item_id": self._msg_id, "output_index": index, "content_index": 0, "refusal": text},
            ) + self._event(
                "response.content_part.done",
                {"item_id": self._msg_id, "output_index": index, "content_index": 0, "part": part},
            )
        elif kind == "message":
            item = message_item(text, item_id=self._msg_id)
            part = item["content"][0]
            out = self._event(
                "response.output_text.done",
                {"item_id": self._msg_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []},
            ) + self._event(
                "response.content_part.done",
                {"item_id": self._msg_id, "output_index": index, "content_index": 0, "part": part},
            )
        else:
            item = reasoning_item(text, thinking=self._thinking)
            item["id"] = self._rs_id
            self._thinking = []
            part = {"type": "summary_text", "text": text}
            out = b""
            if text:
                out = self._event(
                    "response.reasoning_summary_text.done",
                    {"item_id": self._rs_id, "output_index": index, "summary_index": 0, "text": text},
                ) + self._event(
                    "response.reasoning_summary_part.done",
                    {"item_id": self._rs_id, "output_index": index, "summary_index": 0, "part": part},
                )
        self._output[index] = item
        return out + self._event("response.output_item.done", {"output_index": index, "item": item})

    def _close_calls(self) -> bytes:
        out = b""
        for call in self._calls.values():
            arguments = "".join(call.args)
            item = {
                "id": call.item_id,
                "type": "function_call",
                "status": "completed",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": arguments,
            }
            self._output[call.output_index] = item
            out += self._event(
                "response.function_call_arguments.done",
                {"item_id": call.item_id, "output_index": call.output_index, "arguments": arguments},
            ) + self._event("response.output_item.done", {"output_index": call.output_index, "item": item})
        self._calls = {}
        return out

    def _open_text(self, kind: str) -> bytes:
        out = self._close_text() + self._close_calls()
        self._kind = kind
        index = self._msg_index = len(self._output)
        if kind in ("message", "refusal"):
            self._msg_id = item_id = new_item_id("msg_")
            item: JsonObject = {
                "id": item_id,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._output.append(item)
            refusal = kind == "refusal"
            self._text_prefix = (
                (
                    b'{"type":"response.refusal.delta","item_id":"'
                    if refusal
                    else b'{"type":"response.output_text.delta","item_id":"'
                )
                + item_id.encode()
                + b'","output_index":'
                + str(index).encode()
                + (b',"content_index":0,"delta":' if refusal else b',"content_index":0,"logprobs":[],"delta":')
            )
            part: JsonObject = (
                {"type": "refusal", "refusal": ""}
                if refusal
                else {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            )
            return (
                out
                + self._event("response.output_item.added", {"output_index": index, "item": item})
                + self._event(
                    "response.content_part.added",
                    {"item_id": item_id, "output_index": index, "content_index": 0, "part": part},
                )
            )
        self._rs_id = item_id = new_item_id("rs_")
        item = {"id": item_id, "type": "reasoning", "summary": [], "status": "in_progress"}
        self._output.append(item)
        self._summary_prefix = (
            b'{"type":"response.reasoning_summary_text.delta","item_id":"'
            + item_id.encode()
            + b'","output_index":'
            + str(index).encode()
            + b',"summary_index":0,"delta":'
        )
        return out + self._event("response.output_item.added", {"output_index": index, "item": item})

    def _summary_part(self) -> bytes:
        """``response.reasoning_summary_part.added``, before the first summary text of the open item."""
        return self._event(
            "response.reasoning_summary_part.added",
            {
                "item_id": self._rs_id,
                "output_index": self._msg_index,
                "summary_index": 0,
                "part": {"type": "summary_text", "text": ""},
            },
        )

    def _open_call(self, index: int, delta: JsonObject) -> bytes:
        out = self._close_text()
        function = delta.get("function") or {}
        call = _ToolCall(
            len(self._output), str(delta.get("id") or new_item_id("call_")), str(function.get("name") or "")
        )
        call.prefix = (
            b'{"type":"response.function_call_arguments.delta","item_id":"'
            + call.item_id.encode()
            + b'","output_index":'
            + str(call.output_index).encode()
            + b',"delta":'
        )
        self._calls[index] = call
        item = {
            "id": call.item_id,
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": "",
        }
        self._output.append(item)
        return out + self._event("response.output_item.added", {"output_index": call.output_index, "item": item})

    # -- feeding ----------------------------------------------------------------
    def feed(self, event: bytes | None, data: bytes) -> bytes:
        """Translate one upstream Chat Completions event; ``b""`` when it gives nothing.

        Raises :class:`TranslationError` when ``data`` is not a JSON object.
        """
        if self.response is not None or not data:
            return b""
        if data == b"[DONE]":
            return self.finish()
        return self.feed_payload(loads_object(data, "Chat Completions stream event data"))

    def feed_payload(self, chunk: JsonObject) -> bytes:
        """:meth:`feed` for an already parsed chunk."""
        if self.response is not None:
            return b""
        out = b"" if self._started else self._start()
        try:
            error = chunk.get("error")
            if error is not None:
                return out + self._fail(error if isinstance(error, dict) else {"message": str(error)})
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self._usage = usage
            choices = chunk.get("choices")
            if not choices:
                return out
            choice = choices[0]
            delta = choice.get("delta") or {}
            reasoning = reasoning_text(delta)
            if reasoning is not None:
                if self._kind != "reasoning":
                    out += self._open_text("reasoning")
                if not self._parts:
                    out += self._summary_part()
                self._parts.append(reasoning)
                out += self._delta(_SUMMARY_DELTA, self._summary_prefix, reasoning)
            thinking = delta.get("thinking_blocks")
            if thinking:
                if self._kind != "reasoning":
                    out += self._open_text("reasoning")
                # without the stream's ``index`` (see MessagesStreamToChatStream): the blocks as Anthropic sent them
                self._thinking.extend(
                    {k: v for k, v in b.items() if k != "index"} for b in thinking if isinstance(b, dict)
                )
            content = delta.get("content")
            if content:
                if self._kind != "message":
                    out += self._open_text("message")
                self._parts.append(content)
                out += self._delta(_TEXT_DELTA, self._text_prefix, content)
            refusal = delta.get("refusal")
            if refusal and isinstance(refusal, str):
                if self._kind != "refusal":
                    out += self._open_text("refusal")
                self._parts.append(refusal)
                out += self._delta(_REFUSAL_DELTA, self._text_prefix, refusal)
            for tc in delta.get("tool_calls") or ():
                index = tc.get("index")
                if type(index) is not int:
                    # some servers omit the index: a call with a new id is a new call, else the latest
                    fresh = tc.get("id") and (self._last_call is None or self._last_call.call_id != tc["id"])
                    index = self._unindexed = self._unindexed + 1 if fresh else self._unindexed
                call = self._calls.get(index)
                if call is None:
                    out += self._open_call(index, tc)
                    call = self._calls[index]
                self._last_call = call
                fragment = (tc.get("function") or {}).get("arguments")
                if fragment:
                    call.args.append(fragment)
                    out += self._delta(_ARGS_DELTA, call.prefix, fragment)
            reason = choice.get("finish_reason")
            if reason:
                self._finish_reason = reason
            return out
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise TranslationError(f"unexpected Chat Completions chunk shape: {exc!r}") from exc

    def finish(self) -> bytes:
        """End the stream (idempotent): close the open items, then ``response.completed`` (or
        ``response.incomplete``); ``response.failed`` when no ``finish_reason`` came."""
        if self.response is not None:
            return b""
        out = b"" if self._started else self._start()
        if self._finish_reason is None:
            return out + self._fail({"code": "server_error", "message": "the provider's stream ended early"})
        out += self._close_text() + self._close_calls()
        status, incomplete = finish_status(self._finish_reason)
        response = dict(self._skeleton)
        response["status"] = status
        response["incomplete_details"] = incomplete
        response["output"] = self._output
        response["usage"] = responses_usage(self._usage)
        self.response = response
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, {"response": response})

    def _fail(self, error: JsonObject) -> bytes:
        code = error.get("code") or error.get("type") or "server_error"
        message = error.get("message") or "the provider reported an error"
        response = dict(self._skeleton)
        response["status"] = "failed"
        response["error"] = {"code": str(code), "message": str(message)}
        response["output"] = [item for item in self._output if item.get("status") != "in_progress"]
        response["usage"] = responses_usage(self._usage) if self._usage is not None else None
        self.response = response
        self.failed = True
        return self._event(
            "error", {"code": str(code), "message": str(message), "param": error.get("param")}
        ) + self._event("response.failed", {"response": response})


class ChainedStream:
    """Two stream translators in a row: ``first``'s output events feed ``second``.

    ``first`` must frame its output as ``data: ...\\n\\n`` events without
    ``event:`` lines (as :class:`~llmproxy.filters.translate.MessagesStreamToChatStream`
    does, and every codec's stream decoder), so the events are cut without a general SSE
    parser. :attr:`last` is ``second`` (a :class:`ChatStreamToResponsesStream` for its final
    ``response``, or a :class:`~llmproxy.filters.translate.ChatStreamToMessagesStream`).
    """

    __slots__ = ("_feed", "first", "last")

    def __init__(self, first: EventTranslator, second: EventTranslator) -> None:
        self.first = first
        self.last = second
        self._feed: Callable[[bytes | None, bytes], bytes] = second.feed

    def _relay(self, framed: bytes) -> bytes:
        if not framed:
            return b""
        out = b""
        for raw in framed.split(b"\n\n"):
            if raw.startswith(b"data: "):
                out += self._feed(None, raw[6:])
        return out

    def feed(self, event: bytes | None, data: bytes) -> bytes:
        """Feed one upstream event through both translators."""
        return self._relay(self.first.feed(event, data))

    def finish(self) -> bytes:
        """End both translators (idempotent)."""
        return self._relay(self.first.finish()) + self.last.finish()
