"""Clients speak the OpenAI Responses API, the provider speaks Chat Completions.

Pure translations, no I/O (an Anthropic provider is reached by chaining
these with :mod:`~llmproxy.filters.translate.chat_to_messages`: Responses ->
Chat -> Messages, see :class:`~llmproxy.filters.translate.ChainedStream`):

* :func:`responses_request_to_chat` — a ``/v1/responses`` request body (plus
  the input items of the conversation so far, for ``previous_response_id``)
  to a ``/v1/chat/completions`` body;
* :func:`chat_response_to_responses` — a ``chat.completion`` to a
  ``response`` object;
* the stream: :mod:`~llmproxy.filters.translate.responses_stream`.

Mapping (request): ``instructions`` becomes a leading system message;
``input`` (a string or a list of items) becomes messages: ``message`` items by
role (``input_text``/``output_text``/``refusal`` parts to text,
``input_image`` to ``image_url``, ``input_file`` with ``file_data`` to a
``file`` part), consecutive ``function_call`` items to one assistant
message's ``tool_calls``, ``function_call_output`` to a ``tool`` message.
``reasoning`` input items are not sent (Chat Completions has no way to give
reasoning back), except, for an Anthropic provider (``keep_thinking``), the
thinking blocks this module put in their ``encrypted_content``: they become
the next assistant message's ``thinking_blocks``, replayed with their
signatures. ``max_output_tokens`` -> ``max_tokens``; ``text.format`` ->
``response_format``; ``reasoning.effort`` -> ``reasoning_effort``;
``tools`` of type ``function`` and ``tool_choice`` -> their Chat forms;
``temperature``, ``top_p``, ``parallel_tool_calls``, ``user`` (or
``safety_identifier``), ``text.verbosity``, ``top_logprobs`` are kept.
What cannot be bridged is refused with a :class:`TranslationError` naming
the field: hosted tools (``web_search``, ``file_search``, ...),
``item_reference`` and other non-message items, ``file_id`` images and files,
``background``, ``conversation``, ``prompt``, ``max_tool_calls``.
``include``, ``truncation``, ``metadata``, ``store``,
``previous_response_id`` and ``stream_options`` are the caller's business.

Mapping (response): ``reasoning_content`` (DeepSeek, vLLM; ``reasoning`` on
some servers) becomes a ``reasoning`` item with one ``summary_text``, and
Anthropic thinking blocks (``thinking_blocks``, signatures included) its
opaque ``encrypted_content``, which a follow-up request (its input items or
``previous_response_id``) replays to an Anthropic provider; the
text a ``message`` item with one ``output_text`` part; each tool call a
``function_call`` item. ``finish_reason`` ``length`` gives status
``incomplete`` with reason ``max_output_tokens``, ``content_filter`` gives
``incomplete`` with reason ``content_filter``.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Sequence
from typing import Any

import orjson

from llmproxy.filters.translate.codec import token_count
from llmproxy.filters.translate.errors import TranslationError

__all__ = [
    "chat_response_to_responses",
    "decode_thinking",
    "encode_thinking",
    "finish_status",
    "input_items",
    "message_item",
    "new_item_id",
    "new_response_id",
    "reasoning_item",
    "reasoning_text",
    "response_skeleton",
    "responses_request_to_chat",
    "responses_usage",
]

JsonObject = dict[str, Any]

#: Request fields that have no Chat Completions equivalent and change what the
#: model does: refused rather than dropped.
_REFUSED_FIELDS = ("background", "conversation", "prompt", "max_tool_calls")


def new_response_id() -> str:
    """A fresh Responses id (``resp_`` and 48 hex digits, the shape OpenAI uses)."""
    return "resp_" + secrets.token_hex(24)


def new_item_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


def encode_thinking(blocks: Sequence[JsonObject]) -> str:
    """Anthropic thinking blocks (signatures included) as a reasoning item's opaque ``encrypted_content``."""
    return base64.b64encode(orjson.dumps(list(blocks))).decode()


