"""Gemini ``generateContent`` as a chat-pivot codec (:mod:`.codec`): Google AI Studio and Vertex.

Request (Chat Completions -> ``GenerateContentRequest``):

* ``system``/``developer`` messages -> ``systemInstruction.parts``;
* ``user``/``assistant`` -> ``contents`` with roles ``user``/``model``
  (consecutive turns of one role merged, as Gemini wants them alternating);
  text parts, ``image_url`` data URLs -> ``inlineData`` (an ``http(s)`` URL is
  refused: Gemini fetches only its own file URIs); ``tool_calls`` ->
  ``functionCall`` parts; ``tool`` messages -> ``functionResponse`` parts (the
  function's name found from the call's id; content that is a JSON object is
  the response, other content is ``{"result": content}``);
* ``tools`` (``function`` only; another type is refused naming
  ``tools[i].type``) -> one ``functionDeclarations`` tool (JSON Schema keys
  Gemini rejects, ``$schema`` and ``additionalProperties``, left out);
  ``tool_choice`` -> ``toolConfig.functionCallingConfig`` (auto AUTO, none
  NONE, required ANY, a named function ANY with ``allowedFunctionNames``);
* ``temperature``, ``top_p``, ``max_tokens``/``max_completion_tokens``,
  ``stop``, ``n``, ``seed``, ``presence_penalty``, ``frequency_penalty`` ->
  ``generationConfig``; ``response_format`` json_object/json_schema ->
  ``responseMimeType: application/json`` (and ``responseJsonSchema``);
  ``reasoning_effort`` -> ``thinkingConfig`` (none/minimal 0, low 1024,
  medium 8192, high 24576 budget tokens, thought summaries included).

Response: text parts -> ``content``, ``thought: true`` parts ->
``reasoning_content``, ``functionCall`` parts -> ``tool_calls`` (arguments
as a JSON string; ids ``call_<responseId>_<n>`` unless Gemini sent one);
``finishReason`` STOP -> ``stop`` (``tool_calls`` when there are calls),
MAX_TOKENS -> ``length``, SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT,
SPII, IMAGE_SAFETY, LANGUAGE -> ``content_filter``, others -> ``stop``.
``promptFeedback.blockReason``, or a SAFETY-class finish with no content, is
a refusal: 400 ``content_filter`` in the client's protocol.

Usage (``usageMetadata``): input ``promptTokenCount`` (it includes the
cached part, ``cachedContentTokenCount``, kept as cache reads); output
``candidatesTokenCount + thoughtsTokenCount``, the thoughts also being the
reasoning tokens.

Errors: ``{"error": {"code", "message", "status"}}``: the status's family
gives the OpenAI type (INVALID_ARGUMENT invalid_request_error,
UNAUTHENTICATED/API_KEY_INVALID authentication_error (401),
PERMISSION_DENIED permission_error, RESOURCE_EXHAUSTED rate_limit_error,
DEADLINE_EXCEEDED timeout_error, 5xx server_error); ``code`` is Gemini's
status string.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import orjson

from llmproxy import Usage
from llmproxy.filters.translate._json import dumps_str, loads_object
from llmproxy.filters.translate.codec import ChatCodec, CodecRefusal, register_codec, token_count
from llmproxy.filters.translate.errors import TranslationError

__all__ = ["GeminiCodec", "GeminiStreamDecoder", "gemini_usage"]

JsonObject = dict[str, Any]

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.S)
_SCHEMA_DROP = frozenset({"$schema", "additionalProperties", "strict"})
_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE"})
#: reasoning_effort -> Gemini 2.5's thinkingBudget (0 turns thinking off; thought summaries come back).
_THINKING_BUDGETS = {"none": 0, "minimal": 0, "low": 1024, "medium": 8192, "high": 24576}
_TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
_GENERATION = {
    "temperature": "temperature",
    "top_p": "topP",
    "max_tokens": "maxOutputTokens",
    "max_completion_tokens": "maxOutputTokens",
    "n": "candidateCount",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}
# Gemini status -> (client status or 0 to keep, OpenAI type)
_ERRORS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (0, "invalid_request_error"),
    "FAILED_PRECONDITION": (0, "invalid_request_error"),
    "OUT_OF_RANGE": (0, "invalid_request_error"),
    "NOT_FOUND": (0, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (0, "permission_error"),
    "RESOURCE_EXHAUSTED": (0, "rate_limit_error"),
    "DEADLINE_EXCEEDED": (0, "timeout_error"),
    "CANCELLED": (0, "server_error"),
    "INTERNAL": (0, "server_error"),
    "UNAVAILABLE": (0, "server_error"),
}
_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 504: "timeout_error"}


# -- request -------------------------------------------------------------------------


def _schema(value: Any) -> Any:
    """A JSON Schema without the keys Gemini's ``parameters`` refuses."""
    if isinstance(value, dict):
        return {k: _schema(v) for k, v in value.items() if k not in _SCHEMA_DROP}
    if isinstance(value, list):
        return [_schema(v) for v in value]
    return value


