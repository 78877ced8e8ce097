"""The ``ratelimit`` filter end to end: real proxy, real mock provider, the official SDKs.

Limits (rpm, tpm, concurrency) with their headers and 429s in both
protocols, settlement on every path (the counters end equal to the metered
usage), bad input, the startup refusals. Budgets, the mid-stream cut, Redis
and the multi-process exactness test are in ``test_ratelimit_budgets.py``
and ``test_ratelimit_redis.py``.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
import yaml

from llmproxy import Quota, SharedStore
from llmproxy.filters.ratelimit import RateLimitFactory
from llmproxy.mock import KeyBehaviour, MockServer
from llmproxy.runtime.app import check_config
from llmproxy.runtime.config import ConfigError, parse_config
from tests import filters_for_tests as tf
from tests.support import LoopThread, RunningProxy

from .test_failover import ROOT, StartMock, call, start_mock_with

__all__ = ["start_mock_with"]

Make = Callable[[dict[str, Any]], RunningProxy]

MODEL = "gpt-x"
HI = [{"role": "user", "content": "hello"}]
KGOOD = "sk-rl-good"
K500 = "sk-rl-500"
KSTALL = "sk-rl-stall"


def rl_config(
    port: int,
    ratelimit: dict[str, Any],
    principals: dict[str, Any] | None = None,
    *,
    keys: list[str] | None = None,
    failover: dict[str, Any] | None = None,
    store: str = "memory",
    provider_type: str = "openai",
    timeouts: dict[str, float] | None = None,
    base_url: str | None = None,
) -> dict[str, Any]:
    provider: dict[str, Any] = {
        "name": "p",
        "type": provider_type,
        "base_url": base_url or f"http://127.0.0.1:{port}" + ("/v1" if provider_type == "openai" else ""),
        "keys": keys or [KGOOD],
        "models": {MODEL: "mock-gpt", "claude-x": "mock-claude"},
    }
    if timeouts:
        provider["timeouts"] = timeouts
    filters: list[dict[str, Any]] = [
        {"name": "tests.filters_for_tests:PrincipalByHeaderFactory", "config": {"principals": principals or {}}},
        {"name": "metering"},
        {"name": "routing", "config": {"providers": [provider]}},
    ]
    if failover is not None:
        filters.append({"name": "failover", "config": failover})
    filters.append({"name": "ratelimit", "config": ratelimit})
    filters.append({"name": "tests.filters_for_tests:UsageRecorderFactory"})
    return {"server": {"access_log": "off"}, "store": store, "filters": filters}


def factory_of(proxy: RunningProxy) -> RateLimitFactory:
    return next(f for f in proxy.runtime.chain.factories if isinstance(f, RateLimitFactory))


def used(loop: LoopThread, store: SharedStore, key: str, window: float = 60) -> int:
    """A counter's value, read with a zero reservation."""
    reservation = loop.call(store.reserve([Quota(key, 1 << 40, window, 0)]))
    return reservation.states[0].used


def oai(proxy: RunningProxy, principal: str | None = None) -> openai.OpenAI:
    headers = {"x-test-principal": principal} if principal else {}
    return openai.OpenAI(
        base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=15, default_headers=headers
    )


def recorded_exchanges(n: int, timeout: float = 5.0) -> list[Any]:
    rec = tf.UsageRecorderFactory.instances[-1]
    deadline = time.monotonic() + timeout
    while len(rec.exchanges) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rec.exchanges) >= n, rec.exchanges
    return rec.exchanges


def stream_request(tokens: int, itl_ms: int, principal: str = "alice") -> bytes:
    """A raw streaming chat request for ``principal``, the mock pacing ``tokens`` events."""
    body = json.dumps({"model": MODEL, "stream": True, "messages": HI}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
        f"x-test-principal: {principal}\r\nX-Mock-Tokens: {tokens}\r\nX-Mock-Itl-Ms: {itl_ms}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def chat_as(port: int, principal: str) -> int:
    return call(
        port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI}, {"x-test-principal": principal}
    ).status


