"""Pure translation between Anthropic Messages and the AWS Bedrock Converse API.

Bedrock's Converse (``POST /model/{modelId}/converse``) and ConverseStream
(``/converse-stream``) are reached through Anthropic Messages as the pivot:
an OpenAI Chat or Responses client's request is first translated to
Messages by the existing translators, then to Converse here; the reply comes
back to Messages here, and on to the client's protocol by the existing
translators. Messages is the closest shape to Converse (content blocks, tool
use and results, thinking, ``cache_control``), so nothing of Claude on
Bedrock is lost on the way:

* ``system`` / message ``content`` blocks: ``text``, ``image`` (base64 only:
  ``{"image": {"format", "source": {"bytes"}}}``), ``document`` (base64 PDF),
  ``tool_use`` -> ``toolUse``, ``tool_result`` -> ``toolResult`` (``status``
  ``error`` for ``is_error``), ``thinking`` -> ``reasoningContent.reasoningText``
  (with its ``signature``), ``redacted_thinking`` -> ``reasoningContent.redactedContent``;
  a block with ``cache_control`` is followed by ``{"cachePoint": {"type": "default"}}``
  (also after a system block and a tool);
* ``max_tokens``, ``temperature``, ``top_p``, ``stop_sequences`` ->
  ``inferenceConfig``; ``top_k`` and ``thinking`` ->
  ``additionalModelRequestFields`` (Claude's own fields);
* ``tools`` -> ``toolConfig.tools[].toolSpec`` (``inputSchema.json``);
  ``tool_choice`` ``auto``/``any``/``tool`` -> ``{"auto"|"any": {}}`` /
  ``{"tool": {"name"}}``; ``none`` leaves ``toolConfig`` out (Converse has no
  "none", and a conversation holding tool blocks needs it, so then the tools go
  and the choice is dropped: documented loss);
* stop reasons: ``end_turn``, ``tool_use``, ``max_tokens``, ``stop_sequence``
  unchanged; ``guardrail_intervened`` and ``content_filtered`` -> ``refusal``;
  ``model_context_window_exceeded`` -> ``max_tokens``;
* usage ``inputTokens``, ``outputTokens``, ``cacheReadInputTokens``,
  ``cacheWriteInputTokens`` -> ``input_tokens``, ``output_tokens``,
  ``cache_read_input_tokens``, ``cache_creation_input_tokens`` (Bedrock's
  ``inputTokens`` for Claude excludes the cached parts, as Anthropic's does);
* errors: the ``x-amzn-errortype`` name (``ThrottlingException`` ...) and
  ``{"message"}`` -> Anthropic's ``{"type": "error", "error": {"type", "message"}}``.

The stream side (:class:`ConverseStreamToMessagesStream`) reads the SSE
events the Bedrock stream decoder makes of the binary event stream (one
``event: <eventType>`` per frame, ``data:`` its JSON payload; an exception
frame is ``event: error`` with ``{"__type", "message"}``) and writes
Anthropic's events. Malformed input raises :class:`TranslationError`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import orjson

from llmproxy import Usage
from llmproxy.filters.translate.chat_to_messages import (
    MessagesStreamToChatStream,
    chat_request_to_messages,
    messages_response_to_chat,
)
from llmproxy.filters.translate.codec import ChatCodec, StreamDecoder, cached_prompt_usage, register_codec
from llmproxy.filters.translate.errors import TranslationError, openai_envelope_from_anthropic

__all__ = [
    "BedrockCodec",
    "ConverseStreamToMessagesStream",
    "bedrock_error_to_anthropic",
    "converse_response_to_messages",
    "from_bedrock",
    "messages_request_to_converse",
]

_CACHE_POINT = {"cachePoint": {"type": "default"}}
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
_STOP_REASONS = {
    "end_turn": "end_turn",
    "tool_use": "tool_use",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "guardrail_intervened": "refusal",
    "content_filtered": "refusal",
    "model_context_window_exceeded": "max_tokens",
}
#: ``x-amzn-errortype`` name -> Anthropic error type.
ERROR_TYPES = {
    "ThrottlingException": "rate_limit_error",
    "ServiceQuotaExceededException": "rate_limit_error",
    "ValidationException": "invalid_request_error",
    "AccessDeniedException": "permission_error",
    "UnrecognizedClientException": "authentication_error",
    "ExpiredTokenException": "authentication_error",
    "ResourceNotFoundException": "not_found_error",
    "ModelNotReadyException": "overloaded_error",
    "ServiceUnavailableException": "overloaded_error",
    "ModelTimeoutException": "api_error",
    "ModelErrorException": "api_error",
    "InternalServerException": "api_error",
    "ModelStreamErrorException": "api_error",
}


# -- request ---------------------------------------------------------------------------
def _with_cache(out: list[dict[str, Any]], block: dict[str, Any], converted: dict[str, Any]) -> None:
    out.append(converted)
    if block.get("cache_control"):
        out.append(_CACHE_POINT)


def _source_bytes(block: dict[str, Any], where: str) -> tuple[str, str]:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64" or not isinstance(source.get("data"), str):
        raise TranslationError(
            f"{where}: Bedrock takes only base64 image and document sources", param=f"{where}.source"
        )
    return str(source.get("media_type") or ""), source["data"]


def _tool_result_content(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content must be a string or a list of blocks", param=f"{where}.content")
    out: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append({"text": part.get("text", "")})
        elif kind == "image":
            media, data = _source_bytes(part, f"{where}.content[{i}]")
            out.append({"image": {"format": _IMAGE_FORMATS.get(media, "png"), "source": {"bytes": data}}})
        else:
            raise TranslationError(f"{where}.content[{i}]: unsupported block type {kind!r}", param=f"{where}.content")
    return out


def _content(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"{where} must be a string or a list of content blocks", param=where)
    out: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        here = f"{where}[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            _with_cache(out, block, {"text": block.get("text", "")})
        elif kind == "image":
            media, data = _source_bytes(block, here)
            fmt = _IMAGE_FORMATS.get(media)
            if fmt is None:
                raise TranslationError(f"{here}: unsupported image type {media!r}", param=f"{here}.source.media_type")
            _with_cache(out, block, {"image": {"format": fmt, "source": {"bytes": data}}})
        elif kind == "document":
            _, data = _source_bytes(block, here)
            name = block.get("title") or f"document-{i}"
            _with_cache(out, block, {"document": {"format": "pdf", "name": name, "source": {"bytes": data}}})
        elif kind == "tool_use":
            use = {"toolUseId": block.get("id", ""), "name": block.get("name", ""), "input": block.get("input") or {}}
            _with_cache(out, block, {"toolUse": use})
        elif kind == "tool_result":
            result: dict[str, Any] = {
                "toolUseId": block.get("tool_use_id", ""),
                "content": _tool_result_content(block.get("content"), here),
            }
            if block.get("is_error"):
                result["status"] = "error"
            _with_cache(out, block, {"toolResult": result})
        elif kind == "thinking":
            text: dict[str, Any] = {"text": block.get("thinking", "")}
            if block.get("signature"):
                text["signature"] = block["signature"]
            out.append({"reasoningContent": {"reasoningText": text}})
        elif kind == "redacted_thinking":
            out.append({"reasoningContent": {"redactedContent": block.get("data", "")}})
        else:
            raise TranslationError(f"{here}: Bedrock Converse has no {kind!r} content block", param=f"{here}.type")
    return out


def messages_request_to_converse(body: dict[str, Any]) -> dict[str, Any]:
    """A Converse request body from an Anthropic Messages request (the model goes in the path)."""
    out: dict[str, Any] = {}
    system = body.get("system")
    if system:
        out["system"] = _content(system, "system")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("'messages' must be a list", param="messages")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise TranslationError(f"messages[{i}].role must be 'user' or 'assistant'", param=f"messages[{i}].role")
        converted.append(
            {"role": message["role"], "content": _content(message.get("content"), f"messages[{i}].content")}
        )
    out["messages"] = converted
    inference: dict[str, Any] = {}
    for src, dst in (
        ("max_tokens", "maxTokens"),
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("stop_sequences", "stopSequences"),
    ):
        if body.get(src) is not None:
            inference[dst] = body[src]
    if inference:
        out["inferenceConfig"] = inference
    additional: dict[str, Any] = {}
    if body.get("top_k") is not None:
        additional["top_k"] = body["top_k"]
    if body.get("thinking") is not None:
        additional["thinking"] = body["thinking"]
    if additional:
        out["additionalModelRequestFields"] = additional
    tools = body.get("tools")
    choice = body.get("tool_choice")
    choice_type = choice.get("type") if isinstance(choice, dict) else None
    if tools and choice_type != "none":
        specs: list[dict[str, Any]] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise TranslationError(f"tools[{i}]: Bedrock Converse has no {kind!r} tool", param=f"tools[{i}].type")
            spec: dict[str, Any] = {
                "name": tool.get("name", ""),
                "inputSchema": {"json": tool.get("input_schema") or {}},
            }
            if tool.get("description"):
                spec["description"] = tool["description"]
            _with_cache(specs, tool, {"toolSpec": spec})
        config: dict[str, Any] = {"tools": specs}
        if choice_type in ("auto", "any"):
            config["toolChoice"] = {choice_type: {}}
        elif choice_type == "tool":
            config["toolChoice"] = {"tool": {"name": choice.get("name", "")}}  # type: ignore[union-attr]
        out["toolConfig"] = config
    return out


# -- response --------------------------------------------------------------------------
def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    out = {"input_tokens": int(usage.get("inputTokens") or 0), "output_tokens": int(usage.get("outputTokens") or 0)}
    if usage.get("cacheReadInputTokens") is not None:
        out["cache_read_input_tokens"] = int(usage["cacheReadInputTokens"])
    if usage.get("cacheWriteInputTokens") is not None:
        out["cache_creation_input_tokens"] = int(usage["cacheWriteInputTokens"])
    return out


def _new_id() -> str:
    return "msg_bdrk_" + secrets.token_hex(12)


def converse_response_to_messages(response: dict[str, Any], *, model: str) -> dict[str, Any]:
    """An Anthropic Messages response from a Converse response."""
    output = response.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    if not isinstance(message, dict):
        raise TranslationError("Converse response without output.message", param="output")
    content: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        if "text" in block:
            content.append({"type": "text", "text": block["text"]})
        elif "toolUse" in block:
            use = block["toolUse"]
            content.append(
                {
                    "type": "tool_use",
                    "id": use.get("toolUseId", ""),
                    "name": use.get("name", ""),
                    "input": use.get("input") or {},
                }
            )
        elif "reasoningContent" in block:
            reasoning = block["reasoningContent"]
            if "redactedContent" in reasoning:
                content.append({"type": "redacted_thinking", "data": reasoning["redactedContent"]})
            else:
                text = reasoning.get("reasoningText") or {}
                content.append(
                    {"type": "thinking", "thinking": text.get("text", ""), "signature": text.get("signature", "")}
                )
    fields = response.get("additionalModelResponseFields")
    stop_sequence = fields.get("stop_sequence") if isinstance(fields, dict) else None
    return {
        "id": _new_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _STOP_REASONS.get(response.get("stopReason") or "", "end_turn"),
        "stop_sequence": stop_sequence,
        "usage": _usage(response.get("usage")),
    }


def bedrock_error_to_anthropic(status: int, error_type: str, body: bytes) -> bytes:
    """Anthropic's error JSON for a Bedrock error (``x-amzn-errortype`` value, ``{"message"}`` body)."""
    name = error_type.split(":", 1)[0].strip()
    message = ""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        message = str(parsed.get("message") or parsed.get("Message") or "")
        name = name or str(parsed.get("__type") or "").rpartition("#")[2]
    if not message:
        message = body.decode("utf-8", "replace")[:500] if body else f"Bedrock error {status}"
    kind = ERROR_TYPES.get(name) or (
        "rate_limit_error" if status == 429 else "invalid_request_error" if 400 <= status < 500 else "api_error"
    )
    text = f"{name}: {message}" if name else message
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": text}})