def _text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, str):
                out.append(part)
            else:
                raise TranslationError(f"{param}[{i}] must be a text part", param=f"{param}[{i}]")
        return "".join(out)
    if content is None:
        return ""
    raise TranslationError(f"{param} must be a string or a list of parts", param=param)


def _user_parts(content: object, param: str) -> list[JsonObject]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{param} must be a string or a list of parts", param=param)
    parts: list[JsonObject] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise TranslationError(f"{where}.image_url.url must be a string", param=f"{where}.image_url.url")
            found = _DATA_URL.fullmatch(url)
            if found is None:
                raise TranslationError(
                    f"{where}.image_url.url: Gemini takes images as data URLs (base64) only, not remote URLs",
                    param=f"{where}.image_url.url",
                )
            parts.append({"inlineData": {"mimeType": found.group(1), "data": found.group(2)}})
        else:
            raise TranslationError(f"{where}.type: {kind!r} parts have no Gemini equivalent", param=f"{where}.type")
    return parts


def _arguments(raw: object, param: str) -> JsonObject:
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise TranslationError(f"{param} must be a JSON string", param=param)
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise TranslationError(f"{param} is not valid JSON", param=param) from None
    if not isinstance(value, dict):
        raise TranslationError(f"{param} must be a JSON object", param=param)
    return value


def _tool_response(content: object, param: str) -> JsonObject:
    text = _text(content, param)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"result": text}
    return value if isinstance(value, dict) else {"result": value}


def _contents(messages: list[Any]) -> tuple[list[JsonObject], list[JsonObject]]:
    """(system parts, contents) of a chat ``messages`` list."""
    system: list[JsonObject] = []
    contents: list[JsonObject] = []
    names: dict[str, str] = {}  # tool_call_id -> function name

    def add(role: str, parts: list[JsonObject]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise TranslationError(f"{param} must be an object", param=param)
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            system.append({"text": _text(content, f"{param}.content")})
        elif role == "user":
            add("user", _user_parts(content, f"{param}.content"))
        elif role == "assistant":
            parts: list[JsonObject] = []
            text = _text(content, f"{param}.content")
            if text:
                parts.append({"text": text})
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise TranslationError(f"{param}.tool_calls must be a list", param=f"{param}.tool_calls")
            for j, call in enumerate(calls):
                where = f"{param}.tool_calls[{j}]"
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise TranslationError(f"{where}.function.name is required", param=f"{where}.function.name")
                names[str(call.get("id"))] = function["name"]
                args = _arguments(function.get("arguments", "{}"), f"{where}.function.arguments")
                parts.append({"functionCall": {"name": function["name"], "args": args}})
            add("model", parts)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = names.get(str(call_id))
            if name is None:
                raise TranslationError(
                    f"{param}.tool_call_id matches no earlier assistant tool call", param=f"{param}.tool_call_id"
                )
            response = _tool_response(content, f"{param}.content")
            add("user", [{"functionResponse": {"name": name, "response": response}}])
        else:
            raise TranslationError(f"{param}.role: unknown role {role!r}", param=f"{param}.role")
    return system, contents


def _tools(body: JsonObject, out: JsonObject) -> None:
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise TranslationError("tools must be a list", param="tools")
        declarations = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise TranslationError(
                    f"tools[{i}].type: {kind!r} tools have no Gemini equivalent", param=f"tools[{i}].type"
                )
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise TranslationError(f"tools[{i}].function.name is required", param=f"tools[{i}].function.name")
            declaration: JsonObject = {"name": function["name"]}
            if isinstance(function.get("description"), str):
                declaration["description"] = function["description"]
            if isinstance(function.get("parameters"), dict) and function["parameters"].get("properties"):
                declaration["parameters"] = _schema(function["parameters"])
            declarations.append(declaration)
        out["tools"] = [{"functionDeclarations": declarations}]
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str) and choice in _TOOL_MODES:
        out["toolConfig"] = {"functionCallingConfig": {"mode": _TOOL_MODES[choice]}}
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        config = {"mode": "ANY", "allowedFunctionNames": [function["name"]]}
        out["toolConfig"] = {"functionCallingConfig": config}
        return
    raise TranslationError("tool_choice: must be auto, none, required or a named function", param="tool_choice")


