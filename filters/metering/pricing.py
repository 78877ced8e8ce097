"""Model prices: the ``prices:`` overrides, then the ``genai-prices`` data.

A :class:`PriceBook` is built once, at startup, from the metering filter's
``prices:`` config section; :meth:`PriceBook.lookup` answers
``(provider, model) -> ModelPrice | None`` and caches every answer (misses
too), so a lookup on the hot path is one dict hit.

Lookup order, first match wins:

1. a config override whose key is the model name (case-insensitive), or the
   name after a ``provider/`` prefix (``openai/gpt-4o`` -> ``gpt-4o``);
2. ``genai-prices``: the llmproxy provider type (``openai``, ``azure``,
   ``anthropic``) or provider name is mapped to a genai-prices provider id
   (a name that contains a known id, e.g. ``anthropic-eu``, matches it, as
   genai-prices itself does); with no such provider the model name picks one
   (``claude-*`` -> anthropic, ...). genai-prices matches dated snapshots
   (``gpt-4o-2024-08-06`` prices as ``gpt-4o``). A ``vendor/model`` name is
   tried whole, then as ``model`` at ``vendor``. For Azure, whose model
   names are deployment names, a name with no match is shortened one
   ``-part`` at a time (``gpt-4o-mini-prod`` -> ``gpt-4o-mini``);
3. otherwise None: the cost is unknown (never 0).

Prices that change over time (genai-prices' conditional prices) are resolved
for the current time; such an entry is cached until the next UTC midnight
(a start-date change) or for a minute (a time-of-day price, e.g. off-peak).
Tiered prices (a higher rate for every token once the prompt passes a
threshold) are kept as :attr:`ModelPrice.tiers` and chosen by :func:`cost`
from the prompt size.

Every price is in US dollars per million tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from llmproxy import Cost, Usage

__all__ = ["ModelPrice", "PriceBook", "cost"]

_MILLION = Decimal(1_000_000)
#: Fields of one ``prices:`` entry.
_FIELDS = ("input", "output", "cache_read", "cache_write", "reasoning")
#: llmproxy provider types -> genai-prices provider ids (other names are passed as they are).
_PROVIDER_IDS: dict[str, str] = {"openai": "openai", "azure": "azure", "anthropic": "anthropic"}
#: Cached answers before the cache is dropped and refilled (model names may come from
#: clients; the bound keeps a stream of made-up names from growing memory).
_MAX_CACHE = 4096
#: How long a time-of-day price is trusted before it is resolved again, in seconds.
_TIME_OF_DAY_TTL = 60.0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens for one model.

    ``cache_read``/``cache_write``/``reasoning`` are None when the source gives no
    separate price (see :func:`cost` for the fallbacks). ``tiers`` are
    ``(threshold, prices)`` pairs, ascending: once the whole prompt has more
    than ``threshold`` tokens, every token is priced at that tier's prices.
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    tiers: tuple[tuple[int, ModelPrice], ...] = ()
    #: ``"genai-prices"`` or ``"config"`` (becomes :attr:`llmproxy.Cost.price_source`).
    source: str = "genai-prices"
    #: The price entry that matched (the genai-prices model id, or the override key).
    model_id: str = ""

    def for_prompt(self, input_tokens: int) -> ModelPrice:
        """The prices that apply to a prompt of ``input_tokens`` (the highest tier passed)."""
        for threshold, tier in reversed(self.tiers):
            if input_tokens > threshold:
                return tier
        return self


def cost(usage: Usage, price: ModelPrice | None) -> Cost | None:
    """The cost of ``usage`` at ``price``; None when the price is unknown.

    * input: ``input_tokens - cache_read_tokens - cache_write_tokens`` (never
      below 0) at the input price;
    * cache reads and writes at their prices, or at the input price when the
      model has none (a provider that does not discount its cache);
    * output: ``output_tokens`` (reasoning included) at the output price,
      except that reasoning tokens are at the reasoning price when the model
      prices them separately.

    Exact :class:`~decimal.Decimal` arithmetic, no rounding; the reasoning part
    is counted in :attr:`~llmproxy.Cost.output`.
    """
    if price is None:
        return None
    p = price.for_prompt(usage.input_tokens)
    cache_read = usage.cache_read_tokens
    cache_write = usage.cache_write_tokens
    plain_input = max(usage.input_tokens - cache_read - cache_write, 0)
    c_input = plain_input * p.input / _MILLION
    c_read = cache_read * (p.input if p.cache_read is None else p.cache_read) / _MILLION
    c_write = cache_write * (p.input if p.cache_write is None else p.cache_write) / _MILLION
    if p.reasoning is None:
        c_output = usage.output_tokens * p.output / _MILLION
    else:
        reasoning = min(usage.reasoning_tokens, usage.output_tokens)
        c_output = ((usage.output_tokens - reasoning) * p.output + reasoning * p.reasoning) / _MILLION
    return Cost(
        total=c_input + c_read + c_write + c_output,
        input=c_input,
        output=c_output,
        cache_read=c_read,
        cache_write=c_write,
        price_source=price.source,
    )


def _parse_override(name: str, entry: object) -> ModelPrice:
    where = f"prices.{name}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: must be a mapping of {', '.join(_FIELDS)}")
    values: dict[str, Decimal] = {}
    for key, value in entry.items():
        if key not in _FIELDS:
            raise ValueError(f"{where}.{key}: unknown field (expected one of {', '.join(_FIELDS)})")
        # bool is an int; a price of True is a config mistake
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
            raise ValueError(f"{where}.{key}: must be a number >= 0")
        try:
            number = Decimal(str(value))
        except ArithmeticError:
            raise ValueError(f"{where}.{key}: must be a number >= 0") from None
        if not number.is_finite() or number < 0:
            raise ValueError(f"{where}.{key}: must be a number >= 0")
        values[key] = number
    for key in ("input", "output"):
        if key not in values:
            raise ValueError(f"{where}.{key}: required")
    return ModelPrice(
        input=values["input"],
        output=values["output"],
        cache_read=values.get("cache_read"),
        cache_write=values.get("cache_write"),
        reasoning=values.get("reasoning"),
        source="config",
        model_id=name,
    )


def _strip_vendor(model: str) -> str:
    return model.rpartition("/")[2]


class PriceBook:
    """Config overrides over the genai-prices data; see the module docstring.

    Construction validates ``overrides`` (raises ValueError naming the field,
    e.g. ``prices.my-model.input: must be a number >= 0``) and loads the
    genai-prices data (0.4-0.5 s once per process on the dev box;
    later PriceBooks reuse it).
    """

    __slots__ = ("_fixed", "_overrides", "_snapshot", "_timed")

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self._overrides: dict[str, ModelPrice] = {}
        for name, entry in (overrides or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"prices.{name}: a model name must be a non-empty string")
            self._overrides[name.lower()] = _parse_override(name, entry)
        from genai_prices import data_snapshot  # the 1.6 MB data module: at startup, not at import

        self._snapshot = data_snapshot.get_snapshot()
        # (provider, model) -> price, for answers that hold for good (nearly all) ...
        self._fixed: dict[tuple[str, str], ModelPrice | None] = {}
        # ... and -> (price, valid until: a time.time() value) for prices that change
        self._timed: dict[tuple[str, str], tuple[ModelPrice | None, float]] = {}

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        """The price of ``model`` at ``provider`` (an llmproxy provider type or name); None if unknown."""
        key = (provider, model)
        try:
            return self._fixed[key]
        except KeyError:
            pass
        now = time.time()
        timed = self._timed.get(key)
        if timed is not None and now < timed[1]:
            return timed[0]
        price, until = self._resolve(provider.lower(), model.lower(), now)
        cache: dict[tuple[str, str], Any] = self._fixed if until == math.inf else self._timed
        if len(cache) >= _MAX_CACHE:
            cache.clear()
        cache[key] = price if until == math.inf else (price, until)
        return price

    def _resolve(self, provider: str, model: str, now: float) -> tuple[ModelPrice | None, float]:
        if not model:
            return None, math.inf
        override = self._overrides.get(model) or self._overrides.get(_strip_vendor(model))
        if override is not None:
            return override, math.inf
        info = self._find(_PROVIDER_IDS.get(provider, provider), model)
        if info is None:
            return None, math.inf
        return _convert(info, now)

    def _find(self, provider_id: str, model: str) -> Any:
        """The genai-prices ModelInfo for ``model`` at ``provider_id``, or None."""
        candidates = [(provider_id, model)]
        if "/" in model:
            vendor, _, bare = model.rpartition("/")
            candidates += [(vendor.rpartition("/")[2], bare), (provider_id, bare)]
        if provider_id == "azure":
            parts = _strip_vendor(model).split("-")
            candidates += [("azure", "-".join(parts[:n])) for n in range(len(parts) - 1, 0, -1)]
        for pid, ref in candidates:
            for attempt_pid in (pid, None):  # None: let the model name choose the provider
                try:
                    _provider, info = self._snapshot.find_provider_model(ref, None, attempt_pid, None)
                except LookupError:
                    continue
                return info
        return None


def _decimal(value: Any) -> Decimal | None:
    """A flat genai-prices price (the base of a tiered one), or None."""
    if value is None:
        return None
    base = getattr(value, "base", value)
    return base if isinstance(base, Decimal) else None


def _flat(prices: Any, model_id: str, pick: Any = _decimal) -> ModelPrice | None:
    inp = pick(getattr(prices, "input_mtok", None))
    out = pick(getattr(prices, "output_mtok", None))
    if inp is None or out is None:
        return None  # not a per-token model (images, audio, per request): unknown, not 0
    return ModelPrice(
        input=inp,
        output=out,
        cache_read=pick(getattr(prices, "cache_read_mtok", None)),
        cache_write=pick(getattr(prices, "cache_write_mtok", None)),
        reasoning=pick(getattr(prices, "output_reasoning_mtok", None)),
        model_id=model_id,
    )


def _convert(info: Any, now: float) -> tuple[ModelPrice | None, float]:
    """genai-prices ModelInfo -> (ModelPrice at ``now``, how long that holds)."""
    when = datetime.fromtimestamp(now, tz=UTC)
    prices = info.get_prices(when)
    base = _flat(prices, info.id)
    if base is None:
        return None, math.inf
    thresholds = sorted(
        {
            tier.start
            for key in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "output_reasoning_mtok")
            for tier in getattr(getattr(prices, key, None), "tiers", ())
        }
    )
    tiers: list[tuple[int, ModelPrice]] = []
    for threshold in thresholds:

        def at_threshold(value: Any, threshold: int = threshold) -> Decimal | None:
            if value is None or not hasattr(value, "tiers"):
                return _decimal(value)
            chosen: Decimal = value.base
            for tier in value.tiers:  # ascending
                if tier.start <= threshold:
                    chosen = tier.price
            return chosen

        tier_price = _flat(prices, info.id, at_threshold)
        if tier_price is not None:
            tiers.append((threshold, tier_price))
    if tiers:
        base = replace(base, tiers=tuple(tiers))
    return base, _valid_until(info, now)


def _valid_until(info: Any, now: float) -> float:
    conditional = info.prices if isinstance(info.prices, list) else []
    kinds = {type(c.constraint).__name__ for c in conditional if c.constraint is not None}
    if "TimeOfDateConstraint" in kinds:
        return now + _TIME_OF_DAY_TTL
    if kinds:
        return (now // 86400 + 1) * 86400  # the next UTC midnight
    return math.inf
