"""The failover filter end to end: the proxy, the mock provider and real sockets.

Every scenario runs against the mock provider with per-key behaviour
(:class:`~proxy.mock.KeyBehaviour`) and counts, at the mock, the
requests each credential received, health-check probes (header
``x-llmproxy-probe``) apart. The behavioural tests run once with
``store: memory`` and once with ``store: redis://...`` (a real
``redis-server``, one flushed database); what needs several processes or a
Redis that goes away is in ``test_failover_redis.py``.

Intervals are short (0.2 s) and thresholds small so the file stays fast.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.context import FactoryContext
from llmproxy.filters.failover import FailoverFactory, HealthBook, KeyHealth
from llmproxy.filters.routing import RouteDecision, RoutingFactory, Target
from llmproxy.filters.routing.adapters.failures import retry_after
from llmproxy.filters.routing.table import Provider
from llmproxy.mock import KeyBehaviour, MockConfig, MockServer, start_mock
from llmproxy.runtime.app import check_config
from llmproxy.runtime.config import ConfigError, parse_config
from llmproxy.state.redis import RedisStore
from llmproxy.state.store import MemoryStore

from ..redis_server import free_port, redis_url
from ..support import LoopThread, RunningProxy

__all__ = ["redis_url"]  # re-exported so pytest sees the fixture in this module

ROOT = Path(__file__).resolve().parents[2]
Make = Callable[[dict[str, Any]], RunningProxy]
StartMock = Callable[..., MockServer]

TOKENS = 5
VOCAB = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
HI = [{"role": "user", "content": "hi"}]
MODEL = "m"

# Provider keys, named after what the mock does with them.
K401 = "sk-fo-revoked-401"
K401B = "sk-fo-revoked-401-b"
K429 = "sk-fo-limited-429"
K500 = "sk-fo-flaky-500"
KSTALL = "sk-fo-stalls"
KDROP = "sk-fo-drops"
KRESET = "sk-fo-resets"
KGOOD = "sk-fo-good"
KGOOD2 = "sk-fo-good-2"
KANT = "sk-fo-anthropic"


def key_id(key: str) -> str:
    """The hashed id the proxy shows for ``key`` (sha256, first 12 hex digits)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def mock_text(tokens: int = TOKENS) -> str:
    return "".join(f"{VOCAB[i]} " for i in range(tokens))


# -- configs -----------------------------------------------------------------------


def provider(
    port: int,
    keys: list[str],
    *,
    name: str = "p",
    kind: str = "openai",
    models: Any = None,
    priority: int = 0,
    timeouts: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "base_url": f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else ""),
        "keys": keys,
        "models": models if models is not None else [MODEL],
        "priority": priority,
        "timeouts": timeouts or {"connect": 1, "headers": 2, "idle": 2, "total": 10},
    }


def config(store: str, providers: list[dict[str, Any]], failover: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": "off"},
        "store": store,
        "filters": [
            {"name": "routing", "config": {"providers": providers}},
            {"name": "failover", "config": failover},
        ],
        **top,
    }


# -- clients -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def attempts(self) -> str | None:
        return self.headers.get("x-llmproxy-attempts")