# -- limits, headers and 429s --------------------------------------------------------------


def test_rpm_refuses_with_openai_headers_and_retry_after(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(rl_config(mock.port, {}, {"alice": {"limits": {"rpm": 3}}}))
    client = oai(proxy, "alice")
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded"
    headers = err.response.headers
    assert 55 <= int(headers["retry-after"]) <= 61  # the window, plus at most one bucket
    assert headers["x-ratelimit-remaining-requests"] == "0"
    reset = headers["x-ratelimit-reset-requests"]
    # a duration in OpenAI's format (1m1s, 59s), rounded up to whole seconds: the window plus
    # at most one bucket
    match = re.fullmatch(r"(?:(\d+)m)?(\d+)s", reset)
    assert match is not None, reset
    assert 55 <= int(match[1] or 0) * 60 + int(match[2]) <= 62, reset
    # another principal (and the anonymous caller) have no limit
    assert oai(proxy).chat.completions.create(model=MODEL, messages=HI).choices


def test_anthropic_clients_get_anthropic_shape_and_headers(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(rl_config(mock.port, {}, {"alice": {"limits": {"rpm": 1, "tpm": 100000}}}))
    client = anthropic.Anthropic(
        base_url=proxy.url,
        api_key="sk-client",
        max_retries=0,
        timeout=15,
        default_headers={"x-test-principal": "alice"},
    )
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=32, messages=HI)
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert raw.headers["anthropic-ratelimit-tokens-limit"] == "100000"
    reset = raw.headers["anthropic-ratelimit-requests-reset"]
    assert reset.endswith("Z") and "T" in reset  # RFC 3339
    assert "x-ratelimit-limit-requests" not in raw.headers
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model=MODEL, max_tokens=32, messages=HI)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_rules_match_and_key_by_a_selector_header(mock: MockServer, make_proxy: Make) -> None:
    rule = {"name": "tenant", "match": {"model": "gpt-*"}, "key": ["header:x-tenant"], "rpm": 1}
    proxy = make_proxy(rl_config(mock.port, {"rules": [rule]}))
    body = {"model": MODEL, "messages": HI}
    assert call(proxy.port, "POST", "/v1/chat/completions", body, {"x-tenant": "a"}).status == 200
    assert call(proxy.port, "POST", "/v1/chat/completions", body, {"x-tenant": "a"}).status == 429
    assert call(proxy.port, "POST", "/v1/chat/completions", body, {"x-tenant": "b"}).status == 200
    # no selector header: the rule does not apply
    assert call(proxy.port, "POST", "/v1/chat/completions", body).status == 200
    assert call(proxy.port, "POST", "/v1/chat/completions", body).status == 200
    # another model does not match
    other = {"model": "claude-x", "messages": HI}
    assert call(proxy.port, "POST", "/v1/chat/completions", other, {"x-tenant": "a"}).status == 200


def test_tpm_reserves_the_estimate_and_settles_to_the_usage(
    mock: MockServer, make_proxy: Make, loop_thread: LoopThread
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(rl_config(mock.port, {}, {"alice": {"limits": {"tpm": 5000}}}))
    client = oai(proxy, "alice")
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=100)
    remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert 5000 - 100 - 30 < remaining <= 5000 - 100  # the estimate: prompt + max_tokens
    usage = recorded_exchanges(1)[0]
    store = factory_of(proxy).store
    assert used(loop_thread, store, "principal:alice|principal=alice|tpm") == usage.total_tokens
    # the next request sees the settled value
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=10)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 5000 - usage.total_tokens


def test_concurrency_limit_holds_while_a_stream_runs(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(rl_config(mock.port, {}, {"alice": {"limits": {"concurrent": 1}}}))
    request = stream_request(40, 20)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        second = call(
            proxy.port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI}, {"x-test-principal": "alice"}
        )
        assert second.status == 429
        data = b""
        while b"[DONE]" not in data:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        third = call(
            proxy.port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI}, {"x-test-principal": "alice"}
        )
        if third.status == 200:
            break
        time.sleep(0.02)
    assert third.status == 200  # the slot was given back


