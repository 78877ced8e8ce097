"""The ``tracing`` filter end to end: the proxy, a scripted provider, an OTLP/HTTP receiver, real sockets.

A retried stream gives one SERVER span and two CLIENT spans (siblings) in the
client's trace, each attempt's upstream request carrying its CLIENT span's
id; the GenAI attributes carry the provider's token counts. A malformed
``traceparent`` is replaced and counted; a collector that refuses or
stalls costs the requests nothing (drops counted); content is recorded
only when asked, redacted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.filters.otlp_receiver import Receiver, SpanView
from tests.filters.scripted_provider import Reply, Scripted
from tests.filters.test_routing_usage import _sse_reply
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
KEY = "sk-tracing-provider-key-0123456789"
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3},
    "completion_tokens_details": {"reasoning_tokens": 2},
}


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    out: dict[str, Any] = {
        "id": "chatcmpl-trace-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "up-model-2024",
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def openai_stream(text: str = "Hello there") -> Reply:
    words = text.split(" ")
    events: list[tuple[str | None, dict[str, Any] | str]] = [(None, _chunk({"role": "assistant", "content": ""}))]
    events += [(None, _chunk({"content": (" " if i else "") + w})) for i, w in enumerate(words)]
    events += [(None, _chunk({}, "stop")), (None, _chunk({}, usage=USAGE)), (None, "[DONE]")]
    return _sse_reply(events)


def error_reply(status: int) -> Reply:
    return Reply(status, b'{"error":{"message":"boom","type":"server_error","code":null,"param":null}}')


def config(base: str, tracing: dict[str, Any], *, failover: bool = True) -> dict[str, Any]:
    filters: list[dict[str, Any]] = [
        {"name": "metering"},
        {
            "name": "routing",
            "config": {
                "providers": [
                    {
                        "name": "p",
                        "type": "openai",
                        "base_url": base,
                        "keys": [KEY, KEY + "-b"],
                        "models": {"gpt-x": "up-model"},
                    }
                ]
            },
        },
    ]
    if failover:
        filters.append(
            {
                "name": "failover",
                "config": {
                    "failure_threshold": 10,
                    "max_attempts": 3,
                    "backoff": {"base": 0.01, "max": 0.02},
                    "health_check": {"enabled": False},
                },
            }
        )
    filters.append({"name": "tracing", "config": {"schedule_delay": 0.05, "timeout": 1, **tracing}})
    return {"server": {"access_log": "off"}, "filters": filters}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def client(proxy: RunningProxy, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-client", max_retries=0, default_headers=headers)


def metric(proxy: RunningProxy, name: str, **labels: str) -> float:
    text = proxy.runtime.admin.registry
    from prometheus_client import generate_latest

    for family in text_string_to_metric_families(generate_latest(text).decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def by_kind(spans: list[SpanView], kind: str) -> list[SpanView]:
    return sorted((s for s in spans if s.kind == kind), key=lambda s: s.start)


def stream_text(proxy: RunningProxy, **headers: str) -> str:
    stream = client(proxy, **headers).chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=50, temperature=0.2
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def parent_of(traceparent: str) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, flags


@pytest.mark.parametrize("first", [500, 429])
def test_a_retried_stream_is_one_server_span_and_two_sibling_client_spans(
    scripted: Scripted, receiver: Receiver, make_proxy: Make, first: int
) -> None:
    scripted.replies.extend([error_reply(first), openai_stream()])
    proxy = make_proxy(config(f"{scripted.url}/v1", {"endpoint": receiver.url}))
    assert stream_text(proxy, traceparent=TRACEPARENT, tracestate="vendor=abc") == "Hello there"

    spans = receiver.wait_for(3)
    assert len(spans) == 3, spans
    (server,) = by_kind(spans, "server")
    clients = by_kind(spans, "client")
    assert len(clients) == 2
    # the client's trace; the server span's parent is the client's span; attempts are siblings
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    assert server.parent_id == CLIENT_SPAN
    assert [c.parent_id for c in clients] == [server.span_id, server.span_id]
    assert len({server.span_id, *(c.span_id for c in clients)}) == 3
    # each upstream request carried its own CLIENT span as parent, and the client's tracestate
    sent = [parent_of(r.headers["traceparent"]) for r in scripted.requests]
    assert sent == [(CLIENT_TRACE, clients[0].span_id, "01"), (CLIENT_TRACE, clients[1].span_id, "01")]
    assert [r.headers.get("tracestate") for r in scripted.requests] == ["vendor=abc", "vendor=abc"]

    assert server.name == "chat gpt-x"
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-x"
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.request.temperature"] == pytest.approx(0.2)
    assert a["gen_ai.request.stream"] is True
    # tokens are counted on the CLIENT spans only: a backend summing spans counts them once
    assert not any(k.startswith(("gen_ai.usage.", "gen_ai.response.")) for k in a)
    assert a["http.response.status_code"] == 200
    assert a["llmproxy.attempts"] == 2
    assert "error.type" not in a
    assert [e[0] for e in server.events] == ["gen_ai.first_token"]
    assert server.start <= server.events[0][1] <= server.end
    assert server.resource["service.name"] == "llmproxy"

    failed, ok = clients
    assert failed.name == ok.name == "chat up-model"
    assert failed.attributes["http.response.status_code"] == first
    assert failed.attributes["error.type"] == str(first)
    assert failed.attributes["llmproxy.attempt.outcome"] == "retried"
    assert failed.status == 2  # STATUS_CODE_ERROR
    assert failed.events == []
    assert ok.attributes["http.response.status_code"] == 200
    assert ok.attributes["gen_ai.request.model"] == "up-model"
    b = ok.attributes
    assert b["gen_ai.usage.input_tokens"] == 11
    assert b["gen_ai.usage.output_tokens"] == 7
    assert b["gen_ai.usage.cache_read.input_tokens"] == 3
    assert b["gen_ai.usage.reasoning.output_tokens"] == 2
    assert b["gen_ai.response.model"] == "up-model-2024"
    assert b["gen_ai.response.id"] == "chatcmpl-trace-1"
    assert b["gen_ai.response.finish_reasons"] == ("stop",)
    assert (failed.attributes["gen_ai.usage.input_tokens"], failed.attributes["gen_ai.usage.output_tokens"]) == (0, 0)
    assert ok.attributes["server.address"] == "127.0.0.1"
    assert ok.attributes["server.port"] == scripted.port
    assert ok.attributes["llmproxy.attempt.number"] == 2
    assert [e[0] for e in ok.events] == ["gen_ai.first_token"]
    assert server.start <= failed.start <= failed.end <= ok.start <= ok.end <= server.end
    # content is not recorded unless asked
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output")) for s in spans for k in s.attributes)
    assert receiver.content_types[0] == "application/x-protobuf"


def test_no_traceparent_starts_a_trace_and_sends_it_upstream(
    scripted: Scripted, receiver: Receiver, make_proxy: Make
) -> None:
    scripted.replies.append(openai_stream())
    proxy = make_proxy(config(f"{scripted.url}/v1", {"endpoint": receiver.url}))
    stream_text(proxy)
    spans = receiver.wait_for(2)
    (server,) = by_kind(spans, "server")
    (attempt,) = by_kind(spans, "client")
    assert server.parent_id == ""
    assert parent_of(scripted.requests[0].headers["traceparent"]) == (server.trace_id, attempt.span_id, "01")
    assert "tracestate" not in scripted.requests[0].headers


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  # short
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 is exactly 55
    ],
)
def test_a_malformed_traceparent_is_replaced_and_counted(
    scripted: Scripted, receiver: Receiver, make_proxy: Make, bad: str
) -> None:
    scripted.replies.append(openai_stream())
    proxy = make_proxy(config(f"{scripted.url}/v1", {"endpoint": receiver.url}))
    assert stream_text(proxy, traceparent=bad, tracestate="vendor=abc") == "Hello there"
    spans = receiver.wait_for(2)
    (server,) = by_kind(spans, "server")
    assert server.parent_id == ""
    assert server.trace_id != CLIENT_TRACE
    upstream = scripted.requests[0].headers
    assert parent_of(upstream["traceparent"])[0] == server.trace_id
    assert "tracestate" not in upstream  # never read (nor passed on) without a valid traceparent
    assert metric(proxy, "llmproxy_tracing_traceparent_invalid_total") == 1


def test_an_unsampled_parent_is_propagated_and_not_recorded(
    scripted: Scripted, receiver: Receiver, make_proxy: Make
) -> None:
    scripted.replies.append(openai_stream())
    proxy = make_proxy(config(f"{scripted.url}/v1", {"endpoint": receiver.url}))
    stream_text(proxy, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00")
    trace_id, span_id, flags = parent_of(scripted.requests[0].headers["traceparent"])
    assert (trace_id, flags) == (CLIENT_TRACE, "00")
    assert span_id != CLIENT_SPAN
    time.sleep(0.3)
    assert receiver.spans == []


def test_without_an_exporter_the_filter_only_propagates(scripted: Scripted, make_proxy: Make) -> None:
    scripted.replies.extend([openai_stream(), openai_stream()])
    proxy = make_proxy(config(f"{scripted.url}/v1", {}))
    factory = next(f for f in proxy.runtime.chain.factories if f.name == "tracing")
    assert not factory.enabled
    stream_text(proxy, traceparent=TRACEPARENT)
    assert scripted.requests[0].headers["traceparent"] == TRACEPARENT  # passed on unchanged
    stream_text(proxy, traceparent="junk")
    trace_id, _, flags = parent_of(scripted.requests[1].headers["traceparent"])
    assert trace_id != CLIENT_TRACE and flags == "00"
    assert metric(proxy, "llmproxy_tracing_traceparent_invalid_total") == 1


def timed_requests(proxy: RunningProxy, count: int) -> list[float]:
    took = []
    api = client(proxy)
    for _ in range(count):
        started = time.perf_counter()
        api.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
        took.append(time.perf_counter() - started)
    return took


def wait_metric(proxy: RunningProxy, name: str, minimum: float, timeout: float = 6.0, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    value = metric(proxy, name, **labels)
    while value < minimum and time.monotonic() < deadline:
        time.sleep(0.05)
        value = metric(proxy, name, **labels)
    return value


JSON_REPLY = Reply(
    200,
    b'{"id":"chatcmpl-j","object":"chat.completion","model":"up-model","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}',
)


@pytest.mark.parametrize("mode", ["refuse", "reject", "slow", "down"])
def test_a_collector_that_fails_costs_requests_nothing_and_drops_are_counted(
    scripted: Scripted, make_proxy: Make, mode: str
) -> None:
    scripted.default = JSON_REPLY
    collector = Receiver(mode if mode != "down" else "ok", delay=3.0)
    if mode == "down":
        collector.close()  # nothing listens there any more: connections are refused
    try:
        tracing = {"endpoint": collector.url, "timeout": 0.5, "max_queue": 4, "batch_size": 2}
        proxy = make_proxy(config(f"{scripted.url}/v1", tracing, failover=False))
        took = timed_requests(proxy, 30)
        # a collector that never answers in time holds the export thread, never a request
        assert max(took) < 0.5, took
        dropped = wait_metric(proxy, "llmproxy_tracing_spans_dropped_total", 2, reason="export_failed")
        assert dropped >= 2
        if mode == "slow":  # the queue filled while the thread waited on the collector
            assert metric(proxy, "llmproxy_tracing_spans_dropped_total", reason="queue_full") > 0
        assert metric(proxy, "llmproxy_tracing_spans_exported_total") == 0
        started = time.monotonic()
        proxy.stop(0.5)
        assert time.monotonic() - started < 4.0  # shutdown does not wait out the exporter's retries
    finally:
        if mode != "down":
            collector.close()


def test_spans_are_exported_again_when_the_collector_recovers(
    scripted: Scripted, receiver: Receiver, make_proxy: Make
) -> None:
    scripted.default = JSON_REPLY
    receiver.mode = "reject"
    proxy = make_proxy(config(f"{scripted.url}/v1", {"endpoint": receiver.url, "batch_size": 1}, failover=False))
    timed_requests(proxy, 2)
    assert wait_metric(proxy, "llmproxy_tracing_spans_dropped_total", 4, reason="export_failed") == 4
    receiver.mode = "ok"
    timed_requests(proxy, 1)
    spans = receiver.wait_for(2)
    assert len(spans) == 2
    assert wait_metric(proxy, "llmproxy_tracing_spans_exported_total", 2) == 2


def test_content_is_recorded_when_asked_merged_and_redacted(
    scripted: Scripted, receiver: Receiver, make_proxy: Make
) -> None:
    from tests.filters.test_tracing_merge import OPENAI_TOOLS

    scripted.replies.append(Reply(200, [OPENAI_TOOLS], "text/event-stream"))
    tracing = {"endpoint": receiver.url, "content": True, "redact_patterns": [r"\b\d{3}-\d{2}-\d{4}\b"]}
    proxy = make_proxy(config(f"{scripted.url}/v1", tracing))
    secret = f"my key sk-live-abcdefghijklmnop1234, ssn 123-45-6789, theirs {KEY}"
    stream = client(proxy).chat.completions.create(
        model="gpt-x",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": secret}],
        stream=True,
    )
    calls = [c for c in stream]
    assert calls
    (server,) = by_kind(receiver.wait_for(2), "server")
    inputs = json_attr(server, "gen_ai.input.messages")
    assert inputs == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {
            "role": "user",
            "parts": [{"type": "text", "content": "my key [REDACTED], ssn [REDACTED], theirs [REDACTED]"}],
        },
    ]
    assert json_attr(server, "gen_ai.output.messages") == [
        {
            "role": "assistant",
            "parts": [
                {"type": "text", "content": "Checking both."},
                {"type": "tool_call", "id": "call_a", "name": "weather", "arguments": {"city": "Paris"}},
                {"type": "tool_call", "id": "call_b", "name": "time", "arguments": {"tz": "CET"}},
            ],
            "finish_reason": "tool_calls",
        }
    ]
    (attempt,) = by_kind(receiver.spans, "client")
    assert attempt.attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)


def json_attr(span: SpanView, name: str) -> Any:
    import json

    return json.loads(span.attributes[name])


def test_anthropic_client_and_provider(scripted: Scripted, receiver: Receiver, make_proxy: Make) -> None:
    import anthropic

    from tests.filters.test_tracing_merge import ANTHROPIC_TOOLS

    scripted.replies.append(Reply(200, [ANTHROPIC_TOOLS], "text/event-stream"))
    cfg = config(scripted.url, {"endpoint": receiver.url})
    cfg["filters"][1]["config"]["providers"][0].update(type="anthropic", models={"claude-x": "claude-up"})
    proxy = make_proxy(cfg)
    api = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0)
    with api.messages.stream(model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    spans = receiver.wait_for(2)
    (server,) = by_kind(spans, "server")
    (attempt,) = by_kind(spans, "client")
    assert server.attributes["gen_ai.provider.name"] == "anthropic"
    assert server.attributes["gen_ai.request.max_tokens"] == 64
    for span in (attempt,):
        a = span.attributes
        assert a["gen_ai.provider.name"] == "anthropic"
        assert a["gen_ai.usage.input_tokens"] == 35  # input + cache read (the GenAI rule)
        assert a["gen_ai.usage.cache_read.input_tokens"] == 5
        assert a["gen_ai.usage.output_tokens"] == 42
        assert a["gen_ai.response.id"] == "msg_1"
        assert a["gen_ai.response.model"] == "claude-x"
        assert a["gen_ai.response.finish_reasons"] == ("tool_use",)
        assert a["gen_ai.request.max_tokens"] == 64
    assert server.name == "chat claude-x" and attempt.name == "chat claude-up"
    assert server.attributes["url.path"] == "/v1/messages"


@pytest.mark.parametrize("latest", [False, True])
def test_semconv_opt_in_switches_to_the_latest_names(
    scripted: Scripted, receiver: Receiver, make_proxy: Make, monkeypatch: pytest.MonkeyPatch, latest: bool
) -> None:
    if latest:
        monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http,gen_ai_latest_experimental")
    scripted.replies.append(openai_stream())
    proxy = make_proxy(config(f"{scripted.url}/v1", {"endpoint": receiver.url}))
    stream_text(proxy)
    (server,) = by_kind(receiver.wait_for(2), "server")
    assert server.attributes["gen_ai.provider.name"] == "openai"
    assert ("gen_ai.system" in server.attributes) is not latest
    assert ("gen_ai.response.time_to_first_chunk" in server.attributes) is latest


def test_the_attribute_names_are_the_conventions() -> None:
    import warnings

    from llmproxy.filters.tracing import semconv as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as g

    released = {v for k, v in vars(g).items() if k.startswith("GEN_AI_") and isinstance(v, str)}
    ours = {v for k, v in vars(sc).items() if k.isupper() and isinstance(v, str) and v.startswith("gen_ai.")}
    assert ours - released == {sc.FIRST_TOKEN_EVENT}  # an event name, not an attribute
    assert set(sc.PROVIDERS.values()) <= {m.value for m in g.GenAiProviderNameValues}
    assert set(sc.OPERATIONS.values()) <= {m.value for m in g.GenAiOperationNameValues}


def test_the_quickstart_exports_when_the_standard_variable_is_set(receiver: Receiver) -> None:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` alone turns export on for ``llmproxy serve -c conf/quickstart.yaml``."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from tests.redis_server import free_port
    from tests.support import wait_healthy

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_SERVICE_NAME": "qs"}
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "-c", str(root / "conf" / "quickstart.yaml"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=root,
    )
    try:
        wait_healthy(port, proc, lambda: proc.communicate(timeout=5)[0])
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=b'{"model":"quickstart-gpt","messages":[{"role":"user","content":"hi"}]}',
            headers={"content-type": "application/json", "traceparent": TRACEPARENT},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        spans = receiver.wait_for(2, timeout=10)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    (server,) = by_kind(spans, "server")
    (attempt,) = by_kind(spans, "client")
    assert server.trace_id == attempt.trace_id == CLIENT_TRACE
    assert server.resource["service.name"] == "qs"
    assert server.attributes["gen_ai.request.model"] == "quickstart-gpt"
    assert attempt.attributes["gen_ai.request.model"] == "mock-gpt-4o-mini"
    assert attempt.attributes["gen_ai.usage.output_tokens"] > 0


def test_a_fallback_to_another_provider_names_each_attempts_provider_and_model(
    scripted: Scripted, receiver: Receiver, make_proxy: Make
) -> None:
    scripted.replies.extend(
        [Reply(500, b'{"type":"error","error":{"type":"api_error","message":"down"}}'), openai_stream()]
    )
    cfg = config(f"{scripted.url}/v1", {"endpoint": receiver.url})
    providers = cfg["filters"][1]["config"]["providers"]
    providers[0]["priority"] = 1
    providers.insert(
        0,
        {
            "name": "a",
            "type": "anthropic",
            "base_url": scripted.url,
            "keys": ["sk-ant-first-0123456789"],
            "models": {"gpt-x": "claude-up"},
        },
    )
    proxy = make_proxy(cfg)
    assert stream_text(proxy, traceparent=TRACEPARENT) == "Hello there"
    spans = receiver.wait_for(3)
    (server,) = by_kind(spans, "server")
    first, second = by_kind(spans, "client")
    assert scripted.requests[0].target == "/v1/messages" and scripted.requests[1].target == "/v1/chat/completions"
    assert (first.attributes["gen_ai.provider.name"], first.attributes["gen_ai.request.model"]) == (
        "anthropic",
        "claude-up",
    )
    assert (second.attributes["gen_ai.provider.name"], second.attributes["gen_ai.request.model"]) == (
        "openai",
        "up-model",
    )
    assert first.attributes["llmproxy.upstream.name"] == "a" and second.attributes["llmproxy.upstream.name"] == "p"
    assert first.parent_id == second.parent_id == server.span_id
    assert server.attributes["gen_ai.provider.name"] == "openai"
    sent = [parent_of(r.headers["traceparent"])[1] for r in scripted.requests]
    assert sent == [first.span_id, second.span_id]


@pytest.mark.parametrize("how", ["config", "env"])
def test_sampling_off_propagates_unsampled_and_records_nothing(
    scripted: Scripted, receiver: Receiver, make_proxy: Make, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    tracing: dict[str, Any] = {"endpoint": receiver.url}
    if how == "config":
        tracing["sample_ratio"] = 0
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    scripted.replies.extend([openai_stream(), openai_stream()])
    proxy = make_proxy(config(f"{scripted.url}/v1", tracing))
    stream_text(proxy)
    assert parent_of(scripted.requests[0].headers["traceparent"])[2] == "00"
    stream_text(proxy, traceparent=TRACEPARENT)  # a sampled parent is followed
    assert parent_of(scripted.requests[1].headers["traceparent"])[:1] == (CLIENT_TRACE,)
    spans = receiver.wait_for(2)
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}


@pytest.mark.parametrize(
    ("tracing", "field"),
    [
        ({"endpoint": "collector:4318"}, "endpoint: must be an http:// or https:// URL"),
        ({"redact_patterns": ["(unclosed"]}, "redact_patterns: '(unclosed' is not a valid regular expression"),
        ({"sample_ratio": 2}, "sample_ratio: must be between 0 and 1"),
        ({"max_queue": 0}, "max_queue: must be greater than 0"),
        ({"contents": True}, "contents"),
    ],
)
def test_bad_config_names_the_field(make_proxy: Make, tracing: dict[str, Any], field: str) -> None:
    from llmproxy.runtime.config import ConfigError

    with pytest.raises((ConfigError, ValueError)) as caught:
        make_proxy(config("http://127.0.0.1:9/v1", tracing))
    assert field in str(caught.value)


ANTHROPIC_JSON = Reply(
    200,
    b'{"id":"msg_j","type":"message","role":"assistant","model":"claude-up-1","content":[{"type":"text",'
    b'"text":"ok \\"id\\": \\"no\\""}],"stop_reason":"max_tokens","usage":{"input_tokens":4,"output_tokens":2}}',
)


@pytest.mark.parametrize("kind", ["json", "json-translated", "stream-translated"])
def test_the_response_facts_are_the_providers(
    scripted: Scripted, receiver: Receiver, make_proxy: Make, kind: str
) -> None:
    from tests.filters.test_tracing_merge import ANTHROPIC_TOOLS

    cfg = config(f"{scripted.url}/v1", {"endpoint": receiver.url}, failover=False)
    if kind == "json":
        scripted.replies.append(JSON_REPLY)
        expected = ("chatcmpl-j", "up-model", ("stop",))
    else:
        cfg["filters"][1]["config"]["providers"][0].update(type="anthropic", base_url=scripted.url)
        if kind == "json-translated":
            scripted.replies.append(ANTHROPIC_JSON)
            expected = ("msg_j", "claude-up-1", ("max_tokens",))
        else:
            scripted.replies.append(Reply(200, [ANTHROPIC_TOOLS], "text/event-stream"))
            expected = ("msg_1", "claude-x", ("tool_use",))
    proxy = make_proxy(cfg)
    api = client(proxy)
    if kind == "stream-translated":
        list(api.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True))
    else:
        api.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    (span,) = by_kind(receiver.wait_for(2), "client")
    for a in (span.attributes,):
        assert (a["gen_ai.response.id"], a["gen_ai.response.model"], a["gen_ai.response.finish_reasons"]) == expected