def call(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 15
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead as exc:
            data = exc.partial
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def chat(port: int, *, stream: bool = False, headers: dict[str, str] | None = None) -> Reply:
    body: dict[str, Any] = {"model": MODEL, "messages": HI}
    if stream:
        body["stream"] = True
    return call(port, "POST", "/v1/chat/completions", body, headers)


def admin(port: int) -> dict[str, Any]:
    reply = call(port, "GET", "/admin/failover")
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


def key_state(port: int, key: str) -> dict[str, Any]:
    rows = [row for row in admin(port)["keys"] if row["key_id"] == key_id(key)]
    assert len(rows) == 1, rows
    return rows[0]


def metrics(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``name -> [(labels, value)]`` from ``GET /metrics``."""
    reply = call(port, "GET", "/metrics")
    assert reply.status == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def metric(port: int, name: str, **labels: str) -> float | None:
    for found, value in metrics(port).get(name, []):
        if all(found.get(k) == v for k, v in labels.items()):
            return value
    return None


def sse_data(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    out = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data:"):
                out.append(line[5:].strip())
    return out


def stream_text(events: list[str]) -> str:
    text = []
    for data in events:
        if data == "[DONE]":
            continue
        payload = json.loads(data)
        for choice in payload.get("choices", []):
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


# -- counting at the mock ------------------------------------------------------------


def is_probe(req: Any) -> bool:
    return "x-llmproxy-probe" in req.headers


def hits(mock: MockServer, key: str) -> int:
    """Client (non-probe) requests the mock received with ``key``."""
    return sum(1 for r in list(mock.requests) if r.credential == key and not is_probe(r))


def probes(mock: MockServer, key: str | None = None) -> list[Any]:
    return [r for r in list(mock.requests) if is_probe(r) and (key is None or r.credential == key)]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def shared_record(url: str, name: str) -> bytes | None:
    """A record as stored in Redis (read through the store, as the proxy reads it)."""
    store = RedisStore(url)
    try:
        value, _version = await store.get(name)
        return value
    finally:
        await store.close()


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def start_mock_with(loop_thread: LoopThread) -> Iterator[StartMock]:
    """Start mock providers with per-key behaviour; all are closed after the test."""
    started: list[MockServer] = []

    def start(keys: dict[str, KeyBehaviour] | None = None, **options: Any) -> MockServer:
        cfg = MockConfig(tokens=TOKENS, keys=dict(keys or {}), **options)
        server = loop_thread.call(start_mock("127.0.0.1", 0, cfg))
        started.append(server)
        return server

    yield start
    for server in started:
        loop_thread.call(server.close())


def _private_db(url: str) -> str:
    """The same server, database 9 (other Redis tests use 0 with their own namespaces), flushed."""
    url = url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    """``store:`` for the proxy: ``memory``, or a flushed database on the session's redis-server."""
    if request.param == "memory":
        return "memory"
    return _private_db(request.getfixturevalue("redis_url"))


# -- key health: eject, cool, restore -----------------------------------------------


def test_bad_keys_are_left_within_their_threshold_and_the_flaky_one_is_restored_by_probes(
    store: str, start_mock_with: StartMock, make_proxy: Make
) -> None:
    failure_threshold, success_threshold, fails = 2, 2, 3
    mock = start_mock_with(
        {
            K401: KeyBehaviour(status=401),
            K429: KeyBehaviour(status=429, retry_after=30),
            K500: KeyBehaviour(status=500, times=fails),
            KSTALL: KeyBehaviour(fault="stall"),
        }
    )
    short = {"connect": 1, "headers": 0.25, "idle": 0.25, "total": 5}
    proxy = make_proxy(
        config(
            store,
            [provider(mock.port, [K401, K429, K500, KSTALL, KGOOD], timeouts=short)],
            {
                "failure_threshold": failure_threshold,
                "success_threshold": success_threshold,
                "eject_for": 0.2,
                "max_attempts": 5,
                "backoff": {"base": 0.01, "max": 0.02},
                "health_check": {"interval": 0.2, "timeout": 0.2, "model": MODEL},
            },
        )
    )

    first = chat(proxy.port)
    assert first.status == 200, first.body
    assert first.attempts == "5"  # round-robin from the first key: every bad key once, then the good one
    replies = [first] + [chat(proxy.port) for _ in range(9)]
    assert [r.status for r in replies] == [200] * 10
    assert [json.loads(r.body)["choices"][0]["message"]["content"] for r in replies] == [mock_text()] * 10

    assert hits(mock, K401) == 1  # ejected at once
    assert hits(mock, K429) == 1  # cooling for its retry-after (30 s)
    assert hits(mock, KSTALL) == failure_threshold  # timeouts count towards the threshold
    assert not probes(mock, K429) and not probes(mock, KGOOD)  # only ejected keys are probed
    assert key_state(proxy.port, K401)["state"] == "ejected"
    assert key_state(proxy.port, K429)["state"] == "cooling"

    wait_for(lambda: key_state(proxy.port, K500)["state"] == "healthy", what="the flaky key's restoration")
    later = [chat(proxy.port) for _ in range(10)]
    assert [r.status for r in later] == [200] * 10
    assert [r.attempts for r in later] == ["1"] * 10

    # The flaky key's life at the mock: its failing client requests, then only
    # probes while ejected (the first still fails, then success_threshold
    # successes), then client traffic again and no more probes.
    life = ["probe" if is_probe(r) else "client" for r in list(mock.requests) if r.credential == K500]
    client_after = life.count("client") - failure_threshold
    assert client_after >= 1, life
    expected_probes = fails - failure_threshold + success_threshold
    assert life == ["client"] * failure_threshold + ["probe"] * expected_probes + ["client"] * client_after
    # the other bad keys never got client traffic back while ejected or cooling
    assert (hits(mock, K401), hits(mock, K429), hits(mock, KSTALL)) == (1, 1, failure_threshold)
    assert probes(mock, K401) and probes(mock, KSTALL)  # still probed, still failing
    for probe in probes(mock):
        assert probe.body is not None and probe.body["max_tokens"] == 1 and probe.model == MODEL


@pytest.mark.parametrize(
    ("retry_after", "cooldown"),
    [(0.4, 30.0), (None, 0.4)],
    ids=["retry-after", "cooldown-without-retry-after"],
)
def test_429_cools_the_key_for_its_retry_after_then_it_returns_by_itself(
    store: str, start_mock_with: StartMock, make_proxy: Make, retry_after: float | None, cooldown: float
) -> None:
    mock = start_mock_with({K429: KeyBehaviour(status=429, retry_after=retry_after, times=1)})
    proxy = make_proxy(
        config(store, [provider(mock.port, [K429, KGOOD])], {"cooldown": cooldown, "eject_for": 30})
    )  # no health checks: the key must come back on its own
    started = time.monotonic()
    first = chat(proxy.port)
    assert (first.status, first.attempts) == (200, "2")
    assert hits(mock, K429) == 1
    row = key_state(proxy.port, K429)
    assert (row["state"], row["reason"], row["failures"]) == ("cooling", "rate_limited", 0)

    # The state machine's timing is pinned on a fake clock (test_usable_follows_the_clock);
    # here, end to end, a short cool-down: inside it only the good key, after it both.
    while time.monotonic() - started < 0.25:  # well inside the cool-down: only the good key
        reply = chat(proxy.port)
        assert (reply.status, reply.attempts) == (200, "1")
    assert hits(mock, K429) == 1

    time.sleep(max(0.0, started + 0.4 + 0.15 - time.monotonic()))
    after = [chat(proxy.port) for _ in range(2)]
    assert [(r.status, r.attempts) for r in after] == [(200, "1")] * 2
    assert hits(mock, K429) == 2  # back in the rotation, and the mock now serves it
    assert key_state(proxy.port, K429)["state"] == "healthy"
    assert not probes(mock)


def test_a_provider_that_does_not_serve_the_probe_model_is_probed_with_its_own(
    start_mock_with: StartMock, make_proxy: Make
) -> None:
    mock = start_mock_with({K500: KeyBehaviour(status=500, times=1)})
    proxy = make_proxy(
        config(
            "memory",
            [
                provider(mock.port, [KGOOD], name="a"),
                provider(mock.port, [K500, KGOOD2], name="b", kind="anthropic", models={"other": "claude-o"}),
            ],
            {"failure_threshold": 1, "eject_for": 0.1, "health_check": {"interval": 0.1, "model": MODEL}},
        )
    )
    reply = call(proxy.port, "POST", "/v1/chat/completions", {"model": "other", "messages": HI})
    assert (reply.status, reply.attempts) == (200, "2")
    assert key_state(proxy.port, K500)["state"] == "ejected"
    # health_check.model is served by provider a only: b's key is probed with b's first model
    wait_for(lambda: key_state(proxy.port, K500)["state"] == "healthy", what="the restoration of b's key")
    assert [(r.path, r.model) for r in probes(mock, K500)] == [("/v1/messages", "claude-o")]


def test_a_restart_keeps_shared_health_of_kept_keys_and_forgets_removed_ones(
    redis_url: str, start_mock_with: StartMock, make_proxy: Make, loop_thread: LoopThread
) -> None:
    store = _private_db(redis_url)
    mock = start_mock_with({K401: KeyBehaviour(status=401)})
    settings = {"eject_for": 30}
    first = make_proxy(config(store, [provider(mock.port, [K401, KGOOD])], settings))
    assert chat(first.port).attempts == "2"
    first.stop()

    again = make_proxy(config(store, [provider(mock.port, [K401, KGOOD])], settings))
    assert [chat(again.port).attempts for _ in range(2)] == ["1", "1"]  # round-robin starts at K401 again
    assert hits(mock, K401) == 1
    assert key_state(again.port, K401)["state"] == "ejected"
    again.stop()

    record = HealthBook.record_key("p", key_id(K401))
    assert loop_thread.call(shared_record(store, record)) is not None
    without = make_proxy(config(store, [provider(mock.port, [KGOOD])], settings))
    assert chat(without.port).status == 200
    assert loop_thread.call(shared_record(store, record)) is None  # the removed key's record is gone


# -- provider fallback and nothing left -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_fallback_to_another_provider_is_translated_for_an_openai_sdk_client(
    store: str, start_mock_with: StartMock, make_proxy: Make, stream: bool
) -> None:
    mock = start_mock_with({K401: KeyBehaviour(status=401), K401B: KeyBehaviour(status=401)})
    proxy = make_proxy(
        config(
            store,
            [
                provider(mock.port, [K401, K401B], name="a"),
                provider(mock.port, [KANT], name="b", kind="anthropic", models={MODEL: "claude-m"}, priority=1),
            ],
            {"max_attempts": 3, "eject_for": 30},
        )
    )
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client-not-a-provider-key", max_retries=0)
    for expected_attempts in ("3", "1"):  # both A keys fail, then B; afterwards B at once
        if stream:
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI, stream=True)  # type: ignore[arg-type]
            chunks = list(raw.parse())
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[0].object == "chat.completion.chunk"
            assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
        else:
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
            completion = raw.parse()
            assert completion.object == "chat.completion"
            assert completion.choices[0].finish_reason == "stop"
            text = completion.choices[0].message.content or ""
        assert text == mock_text()
        assert raw.headers["x-llmproxy-attempts"] == expected_attempts
    assert (hits(mock, K401), hits(mock, K401B), hits(mock, KANT)) == (1, 1, 2)
    anthropic_requests = [r for r in mock.requests if r.credential == KANT]
    assert {r.path for r in anthropic_requests} == {"/v1/messages"}
    assert {r.model for r in anthropic_requests} == {"claude-m"}


