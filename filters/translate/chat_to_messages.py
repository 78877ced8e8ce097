"""Clients speak OpenAI Chat Completions, the provider speaks Anthropic Messages.

Three pure translations, no I/O:

* :func:`chat_request_to_messages` — a ``/v1/chat/completions`` request body
  to a ``/v1/messages`` body;
* :func:`messages_response_to_chat` — a Message to a ``chat.completion``;
* :class:`MessagesStreamToChatStream` — one Anthropic SSE stream to one
  ``chat.completion.chunk`` stream, event by event.

``reasoning_effort`` becomes extended ``thinking`` (``low`` 1024,
``medium`` 4096, ``high`` 16384 budget tokens; ``minimal``/``none`` none).
Fields that change the answer and have no Anthropic equivalent are refused
with a :class:`~llmproxy.filters.translate.errors.TranslationError` naming
them: ``n`` above 1, a ``response_format`` other than ``text``. Request
fields with no Anthropic equivalent that only tune sampling or delivery are
dropped: ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs``,
``top_logprobs``, ``seed``, ``modalities``, ``audio``,
``prediction``, ``verbosity``, ``service_tier``,
``store``, ``metadata``, ``prompt_cache_key``, ``web_search_options``,
``stream_options`` (the caller passes ``include_usage`` to the stream
translator), the legacy ``functions``/``function_call`` and ``function``
role messages, a message's ``name``, an image's ``detail`` and a tool's
``strict``. Non-function tools (``custom``) and ``tool_choice`` values
Anthropic has no equivalent for (``allowed_tools``) are refused with a 400
naming ``tools[i].type`` / ``tool_choice``. ``temperature`` is passed through unchanged: OpenAI allows up to
2, Anthropic up to 1, and the provider's 400 says so.

``cache_control`` on a content part (not OpenAI's, sent by clients that know
the provider is Anthropic; a Responses ``input_text`` part's too) is kept, but
never more than Anthropic's 4 breakpoints: past 4, the earliest marks in prompt
order are dropped and the last 4 kept (see :func:`_cap_cache_breakpoints`).

Content the provider cannot take (audio parts, ``file_id`` files, non-base64
``data:`` URLs) raises :class:`~llmproxy.filters.translate.errors.TranslationError`
rather than being silently lost.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, ClassVar

import orjson

from llmproxy.filters.translate._json import dumps_str, loads_object
from llmproxy.filters.translate.errors import TranslationError, openai_envelope_from_anthropic

__all__ = [
    "MessagesStreamToChatStream",
    "chat_request_to_messages",
    "messages_response_to_chat",
]

JsonObject = dict[str, Any]

# ---------------------------------------------------------------------------
# Request: chat.completions -> messages
# ---------------------------------------------------------------------------


def _text_block(text: str, part: JsonObject | None = None) -> JsonObject:
    block: JsonObject = {"type": "text", "text": text}
    if part is not None and "cache_control" in part:
        # Not OpenAI, but sent by clients that know the provider is Anthropic.
        block["cache_control"] = part["cache_control"]
    return block


def _image_block(url: object, param: str) -> JsonObject:
    if not isinstance(url, str):
        raise TranslationError("image_url.url must be a string", param=param)
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        media_type, _, encoding = header[5:].partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise TranslationError("only base64 data: URLs are supported for images", param=param)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("image URL must be a data: or http(s): URL", param=param)


def _file_block(file: object, param: str) -> JsonObject:
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith("data:application/pdf;base64,"):
        raise TranslationError("only inline base64 PDF files are supported", param=param)
    source = {"type": "base64", "media_type": "application/pdf", "data": data.partition(",")[2]}
    block: JsonObject = {"type": "document", "source": source}
    filename = file.get("filename") if isinstance(file, dict) else None
    if isinstance(filename, str) and filename:
        block["title"] = filename
    return block


def _content_blocks(content: object, param: str, *, assistant: bool = False) -> list[JsonObject]:
    """Anthropic blocks for an OpenAI ``content`` (string, list of parts or null).

    Empty text is skipped: Anthropic rejects empty text blocks.
    """
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_block(content)] if content else []
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of parts", param=param)
    blocks: list[JsonObject] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or (assistant and kind == "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise TranslationError(f"{kind} part needs a string '{kind}'", param=where)
            if text:
                blocks.append(_text_block(text, part))
        elif kind == "image_url" and not assistant:
            image = part.get("image_url")
            blocks.append(_image_block(image.get("url") if isinstance(image, dict) else image, where))
        elif kind == "file" and not assistant:
            blocks.append(_file_block(part.get("file"), where))
        else:
            raise TranslationError(f"unsupported content part type {kind!r}", param=where)
    return blocks


def _tool_use_blocks(tool_calls: object, param: str) -> list[JsonObject]:
    if not isinstance(tool_calls, list):
        raise TranslationError("tool_calls must be a list", param=param)
    blocks: list[JsonObject] = []
    for j, call in enumerate(tool_calls):
        where = f"{param}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise TranslationError("only function tool calls are supported", param=where)
        arguments = function.get("arguments") or "{}"
        try:
            tool_input = orjson.loads(arguments)
        except (orjson.JSONDecodeError, TypeError):
            tool_input = None
        if not isinstance(tool_input, dict):
            raise TranslationError("tool call arguments must be a JSON object", param=f"{where}.function.arguments")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": tool_input})
    return blocks


def _thinking_blocks(raw: object) -> list[JsonObject]:
    """An assistant message's ``thinking_blocks`` (the convention LiteLLM and others use to carry
    Anthropic reasoning through Chat Completions), replayed as they came: signatures included,
    as Anthropic requires them to continue a tool loop with thinking on."""
    if not isinstance(raw, list):
        return []
    out: list[JsonObject] = []
    for block in raw:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking" and isinstance(block.get("signature"), str):
            out.append({"type": "thinking", "thinking": block.get("thinking") or "", "signature": block["signature"]})
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            out.append({"type": "redacted_thinking", "data": block["data"]})
    return out


def _append_turn(turns: list[JsonObject], role: str, blocks: list[JsonObject]) -> None:
    """Add blocks to the conversation, merging consecutive turns of one role."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _tool_result_block(msg: JsonObject, param: str) -> JsonObject:
    content = msg.get("content")
    block: JsonObject = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id")}
    if isinstance(content, str):
        block["content"] = content
    elif content is not None:
        block["content"] = _content_blocks(content, f"{param}.content")
    return block