# -- stream ----------------------------------------------------------------------------
def _event(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":'
)
_JSON_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"input_json_delta","partial_json":'
)
_THINKING_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"thinking_delta","thinking":'
)


class _MessagesSse:
    """Writes Anthropic's events as SSE, the hot deltas from templates (a Messages client's stream)."""

    __slots__ = ()

    def event(self, name: bytes, payload: dict[str, Any]) -> bytes:
        return _event(name, payload)

    def text(self, index: int, text: Any) -> bytes:
        return _TEXT_DELTA % index + orjson.dumps(text) + b"}}\n\n"

    def json(self, index: int, partial: Any) -> bytes:
        return _JSON_DELTA % index + orjson.dumps(partial) + b"}}\n\n"

    def thinking(self, index: int, text: Any) -> bytes:
        return _THINKING_DELTA % index + orjson.dumps(text) + b"}}\n\n"


class _ChatChunks:
    """Hands Anthropic's events, as objects, to a :class:`MessagesStreamToChatStream`: its Chat
    chunks come out, with no Anthropic SSE written and parsed again in between."""

    __slots__ = ("chat",)

    def __init__(self, chat: MessagesStreamToChatStream) -> None:
        self.chat = chat

    def event(self, name: bytes, payload: dict[str, Any]) -> bytes:
        return self.chat.feed_object(payload)

    def text(self, index: int, text: Any) -> bytes:
        return self.chat.text_delta(text)

    def json(self, index: int, partial: Any) -> bytes:
        return self.chat.json_delta(index, partial)

    def thinking(self, index: int, text: Any) -> bytes:
        delta = {"type": "thinking_delta", "thinking": text}
        return self.chat.feed_object({"type": "content_block_delta", "index": index, "delta": delta})


