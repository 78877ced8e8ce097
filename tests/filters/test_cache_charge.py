"""What a cache hit costs: ratelimit budgets (``charge_hits``), the metering record and metrics,
and the Responses API through the cache; real proxy, the mock provider, the openai SDK.

A hit is free by default: a budget it would exceed still serves it, its record
says ``Source.CACHE`` at zero cost, and metering counts its tokens under
``source="cache"``. With ``charge_hits: true`` ratelimit admits and charges it
on its exact counts: a spent budget refuses it with the same 429 as any request.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import openai
import pytest

from llmproxy.filters.cache import CacheFactory
from llmproxy.filters.ratelimit import RateLimitFactory
from llmproxy.mock import MockServer

from ..support import RunningProxy
from .test_cache import ALICE, CHAT, _access_line, config, post
from .test_ratelimit import used

Make = Callable[[dict[str, Any]], RunningProxy]


def limited(port: int, tokens: int, charge: bool, hard: bool = False) -> dict[str, Any]:
    """auth, routing, cache, metering, then ratelimit with one token budget for everyone."""
    cfg = config(port, {"charge_hits": True} if charge else {})
    budget = {"name": "all", "key": [], "tokens": tokens, "period": "total", "hard": hard}
    cfg["filters"].append({"name": "ratelimit", "config": {"budgets": [budget]}})
    return cfg


def spent(proxy: RunningProxy, loop_thread: Any) -> int:
    factory = next(f for f in proxy.runtime.chain.factories if isinstance(f, RateLimitFactory))
    return used(loop_thread, factory.store, "all|budget|total", window=0)


def metrics(proxy: RunningProxy, prefix: str) -> dict[str, float]:
    text = urllib.request.urlopen(proxy.url + "/metrics", timeout=5).read().decode()
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(prefix)]
    return {name: float(value) for name, value in lines}


@pytest.mark.parametrize("charge", [False, True])
def test_a_spent_budget_serves_a_hit_unless_hits_are_charged(
    mock: MockServer, make_proxy: Make, loop_thread: Any, charge: bool
) -> None:
    proxy = make_proxy(limited(mock.port, 1, charge))  # soft: the miss is admitted, then spends it all
    status, first, body = post(proxy.port, CHAT)
    assert (status, first["x-llmproxy-cache"]) == (200, "miss")
    tokens = json.loads(body)["usage"]["total_tokens"]
    assert spent(proxy, loop_thread) == tokens
    status, second, replay = post(proxy.port, CHAT)
    if charge:
        assert status == 429 and json.loads(replay)["error"]["code"] == "insufficient_quota"
        time.sleep(0.05)
        cached = [n for n, v in metrics(proxy, "llmproxy_tokens_total").items() if 'source="cache"' in n and v]
        assert not cached, cached  # a refused hit served nothing: no record
    else:
        assert (status, second["x-llmproxy-cache"], replay) == (200, "hit", body)
    assert spent(proxy, loop_thread) == tokens  # nothing charged: free, or refused
    assert post(proxy.port, {**CHAT, "messages": [{"role": "user", "content": "other"}]})[0] == 429
    assert len(mock.requests) == 1


def test_a_charged_hit_spends_its_exact_counts(mock: MockServer, make_proxy: Make, loop_thread: Any) -> None:
    proxy = make_proxy(limited(mock.port, 1_000_000, True, hard=True))
    _, _, body = post(proxy.port, CHAT)
    tokens = json.loads(body)["usage"]["total_tokens"]
    _, second, _ = post(proxy.port, CHAT)
    assert second["x-llmproxy-cache"] == "hit"
    assert spent(proxy, loop_thread) == 2 * tokens
    # a hard budget with less room than the hit needs refuses it (a replay cannot be cut short)
    tight = make_proxy(limited(mock.port, 2 * tokens - 1, True, hard=True))
    post(tight.port, CHAT)
    assert post(tight.port, CHAT)[0] == 429
    assert spent(tight, loop_thread) == tokens


def test_a_hit_is_not_charged_by_default(mock: MockServer, make_proxy: Make, loop_thread: Any) -> None:
    proxy = make_proxy(limited(mock.port, 1_000_000, False))
    _, _, body = post(proxy.port, CHAT)
    for _ in range(3):
        assert post(proxy.port, CHAT)[1]["x-llmproxy-cache"] == "hit"
    assert spent(proxy, loop_thread) == json.loads(body)["usage"]["total_tokens"]


@pytest.mark.parametrize("charge", [False, True])
def test_the_metering_record_and_metrics_of_a_hit(
    mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture, charge: bool
) -> None:
    cfg = config(mock.port, {"charge_hits": True} if charge else {})
    cfg["filters"][-1]["config"] = {"prices": {"mock-gpt": {"input": 1.0, "output": 2.0}}}
    proxy = make_proxy(cfg)
    with caplog.at_level(logging.INFO, logger="llmproxy.access"):
        _, first, body = post(proxy.port, CHAT)
        miss_line = _access_line(caplog, first["x-request-id"])
        before = metrics(proxy, "llmproxy_")
        _, second, _ = post(proxy.port, CHAT)
        hit_line = _access_line(caplog, second["x-request-id"])
    usage = json.loads(body)["usage"]
    assert second["x-llmproxy-cache"] == "hit"
    assert f"tokens_in={usage['prompt_tokens']} tokens_out={usage['completion_tokens']}" in hit_line
    miss_cost = miss_line.split("cost=")[1].split()[0]
    assert float(miss_cost) > 0
    assert hit_line.split("cost=")[1].split()[0] == (miss_cost if charge else "0.000000")
    time.sleep(0.05)
    after = metrics(proxy, "llmproxy_")
    for kind, value in (("input", usage["prompt_tokens"]), ("output", usage["completion_tokens"])):
        name = next(
            n for n in after if n.startswith("llmproxy_tokens_total{") and f'kind="{kind}"' in n and "cache" in n
        )
        assert after[name] == value and 'source="cache"' in name, name
    cost = next(n for n in after if n.startswith("llmproxy_cost_usd_total"))
    grew = after[cost] - before[cost]
    assert grew == (pytest.approx(float(miss_cost), rel=1e-3) if charge else 0)


def _responses(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0, timeout=10)


def test_responses_api_json_and_stream_hits(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(mock.port))
    client = _responses(proxy)
    one = client.responses.with_raw_response.create(model="demo", input="hello there")
    two = client.responses.with_raw_response.create(model="demo", input="hello there")
    assert (one.headers["x-llmproxy-cache"], two.headers["x-llmproxy-cache"]) == ("miss", "hit")
    assert one.http_response.content == two.http_response.content
    assert two.parse().output_text and two.parse().usage is not None

    def events() -> list[Any]:
        return [event.model_dump() for event in client.responses.create(model="demo", input="hello there", stream=True)]

    first, second = events(), events()
    assert first == second
    assert first[-1]["type"] == "response.completed" and first[-1]["response"]["usage"]["output_tokens"] > 0
    assert len(mock.requests) == 2


def test_a_cache_before_routing_keys_the_client_model_and_the_table(mock: MockServer, make_proxy: Make) -> None:
    cfg = config(mock.port)
    auth, routing, cache, metering = cfg["filters"]
    cfg["filters"] = [auth, cache, routing, metering]
    proxy = make_proxy(cfg)
    _, first, body = post(proxy.port, CHAT)
    _, second, replay = post(proxy.port, {**CHAT, "user": "u-2"})
    assert (first["x-llmproxy-cache"], second["x-llmproxy-cache"], replay) == ("miss", "hit", body)
    assert post(proxy.port, {**CHAT, "model": "alias"})[1]["x-llmproxy-cache"] == "miss"  # the client's model
    factory = next(f for f in proxy.runtime.chain.factories if f.name == "cache")
    assert isinstance(factory, CacheFactory) and len(factory.table) > 1  # routing's digest is in every key
    other = config(mock.port)
    other["filters"][1]["config"]["providers"][0]["models"]["demo"] = "mock-gpt-2"
    other["filters"] = [other["filters"][0], other["filters"][2], other["filters"][1], other["filters"][3]]
    changed = make_proxy(other)
    assert next(f for f in changed.runtime.chain.factories if f.name == "cache").table != factory.table
    assert len(mock.requests) == 2