# -- every path settles exactly once ---------------------------------------------------------


def _settled_config(port: int, **kw: Any) -> dict[str, Any]:
    return rl_config(port, {}, {"alice": {"limits": {"tpm": 1_000_000, "concurrent": 50}}}, **kw)


def _assert_ledger(proxy: RunningProxy, loop: LoopThread, exchanges: int) -> None:
    usages = recorded_exchanges(exchanges)
    time.sleep(0.05)
    spent = sum(u.total_tokens for u in usages if u is not None)
    store = factory_of(proxy).store
    assert used(loop, store, "principal:alice|principal=alice|tpm") == spent
    assert used(loop, store, "principal:alice|principal=alice|conc", 3600) == 0


def test_success_json_and_stream_settle_to_the_metered_usage(
    mock: MockServer, make_proxy: Make, loop_thread: LoopThread
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_settled_config(mock.port))
    client = oai(proxy, "alice")
    client.chat.completions.create(model=MODEL, messages=HI)
    list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
    _assert_ledger(proxy, loop_thread, 2)


def test_an_upstream_error_releases(mock: MockServer, make_proxy: Make, loop_thread: LoopThread) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_settled_config(mock.port))
    reply = call(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": HI},
        {"x-test-principal": "alice", "x-mock-status": "500"},
    )
    assert reply.status == 500
    _assert_ledger(proxy, loop_thread, 1)
    assert used(loop_thread, factory_of(proxy).store, "principal:alice|principal=alice|tpm") == 0


def test_a_retry_to_another_key_settles_once(
    start_mock_with: StartMock, make_proxy: Make, loop_thread: LoopThread
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    mock = start_mock_with({K500: KeyBehaviour(status=500)})
    proxy = make_proxy(_settled_config(mock.port, keys=[K500, KGOOD], failover={"max_attempts": 3}))
    raw = oai(proxy, "alice").chat.completions.with_raw_response.create(model=MODEL, messages=HI)
    assert raw.headers["x-llmproxy-attempts"] == "2"
    rec = tf.UsageRecorderFactory.instances[-1]
    recorded_exchanges(1)
    assert [outcome for outcome, _ in rec.attempts] == ["retried", "completed"]
    _assert_ledger(proxy, loop_thread, 1)


def test_a_timeout_releases(start_mock_with: StartMock, make_proxy: Make, loop_thread: LoopThread) -> None:
    tf.UsageRecorderFactory.instances.clear()
    mock = start_mock_with({KSTALL: KeyBehaviour(fault="stall")})
    short = {"connect": 1, "headers": 0.3, "idle": 0.3, "total": 3}
    proxy = make_proxy(_settled_config(mock.port, keys=[KSTALL], timeouts=short))
    reply = call(
        proxy.port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI}, {"x-test-principal": "alice"}
    )
    assert reply.status == 504
    _assert_ledger(proxy, loop_thread, 1)


def test_a_client_disconnect_mid_stream_settles_what_was_relayed(
    mock: MockServer, make_proxy: Make, loop_thread: LoopThread
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_settled_config(mock.port))
    request = stream_request(200, 10)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"data: ") < 6:
            received += sock.recv(65536)
    usage = recorded_exchanges(1)[0]
    assert 0 < usage.output_tokens < 200
    _assert_ledger(proxy, loop_thread, 1)