class ConverseStreamToMessagesStream:
    """ConverseStream events (decoded to SSE) -> Anthropic Messages SSE events, for one response.

    ``messageStop`` carries the stop reason and ``metadata`` (after it) the
    usage, which Anthropic sends together in ``message_delta``: the stop
    reason is kept until the usage comes (or the stream ends).

    ``writer`` renders each Anthropic event: as SSE by default; the Chat
    codec's stream passes them on as objects instead (:class:`_ChatChunks`).
    """

    __slots__ = ("_open", "_started", "_stop", "_stopped", "_write", "failed", "model", "usage")

    def __init__(self, *, model: str, writer: _MessagesSse | _ChatChunks | None = None) -> None:
        self.model = model
        self._write = _MessagesSse() if writer is None else writer
        self._started = False
        #: Bedrock block index -> the Anthropic kind of the open block ("text", "tool_use", "thinking").
        self._open: dict[int, str] = {}
        self._stop: str | None = None
        self._stopped = False
        self.failed = False
        #: The provider's usage (from ``metadata``), None until reported.
        self.usage: Usage | None = None

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": _new_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return self._write.event(b"message_start", {"type": "message_start", "message": message})

    def _open_block(self, index: int, kind: str, block: dict[str, Any]) -> bytes:
        self._open[index] = kind
        payload = {"type": "content_block_start", "index": index, "content_block": block}
        return self._write.event(b"content_block_start", payload)

    def feed(self, event: bytes | None, data: bytes) -> bytes:
        """One decoded ConverseStream event -> Anthropic's framed events."""
        if self._stopped:
            return b""
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise TranslationError("ConverseStream event is not JSON", param=None) from None
        if not isinstance(payload, dict):
            raise TranslationError("ConverseStream event is not an object", param=None)
        try:
            if event == b"contentBlockDelta":  # the hot one
                return self._delta(payload)
            handler = _STREAM_HANDLERS.get(event) if event is not None else None
            return handler(self, payload) if handler is not None else b""  # unknown events: skipped
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise TranslationError(f"unexpected ConverseStream event shape: {exc!r}", param=None) from exc

    def _delta(self, payload: dict[str, Any]) -> bytes:
        index = payload.get("contentBlockIndex", 0)
        delta = payload.get("delta") or {}
        out = self._start() if not self._started else b""
        write = self._write
        if "text" in delta:
            if index not in self._open:
                out += self._open_block(index, "text", {"type": "text", "text": ""})
            text = write.text(index, delta["text"])
            return out + text if out else text
        if "toolUse" in delta:
            return out + write.json(index, (delta["toolUse"] or {}).get("input", ""))
        reasoning = delta.get("reasoningContent")
        if isinstance(reasoning, dict):
            if "redactedContent" in reasoning:
                block = {"type": "redacted_thinking", "data": reasoning["redactedContent"]}
                return out + self._open_block(index, "redacted", block)
            if index not in self._open:
                out += self._open_block(index, "thinking", {"type": "thinking", "thinking": "", "signature": ""})
            if "text" in reasoning:
                out += write.thinking(index, reasoning["text"])
            if "signature" in reasoning:
                signature = {"type": "signature_delta", "signature": reasoning["signature"]}
                out += write.event(
                    b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": signature}
                )
        return out

    def _on_block_start(self, payload: dict[str, Any]) -> bytes:
        index = payload.get("contentBlockIndex", 0)
        start = payload.get("start") or {}
        out = self._start()
        use = start.get("toolUse")
        if isinstance(use, dict):
            block = {"type": "tool_use", "id": use.get("toolUseId", ""), "name": use.get("name", ""), "input": {}}
            return out + self._open_block(index, "tool_use", block)
        return out

    def _on_block_stop(self, payload: dict[str, Any]) -> bytes:
        index = payload.get("contentBlockIndex", 0)
        if self._open.pop(index, None) is None:
            return b""
        return self._write.event(b"content_block_stop", {"type": "content_block_stop", "index": index})

    def _on_message_start(self, payload: dict[str, Any]) -> bytes:
        return self._start()

    def _on_message_stop(self, payload: dict[str, Any]) -> bytes:
        self._stop = _STOP_REASONS.get(payload.get("stopReason") or "", "end_turn")
        return self._start() + self._close_blocks()

    def _on_metadata(self, payload: dict[str, Any]) -> bytes:
        raw = payload.get("usage")
        if isinstance(raw, dict):
            self.usage = from_bedrock(raw)
        return self._start() + self._close_blocks() + self._end(_usage(raw))

    def _on_error(self, payload: dict[str, Any]) -> bytes:
        self.failed = self._stopped = True
        name = str(payload.get("__type") or "")
        kind = ERROR_TYPES.get(name, "api_error")
        message = f"{name}: {payload.get('message', '')}" if name else str(payload.get("message", ""))
        return self._write.event(b"error", {"type": "error", "error": {"type": kind, "message": message}})

    def _close_blocks(self) -> bytes:
        out = b""
        for index in sorted(self._open):
            out += self._write.event(b"content_block_stop", {"type": "content_block_stop", "index": index})
        self._open.clear()
        return out

    def _end(self, usage: dict[str, int] | None) -> bytes:
        self._stopped = True
        delta = {"type": "message_delta", "delta": {"stop_reason": self._stop or "end_turn", "stop_sequence": None}}
        if usage is not None:
            delta["usage"] = usage
        return self._write.event(b"message_delta", delta) + self._write.event(b"message_stop", {"type": "message_stop"})

    def finish(self) -> bytes:
        """The end of the upstream body: close what is open (idempotent)."""
        if self._stopped or not self._started:
            return b""
        return self._close_blocks() + self._end(None)


