"""``type: openai``: OpenAI and every OpenAI-compatible server.

vLLM, Ollama, Groq, DeepSeek, Mistral, Together, OpenRouter... differ only
in ``base_url`` (which includes the ``/v1`` part, as in the OpenAI SDK's
``base_url``). The key goes in ``Authorization: Bearer``.

``native_responses: false`` is for a server without ``/v1/responses`` (most
OpenAI-compatible ones): Responses requests are then bridged to its Chat
Completions by the routing filter instead of passed through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmproxy.filters.routing.adapters.base import Adapter, register

__all__ = ["OpenAIAdapter"]

_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
}


@register("openai")
class OpenAIAdapter(Adapter):
    protocol = "openai"
    native_apis = frozenset(_PATHS)
    extra_options = {"native_responses": True}

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        native = self.options.get("native_responses", True)
        if not isinstance(native, bool):
            raise ValueError("native_responses: must be true or false")
        if not native:
            self.native_apis = frozenset(_PATHS) - {"responses"}  # type: ignore[misc]

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"authorization", b"Bearer " + key.encode("latin-1")),)

    def path(self, api: str, provider_model: str, query: str) -> str:
        return _PATHS[api] + query
