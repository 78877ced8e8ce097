"""Local replies for the token-counting endpoints, counted offline with the metering tokenizer.

=====================================  ==========================================================
request                                reply (200, JSON)
=====================================  ==========================================================
``POST /v1/messages/count_tokens``     ``{"input_tokens": N}`` (Anthropic's shape)
``POST /v1/responses/input_tokens``    ``{"object": "response.input_tokens", "input_tokens": N}``
                                       (OpenAI's shape, ``InputTokenCountResponse``)
``POST /v1/chat/completions/           the OpenAI shape above, for a chat completions body
count_tokens``                         (llmproxy's own endpoint; OpenAI has none for chat)
=====================================  ==========================================================

The functions are pure: ``(body, model) -> reply dict``; ``model`` is the model the request
resolves to (the body's ``model`` after routing). The count is the prompt count of
``tokenizer.count_prompt`` — exact for OpenAI models with a public tokenizer, approximate for
Claude (see models.py); the reply shapes carry no such flag, so callers that care should read
:func:`count_for` or forward to the provider's own endpoint. For large bodies, use
:func:`reply_async`, which counts off the event loop above ``tokenizer.INLINE_LIMIT``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmproxy.filters.metering.tokenizer import Protocol, TokenCount, count_prompt, count_prompt_async

ANTHROPIC_COUNT_TOKENS = "/v1/messages/count_tokens"
RESPONSES_INPUT_TOKENS = "/v1/responses/input_tokens"
CHAT_COUNT_TOKENS = "/v1/chat/completions/count_tokens"

# path -> the protocol its body is in
PROTOCOLS: dict[str, Protocol] = {
    ANTHROPIC_COUNT_TOKENS: "anthropic",
    RESPONSES_INPUT_TOKENS: "responses",
    CHAT_COUNT_TOKENS: "openai",
}


def anthropic_count_tokens(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Reply to ``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``."""
    return {"input_tokens": count_prompt(body, "anthropic", model).tokens}


def responses_input_tokens(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Reply to ``POST /v1/responses/input_tokens``: ``{"object": "response.input_tokens", ...}``."""
    return _openai_reply(count_prompt(body, "responses", model))


def chat_count_tokens(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Reply to ``POST /v1/chat/completions/count_tokens`` (a chat body), OpenAI's reply shape."""
    return _openai_reply(count_prompt(body, "openai", model))


def _openai_reply(counted: TokenCount) -> dict[str, Any]:
    return {"object": "response.input_tokens", "input_tokens": counted.tokens}


def _shape(path: str, counted: TokenCount) -> dict[str, Any]:
    if path == ANTHROPIC_COUNT_TOKENS:
        return {"input_tokens": counted.tokens}
    return _openai_reply(counted)


REPLIES: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    ANTHROPIC_COUNT_TOKENS: anthropic_count_tokens,
    RESPONSES_INPUT_TOKENS: responses_input_tokens,
    CHAT_COUNT_TOKENS: chat_count_tokens,
}


def count_for(path: str, body: dict[str, Any], model: str) -> TokenCount | None:
    """The full count (with encoding and approximate flag) behind ``path``'s reply; None if not a count path."""
    protocol = PROTOCOLS.get(path)
    return None if protocol is None else count_prompt(body, protocol, model)


async def reply_async(path: str, body: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The reply for a count path, counted with ``count_prompt_async``; None if ``path`` is not one."""
    protocol = PROTOCOLS.get(path)
    if protocol is None:
        return None
    return _shape(path, await count_prompt_async(body, protocol, model))
