"""The admission estimate of a request: its prompt tokens and the output it may produce.

The prompt is counted with metering's tokenizer on the body as it will be
sent (``exchange.request_json()``, parsed once; off the loop for big
prompts). The output is the request's own cap (``max_completion_tokens``,
``max_tokens`` or ``max_output_tokens``, the first present), or the
configured default when it has none (embeddings produce none). A cap that is
not a non-negative integer is a 400 naming the field, before anything is
reserved.
"""

from __future__ import annotations

from typing import Any

from llmproxy import BadRequest
from llmproxy.filters.metering.tokenizer import count_prompt_async, count_prompt_inline, detect_protocol

__all__ = [
    "GEMINI_FIELD",
    "OUTPUT_FIELDS",
    "asks_cap",
    "output_cap",
    "prompt_tokens",
    "prompt_tokens_now",
    "set_output_cap",
]

#: The request fields that cap the output, in the order they are looked for.
OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


#: Gemini's output cap (``generationConfig.maxOutputTokens``), named as :func:`output_cap` reports it.
GEMINI_FIELD = "generationConfig.maxOutputTokens"


def output_cap(payload: dict[str, Any], default: int) -> tuple[int, str | None]:
    """``(cap, field)``: the request's output cap and the field it came from (None: the default).

    A Gemini body (routed to a ``type: gemini`` provider) has it nested: ``field`` is then
    :data:`GEMINI_FIELD`, which :func:`set_output_cap` understands.
    """
    config = payload.get("generationConfig")
    if isinstance(config, dict) and "contents" in payload:
        value = config.get("maxOutputTokens")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, GEMINI_FIELD
        return default, None
    for name in OUTPUT_FIELDS:
        if name in payload and payload[name] is not None:
            value = payload[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequest(f"'{name}' must be a non-negative integer", param=name, code="invalid_value")
            return value, name
    return default, None


def set_output_cap(payload: dict[str, Any], field: str | None, cap: int) -> None:
    """Set the upstream body's output cap: in ``field`` (as :func:`output_cap` named it), or, with
    none, in the body's protocol's own field (Gemini's nested one, Messages' ``max_tokens``,
    else ``max_output_tokens``)."""
    if field is None and "contents" in payload and "messages" not in payload:
        field = GEMINI_FIELD
    if field == GEMINI_FIELD:
        config = payload.get("generationConfig")
        payload["generationConfig"] = {**(config if isinstance(config, dict) else {}), "maxOutputTokens": cap}
        return
    payload[field or ("max_tokens" if "messages" in payload else "max_output_tokens")] = cap


def asks_cap(payload: dict[str, Any]) -> bool:
    """Whether a request sets an output cap itself (any of :data:`OUTPUT_FIELDS`, not null).

    Used on the client's own request when routing translated it: a translation to
    Anthropic's Messages adds a default ``max_tokens`` the client never asked for.
    """
    return any(payload.get(name) is not None for name in OUTPUT_FIELDS)


def prompt_tokens_now(payload: Any, body: bytes, model: str) -> int | None:
    """:func:`prompt_tokens` as a plain call, or None when the count must run off the loop (a long
    prompt, an encoding not loaded yet): then await :func:`prompt_tokens`."""
    if isinstance(payload, dict):
        try:
            counted = count_prompt_inline(payload, detect_protocol(payload), model, wire_size=len(body))
        except Exception:  # not a chat, Responses or Messages body: fall back on its size
            return _by_size(body)
        return counted.tokens if counted is not None else None
    return _by_size(body)


async def prompt_tokens(payload: Any, body: bytes, model: str) -> int:
    """Prompt tokens of ``payload`` (a request JSON); a body that is not a chat-like request
    is estimated from its size (a third of its bytes, an overestimate for any text)."""
    if isinstance(payload, dict):
        try:
            counted = await count_prompt_async(payload, detect_protocol(payload), model, wire_size=len(body))
            return counted.tokens
        except Exception:  # not a chat, Responses or Messages body: fall back on its size
            pass
    return _by_size(body)


def _by_size(body: bytes) -> int:
    return len(body) // 3 + 1
