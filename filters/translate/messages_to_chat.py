"""Clients speak Anthropic Messages, the provider is OpenAI-compatible (Chat Completions).

Three pure translations, no I/O:

* :func:`messages_request_to_chat` — a ``/v1/messages`` request body to a
  ``/v1/chat/completions`` body;
* :func:`chat_response_to_messages` — a ``chat.completion`` to a Message;
* :class:`ChatStreamToMessagesStream` — one ``chat.completion.chunk`` stream
  to one Anthropic SSE stream, event by event.

Request fields with no Chat Completions equivalent are dropped: ``top_k``,
``thinking``, ``service_tier``, ``container``, ``mcp_servers``,
``context_management``, every ``cache_control`` (OpenAI caches on its own),
``citations``, a tool result's ``is_error``, ``metadata`` other than
``user_id``. Server tools (``web_search_*``, ``bash_*``, ``text_editor_*``
and every other tool with a versioned ``type``) run at Anthropic: they are
refused with a 400 naming ``tools[i].type``. Thinking blocks in the
history are dropped. Content the provider cannot take (documents
other than base64 PDF or plain text, unknown block types) raises
:class:`~llmproxy.filters.translate.errors.TranslationError`.

Mapped: ``metadata.user_id`` to ``user``, ``stop_sequences`` to ``stop``,
images (base64 and URL sources) to ``image_url`` parts, base64 PDF documents
to ``file`` parts (``title`` as ``filename``), plain-text documents to text;
a ``stop_sequences``, ``metadata`` or ``metadata.user_id`` of the wrong type
is a :class:`~llmproxy.filters.translate.errors.TranslationError` naming it.

Text joins: several system blocks are joined with ``"\\n"`` into one system
message; several text blocks of one tool result are joined with ``"\\n"``; an
assistant turn's text blocks are joined with nothing (they are one output).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from llmproxy.filters.translate._json import dumps_str, loads_object
from llmproxy.filters.translate.errors import TranslationError, anthropic_envelope_from_openai

__all__ = [
    "ChatStreamToMessagesStream",
    "chat_response_to_messages",
    "messages_request_to_chat",
]

JsonObject = dict[str, Any]

# ---------------------------------------------------------------------------
# Request: messages -> chat.completions
# ---------------------------------------------------------------------------


def _image_part(source: object, param: str) -> JsonObject:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        assert isinstance(source, dict)
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url":
        assert isinstance(source, dict)
        url = str(source.get("url"))
    else:
        raise TranslationError(f"unsupported image source type {kind!r}", param=param)
    return {"type": "image_url", "image_url": {"url": url}}


def _document_part(block: JsonObject, param: str) -> JsonObject:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if isinstance(source, dict) and kind == "base64" and source.get("media_type") == "application/pdf":
        file: JsonObject = {"file_data": f"data:application/pdf;base64,{source.get('data')}"}
        file["filename"] = block.get("title") or "document.pdf"
        return {"type": "file", "file": file}
    if isinstance(source, dict) and kind == "text":
        return {"type": "text", "text": str(source.get("data", ""))}
    raise TranslationError("only base64 PDF and plain-text documents are supported", param=param)


def _user_part(block: object, param: str) -> JsonObject | None:
    """The OpenAI content part for one user-side block; None for dropped blocks."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        assert isinstance(block, dict)
        return {"type": "text", "text": block.get("text", "")}
    if kind == "image":
        assert isinstance(block, dict)
        return _image_part(block.get("source"), f"{param}.source")
    if kind == "document":
        assert isinstance(block, dict)
        return _document_part(block, param)
    if kind in ("thinking", "redacted_thinking"):
        return None
    raise TranslationError(f"unsupported content block type {kind!r}", param=param)


def _parts_content(parts: list[JsonObject]) -> str | list[JsonObject]:
    """A lone text part travels as a plain string, which every server accepts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        text: str = parts[0]["text"]
        return text
    return parts


def _tool_message(block: JsonObject, param: str, images: list[JsonObject]) -> JsonObject:
    """A ``tool`` message for a ``tool_result`` block; its images go to ``images``."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):
        texts: list[str] = []
        for k, item in enumerate(content):
            part = _user_part(item, f"{param}.content[{k}]")
            if part is None:
                continue
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                images.append(part)  # tool messages cannot carry images
        text = "\n".join(texts)
    else:
        raise TranslationError("tool_result content must be a string or a list", param=f"{param}.content")
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _user_messages(content: object, param: str) -> list[JsonObject]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of blocks", param=param)
    out: list[JsonObject] = []
    images: list[JsonObject] = []
    parts: list[JsonObject] = []
    for j, block in enumerate(content):
        where = f"{param}[{j}]"
        if isinstance(block, dict) and block.get("type") == "tool_result":
            out.append(_tool_message(block, where, images))
            continue
        part = _user_part(block, where)
        if part is not None:
            parts.append(part)
    parts = images + parts
    if parts:
        out.append({"role": "user", "content": _parts_content(parts)})
    return out


