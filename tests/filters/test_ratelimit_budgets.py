"""Budgets of the ``ratelimit`` filter: reserve, settle, 429 ``insufficient_quota``, the hard cap mid-stream.

The cut is tested against the scripted provider, which ignores ``max_tokens``
(the mock honours it, so the clamp alone would end its streams): the proxy
itself must count the relayed output and end the stream in the client's
protocol, and both SDKs must read it as a normal end with its usage.
"""

from __future__ import annotations

import time
from typing import Any

import anthropic
import openai
import pytest

from llmproxy.mock import MockServer
from tests import filters_for_tests as tf
from tests.filters.scripted_provider import Scripted
from tests.filters.test_routing_usage import _sse_reply
from tests.support import LoopThread

from .test_ratelimit import HI, MODEL, Make, call, factory_of, oai, recorded_exchanges, rl_config, used

WORDS = 60  # content events the scripted stream sends, one word each


def _long_stream(words: int = WORDS) -> Any:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "mock-gpt"}
    events: list[tuple[str | None, Any]] = [
        (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    ]
    events += [(None, {**base, "choices": [{"index": 0, "delta": {"content": " word"}}]}) for _ in range(words)]
    events.append((None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage = {"prompt_tokens": 9, "completion_tokens": words + 1, "total_tokens": words + 10}
    events.append((None, {**base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return _sse_reply(events)


def test_a_token_budget_refuses_with_insufficient_quota(
    mock: MockServer, make_proxy: Make, loop_thread: LoopThread
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(rl_config(mock.port, {}, {"bob": {"budgets": [{"tokens": 200, "period": "day"}]}}))
    client = oai(proxy, "bob")
    served = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(50):
            client.chat.completions.create(model=MODEL, messages=HI)
            served += 1
    err = info.value
    assert err.code == "insufficient_quota" and err.type == "insufficient_quota"
    assert served >= 3
    spent = sum(u.total_tokens for u in recorded_exchanges(served + 1) if u is not None)
    assert spent <= 200
    # the ledger (admin page) shows bob's spend, and the budget counter equals it
    ledger = call(proxy.port, "GET", "/admin/ratelimit").json()
    row = next(r for r in ledger["ledger"] if r["principal"] == "bob")
    assert row["requests"] == served and row["input_tokens"] + row["output_tokens"] == spent
    budget = next(b for b in ledger["budgets"] if b["budget"].startswith("principal:bob"))
    assert budget["limit"] == 200
    day = time.strftime("%Y-%m-%d", time.gmtime())
    key = f"principal:bob:budget0|principal=bob|budget|{day}"
    assert used(loop_thread, factory_of(proxy).store, key, window=0) == spent  # settled to the metered usage
    day_key = next(b for b in factory_of(proxy).admin_page()["budgets"])
    assert day_key["unit"] == "tokens"
    # anthropic clients get their shape
    aclient = anthropic.Anthropic(
        base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-test-principal": "bob"}
    )
    with pytest.raises(anthropic.RateLimitError):
        aclient.messages.create(model=MODEL, max_tokens=16, messages=HI)


def test_a_hard_budget_clamps_max_tokens_upstream(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(rl_config(mock.port, {}, {"bob": {"budgets": {"tokens": 40, "period": "total"}}}))
    client = oai(proxy, "bob")
    # asking for more than is left, explicitly: refused before the upstream
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1000)
    assert info.value.code == "insufficient_quota"
    # without max_tokens: what is left is granted, and max_tokens clamped to it upstream
    reply = client.chat.completions.create(model=MODEL, messages=HI, extra_headers={"x-mock-tokens": "200"})
    assert reply.usage is not None
    assert reply.usage.completion_tokens < 40 and reply.choices[0].finish_reason == "length"


def test_a_hard_cap_ends_an_openai_stream_cleanly(scripted: Scripted, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    scripted.default = _long_stream()
    cfg = rl_config(0, {}, {"bob": {"budgets": {"tokens": 40, "period": "day"}}}, base_url=scripted.url + "/v1")
    proxy = make_proxy(cfg)
    chunks = list(
        oai(proxy, "bob").chat.completions.create(
            model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens < WORDS
    assert text.count("word") == usage.completion_tokens
    assert usage.prompt_tokens + usage.completion_tokens <= 40
    assert scripted.requests[-1].body["max_tokens"] <= 40  # clamped upstream as well
    metered = recorded_exchanges(1)[0]
    assert metered.output_tokens == usage.completion_tokens


def test_a_hard_cap_ends_an_anthropic_stream_cleanly(scripted: Scripted, make_proxy: Make) -> None:
    scripted.default = _long_stream()
    cfg = rl_config(0, {}, {"bob": {"budgets": {"tokens": 60, "period": "day"}}}, base_url=scripted.url + "/v1")
    proxy = make_proxy(cfg)
    client = anthropic.Anthropic(
        base_url=proxy.url, api_key="k", max_retries=0, timeout=15, default_headers={"x-test-principal": "bob"}
    )
    # the provider ignores max_tokens: the proxy cuts the stream at the reservation's allowance
    with client.messages.stream(model=MODEL, max_tokens=30, messages=HI) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert 0 < final.usage.output_tokens <= 30
    text = "".join(block.text for block in final.content if block.type == "text")
    assert text.count("word") == final.usage.output_tokens


def test_a_soft_budget_does_not_cut(scripted: Scripted, make_proxy: Make) -> None:
    scripted.default = _long_stream()
    budgets = {"tokens": 40, "period": "day", "hard": False}
    proxy = make_proxy(rl_config(0, {}, {"bob": {"budgets": budgets}}, base_url=scripted.url + "/v1"))
    chunks = list(oai(proxy, "bob").chat.completions.create(model=MODEL, messages=HI, stream=True))
    assert sum((c.choices[0].delta.content or "").count("word") for c in chunks if c.choices) == WORDS
    # now over budget: refused before any upstream call
    seen = len(scripted.requests)
    with pytest.raises(openai.RateLimitError):
        oai(proxy, "bob").chat.completions.create(model=MODEL, messages=HI)
    assert len(scripted.requests) == seen


def test_team_budgets_share_one_counter(mock: MockServer, make_proxy: Make) -> None:
    ratelimit = {"budgets": [{"name": "research", "key": ["team"], "tokens": 60, "period": "month"}]}
    principals = {"ann": {"team": "research"}, "ben": {"team": "research"}, "cid": {"team": "ops"}}
    proxy = make_proxy(rl_config(mock.port, ratelimit, principals))
    refused = False
    for _ in range(20):
        for who in ("ann", "ben"):
            try:
                oai(proxy, who).chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
            except openai.RateLimitError:
                refused = True
    assert refused
    with pytest.raises(openai.RateLimitError):
        oai(proxy, "ann").chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
    assert oai(proxy, "cid").chat.completions.create(model=MODEL, messages=HI, max_tokens=5).choices


def test_decision_and_budget_metrics_show_every_admission(mock: MockServer, make_proxy: Make) -> None:
    """Admissions are counted in plain numbers and moved into the metrics shortly after: a scrape
    a moment later shows each one, and the budget gauge the counter's value."""
    from .test_failover import metric

    proxy = make_proxy(
        rl_config(
            mock.port,
            {"rules": [{"name": "all", "key": [], "rpm": 1000}]},
            {"bob": {"budgets": [{"tokens": 10_000, "period": "day"}]}},
        )
    )
    client = oai(proxy, "bob")
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=HI)
    time.sleep(0.5)  # past the flush delay
    assert metric(proxy.port, "llmproxy_ratelimit_decisions_total", rule="all", decision="admitted") == 3
    assert (
        metric(proxy.port, "llmproxy_ratelimit_decisions_total", rule="principal:bob:budget0", decision="admitted") == 3
    )
    gauge = metric(proxy.port, "llmproxy_ratelimit_budget_used", budget="principal:bob:budget0")
    assert gauge is not None and gauge > 0


def test_trust_max_tokens_skips_counting_only_a_stream_whose_upstream_cap_fits(
    scripted: Scripted, make_proxy: Make
) -> None:
    """``trust_max_tokens``: a stream that asked for an output cap within the allowance is
    relayed uncounted (the provider is trusted to stop there: this scripted one does not, which
    shows it); one with no cap is still counted and cut at the allowance."""
    scripted.default = _long_stream()
    budget = {"budgets": {"tokens": 60, "period": "day"}}
    cfg = rl_config(0, {"trust_max_tokens": True}, {"bob": budget, "carol": budget}, base_url=scripted.url + "/v1")
    proxy = make_proxy(cfg)
    client = anthropic.Anthropic(
        base_url=proxy.url, api_key="k", max_retries=0, timeout=15, default_headers={"x-test-principal": "bob"}
    )
    with client.messages.stream(model=MODEL, max_tokens=30, messages=HI) as stream:
        final = stream.get_final_message()
    assert final.stop_reason != "max_tokens"  # not cut: the cap was trusted
    chunks = list(  # bob's uncut stream spent his budget: carol's is fresh
        oai(proxy, "carol").chat.completions.create(
            model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]  # no max_tokens asked: counted and cut as without the option
