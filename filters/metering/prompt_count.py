"""Count the prompt tokens of a request body, per wire protocol, with one encoding.

OpenAI chat completions follows the OpenAI cookbook ("How to count tokens with tiktoken",
``num_tokens_from_messages``): every message costs 3 tokens plus the tokens of each of its string
values, ``name`` costs 1 more, and the reply is primed with 3. That rule reproduces the usage
OpenAI reports for gpt-3.5-turbo-0613, gpt-4-0613 and gpt-4o. Beyond it (approximate=True):

* assistant ``tool_calls`` / ``function_call``: the function name plus the arguments string;
* ``tools`` / ``functions``: the cookbook's ``num_tokens_for_tools`` estimate (7 tokens per
  function for o200k models, 10 for cl100k, 3 + 3 per property, enum items 3 each, 12 at the end);
* images: see images.py (exact when the size is in the data: URL and the model's rule is known).

Anthropic messages (always approximate: Claude's tokenizer is not public): the same per-message
overhead; ``system`` (string or text blocks); text, thinking, tool_use (name + JSON input),
tool_result (its text or blocks), image (w*h/750) and text-document blocks; ``tools`` as name +
description + JSON schema, plus the tool-use system prompt Anthropic documents (346 tokens for
``tool_choice`` auto/none, 313 for any/tool).

OpenAI Responses ``input`` (a string or a list of items) and ``instructions`` are counted with the
chat rule: message items like chat messages, function_call as name + arguments,
function_call_output as its output; anything else as its JSON text, approximate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from llmproxy.filters.metering.images import (
    anthropic_image_tokens,
    base64_image_size,
    data_url_size,
    openai_image_tokens,
)

Encode = Callable[[str], int]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
_ANTHROPIC_TOOL_PROMPT = {"auto": 346, "none": 346, "any": 313, "tool": 313}


class Tally:
    """A running count: ``tokens`` so far and whether any part of it was estimated."""

    __slots__ = ("approximate", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.approximate = False

    def add(self, tokens: int, approximate: bool = False) -> None:
        self.tokens += tokens
        self.approximate = self.approximate or approximate


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


# ---------------------------------------------------------------- OpenAI chat completions


def _openai_part(part: Any, enc: Encode, model: str, tally: Tally) -> None:
    if isinstance(part, str):
        tally.add(enc(part))
        return
    if not isinstance(part, dict):
        return
    kind = part.get("type")
    if kind in ("text", "input_text", "output_text"):
        tally.add(enc(str(part.get("text", ""))))
    elif kind == "refusal":
        tally.add(enc(str(part.get("refusal", ""))))
    elif kind in ("image_url", "input_image"):
        image = part.get("image_url")
        url = image.get("url", "") if isinstance(image, dict) else (image or "")
        detail = (image.get("detail") if isinstance(image, dict) else None) or part.get("detail") or "auto"
        size = data_url_size(url) if isinstance(url, str) else None
        tokens, approx = openai_image_tokens(size[0] if size else None, size[1] if size else None, str(detail), model)
        tally.add(tokens, approx)
    else:  # input_audio, file, input_file: not countable from the request alone
        tally.add(0, True)


def _openai_message(message: Any, enc: Encode, model: str, tally: Tally) -> None:
    tally.add(TOKENS_PER_MESSAGE)
    if not isinstance(message, dict):
        return
    for key, value in message.items():
        if isinstance(value, str):
            tally.add(enc(value))
            if key == "name":
                tally.add(TOKENS_PER_NAME)
        elif key == "content" and isinstance(value, list):
            for part in value:
                _openai_part(part, enc, model, tally)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                tally.add(enc(str(fn.get("name", ""))) + enc(str(fn.get("arguments", ""))), True)
        elif key == "function_call" and isinstance(value, dict):
            tally.add(enc(str(value.get("name", ""))) + enc(str(value.get("arguments", ""))), True)


def _strip_dot(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def openai_tools(tools: Iterable[Any], enc: Encode, func_init: int, tally: Tally) -> None:
    """The cookbook's ``num_tokens_for_tools`` estimate, for chat and Responses tool shapes."""
    count = 0
    seen = False
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or "name" not in fn:
            count += enc(_json(tool))  # built-in tools (web_search, ...): their JSON, roughly
            seen = True
            continue
        seen = True
        count += func_init + enc(f"{fn.get('name', '')}:{_strip_dot(str(fn.get('description') or ''))}")
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and props:
            count += 3
            for key, prop in props.items():
                prop = prop if isinstance(prop, dict) else {}
                count += 3
                enum = prop.get("enum")
                if isinstance(enum, list):
                    count -= 3
                    for item in enum:
                        count += 3 + enc(str(item))
                ptype = prop.get("type", "")
                line = f"{key}:{ptype if isinstance(ptype, str) else _json(ptype)}:"
                count += enc(line + _strip_dot(str(prop.get("description") or "")))
                nested = {k: prop[k] for k in ("properties", "items", "anyOf") if k in prop}
                if nested:
                    count += enc(_json(nested))
    if seen:
        tally.add(count + 12, True)