@pytest.mark.parametrize(
    ("keys", "eject_for", "retry_after"),
    [
        ({K401: KeyBehaviour(status=401), K429: KeyBehaviour(status=429, retry_after=5)}, 30, 5),
        ({K401: KeyBehaviour(status=401), K401B: KeyBehaviour(status=401)}, 7, 7),
    ],
    ids=["soonest-is-a-cooling-key", "all-ejected"],
)
def test_nothing_healthy_is_503_with_retry_after_of_the_soonest_recovery(
    store: str,
    start_mock_with: StartMock,
    make_proxy: Make,
    keys: dict[str, KeyBehaviour],
    eject_for: float,
    retry_after: int,
) -> None:
    mock = start_mock_with(keys)
    proxy = make_proxy(config(store, [provider(mock.port, list(keys))], {"eject_for": eject_for}))
    first = chat(proxy.port)  # every key fails once: the last provider answer goes back
    assert first.status in (401, 429) and first.attempts == "2"
    seen = len(mock.requests)
    for _ in range(2):
        reply = chat(proxy.port)
        assert reply.status == 503
        assert reply.json() == {
            "error": {
                "message": "no healthy provider key is available for this model right now",
                "type": reply.json()["error"]["type"],
                "param": None,
                "code": "no_healthy_upstream",
            }
        }
        assert retry_after - 1 <= int(reply.headers["retry-after"]) <= retry_after
    assert len(mock.requests) == seen  # refused without contacting the provider


