"""The ``ratelimit`` filter on a real ``redis-server``: exact across processes, races, Redis down.

* Exactness: 4 proxy processes on one Redis, 200 concurrent streams against
  a 10,000 tokens/minute limit: the tokens admitted (the usage the streams
  report) never exceed the limit plus one reservation, and the limit was
  used up (no request refused while budget remained: each refusal says
  fewer tokens remained than it needed).
* Budget race: 100 concurrent first requests for a fresh principal whose
  budget covers 10: at most 10 succeed, and the spend stays in the budget.
* Redis down: limits fail open, budgets fail closed (503), never a hang.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.filters.metering.tokenizer import count_prompt
from llmproxy.mock import MockServer

from ..redis_server import REDIS_SERVER, SKIP_REASON
from .test_failover import metric
from .test_failover_redis import ProxyProcess, RedisServer, redis_server
from .test_ratelimit import HI, MODEL, Make, oai, recorded_exchanges, rl_config

__all__ = ["redis_server"]

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

LIMIT = 10_000
MAX_TOKENS = 100


def _stream(port: int, headers: dict[str, str]) -> tuple[int, dict[str, str], int]:
    """One streaming chat request: (status, headers, total tokens the stream reported)."""
    body = {
        "model": MODEL,
        "messages": HI,
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json", **headers})
        resp = conn.getresponse()
        data = resp.read()
        fields = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    total = 0
    if resp.status == 200:
        for line in data.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    total = usage["total_tokens"]
        assert total > 0, data[-300:]
    return resp.status, fields, total


def test_four_processes_admit_at_most_the_limit_plus_one_reservation(
    redis_server: RedisServer, mock: MockServer, tmp_path: Path
) -> None:
    raw = rl_config(mock.port, {"rules": [{"name": "global", "key": [], "tpm": LIMIT}]}, store=redis_server.url)
    raw["filters"] = [f for f in raw["filters"] if not f["name"].startswith("tests.")]
    conf = tmp_path / "exact.yaml"
    conf.write_text(yaml.safe_dump(raw))
    procs = [ProxyProcess(conf, f"i{n}", tmp_path) for n in range(4)]
    try:
        for proc in procs:
            proc.wait_healthy()
        headers = {"x-mock-tokens": str(MAX_TOKENS), "x-mock-itl-ms": "3"}
        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(lambda i: _stream(procs[i % 4].port, headers), range(200)))
    finally:
        for proc in procs:
            proc.stop()
    ok = [total for status, _, total in results if status == 200]
    refused = [fields for status, fields, _ in results if status == 429]
    assert len(ok) + len(refused) == 200, {status for status, _, _ in results}
    # one request's reservation: the prompt as the filter counts it (the body sent upstream) + max_tokens
    sent = {"model": "mock-gpt", "messages": HI, "stream": True, "max_tokens": MAX_TOKENS}
    reservation = count_prompt(sent, "openai", "mock-gpt").tokens + MAX_TOKENS
    admitted = sum(ok)
    assert refused, "the limit was never reached"
    assert admitted <= LIMIT + reservation, (admitted, len(ok))
    # no request refused while budget remained: reservations only shrink when they settle, so at
    # least LIMIT // reservation fit, and each refusal saw less room than it needed
    assert len(ok) >= LIMIT // reservation, (admitted, len(ok), reservation)
    for fields in refused:
        assert int(fields["x-ratelimit-remaining-tokens"]) < reservation
        assert int(fields["retry-after"]) >= 1


def test_a_budget_race_admits_at_most_what_it_covers(
    redis_server: RedisServer, mock: MockServer, make_proxy: Make
) -> None:
    # calibrate: what one request spends (the mock's counts), on an unlimited principal
    budgets = {"tokens": 1, "period": "total"}
    principals: dict[str, Any] = {"calib": {}, "fresh": {"budgets": budgets}}
    probe = make_proxy(rl_config(mock.port, {}, principals, store=redis_server.url))
    reply = oai(probe, "calib").chat.completions.create(
        model=MODEL, messages=HI, max_tokens=20, extra_headers={"x-mock-tokens": "20"}
    )
    assert reply.usage is not None
    per_request = reply.usage.total_tokens
    principals["fresh"]["budgets"] = {"tokens": 10 * per_request, "period": "total"}
    proxy = make_proxy(rl_config(mock.port, {}, principals, store=redis_server.url))
    recorded_exchanges(0)

    def one(_: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        body = {"model": MODEL, "messages": HI, "max_tokens": 20}
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"content-type": "application/json", "x-test-principal": "fresh", "x-mock-tokens": "20"},
        )
        status = conn.getresponse().status
        conn.close()
        return status

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(one, range(100)))
    assert set(statuses) <= {200, 429}
    assert 1 <= statuses.count(200) <= 10
    time.sleep(0.2)
    spent = sum(u.total_tokens for u in recorded_exchanges(100) if u is not None)
    assert spent <= 10 * per_request


def test_redis_down_limits_fail_open_budgets_fail_closed(
    redis_server: RedisServer, mock: MockServer, make_proxy: Make
) -> None:
    principals = {"alice": {"limits": {"rpm": 100}}, "bob": {"budgets": {"tokens": 10_000}}}
    proxy = make_proxy(rl_config(mock.port, {}, principals, store=redis_server.url + "?probe_interval=0.2"))
    assert oai(proxy, "alice").chat.completions.create(model=MODEL, messages=HI).choices
    assert oai(proxy, "bob").chat.completions.create(model=MODEL, messages=HI, max_tokens=10).choices
    redis_server.kill()
    started = time.monotonic()
    assert oai(proxy, "alice").chat.completions.create(model=MODEL, messages=HI).choices  # open
    import openai

    with pytest.raises(openai.InternalServerError) as info:
        oai(proxy, "bob").chat.completions.create(model=MODEL, messages=HI, max_tokens=10)
    assert info.value.status_code == 503 and info.value.code == "ratelimit_store_unavailable"
    assert time.monotonic() - started < 3  # never a hang
    errors = metric(proxy.port, "llmproxy_ratelimit_store_errors_total", operation="reserve")
    assert errors is not None and errors >= 2