_STREAM_HANDLERS: dict[bytes, Callable[[ConverseStreamToMessagesStream, dict[str, Any]], bytes]] = {
    b"contentBlockStart": ConverseStreamToMessagesStream._on_block_start,
    b"contentBlockStop": ConverseStreamToMessagesStream._on_block_stop,
    b"messageStart": ConverseStreamToMessagesStream._on_message_start,
    b"messageStop": ConverseStreamToMessagesStream._on_message_stop,
    b"metadata": ConverseStreamToMessagesStream._on_metadata,
    b"error": ConverseStreamToMessagesStream._on_error,
}


class _ChatStream:
    """ConverseStream events -> Chat Completions chunks, with the provider's ``usage``: the
    Converse translator writes straight into :class:`MessagesStreamToChatStream` (as objects)."""

    __slots__ = ("first", "last")

    def __init__(self, *, model: str, include_usage: bool) -> None:
        self.last = MessagesStreamToChatStream(model=model, include_usage=include_usage)
        self.first = ConverseStreamToMessagesStream(model=model, writer=_ChatChunks(self.last))

    @property
    def usage(self) -> Usage | None:
        return self.first.usage

    @usage.setter
    def usage(self, value: Usage | None) -> None:
        self.first.usage = value

    def feed(self, event: bytes | None, data: bytes) -> bytes:
        """One ConverseStream event -> the Chat chunks for it."""
        return self.first.feed(event, data)

    def finish(self) -> bytes:
        """End both translators (idempotent)."""
        return self.first.finish() + self.last.finish()