# -- streams -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "headers"),
    [
        (KeyBehaviour(fault="drop"), {"x-mock-stall-after": "0"}),  # headers and role chunk, then closed
        (KeyBehaviour(fault="reset"), {}),  # no byte at all
    ],
    ids=["drop-before-first-delta", "reset"],
)
def test_stream_failing_before_its_first_delta_is_retried_invisibly(
    store: str, start_mock_with: StartMock, make_proxy: Make, behaviour: KeyBehaviour, headers: dict[str, str]
) -> None:
    # The fault is bound to the key, so the retry (which carries the same
    # request headers) lands on a key that behaves.
    mock = start_mock_with({KDROP: behaviour})
    proxy = make_proxy(config(store, [provider(mock.port, [KDROP, KGOOD])], {"failure_threshold": 3}))
    reply = chat(proxy.port, stream=True, headers=headers)
    assert reply.status == 200
    assert reply.attempts == "2"
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_data(reply.body)
    assert events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    payloads = [json.loads(e) for e in events[:-1]]
    roles = [p for p in payloads if p["choices"] and p["choices"][0]["delta"].get("role")]
    assert len(roles) == 1  # nothing of the failed attempt reached the client
    assert stream_text(events) == mock_text()
    assert (hits(mock, KDROP), hits(mock, KGOOD)) == (1, 1)
    assert key_state(proxy.port, KDROP)["failures"] == 1


def test_stream_failing_after_content_ends_with_an_sse_error_and_counts_against_the_key(
    store: str, start_mock_with: StartMock, make_proxy: Make
) -> None:
    mock = start_mock_with({KDROP: KeyBehaviour(fault="drop")})
    proxy = make_proxy(config(store, [provider(mock.port, [KDROP, KGOOD])], {"failure_threshold": 2}))
    drop_after_three = {"x-mock-stall-after": "3"}

    reply = chat(proxy.port, stream=True, headers=drop_after_three)  # round-robin starts at the first key
    assert (reply.status, reply.attempts) == (200, "1")
    events = sse_data(reply.body)
    assert stream_text(events[:-1]) == mock_text(3)  # three deltas reached the client ...
    error = json.loads(events[-1])["error"]  # ... then one final error event, no [DONE]
    assert error["code"] and "[DONE]" not in events
    assert (hits(mock, KDROP), hits(mock, KGOOD)) == (1, 0)  # no retry once content went out
    # counted when the exchange ends, just after the client saw the end of the stream
    wait_for(lambda: key_state(proxy.port, KDROP)["failures"] == 1, what="the failure to be counted")
    assert key_state(proxy.port, KDROP)["state"] == "healthy"
    assert metric(proxy.port, "llmproxy_upstream_key_failures", key_id=key_id(KDROP)) == 1

    ok = chat(proxy.port, stream=True, headers=drop_after_three)  # the good key
    assert (ok.status, sse_data(ok.body)[-1]) == (200, "[DONE]")
    again = chat(proxy.port, stream=True, headers=drop_after_three)  # the dropping key: second failure
    assert json.loads(sse_data(again.body)[-1])["error"]
    # Two consecutive failures of that key: ejected, though each stream had
    # delivered content before it failed.
    wait_for(lambda: key_state(proxy.port, KDROP)["state"] != "healthy", what="the second failure to be counted")
    row = key_state(proxy.port, KDROP)
    assert (row["state"], row["failures"], row["reason"]) == ("ejected", 2, "failures")
    for _ in range(3):
        assert sse_data(chat(proxy.port, stream=True, headers=drop_after_three).body)[-1] == "[DONE]"
    assert hits(mock, KDROP) == 2


