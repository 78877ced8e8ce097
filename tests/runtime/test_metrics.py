"""``/metrics`` and the logs after known sequences of requests: real proxy, mock provider, SDKs.

Scrapes are parsed with prometheus_client's own parser; counts are exact,
histograms checked for shape (cumulative buckets, ``+Inf`` = count,
plausible sums). The several-worker case runs a real ``llmproxy serve
--workers 2`` and checks that one scrape shows the sum over both workers.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.mock import KeyBehaviour, MockConfig, MockServer, start_mock
from llmproxy.runtime.metrics import PUBLISH_INTERVAL
from tests.redis_server import free_port
from tests.support import LoopThread, RunningProxy, wait_healthy

Make = Callable[[dict[str, Any]], RunningProxy]
Samples = dict[str, list[tuple[dict[str, str], float]]]

HI = [{"role": "user", "content": "hi"}]
PROVIDER_KEY = "sk-metrics-provider-secret-1"
BAD_KEY = "sk-metrics-failing-secret-2"
CLIENT_KEY = "sk-metrics-client-secret-3"
WRONG_KEY = "sk-metrics-wrong-secret-4"
CHAT = "/v1/chat/completions"


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """``(sample name -> [(labels, value)], family name -> type)`` from ``GET /metrics``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
    finally:
        conn.close()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == want for k, want in labels.items()))


def check_histogram(samples: Samples, name: str, count: int, **labels: str) -> float:
    """Assert ``name`` observed ``count`` times with cumulative buckets; return its sum."""
    buckets = sorted(
        (float(found["le"]), v)
        for found, v in samples.get(name + "_bucket", [])
        if all(found.get(k) == want for k, want in labels.items())
    )
    assert buckets, f"no buckets for {name} {labels}"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name} buckets are not cumulative: {buckets}"
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == count
    assert value(samples, name + "_count", **labels) == count
    return value(samples, name + "_sum", **labels)


def routed(mock_port: int, **server: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": "off", **server},
        "filters": [
            {"name": "metering", "config": {"prices": {"mock-gpt": {"input": 1.0, "output": 2.0}}}},
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "p",
                            "type": "openai",
                            "base_url": f"http://127.0.0.1:{mock_port}/v1",
                            "keys": [PROVIDER_KEY],
                            "models": {"gpt-x": "mock-gpt"},
                        }
                    ]
                },
            },
        ],
    }


def wait_idle(proxy: RunningProxy) -> None:
    """Until the last exchange's end hooks ran (they run on the proxy's loop after the reply)."""
    deadline = time.monotonic() + 5
    while proxy.runtime.tasks and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_known_sequence_gives_exact_counts_and_plausible_histograms(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(routed(mock.port))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    outputs = 0
    for _ in range(3):
        reply = client.chat.completions.create(model="gpt-x", messages=HI)  # type: ignore[arg-type]
        assert reply.usage is not None
        outputs += reply.usage.completion_tokens
    for _ in range(2):
        chunks = list(client.chat.completions.create(model="gpt-x", messages=HI, stream=True))  # type: ignore[arg-type]
        assert chunks
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model-4711", messages=HI)  # type: ignore[arg-type]
    wait_idle(proxy)
    samples, types = scrape(proxy.port)

    ok = {"route": CHAT, "provider": "p", "model": "gpt-x", "principal": "-"}
    assert value(samples, "llmproxy_requests_total", status="200", **ok) == 5
    assert value(samples, "llmproxy_requests_total", route=CHAT, status="404", model="other") == 1
    assert value(samples, "llmproxy_requests_total") == 6
    assert value(samples, "llmproxy_errors_total") == 1
    assert value(samples, "llmproxy_upstream_attempts_total", provider="p", outcome="completed") == 5
    assert value(samples, "llmproxy_upstream_attempts_total") == 5
    assert value(samples, "llmproxy_retries_total") == 0 and value(samples, "llmproxy_fallbacks_total") == 0
    assert value(samples, "llmproxy_in_flight") == 0 and value(samples, "llmproxy_streams_in_flight") == 0
    assert value(samples, "llmproxy_received_bytes_total") > 0 and value(samples, "llmproxy_sent_bytes_total") > 0

    upstream = {"provider": "p", "model": "mock-gpt"}
    total = check_histogram(samples, "llmproxy_request_duration_seconds", 5, route=CHAT, **upstream)
    assert 0 < total < 30
    ttft = check_histogram(samples, "llmproxy_time_to_first_token_seconds", 2, **upstream)
    assert 0 < ttft < total
    check_histogram(samples, "llmproxy_time_per_output_token_seconds", 2, **upstream)
    check_histogram(samples, "llmproxy_token_usage_tokens", 5, type="input", **upstream)
    out_sum = check_histogram(samples, "llmproxy_token_usage_tokens", 5, type="output", **upstream)
    assert out_sum == value(samples, "llmproxy_tokens_total", kind="output") and out_sum > outputs
    overhead = check_histogram(samples, "llmproxy_overhead_seconds", 6, route=CHAT)
    assert 0 < overhead < value(samples, "llmproxy_request_duration_seconds_sum") + 1
    assert value(samples, "llmproxy_spent_tokens_total", principal="-", model="gpt-x", type="output") == out_sum
    assert value(samples, "llmproxy_spent_usd_total", model="gpt-x") > 0

    assert types["llmproxy_requests"] == "counter" and types["llmproxy_in_flight"] == "gauge"
    assert types["llmproxy_request_duration_seconds"] == "histogram"


def test_model_names_a_client_makes_up_do_not_grow_label_sets(mock: MockServer, make_proxy: Make) -> None:
    """Without routing every name is the client's: all are counted as ``other``."""
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "server": {"access_log": "off"}})
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    for i in range(8):
        client.chat.completions.create(model=f"made-up-{i}", messages=HI)  # type: ignore[arg-type]
    wait_idle(proxy)
    samples, _ = scrape(proxy.port)
    models = {found["model"] for name, rows in samples.items() for found, _ in rows if "model" in found}
    assert models == {"other"}
    assert value(samples, "llmproxy_requests_total", model="other", status="200") == 8
    assert len(samples["llmproxy_requests_total"]) == 1


