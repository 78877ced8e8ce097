"""Provider adapters, chosen from a registry by ``type:`` in the config."""

from llmproxy.filters.routing.adapters import anthropic, azure, openai, presets  # noqa: F401  (registration side effect)
from llmproxy.filters.routing.adapters.base import ADAPTERS, API, Adapter, Failure, FailureKind, Protocol, register

__all__ = ["ADAPTERS", "API", "Adapter", "Failure", "FailureKind", "Protocol", "register"]