def count_openai_chat(body: dict[str, Any], enc: Encode, model: str, func_init: int) -> Tally:
    """Prompt tokens of an OpenAI ``/v1/chat/completions`` body (cookbook rule, see module doc)."""
    tally = Tally()
    for message in body.get("messages") or ():
        _openai_message(message, enc, model, tally)
    tally.add(REPLY_PRIMING)
    tools = body.get("tools") or body.get("functions")
    if isinstance(tools, list):
        openai_tools(tools, enc, func_init, tally)
    return tally


# ---------------------------------------------------------------- OpenAI Responses


def _responses_item(item: Any, enc: Encode, model: str, tally: Tally) -> None:
    if isinstance(item, str):
        tally.add(TOKENS_PER_MESSAGE + enc(item))
        return
    if not isinstance(item, dict):
        return
    kind = item.get("type", "message")
    if kind == "message" or "role" in item:
        tally.add(TOKENS_PER_MESSAGE + enc(str(item.get("role", "user"))))
        content = item.get("content")
        if isinstance(content, str):
            tally.add(enc(content))
        elif isinstance(content, list):
            for part in content:
                _openai_part(part, enc, model, tally)
    elif kind == "function_call":
        tally.add(TOKENS_PER_MESSAGE + enc(str(item.get("name", ""))) + enc(str(item.get("arguments", ""))), True)
    elif kind == "function_call_output":
        output = item.get("output", "")
        tally.add(TOKENS_PER_MESSAGE + enc(output if isinstance(output, str) else _json(output)), True)
    else:
        tally.add(TOKENS_PER_MESSAGE + enc(_json(item)), True)


def count_responses(body: dict[str, Any], enc: Encode, model: str, func_init: int) -> Tally:
    """Prompt tokens of an OpenAI ``/v1/responses`` body: ``instructions`` + ``input`` + tools."""
    tally = Tally()
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        tally.add(TOKENS_PER_MESSAGE + enc("system") + enc(instructions))
    items = body.get("input")
    if isinstance(items, str):
        tally.add(TOKENS_PER_MESSAGE + enc("user") + enc(items))
    elif isinstance(items, list):
        for item in items:
            _responses_item(item, enc, model, tally)
    tally.add(REPLY_PRIMING)
    tools = body.get("tools")
    if isinstance(tools, list):
        openai_tools(tools, enc, func_init, tally)
    return tally


# ---------------------------------------------------------------- Anthropic messages


def _anthropic_block(block: Any, enc: Encode, tally: Tally) -> None:
    if isinstance(block, str):
        tally.add(enc(block))
        return
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind == "text":
        tally.add(enc(str(block.get("text", ""))))
    elif kind == "thinking":
        tally.add(enc(str(block.get("thinking", ""))))
    elif kind == "tool_use" or kind == "server_tool_use":
        tally.add(enc(str(block.get("name", ""))) + enc(_json(block.get("input", {}))))
    elif kind == "tool_result":
        content = block.get("content")
        if isinstance(content, str):
            tally.add(enc(content))
        elif isinstance(content, list):
            for inner in content:
                _anthropic_block(inner, enc, tally)
    elif kind == "image":
        source = block.get("source") or {}
        size = None
        if isinstance(source, dict) and source.get("type") == "base64":
            size = base64_image_size(str(source.get("data", "")))
        tokens, _ = anthropic_image_tokens(size[0] if size else None, size[1] if size else None)
        tally.add(tokens, True)
    elif kind == "document":
        source = block.get("source") or {}
        if isinstance(source, dict) and source.get("type") == "text":
            tally.add(enc(str(source.get("data", ""))))
        else:
            tally.add(0, True)
    else:  # redacted_thinking, search results, ...: not countable here
        tally.add(0, True)


def count_anthropic(body: dict[str, Any], enc: Encode) -> Tally:
    """Prompt tokens of an Anthropic ``/v1/messages`` body, approximated (see module doc)."""
    tally = Tally()
    tally.approximate = True
    system = body.get("system")
    if isinstance(system, str) and system:
        tally.add(TOKENS_PER_MESSAGE + enc(system))
    elif isinstance(system, list):
        tally.add(TOKENS_PER_MESSAGE)
        for block in system:
            _anthropic_block(block, enc, tally)
    for message in body.get("messages") or ():
        tally.add(TOKENS_PER_MESSAGE)
        if not isinstance(message, dict):
            continue
        tally.add(enc(str(message.get("role", ""))))
        content = message.get("content")
        if isinstance(content, str):
            tally.add(enc(content))
        elif isinstance(content, list):
            for block in content:
                _anthropic_block(block, enc, tally)
    tally.add(REPLY_PRIMING)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        choice = body.get("tool_choice")
        mode = choice.get("type", "auto") if isinstance(choice, dict) else "auto"
        tally.add(_ANTHROPIC_TOOL_PROMPT.get(str(mode), 346))
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            tally.add(enc(str(tool.get("name", ""))) + enc(str(tool.get("description") or "")))
            schema = tool.get("input_schema")
            tally.add(enc(_json(schema)) if schema is not None else enc(_json(tool)))
    return tally
