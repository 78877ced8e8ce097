"""Hot reload inside one worker (:meth:`Proxy.reload`): generations, state kept, nothing leaked.

Real sockets, the mock provider and the official SDKs; the proxy runs on the
test loop thread so a test can look at its generations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest

from llmproxy.mock import MockServer
from llmproxy.runtime.config import parse_config
from tests.support import LoopThread, RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]
HI = [{"role": "user", "content": "hi"}]


def config(mock: MockServer, *, keys: list[dict[str, Any]], stamp: str, rpm: int = 100) -> dict[str, Any]:
    """Every builtin filter that registers metrics or admin pages, so a reload re-registers them all."""
    return {
        "server": {"access_log": "off"},
        "filters": [
            {"name": "auth", "config": {"keys": keys}},
            {"name": "metering", "config": {"prices": {"mock-gpt": {"input": 1, "output": 2}}}},
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "oa",
                            "type": "openai",
                            "base_url": f"http://127.0.0.1:{mock.port}/v1",
                            "keys": ["sk-provider"],
                            "models": {"gpt-x": "mock-gpt"},
                        }
                    ]
                },
            },
            {"name": "failover", "config": {}},
            {"name": "ratelimit", "config": {"rules": [{"name": "per-key", "key": ["principal"], "rpm": rpm}]}},
            {"name": "headers", "config": {"response": {"set": {"x-generation": stamp}}}},
        ],
    }


ALICE = {"name": "alice", "key": "sk-alice"}
BOB = {"name": "bob", "key": "sk-bob"}


def client(proxy: RunningProxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=10)


def reload(proxy: RunningProxy, raw: dict[str, Any]) -> bool:
    cfg = parse_config(raw, "reloaded.yaml")
    result: bool = proxy.thread.call(proxy.proxy.reload(cfg))
    return result


def test_reload_swaps_filters_keeps_state_and_refuses_a_revoked_key_at_once(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(mock, keys=[ALICE, BOB], stamp="one", rpm=5))
    first = proxy.proxy.runtime
    pool = first.pool
    for _ in range(3):
        reply = client(proxy, "sk-alice").chat.completions.with_raw_response.create(model="gpt-x", messages=HI)
        assert reply.headers["x-generation"] == "one"
    assert client(proxy, "sk-bob").chat.completions.create(model="gpt-x", messages=HI).choices

    assert reload(proxy, config(mock, keys=[ALICE], stamp="two", rpm=5))  # bob revoked
    second = proxy.proxy.runtime
    assert second is not first and first.successor is second
    assert second.pool is pool  # upstream connections of unchanged providers kept
    assert second.admin.metrics is first.admin.metrics  # the core counters go on

    with pytest.raises(openai.AuthenticationError):
        client(proxy, "sk-bob").chat.completions.create(model="gpt-x", messages=HI)
    reply = client(proxy, "sk-alice").chat.completions.with_raw_response.create(model="gpt-x", messages=HI)
    assert reply.headers["x-generation"] == "two"
    # alice's rate limit counted on: 3 + 1 before, this is her 5th of 5 per minute, then 429
    client(proxy, "sk-alice").chat.completions.create(model="gpt-x", messages=HI)
    with pytest.raises(openai.RateLimitError):
        client(proxy, "sk-alice").chat.completions.create(model="gpt-x", messages=HI)

    # every filter's collectors are served by the new generation's registry, registered once
    metrics = httpx2.get(proxy.url + "/metrics").text
    assert "llmproxy_requests_total" in metrics
    assert "llmproxy_ratelimit_decisions" in metrics

    # the old generation retired: its factories closed, its ticks stopped
    def retired() -> bool:
        return all(runtime is not first for runtime, _ in proxy.proxy.generations)

    for _ in range(100):
        if retired():
            break
        proxy.thread.call(_sleep(0.02))
    assert retired()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_an_invalid_reload_changes_nothing(mock: MockServer, make_proxy: Make, caplog: Any) -> None:
    proxy = make_proxy(config(mock, keys=[ALICE], stamp="one"))
    before = proxy.proxy.runtime
    bad = config(mock, keys=[ALICE], stamp="one")
    bad["filters"][2]["config"]["providers"][0]["keys"] = [""]
    with caplog.at_level("ERROR", logger="llmproxy"):
        assert not reload(proxy, bad)
    assert proxy.proxy.runtime is before
    assert (
        "reload refused, still serving the previous config: reloaded.yaml: filters[2].config: filter 'routing': "
        "providers[0].keys: provider 'oa' has no key" in caplog.text
    )
    reply = client(proxy, "sk-alice").chat.completions.with_raw_response.create(model="gpt-x", messages=HI)
    assert reply.headers["x-generation"] == "one"


def test_a_stream_in_flight_finishes_on_its_generation(
    mock: MockServer, make_proxy: Make, loop_thread: LoopThread
) -> None:
    proxy = make_proxy(config(mock, keys=[ALICE], stamp="one"))
    first = proxy.proxy.runtime
    got_first = threading.Event()
    chunks: list[str] = []
    stamps: list[str] = []

    def stream() -> None:
        with client(proxy, "sk-alice").chat.completions.with_streaming_response.create(
            model="gpt-x", messages=HI, stream=True, extra_headers={"x-mock-tokens": "30", "x-mock-itl-ms": "20"}
        ) as response:
            stamps.append(response.headers["x-generation"])
            for line in response.iter_lines():
                if line.startswith("data:"):
                    chunks.append(line)
                    got_first.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert got_first.wait(10)
    assert reload(proxy, config(mock, keys=[ALICE], stamp="two"))
    # the old generation is kept while its stream runs; a new request gets the new one
    assert any(runtime is first for runtime, _ in proxy.proxy.generations)
    reply = client(proxy, "sk-alice").chat.completions.with_raw_response.create(model="gpt-x", messages=HI)
    assert reply.headers["x-generation"] == "two"
    thread.join(20)
    assert stamps == ["one"] and chunks[-1] == "data: [DONE]"
    for _ in range(100):
        if all(runtime is not first for runtime, _ in proxy.proxy.generations):
            break
        loop_thread.call(_sleep(0.02))
    assert all(runtime is not first for runtime, _ in proxy.proxy.generations)
