"""``type: anthropic``: the Anthropic Messages API.

``base_url`` is ``https://api.anthropic.com`` (no ``/v1``). The key goes in
``x-api-key``; ``anthropic-version`` is sent from ``anthropic_version``
unless the client sent its own (Anthropic SDK clients always do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmproxy.filters.routing.adapters.base import Adapter, register
from llmproxy.filters.routing.adapters.failures import Failure, FailureKind, HeaderGet

__all__ = ["AnthropicAdapter"]

_PATHS = {"messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}


@register("anthropic")
class AnthropicAdapter(Adapter):
    protocol = "anthropic"
    native_apis = frozenset(_PATHS)
    extra_options = {"anthropic_version": "2023-06-01", "default_max_tokens": 4096}

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        version = self.options.get("anthropic_version", "2023-06-01")
        if not isinstance(version, str) or not version:
            raise ValueError("anthropic_version: must be a non-empty string such as 2023-06-01")
        self.version = version.encode("latin-1")
        max_tokens = self.options.get("default_max_tokens", 4096)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("default_max_tokens: must be a positive integer")
        self.default_max_tokens = max_tokens

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"x-api-key", key.encode("latin-1")),)

    def static_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"anthropic-version", self.version),)

    def path(self, api: str, provider_model: str, query: str) -> str:
        return _PATHS[api]

    def classify(self, status: int, headers: HeaderGet, body_prefix: bytes, now: float) -> Failure:
        """Anthropic's error types on top of the defaults: 529 ``overloaded_error``
        (with ``retry-after`` when sent), a 400 "credit balance is too low" is the
        key out of credit (QUOTA), "prompt is too long" is CONTEXT_LENGTH."""
        if status == 400:
            if b"credit balance" in body_prefix:
                return Failure(FailureKind.QUOTA)
            if b"prompt is too long" in body_prefix:
                return Failure(FailureKind.CONTEXT_LENGTH)
        return super().classify(status, headers, body_prefix, now)