def _system_blocks(content: object, param: str) -> list[JsonObject]:
    blocks = _content_blocks(content, param)
    if any(block["type"] != "text" for block in blocks):
        raise TranslationError("system and developer messages may only hold text", param=param)
    return blocks


def chat_request_to_messages(body: JsonObject, *, model: str, default_max_tokens: int = 4096) -> JsonObject:
    """Translate a Chat Completions request body into a Messages request body.

    ``model`` is the provider's model name (the route decides it).
    ``system``/``developer`` messages, wherever they sit, are hoisted into
    ``system`` (a string, or a list of text blocks when there are several,
    in order); ``tool`` messages become
    ``tool_result`` blocks of a user turn; consecutive turns of one role are
    merged, as Anthropic requires alternation. A turn that is a single plain
    text block is sent as a string. ``max_completion_tokens`` wins over
    ``max_tokens``; with neither, ``default_max_tokens`` is used (Anthropic
    requires the field). Raises :class:`TranslationError` on malformed input.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("'messages' must be a list", param="messages")
    system: list[JsonObject] = []
    turns: list[JsonObject] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role == "system" or role == "developer":
            system.extend(_system_blocks(msg.get("content"), f"{param}.content"))
        elif role == "user":
            _append_turn(turns, "user", _content_blocks(msg.get("content"), f"{param}.content"))
        elif role == "assistant":
            blocks = _thinking_blocks(msg.get("thinking_blocks"))
            blocks += _content_blocks(msg.get("content"), f"{param}.content", assistant=True)
            if msg.get("tool_calls"):
                blocks.extend(_tool_use_blocks(msg["tool_calls"], f"{param}.tool_calls"))
            _append_turn(turns, "assistant", blocks)
        elif role == "tool":
            _append_turn(turns, "user", [_tool_result_block(msg, param)])
        elif role == "function":
            continue  # legacy function calling: dropped, see the module docstring
        else:
            raise TranslationError(f"unsupported message role {role!r}", param=f"{param}.role")
    for turn in turns:
        content = turn["content"]
        if len(content) == 1 and content[0].keys() == {"type", "text"} and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]

    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError("n > 1 is not supported by this provider (it returns one choice)", param="n")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise TranslationError("response_format is not supported by this provider", param="response_format")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    out: JsonObject = {
        "model": model,
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        "messages": turns,
    }
    _thinking(body.get("reasoning_effort"), out, explicit_max=max_tokens is not None)
    if system:
        if len(system) == 1 and system[0].keys() == {"type", "text"}:
            out["system"] = system[0]["text"]
        else:
            out["system"] = system
    _translate_tools(body, out)
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            out["stop_sequences"] = stop
    elif stop is not None:
        raise TranslationError("stop must be a string or a list of strings", param="stop")
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stream") is not None:
        out["stream"] = bool(body["stream"])
    for key in ("user", "safety_identifier"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise TranslationError(f"{key} must be a string", param=key)
    user = body.get("user") or body.get("safety_identifier")
    if user:
        out["metadata"] = {"user_id": user}
    _cap_cache_breakpoints(out)
    return out


#: Anthropic refuses a request with more blocks marked ``cache_control`` than this.
MAX_CACHE_BREAKPOINTS = 4


def _cap_cache_breakpoints(out: JsonObject) -> None:
    """Keep only the last :data:`MAX_CACHE_BREAKPOINTS` ``cache_control`` marks, in prompt order.

    Anthropic reads a prompt as tools, then system, then messages, and caches
    the prefix up to each breakpoint; the latest breakpoints cover the most,
    so the earliest marks are the ones dropped (the blocks stay). Marks inside
    ``tool_result`` content count too.
    """
    marked: list[JsonObject] = []

    def scan(blocks: object) -> None:
        if not isinstance(blocks, list):
            return
        for block in blocks:
            if "cache_control" in block:
                marked.append(block)
            if block.get("type") == "tool_result":
                scan(block.get("content"))

    scan(out.get("tools"))
    scan(out.get("system"))
    for turn in out["messages"]:
        scan(turn["content"])
    for block in marked[: max(len(marked) - MAX_CACHE_BREAKPOINTS, 0)]:
        del block["cache_control"]


#: ``reasoning_effort`` -> Anthropic thinking budget (None: no thinking).
_THINKING_BUDGETS: dict[str, int | None] = {"none": None, "minimal": None, "low": 1024, "medium": 4096, "high": 16384}


def _thinking(effort: object, out: JsonObject, *, explicit_max: bool) -> None:
    """Set ``thinking`` for a ``reasoning_effort``. The budget must stay below ``max_tokens``:
    without a client limit, ``max_tokens`` grows by the budget; with one, the budget shrinks to
    fit, and a limit too small for Anthropic's 1024-token minimum is refused."""
    if effort is None:
        return
    if not isinstance(effort, str) or effort not in _THINKING_BUDGETS:
        raise TranslationError(f"unsupported reasoning_effort {effort!r}", param="reasoning_effort")
    budget = _THINKING_BUDGETS[effort]
    if budget is None:
        return
    max_tokens = out["max_tokens"]
    if not explicit_max:
        out["max_tokens"] = max_tokens + budget
    elif not isinstance(max_tokens, int) or max_tokens <= 1024:
        raise TranslationError(
            "reasoning_effort needs max_tokens above 1024 on this provider (thinking budget minimum)",
            param="reasoning_effort",
        )
    else:
        budget = min(budget, max_tokens - 1)
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}