def test_the_overhead_header_is_opt_in(mock: MockServer, make_proxy: Make) -> None:
    for enabled in (False, True):
        proxy = make_proxy(routed(mock.port, overhead_header=enabled))
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(model="gpt-x", messages=HI, stream=stream)  # type: ignore[call-overload]
            header = raw.headers.get("x-llmproxy-overhead-ms")
            raw.parse()
            if not enabled:
                assert header is None
            else:
                assert header is not None and 0 <= float(header) < 1000


# -- retries, fallbacks and the debug log --------------------------------------------------


def test_a_fallback_is_counted_and_every_decision_logged_without_a_secret(
    loop_thread: LoopThread, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    mock = loop_thread.call(
        start_mock(
            "127.0.0.1", 0, MockConfig(tokens=5, keys={BAD_KEY: KeyBehaviour(status=500), PROVIDER_KEY: KeyBehaviour()})
        )
    )
    try:
        base = f"http://127.0.0.1:{mock.port}/v1"
        proxy = make_proxy(
            {
                "server": {"access_log": "text"},
                "filters": [
                    {"name": "auth", "config": {"keys": [{"name": "alice", "key": CLIENT_KEY, "team": "t1"}]}},
                    {"name": "metering"},
                    {
                        "name": "routing",
                        "config": {
                            "providers": [
                                {"name": "a", "type": "openai", "base_url": base, "keys": [BAD_KEY], "models": ["m"]},
                                {
                                    "name": "b",
                                    "type": "openai",
                                    "base_url": base,
                                    "keys": [PROVIDER_KEY],
                                    "models": ["m"],
                                    "priority": 1,
                                },
                            ]
                        },
                    },
                    {"name": "failover", "config": {"failure_threshold": 1, "max_attempts": 3}},
                ],
            }
        )
        with caplog.at_level(logging.DEBUG, logger="llmproxy"):
            good = openai.OpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)
            reply = good.chat.completions.with_raw_response.create(model="m", messages=HI)  # type: ignore[arg-type]
            assert reply.headers["x-llmproxy-attempts"] == "2"
            wrong = openai.OpenAI(base_url=proxy.url + "/v1", api_key=WRONG_KEY, max_retries=0, timeout=10)
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
            wait_idle(proxy)
        samples, _ = scrape(proxy.port)
    finally:
        loop_thread.call(mock.close())

    assert value(samples, "llmproxy_upstream_attempts_total", provider="a", outcome="retried") == 1
    assert value(samples, "llmproxy_upstream_attempts_total", provider="b", outcome="completed") == 1
    assert value(samples, "llmproxy_retries_total", provider="b", reason="500") == 1
    assert value(samples, "llmproxy_fallbacks_total", provider="b") == 1
    assert value(samples, "llmproxy_requests_total", status="200", provider="b", model="m", principal="alice") == 1
    assert value(samples, "llmproxy_requests_total", status="401", principal="-") == 1
    assert value(samples, "llmproxy_spent_tokens_total", principal="alice", team="t1", model="m", type="output") > 0

    lines = [(r.levelno, r.name, r.getMessage()) for r in caplog.records]
    debug = [text for level, _, text in lines if level == logging.DEBUG]
    assert any("auth accepted alice" in t for t in debug)
    assert any("routing chose a model m" in t for t in debug)
    assert any("failover retries attempt 1 on a" in t and "server (status 500)" in t and "next: b" in t for t in debug)
    assert any("auth refused (unknown key)" in t for t in debug)
    assert any(
        level == logging.WARNING and name == "llmproxy.failover" and "ejected (reason failures" in text
        for level, name, text in lines
    )
    for _, _, text in lines:
        for secret in (PROVIDER_KEY, BAD_KEY, CLIENT_KEY, WRONG_KEY):
            assert secret not in text