# -- attempts ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 2, 4])
def test_max_attempts_caps_the_attempts_made_and_reported(
    start_mock_with: StartMock, make_proxy: Make, max_attempts: int
) -> None:
    keys = [f"sk-fo-down-{i}" for i in range(5)]
    mock = start_mock_with({k: KeyBehaviour(status=500) for k in keys})
    proxy = make_proxy(
        config("memory", [provider(mock.port, keys)], {"max_attempts": max_attempts, "failure_threshold": 10})
    )
    reply = chat(proxy.port)
    assert reply.status == 500
    assert reply.attempts == str(max_attempts)
    assert len(mock.requests) == max_attempts
    assert len({r.credential for r in mock.requests}) == max_attempts  # a different key each time


def test_a_single_key_is_retried_after_a_backoff_until_max_attempts(
    start_mock_with: StartMock, make_proxy: Make
) -> None:
    mock = start_mock_with({K500: KeyBehaviour(status=503, times=2)})
    proxy = make_proxy(
        config(
            "memory",
            [provider(mock.port, [K500])],
            {"max_attempts": 3, "failure_threshold": 5, "backoff": {"base": 0.05, "max": 0.1}},
        )
    )
    started = time.monotonic()
    reply = chat(proxy.port)
    assert (reply.status, reply.attempts) == (200, "3")
    assert time.monotonic() - started >= 0.025 + 0.05  # jittered 0.05 then 0.1, each at least halved
    assert [r.credential for r in mock.requests] == [K500] * 3
    wait_for(lambda: key_state(proxy.port, K500)["failures"] == 0, what="the success to reset the count")


def test_no_attempt_starts_after_the_deadline(start_mock_with: StartMock, make_proxy: Make) -> None:
    mock = start_mock_with({KSTALL: KeyBehaviour(fault="stall")})
    slow = {"connect": 1, "headers": 0.3, "idle": 0.3, "total": 5}
    proxy = make_proxy(config("memory", [provider(mock.port, [KSTALL, KGOOD], timeouts=slow)], {"deadline": 0.2}))
    reply = chat(proxy.port)  # the first attempt times out after the deadline passed
    assert (reply.status, reply.attempts) == (504, "1")
    assert reply.json()["error"]["code"]
    assert (hits(mock, KSTALL), hits(mock, KGOOD)) == (1, 0)
    assert chat(proxy.port).status == 200  # the next request starts afresh, on the next key