def from_bedrock(usage: dict[str, Any]) -> Usage:
    """A :class:`llmproxy.Usage` from a Converse ``usage`` object.

    ``inputTokens`` excludes the cached parts (as Anthropic's ``input_tokens``
    does), so the record's input is the whole prompt: ``inputTokens +
    cacheReadInputTokens + cacheWriteInputTokens`` (the OpenTelemetry GenAI
    rule), with the cache parts kept separately.
    """
    return cached_prompt_usage(
        usage,
        uncached="inputTokens",
        cache_read="cacheReadInputTokens",
        cache_write="cacheWriteInputTokens",
        output="outputTokens",
    )


@register_codec("bedrock")
class BedrockCodec(ChatCodec):
    """Bedrock Converse as a chat-pivot codec (:mod:`llmproxy.filters.translate.codec`).

    Chat requests go to Converse through Anthropic Messages
    (``chat_request_to_messages`` then :func:`messages_request_to_converse`),
    replies come back the same way. ``framing`` is ``sse``: the Bedrock
    adapter's core stream decoder has already turned the binary event stream
    into SSE events (``event: contentBlockDelta`` ...).

    Two additions to the chat-pivot interface, both optional for codecs:

    * ``error_header``: routing passes the value of this response header to
      :meth:`decode_error` as ``error_type`` (Bedrock names the error there:
      ``x-amzn-errortype: ThrottlingException:...``, the body has only ``message``);
    * ``messages_native``: an Anthropic Messages client's request, JSON reply
      and stream skip the chat hop (:meth:`encode_messages_request`,
      :meth:`decode_messages_response`, :meth:`messages_stream_decoder`), so
      that Claude on Bedrock keeps ``cache_control`` (``cachePoint``) and
      ``thinking`` (``reasoningContent``), which Chat Completions cannot carry.
    """

    framing = "sse"
    error_header = "x-amzn-errortype"
    messages_native = True

    def encode_request(self, chat: dict[str, Any], *, model: str) -> dict[str, Any]:
        messages = chat_request_to_messages(chat, model=model)
        if chat.get("max_tokens") is None and chat.get("max_completion_tokens") is None:
            messages.pop("max_tokens", None)  # Converse has its own default: no made-up limit
        return messages_request_to_converse(messages)

    def decode_response(self, body: dict[str, Any], *, model: str) -> dict[str, Any]:
        return messages_response_to_chat(converse_response_to_messages(body, model=model), model=model)

    def stream_decoder(self, *, model: str, include_usage: bool) -> StreamDecoder:
        return _ChatStream(model=model, include_usage=include_usage)

    def decode_error(self, body: bytes, status: int, *, error_type: str = "") -> tuple[int, dict[str, Any]]:
        inner = orjson.loads(bedrock_error_to_anthropic(status, error_type, body))["error"]
        return status, openai_envelope_from_anthropic(inner, status=status)

    def usage(self, body: dict[str, Any]) -> Usage | None:
        usage = body.get("usage")
        return from_bedrock(usage) if isinstance(usage, dict) else None

    # -- the Messages-native extension ---------------------------------------------------
    def encode_messages_request(self, body: dict[str, Any], *, model: str) -> dict[str, Any]:
        """The Converse body for an Anthropic Messages request (nothing lost on the way)."""
        return messages_request_to_converse(body)

    def decode_messages_response(self, body: dict[str, Any], *, model: str) -> dict[str, Any]:
        """The Anthropic Message for a Converse response."""
        return converse_response_to_messages(body, model=model)

    def messages_stream_decoder(self, *, model: str) -> ConverseStreamToMessagesStream:
        """ConverseStream events straight to Anthropic's events (``usage`` kept on it)."""
        return ConverseStreamToMessagesStream(model=model)