def chat_request_to_gemini(body: JsonObject) -> JsonObject:
    """The ``GenerateContentRequest`` for a Chat Completions request (see the module docstring)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages must be a list", param="messages")
    system, contents = _contents(messages)
    out: JsonObject = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    _tools(body, out)
    config: JsonObject = {}
    for key, name in _GENERATION.items():
        value = body.get(key)
        if value is not None:
            config[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        config["stopSequences"] = stop
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
        if kind == "json_schema":
            schema = fmt.get("json_schema")
            if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
                config["responseJsonSchema"] = schema["schema"]
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in _THINKING_BUDGETS:
            raise TranslationError(
                f"reasoning_effort: must be one of {', '.join(_THINKING_BUDGETS)}", param="reasoning_effort"
            )
        budget = _THINKING_BUDGETS[effort]
        config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": budget > 0}
    if config:
        out["generationConfig"] = config
    return out


# -- response ------------------------------------------------------------------------


def gemini_usage(metadata: JsonObject, *, final: bool = True) -> Usage:
    """A :class:`Usage` from ``usageMetadata`` (see the module docstring); ``partial`` when not final."""
    prompt = token_count(metadata.get("promptTokenCount"))
    thoughts = token_count(metadata.get("thoughtsTokenCount"))
    record = Usage(
        input_tokens=prompt,
        output_tokens=token_count(metadata.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=token_count(metadata.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        provider_usage=metadata,
    )
    if not final:
        record.extra["partial"] = True
    return record


def _chat_usage(metadata: JsonObject) -> JsonObject:
    prompt = token_count(metadata.get("promptTokenCount"))
    thoughts = token_count(metadata.get("thoughtsTokenCount"))
    completion = token_count(metadata.get("candidatesTokenCount")) + thoughts
    usage: JsonObject = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    cached = token_count(metadata.get("cachedContentTokenCount"))
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts:
        usage["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return usage


def _finish(reason: object, has_calls: bool) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _FILTERED:
        return "content_filter"
    return "tool_calls" if has_calls else "stop"


def _refusal(reason: str, what: str) -> CodecRefusal:
    message = f"Gemini blocked the {what} (reason {reason})"
    error = {"message": message, "type": "invalid_request_error", "code": "content_filter", "param": None}
    return CodecRefusal(400, {"error": error})


def _blocked(body: JsonObject) -> CodecRefusal | None:
    feedback = body.get("promptFeedback")
    if isinstance(feedback, dict) and isinstance(feedback.get("blockReason"), str):
        return _refusal(feedback["blockReason"], "prompt")
    return None


def _call_id(call: JsonObject, response_id: str, n: int) -> str:
    given = call.get("id")
    return given if isinstance(given, str) and given else f"call_{response_id}_{n}"


def _tool_call(call: JsonObject, call_id: str) -> JsonObject:
    """A chat ``tool_calls`` entry for a ``functionCall`` part."""
    name = call.get("name")
    arguments = orjson.dumps(call.get("args") or {}).decode()
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name if isinstance(name, str) else "", "arguments": arguments},
    }


def gemini_response_to_chat(body: JsonObject, *, model: str) -> JsonObject:
    """A ``chat.completion`` for a ``GenerateContentResponse``; raises :class:`CodecRefusal` for a block."""
    blocked = _blocked(body)
    if blocked is not None:
        raise blocked
    candidates = body.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise TranslationError("response has no candidates")
    response_id = body.get("responseId") if isinstance(body.get("responseId"), str) else secrets.token_hex(12)
    choices = []
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
            raise TranslationError(f"candidates[{i}] is not an object")
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        parts = parts if isinstance(parts, list) else []
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[JsonObject] = []
        for part in parts:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                (thoughts if part.get("thought") is True else texts).append(part["text"])
            call = part.get("functionCall")
            if isinstance(call, dict):
                calls.append(
                    {
                        "id": _call_id(call, str(response_id), len(calls)),
                        "type": "function",
                        "function": {
                            "name": call.get("name", ""),
                            "arguments": orjson.dumps(call.get("args") or {}).decode(),
                        },
                    }
                )
        reason = candidate.get("finishReason")
        if reason in _FILTERED and not texts and not calls:
            raise _refusal(str(reason), "response")
        message: JsonObject = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        if calls:
            message["tool_calls"] = calls
        index = candidate.get("index")
        choices.append(
            {
                "index": index if type(index) is int else i,
                "message": message,
                "finish_reason": _finish(reason, bool(calls)),
                "logprobs": None,
            }
        )
    out: JsonObject = {
        "id": f"chatcmpl-{response_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("modelVersion") if isinstance(body.get("modelVersion"), str) else model,
        "choices": choices,
    }
    metadata = body.get("usageMetadata")
    if isinstance(metadata, dict):
        out["usage"] = _chat_usage(metadata)
    return out


def gemini_error_to_chat(body: bytes, status: int) -> tuple[int, JsonObject]:
    """The client status and OpenAI envelope for a Gemini error body (any body: see the module docstring)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and parsed:  # a stream's error comes as a one-element array sometimes
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        text = body.decode("utf-8", "replace").strip()[:2000] or "(empty error body)"
        error = {"message": text}
    return _envelope(error, status)