def test_a_json_body_cut_short_counts_against_the_key(start_mock_with: StartMock, make_proxy: Make) -> None:
    mock = start_mock_with({KDROP: KeyBehaviour(fault="drop")})
    proxy = make_proxy(config("memory", [provider(mock.port, [KDROP, KGOOD])], {"failure_threshold": 2}))
    # The reply is held to its end (limits.json_hold_bytes), so a body cut short is
    # a failed attempt like any other: retried invisibly on the next key.
    replies = [chat(proxy.port) for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4
    assert all(r.json()["object"] == "chat.completion" for r in replies)
    assert "2" in {r.attempts for r in replies}
    wait_for(lambda: key_state(proxy.port, KDROP)["state"] == "ejected", what="two failures to eject the key")
    assert [chat(proxy.port).status for _ in range(3)] == [200] * 3
    assert hits(mock, KDROP) == 2


# -- visibility: hashed key ids only ------------------------------------------------------------


def test_admin_page_metrics_and_logs_name_keys_by_hash_only(
    start_mock_with: StartMock, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mock = start_mock_with({K401: KeyBehaviour(status=401), KRESET: KeyBehaviour(fault="reset")})
    cfg = config(
        "memory",
        [provider(mock.port, [K401, KRESET, KGOOD])],
        {"failure_threshold": 1, "eject_for": 0.1, "health_check": {"interval": 0.1, "timeout": 0.5}},
    )
    cfg["server"] = {"access_log": "text"}
    proxy = make_proxy(cfg)
    for _ in range(4):
        assert chat(proxy.port).status == 200
    wait_for(lambda: len(probes(mock, KRESET)) >= 2, what="failing probes of the resetting key")

    page = call(proxy.port, "GET", "/admin/failover")
    doc = page.json()
    assert doc["store_available"] is True and doc["health_checks"] is True
    rows = {row["key_id"]: row for row in doc["keys"]}
    assert set(rows) == {key_id(K401), key_id(KRESET), key_id(KGOOD)}
    assert (rows[key_id(K401)]["state"], rows[key_id(K401)]["reason"]) == ("ejected", "auth")
    assert (rows[key_id(KRESET)]["state"], rows[key_id(KRESET)]["reason"]) == ("ejected", "failures")
    assert rows[key_id(KRESET)]["next_probe"] is not None
    assert rows[key_id(KGOOD)]["state"] == "healthy"

    scrape = call(proxy.port, "GET", "/metrics")
    assert metric(proxy.port, "llmproxy_upstream_key_state", key_id=key_id(K401), state="ejected") == 1
    assert metric(proxy.port, "llmproxy_upstream_key_state", key_id=key_id(KGOOD), state="healthy") == 1
    probes_sent = metric(proxy.port, "llmproxy_failover_probes_sent_total")
    assert probes_sent is not None and probes_sent >= 2

    log_text = "\n".join(record.getMessage() for record in caplog.records)
    assert key_id(KRESET) in log_text  # the failed health checks are logged, by hashed id
    for secret in (K401, KRESET, KGOOD):
        assert secret.encode() not in page.body
        assert secret.encode() not in scrape.body
        assert secret not in log_text


# -- configuration errors -------------------------------------------------------------------------


def _routing_section() -> dict[str, Any]:
    return {"name": "routing", "config": {"providers": [provider(9, [KGOOD])]}}


def _check(raw: dict[str, Any]) -> str:
    """The ConfigError message ``llmproxy check`` would print for ``raw``."""
    with pytest.raises(ConfigError) as info:
        asyncio.run(check_config(parse_config(raw, "fo.yaml")))
    return str(info.value)


@pytest.mark.parametrize(
    ("failover", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold: must be at least 1"),
        ({"success_threshold": -1}, "success_threshold: must be at least 1"),
        ({"max_attempts": 0}, "max_attempts: must be at least 1"),
        ({"cooldown": 0}, "cooldown: must be greater than 0"),
        ({"eject_for": -5}, "eject_for: must be greater than 0"),
        ({"deadline": 0}, "deadline: must be greater than 0"),
        ({"backoff": {"base": 0}}, "backoff.base: must be greater than 0"),
        ({"backoff": {"max": -1}}, "backoff.max: must be greater than 0"),
        ({"health_check": {"interval": 0}}, "health_check.interval: must be greater than 0"),
        ({"health_check": {"interval": -0.2}}, "health_check.interval: must be greater than 0"),
        ({"health_check": {"timeout": 0}}, "health_check.timeout: must be greater than 0"),
        ({"health_check": {"model": "gpt-nobody"}}, "health_check.model: no provider serves model 'gpt-nobody'"),
        ({"failure_treshold": 3}, "failure_treshold: unknown key"),
        ({"failure_threshold": "many"}, "failure_threshold: must be an integer"),
    ],
)
def test_bad_failover_config_is_refused_naming_the_field(failover: dict[str, Any], message: str) -> None:
    raw = {"filters": [_routing_section(), {"name": "failover", "config": failover}]}
    error = _check(raw)
    assert error.startswith("fo.yaml: filters[1].config: filter 'failover': ")
    assert message in error


@pytest.mark.parametrize(
    "filters",
    [
        [{"name": "failover", "config": {}}],
        [{"name": "failover", "config": {}}, _routing_section()],
    ],
    ids=["no-routing", "routing-after-failover"],
)
def test_failover_needs_routing_before_it(filters: list[dict[str, Any]]) -> None:
    error = _check({"filters": filters})
    assert error.startswith("fo.yaml: filters[0].config: filter 'failover': ")
    assert "needs the routing filter before it" in error


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_cli_check_names_the_bad_field_and_an_unreachable_redis_store(tmp_path: Path) -> None:
    conf = tmp_path / "fo.yaml"
    raw: dict[str, Any] = {
        "filters": [_routing_section(), {"name": "failover", "config": {"health_check": {"interval": 0}}}]
    }
    conf.write_text(yaml.safe_dump(raw))
    out = _cli("check", "-c", str(conf))
    assert out.returncode != 0
    assert f"{conf}: filters[1].config: filter 'failover': health_check.interval: must be greater than 0" in out.stderr

    closed = free_port()
    raw["filters"][1]["config"] = {}
    raw["store"] = f"redis://127.0.0.1:{closed}/0"
    conf.write_text(yaml.safe_dump(raw))
    for command in (["check", "-c", str(conf)], ["serve", "-c", str(conf), "--port", "0"]):
        out = _cli(*command)
        assert out.returncode != 0, out
        assert f"{conf}: store: redis store redis://127.0.0.1:{closed}/0 unavailable" in out.stderr
        assert "Traceback" not in out.stderr

    out = _cli("check", "-c", str(ROOT / "conf" / "failover-demo.yaml"))
    assert out.returncode == 0, out.stderr


# -- the key health state machine, on a fake clock ------------------------------------------
#
# These drive HealthBook and FailoverFactory directly (MemoryStore, no sockets)
# with an injected clock, so cooling, ejection, trials and probe thresholds are
# checked at exact instants instead of by sleeping and polling.

T0 = 1_700_000_000.0
REC = "failover:p:k"


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _fake_book(
    clock: FakeClock, *, trial: bool = True, failure_threshold: int = 3, success_threshold: int = 1
) -> HealthBook:
    return HealthBook(
        MemoryStore(),
        failure_threshold=failure_threshold,
        success_threshold=success_threshold,
        cooldown=30.0,
        eject_for=10.0,
        trial_after_ejection=trial,
        clock=clock,
    )


# (events, then (state, failures, until - T0, reason)); an event is
# ("auth" | "rate" | "server", retry_after), ("ok", None) or ("wait", seconds)
TRANSITIONS: list[tuple[str, list[tuple[str, float | None]], tuple[str, int, float, str]]] = [
    ("auth-ejects-at-once", [("auth", None)], ("ejected", 1, 10.0, "auth")),
    ("rate-cools-for-retry-after", [("rate", 4.0)], ("cooling", 0, 4.0, "rate_limited")),
    ("rate-without-retry-after-cools-for-cooldown", [("rate", None)], ("cooling", 0, 30.0, "rate_limited")),
    ("rate-zero-retry-after", [("rate", 0.0)], ("cooling", 0, 0.0, "rate_limited")),
    ("server-below-threshold-counts", [("server", None)] * 2, ("healthy", 2, 0.0, "")),
    ("server-at-threshold-ejects", [("server", None)] * 3, ("ejected", 3, 10.0, "failures")),
    ("success-resets-the-count", [("server", None), ("server", None), ("ok", None)], ("healthy", 0, 0.0, "")),
    (
        "not-consecutive-not-ejected",
        [("server", None), ("server", None), ("ok", None), ("server", None), ("server", None)],
        ("healthy", 2, 0.0, ""),
    ),
    ("rate-does-not-shorten-an-ejection", [("auth", None), ("rate", 1.0)], ("ejected", 1, 10.0, "auth")),
    (
        "ejected-failure-pushes-eject-for",
        [("auth", None), ("wait", 4.0), ("server", None)],
        ("ejected", 2, 14.0, "failures"),
    ),
    ("cooling-then-ejected-by-auth", [("rate", 4.0), ("auth", None)], ("ejected", 1, 10.0, "auth")),
    ("time-is-taken-at-the-failure", [("wait", 7.0), ("rate", 2.0)], ("cooling", 0, 9.0, "rate_limited")),
    ("trial-success-restores", [("auth", None), ("wait", 10.0), ("ok", None)], ("healthy", 0, 0.0, "")),
]


async def _drive(book: HealthBook, clock: FakeClock, events: list[tuple[str, float | None]]) -> None:
    for kind, value in events:
        if kind == "wait":
            assert value is not None
            clock.advance(value)
        elif kind == "ok":
            await book.success(REC)
        else:
            await book.failure(REC, kind, value)


@pytest.mark.parametrize(("events", "expected"), [row[1:] for row in TRANSITIONS], ids=[row[0] for row in TRANSITIONS])
def test_health_transitions_on_a_fake_clock(
    events: list[tuple[str, float | None]], expected: tuple[str, int, float, str]
) -> None:
    clock = FakeClock()
    book = _fake_book(clock)
    asyncio.run(_drive(book, clock, events))
    health = book.health(REC)
    assert (health.state, health.failures, health.until - T0 if health.until else 0.0, health.reason) == expected
    # the view and the shared record agree
    raw, _ = asyncio.run(_read(book, REC))
    assert KeyHealth.from_bytes(raw) == health or (raw is None and health == KeyHealth())


async def _read(book: HealthBook, key: str) -> tuple[bytes | None, Any]:
    return await book.store.get(key)


@pytest.mark.parametrize(
    ("events", "trial", "usable_at"),
    [
        ([("rate", 4.0)], True, [(3.999, False), (4.0, True), (100.0, True)]),
        ([("rate", 4.0)], False, [(3.999, False), (4.0, True)]),  # cooling ends by itself, health checks or not
        ([("auth", None)], True, [(9.999, False), (10.0, True)]),  # the trial after eject_for
        ([("auth", None)], False, [(10.0, False), (1e6, False)]),  # with health checks: only probes restore it
        ([("server", None)] * 2, True, [(0.0, True)]),
    ],
    ids=["cooling", "cooling-with-health-checks", "ejected-trial", "ejected-waits-for-probes", "below-threshold"],
)
def test_usable_follows_the_clock(
    events: list[tuple[str, float | None]], trial: bool, usable_at: list[tuple[float, bool]]
) -> None:
    clock = FakeClock()
    book = _fake_book(clock, trial=trial)
    asyncio.run(_drive(book, clock, events))
    start = clock.now
    seen = []
    for offset, _ in usable_at:
        clock.now = start + offset
        seen.append((offset, book.usable(REC)))
        assert book.usable(REC, now=start) is book.health(REC).usable(start, trial)  # an explicit now wins
    assert seen == usable_at


def test_a_failed_trial_ejects_again_for_eject_for_from_then() -> None:
    clock = FakeClock()
    book = _fake_book(clock)
    asyncio.run(book.failure(REC, "auth"))
    clock.advance(10.0)
    assert book.usable(REC)
    asyncio.run(book.failure(REC, "server"))
    assert not book.usable(REC)
    assert book.health(REC).until == clock.now + 10.0


@pytest.mark.parametrize(
    ("success_threshold", "probes", "expected"),
    [
        (1, [True], ("healthy", 0)),
        (2, [True], ("ejected", 1)),
        (2, [True, True], ("healthy", 0)),
        (2, [True, False], ("ejected", 0)),  # a failed probe starts the count again
        (2, [True, False, True], ("ejected", 1)),
        (2, [True, False, True, True], ("healthy", 0)),
        (3, [False, False], ("ejected", 0)),
    ],
)
def test_probe_results_restore_after_success_threshold_consecutive_successes(
    success_threshold: int, probes: list[bool], expected: tuple[str, int]
) -> None:
    clock = FakeClock()
    book = _fake_book(clock, trial=False, success_threshold=success_threshold)

    async def run() -> None:
        await book.failure(REC, "auth")
        for ok in probes:
            clock.advance(5.0)
            await book.probe_result(REC, ok, interval=2.0)

    asyncio.run(run())
    health = book.health(REC)
    assert (health.state, health.probe_successes) == expected
    if health.state == "ejected":
        assert health.until == clock.now + 2.0  # next probe one interval after this one


def test_a_probe_result_for_a_key_not_ejected_changes_nothing() -> None:
    clock = FakeClock()
    book = _fake_book(clock)
    asyncio.run(book.failure(REC, "rate", 3.0))
    before = book.health(REC)
    asyncio.run(book.probe_result(REC, True, interval=2.0))
    assert book.health(REC) == before


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        ("0.25", 0.25),
        ("-3", 0.0),
        ("soon", None),
        (formatdate(T0 + 120, usegmt=True), 120.0),  # an HTTP date, relative to the injected now
        (formatdate(T0 - 60, usegmt=True), 0.0),  # in the past
    ],
    ids=["absent", "empty", "seconds", "fraction", "negative", "garbage", "http-date", "http-date-past"],
)
def test_retry_after_is_parsed_against_the_clock(value: str | None, expected: float | None) -> None:
    assert retry_after({"retry-after": value}.get, T0) == expected


