"""The ``cache`` filter end to end: real proxy, the mock provider (which records every request), both SDKs, Redis.

Hits are served without an upstream call, byte-identical for JSON and
event-identical for streams; 50 concurrent identical misses make one
upstream call (one proxy on the memory store; two proxies on one Redis);
principals are kept apart; no-store and sampled requests bypass; errors are
never stored; entries expire.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from llmproxy import FactoryContext, MemoryStore
from llmproxy.filters.auth import hash_key
from llmproxy.filters.cache import CacheFactory
from llmproxy.filters.cache.lru import Lru
from llmproxy.mock import MockConfig, MockServer, start_mock

from ..redis_server import REDIS_SERVER, start_redis_server, stop_redis_server
from ..support import LoopThread, RunningProxy, raw_exchange, status_of

Make = Callable[[dict[str, Any]], RunningProxy]
ALICE = "sk-test-cache-alice-01"
BOB = "sk-test-cache-bob-0002"
HI: list[Any] = [{"role": "user", "content": "hello there"}]


def config(port: int, cache: dict[str, Any] | None = None, store: str = "memory") -> dict[str, Any]:
    return {
        "store": store,
        "filters": [
            {
                "name": "auth",
                "config": {
                    "keys": [{"name": "alice", "key_hash": hash_key(ALICE)}, {"name": "bob", "key_hash": hash_key(BOB)}]
                },
            },
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "oa",
                            "type": "openai",
                            "base_url": f"http://127.0.0.1:{port}/v1",
                            "keys": ["sk-provider-oa"],
                            "models": {"demo": "mock-gpt", "alias": "mock-gpt"},
                        },
                        {
                            "name": "an",
                            "type": "anthropic",
                            "base_url": f"http://127.0.0.1:{port}",
                            "keys": ["sk-provider-an"],
                            "models": {"claude": "mock-claude"},
                        },
                    ]
                },
            },
            {"name": "cache", "config": cache or {}},
            {"name": "metering"},
        ],
    }


def post(port: int, body: dict[str, Any], key: str = ALICE, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(payload)}\r\n{extra}\r\n"
    )
    response = raw_exchange(port, head.encode() + payload)
    raw_head, _, raw_body = response.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")[1:]
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status_of(response), fields, raw_body


def upstream_calls(mock: MockServer) -> int:
    return len([r for r in mock.requests if "/_mock/" not in str(r)])


CHAT = {"model": "demo", "messages": HI}


@pytest.fixture
def cached(mock: MockServer, make_proxy: Make) -> RunningProxy:
    return make_proxy(config(mock.port))


def _access_line(caplog: pytest.LogCaptureFixture, needle: str) -> str:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "llmproxy.access" and needle in record.getMessage():
                return record.getMessage()
        time.sleep(0.01)
    raise AssertionError(f"no access line with {needle}")


def test_second_identical_request_is_a_byte_identical_hit(
    cached: RunningProxy, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="llmproxy.access"):
        s1, h1, b1 = post(cached.port, CHAT)
        s2, h2, b2 = post(cached.port, {"messages": HI, "model": "alias", "user": "u-1"})  # alias, order, user
        hit_line = _access_line(caplog, h2["x-request-id"])
        miss_line = _access_line(caplog, h1["x-request-id"])
    usage = json.loads(b1)["usage"]
    assert f"tokens_out={usage['completion_tokens']}" in hit_line and "tokens_out=" in miss_line
    assert "cost=0" in hit_line, hit_line
    assert (s1, s2) == (200, 200)
    assert h1["x-llmproxy-cache"] == "miss" and h2["x-llmproxy-cache"] == "hit"
    assert b1 == b2 and h2["content-type"] == h1["content-type"]
    assert len(mock.requests) == 1


def test_openai_sdk_stream_replayed_event_identical(cached: RunningProxy, mock: MockServer) -> None:
    client = openai.OpenAI(base_url=cached.url + "/v1", api_key=ALICE, max_retries=0, timeout=10)

    def events() -> list[Any]:
        stream = client.chat.completions.create(
            model="demo", messages=HI, stream=True, stream_options={"include_usage": True}
        )
        return [chunk.model_dump() for chunk in stream]

    first, second = events(), events()
    assert first == second and first[-1]["usage"]["completion_tokens"] > 0
    assert len(mock.requests) == 1
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=HI)
    assert raw.headers["x-llmproxy-cache"] == "miss"  # JSON and stream are separate entries
    assert len(mock.requests) == 2


def test_anthropic_sdk_json_and_stream_hits(cached: RunningProxy, mock: MockServer) -> None:
    client = anthropic.Anthropic(base_url=cached.url, api_key=ALICE, max_retries=0, timeout=10)
    one = client.messages.with_raw_response.create(model="claude", max_tokens=32, messages=HI)
    two = client.messages.with_raw_response.create(model="claude", max_tokens=32, messages=HI)
    assert two.headers["x-llmproxy-cache"] == "hit" and one.http_response.content == two.http_response.content
    with client.messages.stream(model="claude", max_tokens=32, messages=HI) as s:
        a = [e.model_dump() for e in s]
    with client.messages.stream(model="claude", max_tokens=32, messages=HI) as s:
        b = [e.model_dump() for e in s]
    assert a == b and a
    assert len(mock.requests) == 2


def test_principals_do_not_share_entries_unless_shared(mock: MockServer, make_proxy: Make) -> None:
    scoped = make_proxy(config(mock.port))
    assert post(scoped.port, CHAT, ALICE)[1]["x-llmproxy-cache"] == "miss"
    assert post(scoped.port, CHAT, BOB)[1]["x-llmproxy-cache"] == "miss"
    assert post(scoped.port, CHAT, BOB)[1]["x-llmproxy-cache"] == "hit"
    assert len(mock.requests) == 2
    shared = make_proxy(config(mock.port, {"shared": True}))
    post(shared.port, CHAT, ALICE)
    assert post(shared.port, CHAT, BOB)[1]["x-llmproxy-cache"] == "hit"
    assert len(mock.requests) == 3


def test_bypasses(cached: RunningProxy, mock: MockServer) -> None:
    post(cached.port, CHAT)
    for extra in ("cache-control: no-store\r\n", "cache-control: no-cache\r\n"):
        assert post(cached.port, CHAT, extra=extra)[1]["x-llmproxy-cache"] == "bypass"
    sampled = {**CHAT, "temperature": 0.7}
    assert post(cached.port, sampled)[1]["x-llmproxy-cache"] == "bypass"
    assert post(cached.port, sampled)[1]["x-llmproxy-cache"] == "bypass"
    assert post(cached.port, {**CHAT, "temperature": 0})[1]["x-llmproxy-cache"] == "miss"
    assert len(mock.requests) == 6
    _, fields, _ = post(cached.port, CHAT, key="sk-wrong-key-000000")  # refused by auth, before cache ran
    assert "x-llmproxy-cache" not in fields


def test_excluded_models_bypass(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(mock.port, {"exclude_models": ["al*"]}))
    post(proxy.port, {**CHAT, "model": "alias"})
    assert post(proxy.port, {**CHAT, "model": "alias"})[1]["x-llmproxy-cache"] == "bypass"
    assert post(proxy.port, CHAT)[1]["x-llmproxy-cache"] == "miss"


def test_errors_are_not_cached(cached: RunningProxy, mock: MockServer) -> None:
    bad = {**CHAT, "messages": HI, "max_tokens": -5}
    s1, _, _ = post(cached.port, bad, extra="x-mock-status: 500\r\n")
    s2, h2, _ = post(cached.port, bad, extra="x-mock-status: 500\r\n")
    assert s1 >= 400 and s2 >= 400, (s1, s2)
    assert h2["x-llmproxy-cache"] == "miss"
    assert len(mock.requests) == 2


def test_ttl_expiry(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(mock.port, {"ttl": 0.3}))
    post(proxy.port, CHAT)
    assert post(proxy.port, CHAT)[1]["x-llmproxy-cache"] == "hit"
    time.sleep(0.4)
    assert post(proxy.port, CHAT)[1]["x-llmproxy-cache"] == "miss"
    assert len(mock.requests) == 2


@pytest.fixture
def slow_mock(loop_thread: LoopThread) -> Iterator[MockServer]:
    server = loop_thread.call(start_mock("127.0.0.1", 0, MockConfig(ttft=0.5)))
    yield server
    loop_thread.call(server.close())


def _burst(ports: list[int], n: int = 50) -> list[tuple[int, dict[str, str], bytes]]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: post(ports[i % len(ports)], CHAT), range(n)))


def test_fifty_concurrent_misses_make_one_upstream_call(slow_mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(slow_mock.port))
    replies = _burst([proxy.port])
    assert all(status == 200 for status, _, _ in replies)
    assert len({body for _, _, body in replies}) == 1
    assert sorted(f["x-llmproxy-cache"] for _, f, _ in replies).count("miss") == 1
    assert len(slow_mock.requests) == 1


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_fifty_concurrent_misses_on_two_proxies_sharing_redis(slow_mock: MockServer, make_proxy: Make) -> None:
    proc, url = start_redis_server()
    try:
        a = make_proxy(config(slow_mock.port, {"store": "shared"}, store=url))
        b = make_proxy(config(slow_mock.port, {"store": "shared"}, store=url))
        replies = _burst([a.port, b.port])
        assert all(status == 200 for status, _, _ in replies)
        assert len({body for _, _, body in replies}) == 1
        assert len(slow_mock.requests) == 1
    finally:
        stop_redis_server(proc)


def test_a_failed_leader_releases_its_followers(slow_mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(slow_mock.port))
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        leader = pool.submit(post, proxy.port, CHAT, ALICE, "x-mock-status: 500\r\n")
        time.sleep(0.1)
        followers = list(pool.map(lambda _: post(proxy.port, CHAT), range(4)))
    assert leader.result()[0] >= 500
    assert all(status == 200 for status, _, _ in followers)
    assert len(slow_mock.requests) >= 2


def test_lru_bounds_entries_and_bytes() -> None:
    lru = Lru(max_entries=2, max_bytes=10)
    lru.put("a", b"1234", 60)
    lru.put("b", b"1234", 60)
    assert lru.get("a") == b"1234"  # a is now the most recent
    lru.put("c", b"1234", 60)
    assert lru.get("b") is None and len(lru) == 2
    lru.put("d", b"12345678", 60)
    assert lru.bytes <= 10 and lru.get("d") == b"12345678"
    assert not lru.put("e", b"x" * 11, 60)


def test_config_errors_name_the_field() -> None:
    for bad, field in [
        ({"ttl": 0}, "ttl"),
        ({"store": "disk"}, "store"),
        ({"shared": "yes"}, "shared"),
        ({"x": 1}, "x"),
    ]:
        with pytest.raises(ValueError, match=field):
            CacheFactory("cache", bad, FactoryContext(MemoryStore()))


STREAM = {**CHAT, "stream": True}


def test_a_stream_cut_by_the_upstream_is_not_stored(cached: RunningProxy, mock: MockServer) -> None:
    _, first, body = post(cached.port, STREAM, extra="x-mock-fault: drop\r\n")
    assert first["x-llmproxy-cache"] == "miss" and b"[DONE]" not in body
    _, second, _ = post(cached.port, STREAM)
    assert second["x-llmproxy-cache"] == "miss"
    assert post(cached.port, STREAM)[1]["x-llmproxy-cache"] == "hit"
    assert len(mock.requests) == 2


def test_a_stream_the_client_leaves_is_not_stored(slow_mock: MockServer, make_proxy: Make) -> None:
    import socket

    proxy = make_proxy(config(slow_mock.port))
    payload = json.dumps(STREAM).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %b\r\ncontent-length: %d\r\n\r\n%b" % (ALICE.encode(), len(payload), payload)
    )
    time.sleep(0.1)
    sock.close()  # before the mock's first byte (ttft 0.5 s)
    time.sleep(0.7)
    assert post(proxy.port, STREAM)[1]["x-llmproxy-cache"] == "miss"
    assert len(slow_mock.requests) == 2


def test_metrics_count_hits_misses_and_bypass(cached: RunningProxy) -> None:
    import urllib.request

    post(cached.port, CHAT)
    post(cached.port, CHAT)
    post(cached.port, CHAT, extra="cache-control: no-store\r\n")
    time.sleep(0.4)  # past the hit metrics' flush delay
    text = urllib.request.urlopen(cached.url + "/metrics", timeout=5).read().decode()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("llmproxy_cache")
    }
    assert values["llmproxy_cache_hits_total"] == 1
    assert values["llmproxy_cache_misses_total"] == 1
    assert values["llmproxy_cache_bypass_total"] == 1
    assert values["llmproxy_cache_hit_bytes_total"] > 0


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_an_entry_stored_by_one_proxy_is_a_hit_on_another(mock: MockServer, make_proxy: Make) -> None:
    proc, url = start_redis_server()
    try:
        a = make_proxy(config(mock.port, {"store": "shared"}, store=url))
        b = make_proxy(config(mock.port, {"store": "shared"}, store=url))
        _, first, body = post(a.port, STREAM)
        _, second, replay = post(b.port, STREAM)
        assert (first["x-llmproxy-cache"], second["x-llmproxy-cache"]) == ("miss", "hit")
        assert _dechunk(body) == replay and b"[DONE]" in replay and len(mock.requests) == 1
    finally:
        stop_redis_server(proc)


def _dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while True:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return b"".join(out)
        out.append(rest[:n])
        rest = rest[n + 2 :]
