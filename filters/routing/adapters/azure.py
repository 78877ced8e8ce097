"""``type: azure``: Azure OpenAI.

``base_url`` is the resource endpoint (``https://NAME.openai.azure.com``).
The provider's model name (after mapping) is the *deployment* name and goes
in the path: ``/openai/deployments/{deployment}/chat/completions?api-version=...``.
The key goes in the ``api-key`` header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from llmproxy.filters.routing.adapters.base import Adapter, register
from llmproxy.filters.routing.adapters.failures import Failure, FailureKind, HeaderGet

__all__ = ["AzureAdapter"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}


@register("azure")
class AzureAdapter(Adapter):
    protocol = "openai"
    native_apis = frozenset(_PATHS)
    extra_options = {"api_version": "2024-10-21"}

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        version = self.options.get("api_version", "2024-10-21")
        if not isinstance(version, str) or not version:
            raise ValueError("api_version: must be a non-empty string such as 2024-10-21")
        self.api_version = quote(version, safe="-.")

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"api-key", key.encode("latin-1")),)

    def path(self, api: str, provider_model: str, query: str) -> str:
        deployment = quote(provider_model, safe="")
        return f"/openai/deployments/{deployment}{_PATHS[api]}?api-version={self.api_version}"

    def classify(self, status: int, headers: HeaderGet, body_prefix: bytes, now: float) -> Failure:
        """Azure's content filter (400 ``content_filter`` or a ``ResponsibleAIPolicyViolation``
        inner error) is the request's fault, never the key's; 429s carry ``retry-after-ms``."""
        if status == 400 and (b"content_filter" in body_prefix or b"ResponsibleAIPolicyViolation" in body_prefix):
            return Failure(FailureKind.CONTENT_FILTER)
        return super().classify(status, headers, body_prefix, now)