def _fake_factory(clock: FakeClock, keys: int, **failover: Any) -> FailoverFactory:
    context = FactoryContext(MemoryStore())
    routing = RoutingFactory("routing", {"providers": [provider(9, [f"sk-clock-{i}" for i in range(keys)])]}, context)
    context.factories.append(routing)
    return FailoverFactory("failover", {"eject_for": 10, **failover}, context, clock=clock)


def test_choose_and_soonest_recovery_follow_the_clock() -> None:
    clock = FakeClock()
    factory = _fake_factory(clock, 3)
    prov = factory.table.providers["p"]
    records = [factory.record(prov, i) for i in range(3)]
    target = Target(prov, MODEL, 1.0)
    routing = RouteDecision("chat", "openai", [target], lambda _target, _index: None)

    async def fail() -> None:
        await factory.book.failure(records[0], "rate", 4.0)
        await factory.book.failure(records[1], "auth")
        await factory.book.failure(records[2], "rate", 7.0)

    asyncio.run(fail())
    assert factory.choose(routing, set()) is None
    assert factory.soonest_recovery([target]) == 4.0
    clock.advance(3.0)
    assert factory.soonest_recovery([target]) == 1.0
    clock.advance(1.0)
    choice = factory.choose(routing, set())
    assert choice is not None and choice[1] == 0
    assert factory.choose(routing, {("p", 0)}) is None  # the others still wait
    clock.advance(3.0)
    assert factory.choose(routing, {("p", 0)}) == (target, 2)
    clock.advance(3.0)  # eject_for passed: a trial (no health checks)
    assert factory.choose(routing, {("p", 0), ("p", 2)}) == (target, 1)
    states = {row["key_id"]: row["state"] for row in factory.key_states()}
    assert states == {prov.key_ids[0]: "healthy", prov.key_ids[1]: "trial", prov.key_ids[2]: "healthy"}