def _translate_tools(body: JsonObject, out: JsonObject) -> None:
    tools: list[JsonObject] = []
    for i, tool in enumerate(body.get("tools") or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise TranslationError(  # custom tools have no Anthropic equivalent: refused, not dropped
                f"tools of type {kind!r} cannot be sent to an Anthropic model (only function tools)",
                param=f"tools[{i}].type",
            )
        entry: JsonObject = {"name": function.get("name")}
        if function.get("description"):
            entry["description"] = function["description"]
        entry["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
        tools.append(entry)
    if not tools:
        return  # Anthropic refuses tool_choice without tools
    out["tools"] = tools
    choice = body.get("tool_choice")
    tool_choice: JsonObject | None = None
    if choice == "auto":
        tool_choice = {"type": "auto"}
    elif choice == "required":
        tool_choice = {"type": "any"}
    elif choice == "none":
        tool_choice = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        tool_choice = {"type": "tool", "name": choice["function"].get("name")}
    elif choice is not None:  # allowed_tools, custom: no Anthropic equivalent, refused rather than ignored
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise TranslationError(f"tool_choice {kind!r} cannot be sent to an Anthropic model", param="tool_choice")
    if body.get("parallel_tool_calls") is False:
        if tool_choice is None:
            tool_choice = {"type": "auto"}
        if tool_choice["type"] != "none":
            tool_choice["disable_parallel_tool_use"] = True
    if tool_choice is not None:
        out["tool_choice"] = tool_choice


# ---------------------------------------------------------------------------
# Response: message -> chat.completion
# ---------------------------------------------------------------------------

#: Anthropic ``stop_reason`` to OpenAI ``finish_reason``. ``pause_turn``
#: (a server tool paused the turn) has no equivalent and reads as ``stop``;
#: ``refusal`` is what OpenAI calls ``content_filter``.
_FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _chat_usage(input_tokens: int, cache_creation: int, cache_read: int, output: int) -> JsonObject:
    # Anthropic's input_tokens exclude cached tokens; OpenAI's prompt_tokens include them.
    prompt = input_tokens + cache_creation + cache_read
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


def _int(value: object) -> int:
    return value if type(value) is int else 0


def messages_response_to_chat(resp: JsonObject, *, model: str) -> JsonObject:
    """Translate an Anthropic Message into a ``chat.completion`` object.

    ``model`` is the name the client asked for. Text blocks are joined;
    ``tool_use`` blocks become ``tool_calls`` with compact JSON ``arguments``;
    ``thinking`` text becomes ``reasoning_content``, and the thinking and
    ``redacted_thinking`` blocks, signatures included, are kept in
    ``thinking_blocks`` (sent back on an assistant message, they are replayed
    to Anthropic); server-tool blocks are dropped. ``content`` is null when
    there are tool calls and no text. Cache reads and writes count into
    ``prompt_tokens``; reads are also reported as ``cached_tokens``.
    """
    texts: list[str] = []
    tool_calls: list[JsonObject] = []
    reasoning: list[str] = []
    thinking: list[JsonObject] = []
    for block in resp.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            reasoning.append(block.get("thinking") or "")
            thinking.append(
                {"type": "thinking", "thinking": block.get("thinking") or "", "signature": block.get("signature")}
            )
        elif kind == "redacted_thinking":
            thinking.append({"type": "redacted_thinking", "data": block.get("data")})
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    message: JsonObject = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    if thinking:
        message["reasoning_content"] = "".join(reasoning)
        message["thinking_blocks"] = thinking
    usage = resp.get("usage") or {}
    return {
        "id": resp.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH_REASONS.get(resp.get("stop_reason") or "end_turn", "stop"),
            }
        ],
        "usage": _chat_usage(
            _int(usage.get("input_tokens")),
            _int(usage.get("cache_creation_input_tokens")),
            _int(usage.get("cache_read_input_tokens")),
            _int(usage.get("output_tokens")),
        ),
        "system_fingerprint": None,
    }


