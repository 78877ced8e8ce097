"""Prompt and completion content for a span (``content: true`` only), redacted.

The GenAI conventions' message shapes (``gen_ai.input.messages``,
``gen_ai.output.messages``, ``gen_ai.system_instructions``: JSON arrays of
``{"role", "parts": [...]}`` with ``text``, ``tool_call``,
``tool_call_response`` and ``reasoning`` parts, output messages with their
``finish_reason``), made from the client's request body and from the
response merged by :func:`llmproxy.filters.metering.merged.merged_response`,
in the client's protocol (OpenAI chat or Responses, Anthropic messages).

:class:`Redactor` replaces, in every string value, the secrets the proxy
knows (provider keys, the client's credential), the default secret
patterns (API keys of the common providers, bearer tokens, private key
blocks, AWS access key ids) and the configured patterns, with
``[REDACTED]``. Runs in the export thread, never on the event loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["DEFAULT_PATTERNS", "REDACTED", "Redactor", "input_messages", "output_messages"]

REDACTED = "[REDACTED]"

#: Secrets recognised by shape (set ``redact_defaults: false`` to use only your own patterns).
DEFAULT_PATTERNS: tuple[str, ...] = (
    r"sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}",  # OpenAI / Anthropic API keys
    r"\b[Bb]earer\s+[A-Za-z0-9._~+/\-]{16,}=*",
    r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",  # GitHub tokens
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"\bAIza[0-9A-Za-z_\-]{35}\b",  # Google API keys
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
)


class Redactor:
    """Replaces secrets and patterns in the string values of a JSON-like value."""

    def __init__(self, patterns: Iterable[str], secrets: Iterable[str] = ()) -> None:
        self._patterns = [re.compile(p) for p in patterns]
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def text(self, value: str, extra: Iterable[str] = ()) -> str:
        for secret in (*self._secrets, *extra):
            if secret and secret in value:
                value = value.replace(secret, REDACTED)
        for pattern in self._patterns:
            value = pattern.sub(REDACTED, value)
        return value

    def value(self, value: Any, extra: tuple[str, ...] = ()) -> Any:
        """``value`` with every string inside it redacted (a new object; the input is not changed)."""
        if isinstance(value, str):
            return self.text(value, extra)
        if isinstance(value, list):
            return [self.value(item, extra) for item in value]
        if isinstance(value, dict):
            return {key: self.value(item, extra) for key, item in value.items()}
        return value


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
    return raw


def _text_parts(content: Any) -> list[dict[str, Any]]:
    """Parts of a content value: a string, or a list of typed blocks (OpenAI or Anthropic)."""
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    if not isinstance(content, list):
        return parts
    for block in content:
        if isinstance(block, str):
            parts.append({"type": "text", "content": block})
            continue
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "input_text", "output_text"):
            parts.append({"type": "text", "content": block.get("text", "")})
        elif kind in ("tool_use", "server_tool_use"):
            parts.append(
                {"type": "tool_call", "id": block.get("id"), "name": block.get("name"), "arguments": block.get("input")}
            )
        elif kind == "tool_result":
            parts.append(
                {"type": "tool_call_response", "id": block.get("tool_use_id"), "response": block.get("content")}
            )
        elif kind in ("thinking", "redacted_thinking"):
            parts.append({"type": "reasoning", "content": block.get("thinking", "")})
        elif isinstance(kind, str):
            parts.append({"type": kind})  # images, files, audio: the kind only, never the data
    return parts


def _openai_message(message: dict[str, Any]) -> dict[str, Any]:
    role = message.get("role") if isinstance(message.get("role"), str) else "user"
    if role == "tool":
        return {
            "role": "tool",
            "parts": [
                {"type": "tool_call_response", "id": message.get("tool_call_id"), "response": message.get("content")}
            ],
        }
    parts = _text_parts(message.get("content"))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                parts.append(
                    {
                        "type": "tool_call",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "arguments": _arguments(function.get("arguments")),
                    }
                )
    return {"role": role, "parts": parts}


def input_messages(body: Any, protocol: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(input messages, system instructions)`` of a client request body in ``protocol``."""
    if not isinstance(body, dict):
        return [], []
    messages = body.get("messages")
    if protocol == "anthropic":
        system = _text_parts(body.get("system"))
        out = [
            {"role": m.get("role", "user"), "parts": _text_parts(m.get("content"))}
            for m in messages or ()
            if isinstance(m, dict)
        ]
        return out, system
    if isinstance(messages, list):
        return [_openai_message(m) for m in messages if isinstance(m, dict)], []
    if "input" in body:  # Responses API
        raw = body["input"]
        system = _text_parts(body["instructions"]) if isinstance(body.get("instructions"), str) else []
        if isinstance(raw, str):
            return [{"role": "user", "parts": [{"type": "text", "content": raw}]}], system
        if isinstance(raw, list):
            return [
                {"role": m.get("role", "user"), "parts": _text_parts(m.get("content"))}
                for m in raw
                if isinstance(m, dict)
            ], system
    if "prompt" in body:  # legacy completions
        return [{"role": "user", "parts": _text_parts(body["prompt"])}], []
    return [], []


def output_messages(merged: Any, protocol: str) -> list[dict[str, Any]]:
    """The output messages of a merged response (see the module docstring)."""
    if not isinstance(merged, dict):
        return []
    if protocol == "anthropic" or merged.get("type") == "message":
        return [
            {
                "role": merged.get("role", "assistant"),
                "parts": _text_parts(merged.get("content")),
                "finish_reason": merged.get("stop_reason"),
            }
        ]
    out: list[dict[str, Any]] = []
    choices = merged.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            converted: dict[str, Any] = (
                _openai_message(message) if isinstance(message, dict) else {"role": "assistant", "parts": []}
            )
            if isinstance(message, dict) and isinstance(message.get("reasoning_content"), str):
                converted["parts"].insert(0, {"type": "reasoning", "content": message["reasoning_content"]})
            if isinstance(choice.get("text"), str):
                converted["parts"].append({"type": "text", "content": choice["text"]})
            converted["finish_reason"] = choice.get("finish_reason")
            out.append(converted)
        return out
    output = merged.get("output")  # Responses API
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict) and item.get("type") == "message":
                out.append(
                    {
                        "role": "assistant",
                        "parts": _text_parts(item.get("content")),
                        "finish_reason": merged.get("status"),
                    }
                )
            elif isinstance(item, dict) and item.get("type") == "function_call":
                out.append(
                    {
                        "role": "assistant",
                        "parts": [
                            {
                                "type": "tool_call",
                                "id": item.get("call_id"),
                                "name": item.get("name"),
                                "arguments": _arguments(item.get("arguments")),
                            }
                        ],
                        "finish_reason": "tool_call",
                    }
                )
    return out
