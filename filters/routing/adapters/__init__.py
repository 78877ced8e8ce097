"""Provider adapters, chosen from a registry by ``type:`` in the config."""

from llmproxy.filters.routing.adapters import (  # noqa: F401  (registration side effect)
    anthropic,
    azure,
    bedrock,
    gemini,
    openai,
    presets,
    vertex,
)
from llmproxy.filters.routing.adapters.base import ADAPTERS, API, Adapter, Failure, FailureKind, Protocol, register

__all__ = ["ADAPTERS", "API", "Adapter", "Failure", "FailureKind", "Protocol", "register"]
