"""Several budgets on one virtual key (the ``auth`` filter's keys), each enforced.

A key with tokens per day AND US dollars per month: whichever is spent first
refuses with 429 ``insufficient_quota`` naming that budget; the other keeps
counting. Bad budget entries are refused at startup naming the key entry's field.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from llmproxy.mock import MockServer
from llmproxy.runtime.config import ConfigError

from .test_ratelimit import HI, KGOOD, MODEL, Make

#: US$ per million tokens: a mock request (~30 tokens) costs about $0.03.
PRICE = {"input": 1000, "output": 1000}


def _config(mock_port: int, keys: list[dict[str, Any]]) -> dict[str, Any]:
    provider = {
        "name": "p",
        "type": "openai",
        "base_url": f"http://127.0.0.1:{mock_port}/v1",
        "keys": [KGOOD],
        "models": {MODEL: "mock-gpt"},
    }
    return {
        "server": {"access_log": "off"},
        "filters": [
            {"name": "auth", "config": {"keys": keys}},
            {"name": "metering", "config": {"prices": {MODEL: PRICE, "mock-gpt": PRICE}}},
            {"name": "routing", "config": {"providers": [provider]}},
            {"name": "ratelimit"},
        ],
    }


def _budgets(tokens: int, usd: float) -> list[dict[str, Any]]:
    return [
        {"name": "daily-tokens", "tokens": tokens, "period": "day"},
        {"name": "monthly-usd", "usd": usd, "period": "month"},
    ]


def _spend_until_refused(key: str, url: str) -> tuple[int, openai.RateLimitError]:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=15)
    for served in range(100):
        try:
            client.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=20, extra_headers={"x-mock-tokens": "20"}
            )
        except openai.RateLimitError as exc:
            return served, exc
    raise AssertionError("never refused")


def test_each_budget_of_a_key_is_enforced_and_the_refusal_names_the_spent_one(
    mock: MockServer, make_proxy: Make
) -> None:
    keys = [
        {"name": "tok", "key": "sk-mb-tokens-first", "budgets": _budgets(tokens=100, usd=1000)},
        {"name": "usd", "key": "sk-mb-usd-first", "budgets": _budgets(tokens=1_000_000, usd=0.1)},
        {"name": "one", "key": "sk-mb-one", "budgets": {"tokens": 60, "period": "total"}},
    ]
    proxy = make_proxy(_config(mock.port, keys))
    served, err = _spend_until_refused("sk-mb-tokens-first", proxy.url)
    assert err.code == "insufficient_quota" and 2 <= served <= 5, served
    assert "daily-tokens" in err.message and "monthly-usd" not in err.message
    served, err = _spend_until_refused("sk-mb-usd-first", proxy.url)
    assert err.code == "insufficient_quota" and 2 <= served <= 5, served
    assert "monthly-usd" in err.message and "daily-tokens" not in err.message
    # one budget mapping (not a list) still works, named budget0
    served, err = _spend_until_refused("sk-mb-one", proxy.url)
    assert err.code == "insufficient_quota" and served >= 1
    assert "principal:one:budget0" in err.message
    # the ledger shows both budgets of each key
    page = proxy.runtime.chain.factories[-1].admin_page()  # type: ignore[attr-defined]
    names = {b["budget"] for b in page["budgets"]}
    assert {"principal:tok:daily-tokens", "principal:tok:monthly-usd", "principal:usd:monthly-usd"} <= names


@pytest.mark.parametrize(
    ("budgets", "field"),
    [
        ([{"tokens": 10}, "x"], "keys[0].budgets"),
        ([{"tokens": 10, "usd": 1}], "keys[0].budgets[0]"),
        ([{"tokens": -1}], "keys[0].budgets[0].tokens"),
        ([{"name": "a", "tokens": 1}, {"name": "a", "usd": 1}], "keys[0].budgets[1].name"),
        ({"tokens": 10, "period": "week"}, "keys[0].budgets.period"),
    ],
)
def test_bad_budgets_of_a_key_are_refused_at_startup(
    mock: MockServer, make_proxy: Make, budgets: Any, field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_proxy(_config(mock.port, [{"name": "k", "key": "sk-mb-bad", "budgets": budgets}]))
    assert field in str(info.value), info.value