def test_shutdown_mid_stream_settles(mock: MockServer, loop_thread: LoopThread) -> None:
    from tests.support import start_proxy

    tf.UsageRecorderFactory.instances.clear()
    proxy = start_proxy(loop_thread, _settled_config(mock.port))
    store = factory_of(proxy).store
    request = stream_request(500, 10)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"data: ") < 4:
            received += sock.recv(65536)
        stopper = threading.Thread(target=proxy.stop, args=(0.1,))
        stopper.start()
        stopper.join(10)
    usage = recorded_exchanges(1)[0]
    assert usage.output_tokens < 500
    assert used(loop_thread, store, "principal:alice|principal=alice|tpm") == usage.total_tokens
    assert used(loop_thread, store, "principal:alice|principal=alice|conc", 3600) == 0


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, "many", 1.5, True])
def test_a_bad_max_tokens_is_a_400(mock: MockServer, make_proxy: Make, value: Any) -> None:
    proxy = make_proxy(rl_config(mock.port, {}, {"alice": {"limits": {"tpm": 1000}}}))
    reply = call(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": HI, "max_tokens": value},
        {"x-test-principal": "alice"},
    )
    assert reply.status == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_an_absurd_max_tokens_can_never_fit(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(rl_config(mock.port, {}, {"alice": {"limits": {"tpm": 1000}}}))
    reply = call(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": HI, "max_tokens": 10**12},
        {"x-test-principal": "alice"},
    )
    assert reply.status == 429 and reply.json()["error"]["code"] == "request_too_large"
    assert "retry-after" not in reply.headers  # waiting would not help
    # a missing max_tokens uses default_max_tokens (1024 > 1000): too large as well
    reply = call(
        proxy.port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI}, {"x-test-principal": "alice"}
    )
    assert reply.status == 429


def test_a_body_that_is_not_a_chat_request(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(rl_config(mock.port, {"default_max_tokens": 16}, {"alice": {"limits": {"tpm": 1000}}}))
    reply = call(
        proxy.port, "POST", "/v1/embeddings", {"model": MODEL, "input": "some text"}, {"x-test-principal": "alice"}
    )
    assert reply.status == 200, reply.body
    assert int(reply.headers["x-ratelimit-remaining-tokens"]) > 1000 - 20


# -- startup -----------------------------------------------------------------------------------


async def test_workers_with_the_memory_store_are_refused_naming_store() -> None:
    raw = rl_config(1, {}, {})
    raw["server"] = {"workers": 2}
    with pytest.raises(ConfigError) as info:
        await check_config(parse_config(raw, "limits.yaml"))
    assert info.value.path == "store" and "per_worker" in info.value.reason
    raw["filters"][-2]["config"] = {"per_worker": True}
    await check_config(parse_config(raw, "limits.yaml"))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"rules": [{"name": "r"}]}, "rules[0]"),
        ({"rules": [{"name": "r", "rpm": 0}]}, "rules[0].rpm"),
        ({"rules": [{"name": "r", "rpm": 1, "key": ["header:authorization"]}]}, "rules[0].key"),
        ({"rules": [{"name": "r", "rpm": 1, "key": ["nope"]}]}, "rules[0].key"),
        ({"budgets": [{"name": "b", "tokens": 1, "usd": 1}]}, "budgets[0]"),
        ({"budgets": [{"name": "b", "tokens": 1, "period": "week"}]}, "budgets[0].period"),
        ({"nope": 1}, "nope"),
    ],
)
async def test_bad_config_is_refused_naming_the_field(config: dict[str, Any], field: str) -> None:
    raw = rl_config(1, config, {})
    with pytest.raises(ConfigError) as info:
        await check_config(parse_config(raw, "limits.yaml"))
    assert field in str(info.value)


async def test_metering_must_come_first() -> None:
    raw = rl_config(1, {}, {})
    raw["filters"] = [f for f in raw["filters"] if f["name"] != "metering"]
    with pytest.raises(ConfigError, match="metering"):
        await check_config(parse_config(raw, "limits.yaml"))


# -- upstream 429s -----------------------------------------------------------------------------


