"""``type: openai``: OpenAI and every OpenAI-compatible server.

vLLM, Ollama, Groq, DeepSeek, Mistral, Together, OpenRouter... differ only
in ``base_url`` (which includes the ``/v1`` part, as in the OpenAI SDK's
``base_url``). The key goes in ``Authorization: Bearer``.
"""

from __future__ import annotations

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

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"authorization", b"Bearer " + key.encode("latin-1")),)

    def path(self, api: str, provider_model: str, query: str) -> str:
        return _PATHS[api] + query
