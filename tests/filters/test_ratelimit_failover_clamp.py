"""A hard budget's ``max_tokens`` clamp holds on every attempt, failover included.

The client sets no ``max_tokens``; the budget has less left than the default
estimate (``default_max_tokens``), so the ratelimit filter grants what is left
and clamps ``max_tokens`` upstream to it. The first attempt fails (500); failover
retries on another provider (an Anthropic one: routing translates the client's
OpenAI body again for it) or on another key of the same provider (routing
rebuilds the body from the client's): the second upstream request must carry
the clamp too, not the client's own ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

import openai

from tests.filters.scripted_provider import Reply, Scripted

from .test_ratelimit import HI, MODEL, Make, rl_config

BUDGET = 100

_ANTHROPIC_REPLY = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"mock-claude",'
    b'"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,'
    b'"usage":{"input_tokens":9,"output_tokens":2}}'
)
_OPENAI_REPLY = (
    b'{"id":"c1","object":"chat.completion","created":1,"model":"mock-gpt","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'
)
_FAIL = Reply(500, b'{"error":{"message":"boom","type":"server_error","code":null,"param":null}}')


def _config(scripted: Scripted, second: str) -> dict[str, Any]:
    raw = rl_config(
        0,
        {},
        {"bob": {"budgets": {"tokens": BUDGET, "period": "day"}}},
        keys=["sk-first", "sk-second"],
        failover={"max_attempts": 2, "backoff": {"base": 0.001, "max": 0.001}},
        base_url=scripted.url + "/v1",
    )
    routing = next(f for f in raw["filters"] if f["name"] == "routing")
    if second == "anthropic":
        first = routing["config"]["providers"][0]
        first["keys"] = ["sk-first"]
        routing["config"]["providers"].append(
            {
                "name": "a",
                "type": "anthropic",
                "base_url": scripted.url,
                "keys": ["sk-ant"],
                "models": {MODEL: "mock-claude"},
                "priority": 1,  # the fallback
            }
        )
    return raw


def _client(proxy: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key="k",
        max_retries=0,
        timeout=15,
        default_headers={"x-test-principal": "bob"},
    )


def test_the_clamp_holds_when_failover_moves_to_an_anthropic_provider(scripted: Scripted, make_proxy: Make) -> None:
    scripted.replies.extend([_FAIL, Reply(200, _ANTHROPIC_REPLY)])
    proxy = make_proxy(_config(scripted, "anthropic"))
    reply = _client(proxy).chat.completions.create(model=MODEL, messages=HI)
    assert reply.choices[0].message.content == "hi"
    first, second = scripted.requests
    assert first.target.endswith("/chat/completions") and second.target.endswith("/messages"), scripted.requests
    assert 0 < first.body["max_tokens"] < BUDGET
    assert second.body.get("max_tokens") == first.body["max_tokens"], second.body


def test_the_clamp_holds_when_failover_moves_to_another_key(scripted: Scripted, make_proxy: Make) -> None:
    scripted.replies.extend([_FAIL, Reply(200, _OPENAI_REPLY)])
    proxy = make_proxy(_config(scripted, "key"))
    client = _client(proxy)
    reply = client.chat.completions.create(model=MODEL, messages=HI)
    assert reply.choices[0].message.content == "hi"
    first, second = scripted.requests
    assert first.headers["authorization"] != second.headers["authorization"]
    assert 0 < first.body["max_tokens"] < BUDGET
    assert second.body.get("max_tokens") == first.body["max_tokens"], second.body


def test_a_translated_default_max_tokens_is_not_the_clients_cap(scripted: Scripted, make_proxy: Make) -> None:
    """An OpenAI client without ``max_tokens`` on an Anthropic provider: the translation's default
    ``max_tokens`` (4096, above the budget) is not a cap the client asked for, so the hard budget
    grants what is left and clamps it, as it does without translation."""
    scripted.replies.append(Reply(200, _ANTHROPIC_REPLY))
    raw = rl_config(0, {}, {"bob": {"budgets": {"tokens": BUDGET, "period": "day"}}}, provider_type="anthropic")
    routing = next(f for f in raw["filters"] if f["name"] == "routing")
    routing["config"]["providers"][0]["base_url"] = scripted.url
    proxy = make_proxy(raw)
    reply = _client(proxy).chat.completions.create(model=MODEL, messages=HI)
    assert reply.choices[0].message.content == "hi"
    (seen,) = scripted.requests
    assert seen.target.endswith("/messages") and 0 < seen.body["max_tokens"] < BUDGET, seen.body


def test_cap_output_lowers_every_field_of_the_providers_api_and_raises_none() -> None:
    from llmproxy.filters.routing.cap import cap_output

    cases: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
        ({}, "chat", {"max_tokens": 50}),
        ({"max_completion_tokens": 900}, "chat", {"max_completion_tokens": 50}),
        ({"max_tokens": 10}, "chat", {"max_tokens": 10}),  # already below: kept
        ({"max_tokens": 4096}, "messages", {"max_tokens": 50}),
        ({}, "responses", {"max_output_tokens": 50}),
        ({"max_output_tokens": 70}, "responses", {"max_output_tokens": 50}),
        ({}, "embeddings", {}),
    ]
    for body, api, expected in cases:
        cap_output(body, api, 50)
        assert body == expected, (api, body)


def test_the_clamp_reaches_a_gemini_provider_in_its_own_field(scripted: Scripted, make_proxy: Make) -> None:
    """A codec provider (Gemini) gets the clamp as ``generationConfig.maxOutputTokens``, not ``max_tokens``."""
    gemini_reply = (
        b'{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"},"finishReason":"STOP","index":0}],'
        b'"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":2,"totalTokenCount":11}}'
    )
    scripted.replies.append(Reply(200, gemini_reply))
    raw = rl_config(0, {}, {"bob": {"budgets": {"tokens": BUDGET, "period": "day"}}}, provider_type="gemini")
    routing = next(f for f in raw["filters"] if f["name"] == "routing")
    routing["config"]["providers"][0]["base_url"] = scripted.url + "/v1beta"
    proxy = make_proxy(raw)
    reply = _client(proxy).chat.completions.create(model=MODEL, messages=HI)
    assert reply.choices[0].message.content == "hi"
    (seen,) = scripted.requests
    assert seen.target == "/v1beta/models/mock-gpt:generateContent", seen.target
    assert "max_tokens" not in seen.body
    assert 0 < seen.body["generationConfig"]["maxOutputTokens"] < BUDGET, seen.body
