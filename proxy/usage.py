"""Token usage and cost: :class:`Usage`, one per attempt and one per exchange.

Routing sets ``attempt.usage`` from what the provider reported (the JSON
``usage``, an OpenAI stream's usage chunk, Anthropic's ``message_start`` and
``message_delta``); the ``metering`` filter fills what the provider did not
give by counting with the tokenizer, prices it, and sets ``exchange.usage``
(the sum over the exchange's attempts) before ``on_exchange_complete``.

Counting rules (the OpenTelemetry GenAI conventions):

* ``input_tokens`` is the whole prompt: for Anthropic
  ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``;
  for OpenAI ``prompt_tokens`` (which already includes its cached tokens).
  ``cache_read_tokens`` and ``cache_write_tokens`` are parts of it, kept
  separately, never added twice.
* ``output_tokens`` is the whole completion, reasoning included;
  ``reasoning_tokens`` is the part of it spent thinking.

Every count says where it came from (:class:`Source`); a reply served from
the ``cache`` filter has a record too, its counts marked ``Source.CACHE``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

__all__ = ["Cost", "Source", "Usage"]


class Source(enum.Enum):
    """Where a count came from."""

    #: Reported by the provider.
    PROVIDER = "provider"
    #: Counted by llmproxy's tokenizer (the provider gave none, or the stream was cut).
    TOKENIZER = "tokenizer"
    #: An admission estimate that was never settled by a real count.
    RESERVATION = "reservation"
    #: Replayed from a response cache: the provider's counts of the reply first served, not
    #: spent again (a hit's record says so, and is priced at zero unless the cache charges hits).
    CACHE = "cache"


@dataclass(slots=True)
class Cost:
    """The price of one usage record, in ``currency`` (US dollars for every shipped price)."""

    total: Decimal
    input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    cache_read: Decimal = Decimal(0)
    cache_write: Decimal = Decimal(0)
    currency: str = "USD"
    #: Where the price came from: ``"genai-prices"`` or ``"config"``.
    price_source: str = "genai-prices"

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.total + other.total,
            self.input + other.input,
            self.output + other.output,
            self.cache_read + other.cache_read,
            self.cache_write + other.cache_write,
            self.currency,
            self.price_source if self.price_source == other.price_source else "mixed",
        )


@dataclass(slots=True)
class Usage:
    """Tokens of one attempt (or, summed, of one exchange); see the module docstring."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    input_source: Source = Source.PROVIDER
    output_source: Source = Source.PROVIDER
    #: The provider's own usage object, as it sent it (None when it sent none).
    provider_usage: dict[str, Any] | None = None
    #: The upstream model the tokens were spent on, its provider's name and the key's id.
    model: str = ""
    provider: str = ""
    key_id: str = ""
    #: The model the client asked for (an alias or a pattern routing resolved).
    requested_model: str = ""
    #: The tokenizer encoding used for counts whose source is TOKENIZER, and
    #: whether it is an approximation (a model with no public tokenizer).
    encoding: str = ""
    approximate: bool = False
    #: The price; None when the model has no known price (cost unknown, never 0).
    cost: Cost | None = None
    #: Free-form notes for the record (e.g. ``{"prompt_drift": 3}``).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens read from the provider's cache."""
        return self.cache_read_tokens

    def merged(self, other: Usage) -> Usage:
        """The sum of two records (an exchange's attempts); a source is the weaker of the two."""
        order = (Source.PROVIDER, Source.CACHE, Source.TOKENIZER, Source.RESERVATION)
        cost = None if self.cost is None or other.cost is None else self.cost + other.cost
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            max(self.input_source, other.input_source, key=order.index),
            max(self.output_source, other.output_source, key=order.index),
            other.provider_usage if other.provider_usage is not None else self.provider_usage,
            other.model or self.model,
            other.provider or self.provider,
            other.key_id or self.key_id,
            other.requested_model or self.requested_model,
            other.encoding or self.encoding,
            self.approximate or other.approximate,
            cost,
            {**self.extra, **other.extra},
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (access log, usage header, admin pages)."""
        out: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "input_source": self.input_source.value,
            "output_source": self.output_source.value,
            "model": self.model,
            "provider": self.provider,
            "key_id": self.key_id,
            "requested_model": self.requested_model,
        }
        if self.encoding:
            out["encoding"] = self.encoding
            out["approximate"] = self.approximate
        out["cost"] = str(self.cost.total) if self.cost is not None else None
        return out