def test_upstream_429s_reach_the_client_when_no_other_key_can_serve(
    start_mock_with: StartMock, make_proxy: Make
) -> None:
    k429, k429b = "sk-rl-429", "sk-rl-429-b"
    mock = start_mock_with({k429: KeyBehaviour(status=429, retry_after=7)})
    proxy = make_proxy(rl_config(mock.port, {}, {}, keys=[k429], failover={}))
    body = {"model": MODEL, "messages": HI}
    first = call(proxy.port, "POST", "/v1/chat/completions", body)
    assert first.status == 429 and first.headers["retry-after"] == "7"  # the provider's own
    again = call(proxy.port, "POST", "/v1/chat/completions", body)  # the key cools: still a 429, not a 503
    assert again.status == 429 and again.json()["error"]["code"] == "upstream_rate_limited"
    assert 1 <= int(again.headers["retry-after"]) <= 7
    anth = call(proxy.port, "POST", "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": HI})
    assert anth.status == 429 and anth.json()["error"]["type"] == "rate_limit_error"
    # with another key, the 429 is retried there invisibly
    mock2 = start_mock_with({k429b: KeyBehaviour(status=429, retry_after=7)})
    proxy2 = make_proxy(rl_config(mock2.port, {}, {}, keys=[k429b, KGOOD], failover={}))
    for _ in range(3):
        assert call(proxy2.port, "POST", "/v1/chat/completions", body).status == 200


# -- the demo config ---------------------------------------------------------------------------


def test_the_limits_demo(make_proxy: Make) -> None:
    """conf/limits-demo.yaml as shipped: the real auth filter, the real ratelimit filter."""
    raw = yaml.safe_load((ROOT / "conf" / "limits-demo.yaml").read_text())
    raw["server"]["access_log"] = "off"
    proxy = make_proxy(raw)
    body = {"model": "demo", "messages": HI}

    def as_key(key: str) -> Any:
        return call(proxy.port, "POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})

    assert [as_key("sk-demo-alice").status for _ in range(3)] == [200, 200, 200]
    refused = as_key("sk-demo-alice")
    assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["retry-after"]) >= 1
    statuses = [as_key("sk-demo-bob").status for _ in range(20)]
    assert 200 in statuses and statuses[-1] == 429
    last = as_key("sk-demo-bob")
    assert last.json()["error"]["code"] == "insufficient_quota"
    assert as_key("sk-demo-nobody").status == 401


def test_compiled_rule_matching_agrees_with_fnmatch() -> None:
    """A rule's compiled patterns match exactly what ``fnmatch.fnmatchcase`` matches, any one
    of a field's patterns sufficing, every given field required (headers included)."""
    import fnmatch
    import random

    from llmproxy import Headers
    from llmproxy.filters.ratelimit.rules import Facts, Match

    rng = random.Random(7)
    pieces = ["gpt", "-", "4", "o", "*", "?", "[ab]", "[!c]", "claude", ".", "\n", ""]
    values = ["", "gpt-4o", "gpt-4", "claude-3", "a", "c", "gpt\n4", "ab.c", "GPT-4O", "gpt-4o-mini"]
    for _ in range(400):
        patterns = tuple(
            "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        )
        model, team, header = rng.choice(values), rng.choice([*values, None]), rng.choice([*values, None])
        headers = Headers.from_pairs([("x-sel", header)] if header is not None else [])
        facts = Facts(model, "prov", "alice", team, headers)
        expected = any(fnmatch.fnmatchcase(model, p) for p in patterns)
        assert Match(model=patterns).matches(facts) is expected, (patterns, model)
        team_expected = team is not None and any(fnmatch.fnmatchcase(team, p) for p in patterns)
        assert Match(team=patterns).matches(facts) is team_expected, (patterns, team)
        header_expected = header is not None and any(fnmatch.fnmatchcase(header, p) for p in patterns)
        assert Match(headers=(("x-sel", patterns),)).matches(facts) is header_expected, (patterns, header)
        both = Match(model=patterns, headers=(("x-sel", patterns),)).matches(facts)
        assert both is (expected and header_expected)
    assert Match().matches(Facts("", "", "", None, Headers.from_pairs([])))