# ---------------------------------------------------------------------------
# Stream: Anthropic SSE -> chat.completion.chunk SSE
# ---------------------------------------------------------------------------

# Every chunk is ``_head`` (id, object, created, model, fingerprint, the opening
# of ``choices``) + one of these bodies. Only the JSON string of the delta is
# serialised per event.
_CHOICE_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'
_ROLE_BODY = b'{"index":0,"delta":{"role":"assistant","content":""}' + _CHOICE_TAIL
_CONTENT_OPEN = b'{"index":0,"delta":{"content":'
_CONTENT_CLOSE = b"}" + _CHOICE_TAIL
_ARGS_CLOSE = b"}}]}" + _CHOICE_TAIL
_DONE = b"data: [DONE]\n\n"


def _finish_body(reason: str) -> bytes:
    return b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"' + reason.encode() + b'"}]}\n\n'


_FINISH_BODIES: dict[str, bytes] = {r: _finish_body(r) for r in set(_FINISH_REASONS.values())}

_Handler = Callable[["MessagesStreamToChatStream", JsonObject], bytes]


class MessagesStreamToChatStream:
    """Translate one Anthropic Messages SSE stream into a Chat Completions stream.

    One instance per response. Call :meth:`feed` with each upstream event in
    order and send what it returns; call :meth:`finish` when the upstream body
    ends and send that too. Both return ready-framed ``data: ...\\n\\n`` bytes,
    possibly empty.

    Mapping: ``message_start`` gives the first chunk (``role: assistant``,
    ``content: ""``); ``text_delta`` gives content deltas; a ``tool_use``
    block start gives a ``tool_calls`` delta (index counted among tool calls,
    id, type, name, ``arguments: ""``) and its ``input_json_delta`` fragments
    give ``arguments`` fragments, unchanged; ``message_delta`` gives the
    chunk with ``finish_reason``; ``message_stop`` gives the usage chunk
    (``choices: []``, only when ``include_usage``) and ``data: [DONE]``.
    A ``thinking`` block gives ``reasoning_content`` deltas and, at its end,
    one ``thinking_blocks`` delta with the whole block and its signature (a
    ``redacted_thinking`` block gives that delta at its start), so a client
    can send it back. Each streamed block carries an ``index`` (its position
    among the stream's thinking blocks): the openai SDK's stream accumulator
    merges list deltas by ``index`` and raises on a second entry without one.
    ``ping``, citations and server-tool blocks give nothing. An
    ``error`` event gives ``data: {"error": {...}}`` and ends the stream:
    nothing is emitted after it, not even ``[DONE]``.
    """

    __slots__ = (
        "_cache_creation",
        "_cache_read",
        "_closed",
        "_content_prefix",
        "_created",
        "_head",
        "_include_usage",
        "_input_tokens",
        "_model",
        "_output_tokens",
        "_thinking",
        "_thinking_count",
        "_tool_prefixes",
    )

    _HANDLERS: ClassVar[dict[str, _Handler]]

    def __init__(self, *, model: str, include_usage: bool) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time())
        self._head = b""
        self._content_prefix = b""
        # Anthropic block index -> precomputed arguments prefix of that tool call.
        self._tool_prefixes: dict[int, bytes] = {}
        # Anthropic block index -> the thinking block being streamed (text parts, signature).
        self._thinking: dict[int, JsonObject] = {}
        self._thinking_count = 0
        self._input_tokens = 0
        self._cache_creation = 0
        self._cache_read = 0
        self._output_tokens = 0
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<MessagesStreamToChatStream model={self._model!r} started={bool(self._head)} "
            f"tools={len(self._tool_prefixes)} closed={self._closed}>"
        )

    def _start(self, message_id: str) -> None:
        self._head = (
            b'data: {"id":'
            + dumps_str(message_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(self._created).encode()
            + b',"model":'
            + dumps_str(self._model)
            + b',"system_fingerprint":null,"choices":['
        )
        self._content_prefix = self._head + _CONTENT_OPEN

    def feed(self, event: bytes | None, data: bytes) -> bytes:
        """Translate one upstream event (its ``event:`` name and ``data:`` bytes).

        Returns the OpenAI SSE bytes to send for it, ``b""`` when none.
        Raises :class:`TranslationError` if ``data`` is not a JSON object
        or not shaped like an Anthropic event.
        """
        if self._closed or event == b"ping" or not data:
            return b""
        return self.feed_object(loads_object(data, "Anthropic stream event data"))

    def feed_object(self, payload: JsonObject) -> bytes:
        """Like :meth:`feed`, for an event already parsed (a translator before this one hands on
        its events as objects: :mod:`llmproxy.filters.translate.bedrock`)."""
        if self._closed:
            return b""
        try:
            kind = payload.get("type")
            if kind == "content_block_delta":  # the hot path
                delta = payload.get("delta") or {}
                dtype = delta.get("type")
                if dtype == "text_delta":
                    return self.text_delta(delta.get("text"))
                if dtype == "input_json_delta":
                    return self.json_delta(payload.get("index", -1), delta.get("partial_json"))
                if dtype == "thinking_delta" or dtype == "signature_delta":
                    return self._on_thinking_delta(payload.get("index", -1), delta)
                return b""
            handler = self._HANDLERS.get(kind) if isinstance(kind, str) else None
            return handler(self, payload) if handler is not None else b""
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise TranslationError(f"unexpected Anthropic stream event shape: {exc!r}") from exc

    def text_delta(self, text: Any) -> bytes:
        """A ``text_delta``'s chunk (``text`` as the event holds it)."""
        if self._closed or not text:
            return b""
        if not self._head:
            self._start(_fallback_id())
        return self._content_prefix + dumps_str(text) + _CONTENT_CLOSE

    def json_delta(self, index: Any, fragment: Any) -> bytes:
        """An ``input_json_delta``'s chunk: the block ``index``'s tool call ``arguments`` fragment."""
        prefix = self._tool_prefixes.get(index)
        if self._closed or prefix is None or not fragment:
            return b""
        return prefix + dumps_str(fragment) + _ARGS_CLOSE

    def finish(self) -> bytes:
        """The bytes that end the client stream, if :meth:`feed` has not sent them.

        After ``message_stop`` or an ``error`` event this is ``b""``. On a
        stream that ended early it is the usage chunk (when asked for) and
        ``data: [DONE]``; a caller that knows the upstream failed should send
        its error event instead of calling this. Idempotent.
        """
        if self._closed:
            return b""
        return self._tail()

    # -- handlers -----------------------------------------------------------

    def _on_message_start(self, payload: JsonObject) -> bytes:
        message = payload.get("message") or {}
        self._start(str(message.get("id") or _fallback_id()))
        self._take_usage(message.get("usage") or {})
        return self._head + _ROLE_BODY

    def _on_block_start(self, payload: JsonObject) -> bytes:
        block = payload.get("content_block") or {}
        if not self._head:
            self._start(_fallback_id())
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            return self._content_prefix + dumps_str(text) + _CONTENT_CLOSE if text else b""
        if kind == "thinking":
            self._thinking[payload.get("index", -1)] = {"parts": [], "signature": block.get("signature")}
            text = block.get("thinking")
            return self._on_thinking_delta(payload.get("index", -1), {"thinking": text}) if text else b""
        if kind == "redacted_thinking":
            return self._thinking_blocks_chunk({"type": "redacted_thinking", "data": block.get("data")})
        if kind != "tool_use":
            return b""  # server tools: no Chat Completions equivalent
        tool_index = str(len(self._tool_prefixes)).encode()
        self._tool_prefixes[payload.get("index", -1)] = (
            self._head + b'{"index":0,"delta":{"tool_calls":[{"index":' + tool_index + b',"function":{"arguments":'
        )
        return (
            self._head
            + b'{"index":0,"delta":{"tool_calls":[{"index":'
            + tool_index
            + b',"id":'
            + dumps_str(str(block.get("id") or ""))
            + b',"type":"function","function":{"name":'
            + dumps_str(str(block.get("name") or ""))
            + b',"arguments":""}}]}'
            + _CHOICE_TAIL
        )

    def _on_thinking_delta(self, index: int, delta: JsonObject) -> bytes:
        """Thinking text as ``reasoning_content`` deltas; the signature is kept for the block's end."""
        state = self._thinking.get(index)
        if state is None:
            return b""
        if isinstance(delta.get("signature"), str):
            state["signature"] = delta["signature"]
            return b""
        text = delta.get("thinking")
        if not isinstance(text, str) or not text:
            return b""
        state["parts"].append(text)
        return self._head + b'{"index":0,"delta":{"reasoning_content":' + dumps_str(text) + _CONTENT_CLOSE

    def _on_block_stop(self, payload: JsonObject) -> bytes:
        """The end of a thinking block: the whole block, signature included, as ``thinking_blocks``."""
        state = self._thinking.pop(payload.get("index", -1), None)
        if state is None:
            return b""
        block = {"type": "thinking", "thinking": "".join(state["parts"]), "signature": state["signature"]}
        return self._thinking_blocks_chunk(block)

    def _thinking_blocks_chunk(self, block: JsonObject) -> bytes:
        if not self._head:
            self._start(_fallback_id())
        block["index"] = self._thinking_count
        self._thinking_count += 1
        return self._head + b'{"index":0,"delta":{"thinking_blocks":[' + orjson.dumps(block) + b"]}" + _CHOICE_TAIL

    def _on_message_delta(self, payload: JsonObject) -> bytes:
        self._take_usage(payload.get("usage") or {})
        reason = (payload.get("delta") or {}).get("stop_reason")
        if not reason:
            return b""
        if not self._head:
            self._start(_fallback_id())
        return self._head + _FINISH_BODIES[_FINISH_REASONS.get(reason, "stop")]

    def _on_message_stop(self, payload: JsonObject) -> bytes:
        return self._tail()

    def _on_error(self, payload: JsonObject) -> bytes:
        self._closed = True
        error = payload.get("error")
        envelope = openai_envelope_from_anthropic(error if isinstance(error, dict) else None)
        return b"data: " + orjson.dumps(envelope) + b"\n\n"

    # -- helpers ------------------------------------------------------------

    def _take_usage(self, usage: JsonObject) -> None:
        """Record usage counts; Anthropic's are cumulative, so they overwrite."""
        if type(usage.get("input_tokens")) is int:
            self._input_tokens = usage["input_tokens"]
        if type(usage.get("cache_creation_input_tokens")) is int:
            self._cache_creation = usage["cache_creation_input_tokens"]
        if type(usage.get("cache_read_input_tokens")) is int:
            self._cache_read = usage["cache_read_input_tokens"]
        if type(usage.get("output_tokens")) is int:
            self._output_tokens = usage["output_tokens"]

    def _tail(self) -> bytes:
        self._closed = True
        if not self._include_usage:
            return _DONE
        if not self._head:
            self._start(_fallback_id())
        usage = _chat_usage(self._input_tokens, self._cache_creation, self._cache_read, self._output_tokens)
        return self._head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n" + _DONE


MessagesStreamToChatStream._HANDLERS = {
    "message_start": MessagesStreamToChatStream._on_message_start,
    "content_block_start": MessagesStreamToChatStream._on_block_start,
    "content_block_stop": MessagesStreamToChatStream._on_block_stop,
    "message_delta": MessagesStreamToChatStream._on_message_delta,
    "message_stop": MessagesStreamToChatStream._on_message_stop,
    "error": MessagesStreamToChatStream._on_error,
}


def _fallback_id() -> str:
    """An id for a stream whose ``message_start`` never came (malformed upstream)."""
    return "chatcmpl-" + secrets.token_hex(12)