def _envelope(error: JsonObject, status: int) -> tuple[int, JsonObject]:
    code = error.get("status")
    code = code if isinstance(code, str) else None
    client_status, kind = _ERRORS.get(code or "", (0, ""))
    details = error.get("details")
    if isinstance(details, list) and any(isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details):
        client_status, kind, code = 401, "authentication_error", "invalid_api_key"
    status = client_status or status
    if not kind:
        kind = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = error.get("message")
    envelope = {
        "message": message if isinstance(message, str) and message else "Upstream error",
        "type": kind,
        "code": code,
        "param": None,
    }
    return status, {"error": envelope}


# -- stream --------------------------------------------------------------------------

_DONE = b"data: [DONE]\n\n"


class GeminiStreamDecoder:
    """One ``streamGenerateContent?alt=sse`` stream to Chat Completions chunks.

    Each event is one ``GenerateContentResponse``: its text parts become
    ``content`` deltas, thought parts ``reasoning_content`` deltas, each
    ``functionCall`` a whole tool-call delta (Gemini sends calls whole), a
    ``finishReason`` the finish chunk; ``usageMetadata`` (in every chunk,
    the counts so far) updates :attr:`usage`. A block (``promptFeedback``,
    or a SAFETY-class finish before any content) and an ``error`` payload
    become an OpenAI error chunk and end the stream. :meth:`finish` sends the
    usage chunk (``include_usage``) and ``[DONE]``, or an error chunk when the
    provider's stream ended before a finish reason.
    """

    __slots__ = (
        "_calls",
        "_closed",
        "_finished",
        "_head",
        "_id",
        "_include_usage",
        "_metadata",
        "_model",
        "_sent",
        "usage",
    )

    def __init__(self, *, model: str, include_usage: bool) -> None:
        self._model = model
        self._include_usage = include_usage
        #: b'data: {"id":...,"choices":[{"index":' (set by the first event)
        self._head = b""
        self._id = ""
        self._calls = 0
        self._sent = False  # any content or call delta sent
        self._finished = False
        self._closed = False
        self._metadata: JsonObject | None = None
        self.usage: Usage | None = None

    def _start(self, payload: JsonObject) -> bytes:
        response_id = payload.get("responseId")
        response_id = response_id if isinstance(response_id, str) else secrets.token_hex(12)
        self._id = response_id
        model = payload.get("modelVersion")
        model = model if isinstance(model, str) else self._model
        self._head = (
            b'data: {"id":'
            + dumps_str(f"chatcmpl-{response_id}")
            + b',"object":"chat.completion.chunk","created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + dumps_str(model)
            + b',"choices":['
        )
        return self._head + b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'

    def _delta(self, index: bytes, delta: bytes) -> bytes:
        return self._head + b'{"index":' + index + b',"delta":' + delta + b',"finish_reason":null}]}\n\n'

    def _error(self, envelope: JsonObject) -> bytes:
        self._closed = True
        return b"data: " + orjson.dumps(envelope) + b"\n\n"

    def feed(self, event: bytes | None, data: bytes) -> bytes:
        """The chat chunks for one Gemini SSE event's data."""
        if self._closed or not data.strip():
            return b""
        payload = loads_object(data, "SSE event data")
        out = b"" if self._head else self._start(payload)
        error = payload.get("error")
        if isinstance(error, dict):
            return out + self._error(_envelope(error, 500)[1])
        metadata = payload.get("usageMetadata")
        if isinstance(metadata, dict) and metadata != self._metadata:  # the running counts repeat: one record
            self._metadata = metadata
            self.usage = gemini_usage(metadata, final=False)
        blocked = _blocked(payload)
        if blocked is not None:
            return out + self._error(blocked.envelope)
        candidates = payload.get("candidates")
        if not isinstance(candidates, list):
            return out
        for candidate in candidates:
            if not isinstance(candidate, dict):
                continue
            index = candidate.get("index")
            idx = str(index if type(index) is int else 0).encode()
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else ():
                if not isinstance(part, dict):
                    continue
                text = part.get("text")
                if isinstance(text, str) and text:
                    key = b'{"reasoning_content":' if part.get("thought") is True else b'{"content":'
                    out += self._delta(idx, key + dumps_str(text) + b"}")
                    self._sent = True
                call = part.get("functionCall")
                if isinstance(call, dict):
                    tool_call = {
                        "index": self._calls,
                        "id": _call_id(call, self._id, self._calls),
                        "type": "function",
                        "function": {
                            "name": call.get("name", ""),
                            "arguments": orjson.dumps(call.get("args") or {}).decode(),
                        },
                    }
                    self._calls += 1
                    self._sent = True
                    out += self._delta(idx, b'{"tool_calls":[' + orjson.dumps(tool_call) + b"]}")
            reason = candidate.get("finishReason")
            if isinstance(reason, str):
                if reason in _FILTERED and not self._sent:
                    return out + self._error(_refusal(reason, "response").envelope)
                self._finished = True
                if self.usage is not None:
                    self.usage.extra.pop("partial", None)
                finish = _finish(reason, self._calls > 0).encode()
                out += self._head + b'{"index":' + idx + b',"delta":{},"finish_reason":"' + finish + b'"}]}\n\n'
        return out

    def finish(self) -> bytes:
        """What is still due at the end of the provider's stream (idempotent)."""
        if self._closed:
            return b""
        if not self._finished:
            envelope = {
                "error": {
                    "message": "the provider's stream ended before its finish reason",
                    "type": "server_error",
                    "code": "upstream_stream_cut",
                    "param": None,
                }
            }
            return self._error(envelope)
        self._closed = True
        if not self._include_usage or self._metadata is None:
            return _DONE
        usage = orjson.dumps(_chat_usage(self._metadata))
        return self._head + b'],"usage":' + usage + b"}\n\n" + _DONE


@register_codec("gemini")
class GeminiCodec(ChatCodec):
    """Gemini's ``generateContent`` protocol (AI Studio; Vertex AI's Gemini takes the same bodies)."""

    def encode_request(self, chat: JsonObject, *, model: str) -> JsonObject:
        return chat_request_to_gemini(chat)

    def decode_response(self, body: JsonObject, *, model: str) -> JsonObject:
        return gemini_response_to_chat(body, model=model)

    def stream_decoder(self, *, model: str, include_usage: bool) -> GeminiStreamDecoder:
        return GeminiStreamDecoder(model=model, include_usage=include_usage)

    def decode_error(self, body: bytes, status: int) -> tuple[int, JsonObject]:
        return gemini_error_to_chat(body, status)

    def usage(self, body: JsonObject) -> Usage | None:
        metadata = body.get("usageMetadata")
        return gemini_usage(metadata) if isinstance(metadata, dict) else None