def test_a_limit_hit_is_counted_and_logged(
    mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    config = routed(mock.port)
    config["filters"].insert(
        0, {"name": "auth", "config": {"keys": [{"name": "bob", "key": CLIENT_KEY, "limits": {"rpm": 1}}]}}
    )
    config["filters"].append({"name": "ratelimit"})
    proxy = make_proxy(config)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)
    with caplog.at_level(logging.DEBUG, logger="llmproxy"):
        client.chat.completions.create(model="gpt-x", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-x", messages=HI)  # type: ignore[arg-type]
        wait_idle(proxy)
    samples, _ = scrape(proxy.port)
    assert value(samples, "llmproxy_rate_limited_total", principal="bob") == 1
    assert value(samples, "llmproxy_requests_total", status="429", principal="bob") == 1
    refusals = [r.getMessage() for r in caplog.records if "ratelimit limit" in r.getMessage()]
    assert len(refusals) == 1 and "refuses" in refusals[0]
    assert all(CLIENT_KEY not in r.getMessage() and PROVIDER_KEY not in r.getMessage() for r in caplog.records)


def test_failover_counters_are_counters(mock: MockServer, make_proxy: Make) -> None:
    config = routed(mock.port)
    config["filters"].append({"name": "failover"})
    proxy = make_proxy(config)
    _, types = scrape(proxy.port)
    assert types["llmproxy_failover_probes_sent"] == "counter"
    assert types["llmproxy_failover_store_errors"] == "counter"
    assert types["llmproxy_upstream_key_state"] == "gauge"


# -- several workers: a real `llmproxy serve` ----------------------------------------------


def _serve(tmp_path: Path, workers: int, access_log: str, log_level: str = "info") -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": access_log},
        "mock_upstreams": [{"name": "demo", "tokens": 6}],
        "filters": [
            {"name": "metering"},
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "mock",
                            "type": "openai",
                            "base_url": "mock://demo/v1",
                            "keys": [PROVIDER_KEY],
                            "models": {"demo": "mock-demo"},
                        }
                    ]
                },
            },
        ],
    }
    path = tmp_path / "conf.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmproxy",
            "serve",
            "-c",
            str(path),
            "--workers",
            str(workers),
            "--log-level",
            log_level,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_healthy(port, proc, lambda: proc.communicate(timeout=5)[1])
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    return err


def test_two_workers_add_up_in_one_scrape_and_log_json_lines(tmp_path: Path) -> None:
    proc, port = _serve(tmp_path, 2, "json")
    try:
        requests = 24
        for i in range(requests):  # a new connection each: the kernel spreads them over the workers
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0, timeout=10
            )
            if i % 3:
                client.chat.completions.create(model="demo", messages=HI)  # type: ignore[arg-type]
            else:
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model=f"random-{i}", messages=HI)  # type: ignore[arg-type]
            client.close()
        time.sleep(PUBLISH_INTERVAL + 0.5)  # each worker publishes its counts within PUBLISH_INTERVAL
        unknown = requests // 3 + (1 if requests % 3 else 0)
        for _ in range(4):  # whichever worker answers, the scrape is the sum
            samples, _ = scrape(port)
            assert value(samples, "llmproxy_requests_total") == requests
            assert value(samples, "llmproxy_requests_total", status="404", model="other") == unknown
            assert value(samples, "llmproxy_upstream_attempts_total", provider="mock") == requests - unknown
            check_histogram(
                samples,
                "llmproxy_request_duration_seconds",
                requests - unknown,
                route=CHAT,
                provider="mock",
                model="mock-demo",
            )
            assert value(samples, "llmproxy_in_flight") == 0
            # a filter's prometheus_client counter (metering's), summed by multiprocess mode
            output = value(samples, "llmproxy_token_usage_tokens_sum", type="output")
            assert output > 0 and value(samples, "llmproxy_tokens_total", kind="output") == output
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("HEAD", "/metrics")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        conn.close()
    finally:
        err = _stop(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [r for r in records if r["logger"] == "llmproxy.access"]
    assert len(access) == requests  # admin scrapes and /healthz are no exchanges
    workers = {r["worker"] for r in access}
    assert workers == {"0", "1"}, f"one worker served everything: {workers}"
    for record in records:
        assert record["ts"].endswith("Z") and record["level"] and "worker" in record
    assert PROVIDER_KEY not in err


def test_text_logs_name_the_worker_and_debug_says_what_routing_decided(tmp_path: Path) -> None:
    proc, port = _serve(tmp_path, 1, "text", log_level="debug")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0, timeout=10)
        client.chat.completions.create(model="demo", messages=HI)  # type: ignore[arg-type]
        client.close()
        time.sleep(0.2)
    finally:
        err = _stop(proc)
    ours = [line for line in err.splitlines() if " llmproxy" in line]
    assert ours and all(" w0 " in line or " wmain " in line for line in ours), ours
    decisions = [line for line in ours if " DEBUG " in line and "routing chose mock model mock-demo" in line]
    assert len(decisions) == 1
    access = [line for line in ours if "llmproxy.access" in line]
    assert len(access) == 1 and '"POST /v1/chat/completions" 200' in access[0]
    assert PROVIDER_KEY not in err
