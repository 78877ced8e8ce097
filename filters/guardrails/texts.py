"""Where the text is: the strings of a request and of a whole response that rules look at.

Every function takes ``fix``, called with each text and returning its
replacement (the same object when unchanged); it returns True when some text
changed. Request texts: every message's content (strings and text parts),
the system prompt and instructions, tool results, assistant tool-call
arguments and tool_use inputs, in Chat Completions, Messages and Responses
shapes (never signed thinking blocks echoed back: changing one breaks its
signature). Response texts: message text, tool-call arguments (OpenAI's JSON
text, Anthropic's ``input`` values) and reasoning text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

__all__ = ["fix_output_item", "fix_request", "fix_response"]

Fix = Callable[[str], str]

#: Keys whose string value is text the rules look at.
#: (Not ``thinking``: a request echoes signed thinking blocks back, and a changed one is refused.)
_TEXT: Final = frozenset({"content", "text", "system", "instructions", "input", "arguments", "output", "prompt"})
#: Keys whose list or mapping value may hold such text.
_NESTED: Final = _TEXT | frozenset({"messages", "tool_calls", "function"})


def _fix_all(node: Any, fix: Fix) -> bool:
    """Every string under ``node`` (a tool_use ``input``: all of it is the model's or the user's)."""
    changed = False
    # (replacing a value while iterating keeps a dict's size: allowed)
    pairs = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in pairs:
        if isinstance(value, str):
            new = fix(value)
            if new is not value:
                node[key] = new
                changed = True
        elif isinstance(value, (dict, list)):
            changed |= _fix_all(value, fix)
    return changed


def _fix_node(node: Any, fix: Fix) -> bool:
    changed = False
    if isinstance(node, dict):
        tool_use = node.get("type") == "tool_use"
        for key, value in node.items():
            if key not in _NESTED:
                continue
            if isinstance(value, str):
                if key in _TEXT:
                    new = fix(value)
                    if new is not value:
                        node[key] = new
                        changed = True
            elif tool_use and key == "input":
                changed |= _fix_all(value, fix)
            elif isinstance(value, (dict, list)):
                changed |= _fix_node(value, fix)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str):
                new = fix(value)
                if new is not value:
                    node[i] = new
                    changed = True
            else:
                changed |= _fix_node(value, fix)
    return changed


def fix_request(body: dict[str, Any], fix: Fix) -> bool:
    """The texts of a chat, messages, responses or completions request (``body`` changed in place)."""
    return _fix_node(body, fix)


def fix_output_item(item: Any, fix: Fix) -> bool:
    """One Responses output item: message text parts, function-call arguments, reasoning text."""
    if not isinstance(item, dict):
        return False
    changed = False
    args = item.get("arguments")
    if isinstance(args, str):
        new = fix(args)
        if new is not args:
            item["arguments"] = new
            changed = True
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            for part in parts:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    new = fix(part["text"])
                    if new is not part["text"]:
                        part["text"] = new
                        changed = True
    return changed


def fix_response(api: str, body: Any, fix: Fix) -> bool:
    """The texts of a whole (non-streamed) response of ``api``: chat, completions, messages or responses."""
    if not isinstance(body, dict):
        return False
    changed = False
    if api in ("chat", "completions"):
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                new = fix(choice["text"])
                if new is not choice["text"]:
                    choice["text"] = new
                    changed = True
            message = choice.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("content"), str):
                    new = fix(message["content"])
                    if new is not message["content"]:
                        message["content"] = new
                        changed = True
                for call in message.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        new = fix(fn["arguments"])
                        if new is not fn["arguments"]:
                            fn["arguments"] = new
                            changed = True
    elif api == "messages":
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                changed |= _fix_all(block.get("input"), fix)
                continue
            for key in ("text", "thinking"):
                if isinstance(block.get(key), str):
                    new = fix(block[key])
                    if new is not block[key]:
                        block[key] = new
                        changed = True
    elif api == "responses":
        for item in body.get("output") or ():
            changed |= fix_output_item(item, fix)
    return changed