def test_probe_tick_probes_only_keys_whose_time_has_come() -> None:
    clock = FakeClock()
    factory = _fake_factory(clock, 3, health_check={"interval": 2, "model": MODEL})
    prov = factory.table.providers["p"]
    records = [factory.record(prov, i) for i in range(3)]
    probed: list[int] = []

    async def fake_probe(p: Provider, key_index: int, model: str) -> None:
        probed.append(key_index)
        await factory.book.probe_result(factory.record(p, key_index), False, factory.interval)

    factory._probe = fake_probe  # type: ignore[method-assign,assignment]

    async def run() -> list[list[int]]:
        await factory.book.failure(records[0], "auth")  # until T0 + 10
        clock.advance(5.0)
        await factory.book.failure(records[1], "auth")  # until T0 + 15
        await factory.book.failure(records[2], "rate", 1.0)  # cooling: never probed
        rounds = []
        for step in (4.0, 1.0, 1.0, 4.0):
            clock.advance(step)
            probed.clear()
            await factory.probe_tick()
            rounds.append(sorted(probed))
        return rounds

    # T0+9: nothing due; T0+10: key 0 (next at +12); T0+11: nothing; T0+15: both
    assert asyncio.run(run()) == [[], [0], [], [0, 1]]
    assert factory.book.health(records[2]).state == "cooling"
