"""Exchanges cut at the end of the shutdown grace: answered, accounted once, reservations settled.

In-process proxies on real sockets (the shutdown is :meth:`Proxy.shutdown`,
what SIGTERM runs), the mock provider and a real ``redis-server``.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmproxy import Attempt, Exchange, Filter, FilterFactory
from llmproxy.mock import MockServer
from tests.redis_server import REDIS_SERVER, SKIP_REASON, start_redis_server, stop_redis_server
from tests.support import LoopThread, RunningProxy, start_proxy

Make = Callable[[dict[str, Any]], RunningProxy]

#: (hook, request id, error code) of every end hook of :class:`Counting`, across exchanges.
ENDS: list[tuple[str, str, str]] = []


class CountingFilter(Filter):
    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> None:
        ENDS.append(("attempt", exchange.id, attempt.outcome.value))

    async def on_exchange_complete(self, exchange: Exchange) -> None:
        ENDS.append(("exchange", exchange.id, exchange.error.code or "" if exchange.error else ""))


class Counting(FilterFactory):
    filter_class = CountingFilter


def routing(mock: MockServer) -> dict[str, Any]:
    return {
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
    }


def open_request(port: int, stream: bool, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"model": "gpt-x", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json", **headers})
    return conn.getresponse()


def test_cut_exchanges_answer_and_run_every_end_hook_once(mock: MockServer, make_proxy: Make) -> None:
    ENDS.clear()
    proxy = make_proxy(
        {
            "server": {"access_log": "off"},
            "filters": [routing(mock), {"name": "tests.runtime.test_shutdown_cut:Counting"}],
        }
    )
    streams = [open_request(proxy.port, True, {"x-mock-tokens": "500", "x-mock-itl-ms": "20"}) for _ in range(5)]
    for resp in streams:
        assert resp.status == 200 and resp.readline()  # a first event is out
    # one whose head never comes in the grace: answered with a 503 envelope
    waiting: list[tuple[int, dict[str, Any]]] = []

    def before_head() -> None:
        resp = open_request(proxy.port, False, {"x-mock-ttft-ms": "10000"})
        waiting.append((resp.status, json.loads(resp.read())))

    thread = threading.Thread(target=before_head)
    thread.start()
    for _ in range(200):
        if len(proxy.proxy.runtime.tasks) == 6:
            break
        proxy.thread.call(_sleep(0.01))
    assert len(proxy.proxy.runtime.tasks) == 6

    proxy.stop(0.2)
    for resp in streams:
        rest = resp.read()
        events = [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
        last = json.loads(events[-1][6:])
        assert last["error"]["code"] == "server_shutdown", events[-1]
        assert b"[DONE]" not in rest
    thread.join(10)
    assert waiting and waiting[0][0] == 503
    assert waiting[0][1]["error"]["code"] == "server_shutdown"

    per_exchange = Counter((hook, rid) for hook, rid, _ in ENDS)
    assert len({rid for _, rid, _ in ENDS}) == 6
    assert all(count == 1 for count in per_exchange.values()), per_exchange  # exactly once each
    assert sorted(code for hook, _, code in ENDS if hook == "exchange") == ["server_shutdown"] * 6
    assert {outcome for hook, _, outcome in ENDS if hook == "attempt"} == {"abandoned"}


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@pytest.fixture
def redis_url() -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    proc, url = start_redis_server()
    yield url
    stop_redis_server(proc)


def test_cut_streams_release_their_ratelimit_slots(mock: MockServer, loop_thread: LoopThread, redis_url: str) -> None:
    config = {
        "server": {"access_log": "off"},
        "store": redis_url,
        "filters": [
            {"name": "metering", "config": {}},
            routing(mock),
            {"name": "ratelimit", "config": {"rules": [{"name": "slots", "key": [], "concurrent": 3}]}},
        ],
    }
    first = start_proxy(loop_thread, config)
    streams = [open_request(first.port, True, {"x-mock-tokens": "500", "x-mock-itl-ms": "20"}) for _ in range(3)]
    assert [resp.status for resp in streams] == [200, 200, 200]
    for resp in streams:
        assert resp.readline()
    over = open_request(first.port, True, {})
    assert over.status == 429  # the three slots are taken
    over.read()
    first.stop(0.2)  # cut: each stream's reservation must be settled (its slot given back)
    for resp in streams:
        assert b"server_shutdown" in resp.read()

    second = start_proxy(loop_thread, config)  # another instance on the same Redis
    try:
        again = [open_request(second.port, True, {"x-mock-tokens": "3"}) for _ in range(3)]
        assert [resp.status for resp in again] == [200, 200, 200]
        for resp in again:
            assert b"[DONE]" in resp.read()
    finally:
        second.stop(0.5)