def _assistant_message(content: object, param: str) -> JsonObject | None:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of blocks", param=param)
    texts: list[str] = []
    tool_calls: list[JsonObject] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
        elif kind in ("thinking", "redacted_thinking", "server_tool_use") or (
            isinstance(kind, str) and kind.endswith("_tool_result")
        ):
            continue
        else:
            raise TranslationError(f"unsupported content block type {kind!r}", param=f"{param}[{j}]")
    text = "".join(texts)
    if not text and not tool_calls:
        return None
    message: JsonObject = {"role": "assistant", "content": text or None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _system_message(system: object) -> JsonObject | None:
    if isinstance(system, str):
        return {"role": "system", "content": system} if system else None
    if isinstance(system, list):
        text = "\n".join(b.get("text", "") for b in system if isinstance(b, dict) and b.get("type") == "text")
        return {"role": "system", "content": text} if text else None
    if system is None:
        return None
    raise TranslationError("system must be a string or a list of text blocks", param="system")


def _translate_tools(body: JsonObject, out: JsonObject) -> None:
    tools: list[JsonObject] = []
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise TranslationError(  # server tools run at Anthropic: refused, not dropped
                f"server tools ({kind!r}) run at Anthropic and cannot be sent to this model",
                param=f"tools[{i}].type",
            )
        function: JsonObject = {"name": tool.get("name")}
        if tool.get("description"):
            function["description"] = tool["description"]
        function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": function})
    if not tools:
        return  # OpenAI refuses tool_choice and parallel_tool_calls without tools
    out["tools"] = tools
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False


def messages_request_to_chat(body: JsonObject, *, model: str) -> JsonObject:
    """Translate a Messages request body into a Chat Completions request body.

    ``model`` is the provider's model name. ``system`` becomes the first
    message; ``tool_result`` blocks become ``tool`` messages placed before
    the rest of their user turn (images inside tool results move into that
    user message); ``tool_use`` blocks become ``tool_calls`` with compact
    JSON arguments. With ``stream: true`` the body also asks for
    ``stream_options.include_usage`` so the usage chunk always arrives.
    Raises :class:`TranslationError` on malformed input.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("'messages' must be a list", param="messages")
    out_messages: list[JsonObject] = []
    system = _system_message(body.get("system"))
    if system is not None:
        out_messages.append(system)
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role == "user":
            out_messages.extend(_user_messages(msg.get("content"), f"{param}.content"))
        elif role == "assistant":
            message = _assistant_message(msg.get("content"), f"{param}.content")
            if message is not None:
                out_messages.append(message)
        else:
            raise TranslationError(f"unsupported message role {role!r}", param=f"{param}.role")
    out: JsonObject = {"model": model, "messages": out_messages}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = body["max_tokens"]
    _translate_tools(body, out)
    stop = body.get("stop_sequences")
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            out["stop"] = stop
    elif stop is not None:
        raise TranslationError("stop_sequences must be a list of strings", param="stop_sequences")
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise TranslationError("metadata must be an object", param="metadata")
    user_id = metadata.get("user_id") if metadata else None
    if isinstance(user_id, str):
        if user_id:
            out["user"] = user_id
    elif user_id is not None:
        raise TranslationError("metadata.user_id must be a string", param="metadata.user_id")
    return out


# ---------------------------------------------------------------------------
# Response: chat.completion -> message
# ---------------------------------------------------------------------------

#: OpenAI ``finish_reason`` to Anthropic ``stop_reason``. ``content_filter``
#: becomes ``refusal`` (Anthropic's "a classifier stopped the output").
#: OpenAI does not say which stop sequence matched, so ``stop`` is always
#: ``end_turn`` with ``stop_sequence: null``. Any tool call makes it
#: ``tool_use``, whatever the finish reason said.
_STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _messages_usage(usage: object) -> JsonObject:
    """Anthropic usage from OpenAI usage: cached prompt tokens move to cache reads."""
    prompt = completion = cached = 0
    if isinstance(usage, dict):
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            cached = _int(details.get("cached_tokens"))
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _int(value: object) -> int:
    return value if type(value) is int else 0


def _message_id(chat_id: object) -> str:
    if not isinstance(chat_id, str) or not chat_id:
        return "msg_" + secrets.token_hex(12)
    return chat_id if chat_id.startswith("msg_") else "msg_" + chat_id


def _tool_input(arguments: object) -> JsonObject:
    """Parsed tool arguments. Arguments that are not a JSON object (a model can
    emit broken JSON) are kept as ``{"_raw_arguments": "<text>"}`` rather than
    failing the whole response."""
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str) else None
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    return {"_raw_arguments": arguments}


def chat_response_to_messages(resp: JsonObject, *, model: str) -> JsonObject:
    """Translate a ``chat.completion`` into an Anthropic Message.

    ``model`` is the name the client asked for. Only ``choices[0]`` is used.
    ``reasoning_content`` (or ``reasoning``) becomes a leading ``thinking``
    block with an empty signature, ``content`` (and ``refusal``) a text block,
    ``tool_calls`` ``tool_use`` blocks. The id gets a ``msg_`` prefix when it lacks one.
    ``input_tokens`` excludes cached prompt tokens, which are reported as
    ``cache_read_input_tokens`` (``cache_creation_input_tokens`` is 0: OpenAI
    does not charge cache writes).
    """
    choices = resp.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    blocks: list[JsonObject] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        # DeepSeek, vLLM, OpenRouter: the model's reasoning, as a thinking block (no signature:
        # none exists; sent back, it is dropped again on the way to the provider)
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):  # some servers send content parts back
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if text:
        blocks.append({"type": "text", "text": text})
    if message.get("refusal"):
        blocks.append({"type": "text", "text": message["refusal"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _tool_input(function.get("arguments")),
            }
        )
    if message.get("tool_calls"):
        stop_reason = "tool_use"
    else:
        stop_reason = _STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn")
    return {
        "id": _message_id(resp.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _messages_usage(resp.get("usage")),
    }


# ---------------------------------------------------------------------------
# Stream: chat.completion.chunk SSE -> Anthropic SSE
# ---------------------------------------------------------------------------

_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":'
_DELTA_OPEN = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT_DELTA = b',"delta":{"type":"text_delta","text":'
_JSON_DELTA = b',"delta":{"type":"input_json_delta","partial_json":'
_THINKING_DELTA = b',"delta":{"type":"thinking_delta","thinking":'
_DELTA_CLOSE = b"}}\n\n"
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


class _Block:
    """One Anthropic content block being built: the text, or one tool call.

    ``index`` is None while the block is *pending* (buffered, not yet
    started on the wire); ``prefix`` is the precomputed delta prefix once
    it has started.
    """

    __slots__ = ("buffer", "id", "index", "is_text", "name", "prefix", "sent", "thinking")

    def __init__(self, *, is_text: bool, id: str = "", name: str = "", thinking: bool = False) -> None:
        self.is_text = is_text
        #: A thinking block (the provider's ``reasoning_content``); ``is_text`` is then False.
        self.thinking = thinking
        self.id = id
        self.name = name
        self.index: int | None = None
        self.prefix = b""
        self.buffer: list[str] = []
        #: Tool-call arguments sent live so far (to tell a finished call from an interleaved one).
        self.sent: list[str] = []

    def start_event(self, index: int) -> bytes:
        """Assign the block index and return the ``content_block_start`` event."""
        self.index = index
        number = str(index).encode()
        kind = _TEXT_DELTA if self.is_text else _THINKING_DELTA if self.thinking else _JSON_DELTA
        self.prefix = _DELTA_OPEN + number + kind
        if self.is_text:
            block: JsonObject = {"type": "text", "text": ""}
        elif self.thinking:
            block = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            block = {"type": "tool_use", "id": self.id, "name": self.name, "input": {}}
        payload = {"type": "content_block_start", "index": index, "content_block": block}
        return b"event: content_block_start\ndata: " + orjson.dumps(payload) + b"\n\n"


def _complete(fragments: list[str]) -> bool:
    """Whether the tool-call arguments sent so far are a whole JSON value (checked once per new call)."""
    try:
        orjson.loads("".join(fragments))
    except orjson.JSONDecodeError:
        return False
    return True


class ChatStreamToMessagesStream:
    """Translate one Chat Completions chunk stream into an Anthropic Messages stream.

    One instance per response. Call :meth:`feed` with each upstream event in
    order and send what it returns; call :meth:`finish` when the upstream body
    ends and send that too. Both return ready-framed ``event: ...\\ndata:
    ...\\n\\n`` bytes, possibly empty.

    Output is Anthropic's exact sequence: ``message_start`` (usage zero: the
    OpenAI usage chunk comes last), then for each block ``content_block_start``,
    its deltas and ``content_block_stop``, then ``message_delta`` (stop reason
    and the full usage, input tokens included) and ``message_stop``.

    Anthropic blocks never interleave, OpenAI tool-call deltas may. OpenAI
    streams parallel tool calls one after another: when a new tool-call index
    arrives and the open call's arguments so far are complete JSON, the open
    call is closed and the new one streams live, so every call's
    ``input_json_delta`` fragments arrive as they come. When they are not
    complete (a server that interleaves calls), the new call is buffered and
    sent whole, as one delta, when the choice finishes. Text that precedes
    the tool calls, the usual shape, is closed as soon as the first tool call
    arrives; text that shows up while a tool call is open is buffered the
    same way. A fragment for a call already closed cannot be placed and
    raises :class:`TranslationError` rather than being lost.

    ``reasoning_content`` (or ``reasoning``) deltas stream as a ``thinking``
    block (empty signature: the provider has none), closed when the text or
    the first tool call begins.

    The tail (``message_delta``, ``message_stop``) is sent once both the
    finish reason and the usage are known, or at ``data: [DONE]`` /
    :meth:`finish` with what is known by then. An OpenAI error payload
    (``data: {"error": ...}``) becomes an ``error`` event and ends the
    stream. Only choice 0 is translated.
    """

    __slots__ = (
        "_active",
        "_closed",
        "_model",
        "_next_index",
        "_pending",
        "_reasoning",
        "_started",
        "_stop_reason",
        "_text",
        "_tools",
        "_usage",
    )

    def __init__(self, *, model: str) -> None:
        self._model = model
        self._started = False
        self._closed = False
        self._active: _Block | None = None  # the block streaming live
        self._text: _Block | None = None  # where text deltas go now
        self._reasoning: _Block | None = None  # where reasoning deltas go now
        self._tools: dict[int, _Block] = {}  # OpenAI tool-call index -> block
        self._pending: list[_Block] = []  # buffered blocks, in order of appearance
        self._next_index = 0
        self._stop_reason: str | None = None
        self._usage: object = None

    def __repr__(self) -> str:
        return (
            f"<ChatStreamToMessagesStream model={self._model!r} started={self._started} "
            f"blocks={self._next_index} pending={len(self._pending)} "
            f"stop_reason={self._stop_reason!r} closed={self._closed}>"
        )

    def feed(self, event: bytes | None, data: bytes) -> bytes:
        """Translate one upstream event (its ``event:`` name and ``data:`` bytes).

        Returns the Anthropic SSE bytes to send for it, ``b""`` when none.
        ``data: [DONE]`` returns the tail if it has not been sent. Raises
        :class:`TranslationError` if ``data`` is not a JSON object or not
        shaped like a chunk.
        """
        if self._closed or not data:
            return b""
        if data[:1] == b"[" and data.strip() == b"[DONE]":
            return self.finish()
        chunk = loads_object(data, "chat completion chunk")
        try:
            if "error" in chunk and not chunk.get("choices"):
                return self._error(chunk["error"])
            out = b""
            if not self._started:
                out = self._message_start(chunk.get("id"))
            choices = chunk.get("choices")
            if choices:
                choice = choices[0]
                if choice.get("index", 0) == 0:
                    delta = choice.get("delta")
                    if delta:
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                        if reasoning and isinstance(reasoning, str):
                            out += self._on_reasoning(reasoning)
                        text = delta.get("content")
                        if text and isinstance(text, str):
                            out += self._on_text(text)
                        tool_calls = delta.get("tool_calls")
                        if tool_calls:
                            out += self._on_tool_calls(tool_calls)
                        refusal = delta.get("refusal")
                        if refusal and isinstance(refusal, str):
                            out += self._on_text(refusal)
                    reason = choice.get("finish_reason")
                    if reason and self._stop_reason is None:
                        out += self._close_blocks()
                        self._stop_reason = "tool_use" if self._tools else _STOP_REASONS.get(reason, "end_turn")
            usage = chunk.get("usage")
            if usage:
                self._usage = usage
            if self._stop_reason is not None and self._usage is not None:
                out += self._tail()
            return out
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise TranslationError(f"unexpected chat completion chunk shape: {exc!r}") from exc

    def finish(self) -> bytes:
        """The bytes that end the client stream, if not sent yet; idempotent.

        Closes open and pending blocks and sends ``message_delta`` (with the
        usage seen so far) and ``message_stop``. A stream that never produced
        a chunk yields ``b""``: there is no message to end, and the caller
        should send an error instead. After an ``error`` event, ``b""``.
        """
        if self._closed or not self._started:
            self._closed = True
            return b""
        out = b""
        if self._stop_reason is None:
            out = self._close_blocks()
            self._stop_reason = "tool_use" if self._tools else "end_turn"
        return out + self._tail()

    # -- pieces -------------------------------------------------------------

    def _message_start(self, chat_id: object) -> bytes:
        self._started = True
        message: JsonObject = {
            "id": _message_id(chat_id),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        payload = {"type": "message_start", "message": message}
        return b"event: message_start\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _open(self, block: _Block) -> bytes:
        """Start ``block`` live if nothing is open, else queue it."""
        if self._active is None:
            self._active = block
            index = self._next_index
            self._next_index += 1
            return block.start_event(index)
        self._pending.append(block)
        return b""

    def _on_reasoning(self, text: str) -> bytes:
        """Reasoning deltas stream as a thinking block (live when nothing else is open)."""
        block = self._reasoning
        out = b""
        if block is None:
            block = self._reasoning = _Block(is_text=False, thinking=True)
            out = self._open(block)
        if block is self._active:
            return out + block.prefix + dumps_str(text) + _DELTA_CLOSE
        block.buffer.append(text)
        return out

    def _on_text(self, text: str) -> bytes:
        block = self._text
        out = b""
        if self._active is not None and self._active is self._reasoning:
            out = self._stop_active()  # the reasoning that preceded the answer is finished
            self._reasoning = None
        if block is None:
            block = self._text = _Block(is_text=True)
            out += self._open(block)
        if block is self._active:
            return out + block.prefix + dumps_str(text) + _DELTA_CLOSE
        block.buffer.append(text)
        return out

    def _on_tool_calls(self, tool_calls: list[JsonObject]) -> bytes:
        out = b""
        for call in tool_calls:
            index = call.get("index")
            if type(index) is not int:
                # Some servers omit the index: a call with an id is a new one,
                # one without continues the latest.
                index = len(self._tools) if call.get("id") or not self._tools else len(self._tools) - 1
            function = call.get("function") or {}
            block = self._tools.get(index)
            if block is None:
                block = _Block(is_text=False, id=call.get("id") or "", name=function.get("name") or "")
                if not block.id:
                    block.id = "toolu_" + secrets.token_hex(12)
                self._tools[index] = block
                if self._active is not None and self._active is self._text:
                    # Text before tool calls: it is finished; later text gets a new block.
                    out += self._stop_active()
                    self._text = None
                elif self._active is not None and self._active is self._reasoning:
                    out += self._stop_active()
                    self._reasoning = None
                elif self._active is not None and not self._active.is_text and _complete(self._active.sent):
                    out += self._stop_active()  # the previous call is complete: stream the next live
                out += self._open(block)
            elif block.index is None and function.get("name") and not block.name:
                block.name = function["name"]
            arguments = function.get("arguments")
            if arguments:
                if block is self._active:
                    block.sent.append(arguments)
                    out += block.prefix + dumps_str(arguments) + _DELTA_CLOSE
                elif block.index is not None:
                    raise TranslationError(f"tool call {index} continued after the next tool call started")
                else:
                    block.buffer.append(arguments)
        return out

    def _stop_active(self) -> bytes:
        block = self._active
        self._active = None
        if block is None:
            return b""
        return _BLOCK_STOP + str(block.index).encode() + b"}\n\n"

    def _close_blocks(self) -> bytes:
        """Stop the live block, then send each pending block whole."""
        out = self._stop_active()
        for block in self._pending:
            out += self._open(block)
            if block.buffer:
                out += block.prefix + dumps_str("".join(block.buffer)) + _DELTA_CLOSE
                block.buffer.clear()
            out += self._stop_active()
        self._pending.clear()
        self._text = None
        self._reasoning = None
        return out

    def _tail(self) -> bytes:
        self._closed = True
        payload = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason, "stop_sequence": None},
            "usage": _messages_usage(self._usage),
        }
        return b"event: message_delta\ndata: " + orjson.dumps(payload) + b"\n\n" + _MESSAGE_STOP

    def _error(self, error: object) -> bytes:
        self._closed = True
        envelope = anthropic_envelope_from_openai(error if isinstance(error, dict) else None)
        return b"event: error\ndata: " + orjson.dumps(envelope) + b"\n\n"
