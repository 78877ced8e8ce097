"""The ``guardrails`` filter (see :mod:`.filter`)."""

from llmproxy.filters.guardrails.filter import (
    GuardrailBlocked,
    GuardrailsFactory,
    GuardrailsFilter,
    GuardrailUnavailable,
)

__all__ = ["GuardrailBlocked", "GuardrailUnavailable", "GuardrailsFactory", "GuardrailsFilter"]