def decode_thinking(content: object) -> list[JsonObject]:
    """The thinking blocks in an ``encrypted_content`` made by :func:`encode_thinking`; [] for any other
    (a real OpenAI one, garbage): it cannot be replayed to a bridged provider."""
    if not isinstance(content, str) or not content:
        return []
    try:
        blocks = orjson.loads(base64.b64decode(content, validate=True))
    except (binascii.Error, ValueError):
        return []
    if not isinstance(blocks, list):
        return []
    return [b for b in blocks if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")]


# ---------------------------------------------------------------------------
# Request: responses -> chat.completions
# ---------------------------------------------------------------------------


def input_items(body: JsonObject) -> list[JsonObject]:
    """The request's ``input`` as a list of items (a string is one user message).

    Raises :class:`TranslationError` when ``input`` is neither a string nor a list.
    """
    raw = body.get("input")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise TranslationError("'input' must be a string or a list of items", param="input")
    return raw


def _part(raw: object, param: str, role: str) -> JsonObject:
    if not isinstance(raw, dict):
        raise TranslationError("content parts must be objects", param=param)
    part: JsonObject = raw
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text", "summary_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise TranslationError(f"{kind} part needs a string 'text'", param=param)
        if "cache_control" in part:  # not OpenAI's, sent by clients that know the model is Anthropic's
            return {"type": "text", "text": text, "cache_control": part["cache_control"]}
        return {"type": "text", "text": text}
    if kind == "refusal":
        text = part.get("refusal")
        return {"type": "text", "text": text if isinstance(text, str) else ""}
    if kind == "input_image" and role != "assistant":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise TranslationError("only image_url images can be bridged (not file_id)", param=param)
        image: JsonObject = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and role != "assistant":
        data = part.get("file_data")
        if not isinstance(data, str) or not data:
            raise TranslationError("only inline file_data files can be bridged (not file_id or file_url)", param=param)
        file: JsonObject = {"file_data": data}
        if isinstance(part.get("filename"), str):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    raise TranslationError(f"unsupported content part type {kind!r}", param=param)


def _message(item: JsonObject, param: str) -> JsonObject:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise TranslationError(f"unsupported message role {role!r}", param=f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of parts", param=f"{param}.content")
    parts = [_part(p, f"{param}.content[{j}]", role) for j, p in enumerate(content)]
    if role != "user" and all(p.keys() == {"type", "text"} and p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _tool_output(output: object, param: str) -> str | list[JsonObject]:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        parts = [_part(p, f"{param}.output[{j}]", "user") for j, p in enumerate(output)]
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts
    raise TranslationError("function_call_output.output must be a string or a list of parts", param=f"{param}.output")


def _messages(items: Sequence[object], first: int = 0, *, keep_thinking: bool = False) -> list[JsonObject]:
    """Chat messages for Responses input items; ``first`` numbers the items in error params.

    With ``keep_thinking``, a reasoning item carrying Anthropic thinking (see
    :func:`encode_thinking`) becomes the ``thinking_blocks`` of the assistant
    message that follows it.
    """
    messages: list[JsonObject] = []
    thinking: list[JsonObject] = []
    for i, item in enumerate(items, first):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise TranslationError("input items must be objects", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if (
                not thinking
                and last is not None
                and last["role"] == "assistant"
                and isinstance(last.get("content"), (str, type(None)))
            ):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": _tool_output(item.get("output"), param),
                }
            )
        elif kind == "reasoning":
            if keep_thinking:
                thinking.extend(decode_thinking(item.get("encrypted_content")))
            continue  # otherwise Chat Completions cannot take reasoning back (see the module docstring)
        else:
            raise TranslationError(
                f"input item type {kind!r} cannot be bridged to this provider", param=f"{param}.type"
            )
        if thinking and messages and messages[-1]["role"] == "assistant":
            messages[-1]["thinking_blocks"] = thinking
            thinking = []
    return messages


def _tools(body: JsonObject, out: JsonObject) -> None:
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise TranslationError("'tools' must be a list", param="tools")
        chat_tools: list[JsonObject] = []
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise TranslationError(
                    f"tool type {kind!r} cannot be bridged to this provider", param=f"tools[{i}].type"
                )
            function: JsonObject = {"name": tool.get("name")}
            if tool.get("description"):
                function["description"] = tool["description"]
            function["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
            if tool.get("strict") is not None:
                function["strict"] = tool["strict"]
            chat_tools.append({"type": "function", "function": function})
        out["tools"] = chat_tools
    choice = body.get("tool_choice")
    if choice is None:
        return
    if choice in ("auto", "none", "required"):
        out["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise TranslationError(
            "only auto, none, required and function tool choices can be bridged", param="tool_choice"
        )


def _response_format(text: object) -> JsonObject | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        schema: JsonObject = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        if fmt.get("description"):
            schema["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": schema}
    raise TranslationError(f"text format {kind!r} cannot be bridged", param="text.format")


def responses_request_to_chat(
    body: JsonObject,
    *,
    model: str,
    history: Sequence[JsonObject] = (),
    stream_usage: bool = True,
    keep_thinking: bool = False,
) -> JsonObject:
    """Translate a Responses request body into a Chat Completions request body.

    ``model`` is the provider's model name; ``history`` the input and output
    items of the conversation before this request (``previous_response_id``),
    sent before this request's ``input``. A stream asks for the usage chunk
    (``stream_options.include_usage``) when ``stream_usage``. ``keep_thinking``
    (the provider is Anthropic, reached through
    :func:`~llmproxy.filters.translate.chat_request_to_messages`) replays the
    thinking blocks of reasoning items as ``thinking_blocks``. Raises
    :class:`TranslationError` naming the field for what cannot be bridged
    (see the module docstring).
    """
    for name in _REFUSED_FIELDS:
        if body.get(name) not in (None, False):
            raise TranslationError(f"'{name}' is not supported when this model is bridged", param=name)
    messages: list[JsonObject] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    elif instructions is not None and not isinstance(instructions, str):
        raise TranslationError("'instructions' must be a string", param="instructions")
    if history:
        messages.extend(_messages(history, -len(history), keep_thinking=keep_thinking))
    messages.extend(_messages(input_items(body), keep_thinking=keep_thinking))
    out: JsonObject = {"model": model, "messages": messages}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(key) is not None:
            out[key] = body[key]
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["user"] = user
    _tools(body, out)
    if "parallel_tool_calls" in out and "tools" not in out:
        del out["parallel_tool_calls"]  # OpenAI refuses it without tools
    text = body.get("text")
    response_format = _response_format(text)
    if response_format is not None:
        out["response_format"] = response_format
    if isinstance(text, dict) and text.get("verbosity") is not None:
        out["verbosity"] = text["verbosity"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]
    if isinstance(body.get("top_logprobs"), int) and body["top_logprobs"] > 0:
        out["logprobs"] = True
        out["top_logprobs"] = body["top_logprobs"]
    if body.get("stream") is True:
        out["stream"] = True
        if stream_usage:
            out["stream_options"] = {"include_usage": True}
    return out


# ---------------------------------------------------------------------------
# Response: chat.completion -> response
# ---------------------------------------------------------------------------


def responses_usage(usage: object) -> JsonObject:
    """A Responses ``usage`` object from a Chat Completions one (zeros when absent)."""
    u = usage if isinstance(usage, dict) else {}
    prompt = token_count(u.get("prompt_tokens"))
    completion = token_count(u.get("completion_tokens"))
    pd = u.get("prompt_tokens_details")
    cd = u.get("completion_tokens_details")
    cached = token_count(pd.get("cached_tokens")) if isinstance(pd, dict) else 0
    reasoning = token_count(cd.get("reasoning_tokens")) if isinstance(cd, dict) else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def finish_status(finish_reason: object) -> tuple[str, JsonObject | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_skeleton(body: JsonObject, *, response_id: str, model: str, created_at: int) -> JsonObject:
    """The ``response`` object's fields that echo the request (status ``in_progress``, no output)."""
    raw_text, raw_reasoning = body.get("text"), body.get("reasoning")
    text: JsonObject = raw_text if isinstance(raw_text, dict) else {}
    reasoning: JsonObject = raw_reasoning if isinstance(raw_reasoning, dict) else {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation") or "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def reasoning_item(text: str, status: str = "completed", thinking: Sequence[JsonObject] = ()) -> JsonObject:
    item: JsonObject = {
        "id": new_item_id("rs_"),
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": text}] if text else [],
        "status": status,
    }
    if thinking:
        item["encrypted_content"] = encode_thinking(thinking)
    return item


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> JsonObject:
    return {
        "id": item_id or new_item_id("msg_"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def reasoning_text(holder: JsonObject) -> str | None:
    text = holder.get("reasoning_content")
    if text is None:
        text = holder.get("reasoning")
    return text if isinstance(text, str) and text else None


def chat_response_to_responses(resp: JsonObject, *, request: JsonObject, response_id: str, model: str) -> JsonObject:
    """Translate a ``chat.completion`` into a ``response`` object (see the module docstring).

    ``request`` is the client's Responses request (its echoed fields);
    ``model`` the name reported back. Raises :class:`TranslationError` when
    ``resp`` has no choice.
    """
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TranslationError("chat completion has no choices")
    choice = choices[0]
    raw_message = choice.get("message")
    message: JsonObject = raw_message if isinstance(raw_message, dict) else {}
    status, incomplete = finish_status(choice.get("finish_reason"))
    output: list[JsonObject] = []
    reasoning = reasoning_text(message)
    raw_thinking = message.get("thinking_blocks")
    thinking = [b for b in raw_thinking if isinstance(b, dict)] if isinstance(raw_thinking, list) else []
    if reasoning is not None or thinking:
        output.append(reasoning_item(reasoning or "", thinking=thinking))
    content = message.get("content")
    if isinstance(content, list):  # some servers send content parts back
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    if isinstance(content, str) and content:
        output.append(message_item(content, status))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        output.append(
            {
                "id": new_item_id("msg_"),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [{"type": "refusal", "refusal": refusal}],
            }
        )
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        output.append(
            {
                "id": new_item_id("fc_"),
                "type": "function_call",
                "status": "completed",
                "call_id": call.get("id") or new_item_id("call_"),
                "name": function.get("name") or "",
                "arguments": function.get("arguments") or "",
            }
        )
    created = resp.get("created")
    out = response_skeleton(
        request, response_id=response_id, model=model, created_at=created if type(created) is int else int(time.time())
    )
    out["status"] = status
    out["incomplete_details"] = incomplete
    out["output"] = output
    out["usage"] = responses_usage(resp.get("usage"))
    return out
