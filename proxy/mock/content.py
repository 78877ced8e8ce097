"""Reply content shared by both providers: deterministic text, token counts and tool calls (pure, cached).

The reply text is the words of :data:`VOCAB`, each followed by a space; a
prompt counts ``characters // 4`` tokens (at least 1), so tests can compute
every number a reply carries.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import orjson

from llmproxy.mock.replies import Call

__all__ = [
    "VOCAB",
    "WORD_JSON",
    "arg_pieces",
    "budget",
    "prompt_tokens",
    "reply_text",
    "split3",
    "text_of",
    "text_pieces",
    "tool_plan",
    "tool_tokens",
]

VOCAB: Final = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
)  # fmt: skip
WORD_JSON: Final = tuple(orjson.dumps(w + " ") for w in VOCAB)

_TEXT_KEYS: Final = frozenset({"messages", "content", "text", "system", "prompt", "input", "instructions"})


def _chars(node: object) -> int:
    """Characters of prompt text under ``node`` (integers in token arrays count as 4)."""
    kind = type(node)
    if kind is str:
        return len(node)  # type: ignore[arg-type]
    total = 0
    if kind is list:
        for item in node:  # type: ignore[attr-defined]
            total += len(item) if type(item) is str else _chars(item)
    elif kind is dict:
        for key, value in node.items():  # type: ignore[attr-defined]
            if key in _TEXT_KEYS:
                total += len(value) if type(value) is str else _chars(value)
    elif kind is int:
        total = 4
    return total


def prompt_tokens(node: object) -> int:
    """Deterministic, cheap prompt token count: characters // 4, at least 1."""
    return max(1, _chars(node) // 4)


@functools.lru_cache(maxsize=128)
def reply_text(n: int) -> str:
    """The reply text of ``n`` tokens: vocabulary words, each followed by a space."""
    return "".join(f"{VOCAB[i % len(VOCAB)]} " for i in range(n))


def _tool_args(i: int) -> str:
    """The JSON arguments of tool call ``i`` (0-based)."""
    return orjson.dumps({"q": f"call {i}", "n": i}).decode()


def split3(text: str) -> list[str]:
    """``text`` in (up to) three consecutive fragments, as a model streams arguments."""
    step = max(1, -(-len(text) // 3))
    return [text[i : i + step] for i in range(0, len(text), step)]


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def text_of(call: Call, n: int) -> str:
    """The reply text: ``x-mock-reply`` when given, else ``n`` vocabulary words."""
    return call.reply if call.reply is not None else reply_text(n)


def text_pieces(call: Call) -> list[str]:
    """The streamed pieces of an ``x-mock-reply`` text: ``x-mock-chunk-chars`` each, or word by word."""
    text = call.reply or ""
    if call.chunk_chars:
        return _chunks(text, call.chunk_chars)
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + ([words[-1]] if words[-1] else [])


def arg_pieces(call: Call, args: str) -> list[str]:
    """Streamed fragments of tool-call arguments: ``x-mock-chunk-chars`` each, or three."""
    return _chunks(args, call.chunk_chars) if call.chunk_chars else split3(args)


def _tool_names(body: dict[str, Any]) -> list[str]:
    """Names of the request's tools, OpenAI (``function.name``) or Anthropic (``name``) form."""
    names: list[str] = []
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                fn = tool.get("function")
                name = fn.get("name") if isinstance(fn, dict) else tool.get("name")
                if isinstance(name, str):
                    names.append(name)
    return names


def tool_plan(call: Call) -> list[tuple[str, str]]:
    """``(name, arguments)`` of the tool calls to make: empty unless asked and tools exist."""
    if not call.tool_calls:
        return []
    names = _tool_names(call.body)
    if not names:
        if call.tool_args is None:
            return []
        names = ["tool"]
    args = call.tool_args
    return [(names[i % len(names)], _tool_args(i) if args is None else args) for i in range(call.tool_calls)]


def budget(call: Call, *limit_fields: str) -> tuple[int, bool]:
    """Tokens to produce and whether the request's max-tokens limit cut them short.

    An ``x-mock-reply`` text is never cut: it counts ``characters // 4`` tokens (at least 1).
    """
    if call.reply is not None:
        return max(1, len(call.reply) // 4), False
    for name in limit_fields:
        limit = call.body.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            return (limit, True) if limit < call.tokens else (call.tokens, False)
    return call.tokens, False


def tool_tokens(calls: list[tuple[str, str]]) -> int:
    """Deterministic completion tokens of tool calls."""
    return sum(max(1, (len(name) + len(args)) // 4) for name, args in calls)
