"""``type: gemini``: Google AI Studio's Gemini API (``generateContent``), through the Gemini codec.

``base_url`` is ``https://generativelanguage.googleapis.com/v1beta``. The key
goes in ``x-goog-api-key``. The provider's model name goes in the path:
``/models/{model}:generateContent``, or ``/models/{model}:streamGenerateContent?alt=sse``
for ``stream: true``. Chat, Messages and Responses clients are all
translated (:mod:`llmproxy.filters.translate.gemini`); the client's query
string is not sent on.

Another adapter speaking the same protocol with other paths and auth
(Vertex AI) subclasses :class:`GeminiAdapter` and overrides
:meth:`~GeminiAdapter.request_path` and ``credential_headers``.
"""

from __future__ import annotations

from urllib.parse import quote

from llmproxy.filters.routing.adapters.base import Adapter, register
from llmproxy.filters.translate.codec import CODECS
from llmproxy.filters.translate.gemini import GeminiCodec  # noqa: F401  (registers the codec)

__all__ = ["GeminiAdapter"]


@register("gemini")
class GeminiAdapter(Adapter):
    protocol = "gemini"
    native_apis = frozenset({"chat"})
    codec = CODECS["gemini"]

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"x-goog-api-key", key.encode("latin-1")),)

    def path(self, api: str, provider_model: str, query: str) -> str:
        return self.request_path(api, provider_model, query, stream=False)

    def request_path(self, api: str, provider_model: str, query: str, *, stream: bool) -> str:
        model = quote(provider_model, safe="-._")
        return f"/models/{model}:streamGenerateContent?alt=sse" if stream else f"/models/{model}:generateContent"
