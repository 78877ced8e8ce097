"""PriceBook lookups (config overrides over genai-prices) and cost arithmetic."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from llmproxy import Usage
from llmproxy.filters.metering.pricing import ModelPrice, PriceBook, cost


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook({"my-model": {"input": 0.15, "output": 0.60, "cache_read": 0.075, "cache_write": 0.1875}})


@pytest.mark.parametrize(
    ("provider", "model", "model_id", "inp", "out"),
    [
        ("openai", "gpt-4o-mini", "gpt-4o-mini", "0.15", "0.6"),
        ("openai", "gpt-4o-2024-08-06", "gpt-4o", "2.5", "10"),
        ("openai", "openai/gpt-4o", "gpt-4o", "2.5", "10"),
        ("openai", "GPT-4o-mini", "gpt-4o-mini", "0.15", "0.6"),
        ("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku-latest", "0.8", "4"),
        ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5", "1", "5"),
        ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5", "1", "5"),
        ("azure", "gpt-4o", "gpt-4o", "2.5", "10"),
        ("azure", "gpt-4o-mini-prod", "gpt-4o-mini", "0.15", "0.6"),  # a deployment name
        ("anthropic-eu", "claude-haiku-4-5", "claude-haiku-4-5", "1", "5"),  # a provider name
        ("my-upstream", "claude-haiku-4-5", "claude-haiku-4-5", "1", "5"),  # the model picks the provider
    ],
)
def test_known_models(book: PriceBook, provider: str, model: str, model_id: str, inp: str, out: str) -> None:
    price = book.lookup(provider, model)
    assert price is not None
    assert (price.model_id, price.input, price.output, price.source) == (model_id, D(inp), D(out), "genai-prices")


def test_cache_prices_from_genai_prices(book: PriceBook) -> None:
    haiku = book.lookup("anthropic", "claude-haiku-4-5")
    assert haiku is not None and (haiku.cache_read, haiku.cache_write) == (D("0.1"), D("1.25"))
    mini = book.lookup("openai", "gpt-4o-mini")
    assert mini is not None and (mini.cache_read, mini.cache_write) == (D("0.075"), None)


def test_tiered_prices() -> None:
    price = PriceBook({}).lookup("anthropic", "claude-sonnet-4-5")
    assert price is not None and price.tiers
    threshold, tier = price.tiers[0]
    assert threshold == 200_000 and tier.input > price.input
    assert price.for_prompt(threshold) is price
    assert price.for_prompt(threshold + 1) is tier


@pytest.mark.parametrize("model", ["no-such-model-xyz", "", "gpt-4o-mini/../../x"])
def test_unknown_is_none(book: PriceBook, model: str) -> None:
    assert book.lookup("openai", model) is None


def test_override_wins_and_is_cached(book: PriceBook) -> None:
    price = book.lookup("openai", "my-model")
    assert price == ModelPrice(D("0.15"), D("0.6"), D("0.075"), D("0.1875"), source="config", model_id="my-model")
    assert book.lookup("openai", "my-model") is price
    assert book.lookup("azure", "vendor/my-model") == price
    over = PriceBook({"gpt-4o-mini": {"input": 1, "output": 2}}).lookup("openai", "gpt-4o-mini")
    assert over is not None and (over.input, over.source) == (D(1), "config")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"m": {"input": -1, "output": 1}}, "prices.m.input: must be a number >= 0"),
        ({"m": {"input": "x", "output": 1}}, "prices.m.input: must be a number >= 0"),
        ({"m": {"input": True, "output": 1}}, "prices.m.input: must be a number >= 0"),
        ({"m": {"input": float("nan"), "output": 1}}, "prices.m.input: must be a number >= 0"),
        ({"m": {"input": 1, "output": [1]}}, "prices.m.output: must be a number >= 0"),
        ({"m": {"input": 1, "output": 1, "cached": 1}}, "prices.m.cached: unknown field"),
        ({"m": {"output": 1}}, "prices.m.input: required"),
        ({"m": 3}, "prices.m: must be a mapping"),
    ],
)
def test_config_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        PriceBook(overrides)


PRICE = ModelPrice(D("0.15"), D("0.60"), D("0.075"), D("0.1875"))


def test_cost_with_cache() -> None:
    usage = Usage(input_tokens=10_000, output_tokens=2_000, cache_read_tokens=4_000, cache_write_tokens=1_000)
    c = cost(usage, PRICE)
    assert c is not None
    # 5000 * 0.15e-6, 4000 * 0.075e-6, 1000 * 0.1875e-6, 2000 * 0.60e-6
    assert (c.input, c.cache_read, c.cache_write, c.output) == (
        D("0.00075"),
        D("0.0003"),
        D("0.0001875"),
        D("0.0012"),
    )
    assert c.total == D("0.0024375") and c.price_source == "genai-prices"


def test_cost_cache_falls_back_to_input_price() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=0, cache_read_tokens=200_000, cache_write_tokens=100_000)
    c = cost(usage, ModelPrice(D(2), D(8)))
    assert c is not None and (c.input, c.cache_read, c.cache_write, c.total) == (D("1.4"), D("0.4"), D("0.2"), D(2))


def test_cost_reasoning() -> None:
    usage = Usage(input_tokens=0, output_tokens=1_000, reasoning_tokens=600)
    plain = cost(usage, ModelPrice(D(1), D(4)))
    assert plain is not None and plain.output == D("0.004")  # reasoning is output
    split = cost(usage, ModelPrice(D(1), D(4), reasoning=D(10)))
    assert split is not None and split.output == D("0.0076")  # 400 * 4e-6 + 600 * 10e-6


def test_cost_tier_and_unknown() -> None:
    tiered = ModelPrice(D(3), D(15), tiers=((200_000, ModelPrice(D(6), D("22.5"))),))
    c = cost(Usage(input_tokens=200_001, output_tokens=1_000), tiered)
    assert c is not None and c.total == D("1.200006") + D("0.0225")
    assert cost(Usage(input_tokens=5), None) is None


def test_config_cost_source(book: PriceBook) -> None:
    c = cost(Usage(input_tokens=1, output_tokens=1), book.lookup("openai", "my-model"))
    assert c is not None and c.price_source == "config"
