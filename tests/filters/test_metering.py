"""The ``metering`` filter end to end: real proxy, real mock provider, the official SDKs.

Usage on every exchange (provider counts when given, the tokenizer's when
not, a client disconnect counted from what was relayed), prices from the
price book and its overrides, the access log fields, the opt-in header.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from llmproxy import Source, Usage
from llmproxy.filters.metering.tokenizer import count_text
from llmproxy.mock import MockServer
from tests import filters_for_tests as tf
from tests.filters.scripted_provider import Reply, Scripted
from tests.filters.test_routing_usage import _sse_reply
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

PRICES = {"mock-gpt": {"input": 1.0, "output": 2.0, "cache_read": 0.5}}


def _config(base: str, provider_type: str = "openai", **metering: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": "text"},
        "filters": [
            {"name": "metering", "config": {"prices": PRICES, **metering}},
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "p",
                            "type": provider_type,
                            "base_url": base,
                            "keys": ["sk-test-key-123456"],
                            "models": {"gpt-x": "mock-gpt", "claude-x": "mock-claude-unpriced"},
                        }
                    ]
                },
            },
            {"name": "tests.filters_for_tests:UsageRecorderFactory"},
        ],
    }


def _exchange_usage(timeout: float = 3.0) -> Usage:
    rec = tf.UsageRecorderFactory.instances[-1]
    deadline = time.monotonic() + timeout
    while not rec.exchanges and time.monotonic() < deadline:
        time.sleep(0.01)  # on_exchange_complete runs on the proxy's loop
    assert rec.exchanges, "no exchange completed"
    usage = rec.exchanges[-1]
    assert isinstance(usage, Usage)
    return usage


def _access_line(caplog: pytest.LogCaptureFixture, timeout: float = 3.0) -> str:
    """The metered access log line (written on the proxy's loop just after the filters' last hooks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if "tokens_in" in record.getMessage():
                return record.getMessage()
        time.sleep(0.01)
    raise AssertionError("no metered access log line")


def test_provider_usage_is_priced_and_logged(
    mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(f"http://127.0.0.1:{mock.port}/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with caplog.at_level(logging.INFO, logger="llmproxy.access"):
        reply = client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hello"}])
        usage = _exchange_usage()
        line = _access_line(caplog)
    assert reply.usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert usage.input_source is Source.PROVIDER and usage.output_source is Source.PROVIDER
    assert (usage.requested_model, usage.model, usage.provider) == ("gpt-x", "mock-gpt", "p")
    expected = (Decimal(usage.input_tokens) * 1 + Decimal(usage.output_tokens) * 2) / Decimal(1_000_000)
    assert usage.cost is not None and usage.cost.total == expected
    assert "model=gpt-x upstream_model=mock-gpt provider=p" in line
    assert f"tokens_in={usage.input_tokens} tokens_out={usage.output_tokens} tokens_cached=0" in line
    assert f"cost={expected:.6f}" in line and "stream=no" in line and "ttft=" in line


def test_unknown_price_is_cost_unknown_never_zero(
    mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(f"http://127.0.0.1:{mock.port}/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with caplog.at_level(logging.INFO, logger="llmproxy.access"):
        client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "hello"}])
        usage = _exchange_usage()
        line = _access_line(caplog)
    assert usage.output_tokens > 0 and usage.cost is None
    assert "cost=?" in line


def test_a_stream_without_provider_usage_is_counted_by_the_tokenizer(scripted: Scripted, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "mock-gpt"}
    scripted.default = _sse_reply(
        [
            (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello there,"}}]}),
            (None, {**base, "choices": [{"index": 0, "delta": {"content": " general Kenobi"}}]}),
            (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            (None, "[DONE]"),
        ]
    )
    proxy = make_proxy(_config(f"{scripted.url}/v1"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    chunks = list(
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "say hello"}], stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = _exchange_usage()
    assert usage.output_source is Source.TOKENIZER and usage.input_source is Source.TOKENIZER
    assert usage.output_tokens == count_text(text, "mock-gpt").tokens
    assert usage.input_tokens > 0 and usage.encoding
    assert usage.cost is not None  # priced from the counts


def test_a_client_disconnect_mid_stream_counts_what_was_relayed(mock: MockServer, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(f"http://127.0.0.1:{mock.port}/v1"))
    body = json.dumps({"model": "gpt-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
        b"X-Mock-Tokens: 200\r\nX-Mock-Itl-Ms: 20\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head + body)
        received = b""
        while received.count(b"data: ") < 6:
            received += sock.recv(65536)
    usage = _exchange_usage(timeout=5)
    assert usage.output_source is Source.TOKENIZER  # the provider's usage chunk never came
    assert usage.input_source is Source.TOKENIZER
    assert 0 < usage.output_tokens < 200
    assert usage.input_tokens > 0


def test_anthropic_sdk_usage_through_translation(mock: MockServer, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(f"http://127.0.0.1:{mock.port}/v1"))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    with client.messages.stream(
        model="gpt-x", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        final = stream.get_final_message()
    usage = _exchange_usage()
    assert usage.input_tokens > 0  # never 0 when an OpenAI backend serves an Anthropic client
    assert usage.output_tokens == final.usage.output_tokens
    assert usage.input_source is Source.PROVIDER


def test_the_usage_header_is_opt_in(mock: MockServer, make_proxy: Make) -> None:
    for enabled in (False, True):
        tf.UsageRecorderFactory.instances.clear()
        proxy = make_proxy(_config(f"http://127.0.0.1:{mock.port}/v1", usage_header=enabled))
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-x", messages=[{"role": "user", "content": "hello"}]
        )
        header = raw.headers.get("x-llmproxy-usage")
        if not enabled:
            assert header is None
            continue
        reply = raw.parse()
        assert reply.usage is not None
        assert (
            header is not None
            and f"input={reply.usage.prompt_tokens}; output={reply.usage.completion_tokens}" in header
        )


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"prices": {"m": {"input": -1}}}, "prices.m.input"),
        ({"drift_sample": 2}, "drift_sample"),
        ({"usage_header": "maybe"}, "usage_header"),
        ({"nope": 1}, "nope"),
    ],
)
def test_bad_config_names_the_field(make_proxy: Make, config: dict[str, Any], field: str) -> None:
    from llmproxy import ConfigError

    with pytest.raises((ConfigError, ValueError)) as info:
        make_proxy({"filters": [{"name": "metering", "config": config}]})
    assert field in str(info.value)


def test_count_tokens_is_answered_locally_when_no_provider_counts(mock: MockServer, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(f"http://127.0.0.1:{mock.port}/v1"))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    messages: Any = [{"role": "user", "content": "hello there, how are you today?"}]
    counted = client.messages.count_tokens(model="gpt-x", messages=messages)
    assert counted.input_tokens > 5
    before = len(mock.requests)
    raw = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10).post(
        "/responses/input_tokens", cast_to=object, body={"model": "gpt-x", "input": "hello there, how are you today?"}
    )
    assert isinstance(raw, dict) and raw["object"] == "response.input_tokens" and raw["input_tokens"] > 5
    assert len(mock.requests) == before  # never sent to the provider


@pytest.mark.parametrize("lead", [b" ", b"\n", b"\r\n\t "])
def test_a_json_body_with_leading_whitespace_is_read_like_any_other(
    mock: MockServer, make_proxy: Make, lead: bytes
) -> None:
    """The requested model (and a local count) does not depend on how the JSON starts."""
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(f"http://127.0.0.1:{mock.port}/v1"))
    body = lead + json.dumps({"model": "gpt-x", "messages": [{"role": "user", "content": "hello there"}]}).encode()
    before = len(mock.requests)
    head = (
        b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b'"input_tokens"' in data
    assert len(mock.requests) == before  # answered locally: the model was read


def test_the_json_access_log_carries_the_same_fields(
    mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    tf.UsageRecorderFactory.instances.clear()
    config = _config(f"http://127.0.0.1:{mock.port}/v1")
    config["server"] = {"access_log": "json"}
    proxy = make_proxy(config)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with caplog.at_level(logging.INFO, logger="llmproxy.access"):
        client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "hello"}])
        usage = _exchange_usage()
        line = _access_line(caplog)
    record = json.loads(line)
    assert record["model"] == "claude-x" and record["upstream_model"] == "mock-claude-unpriced"
    assert (record["tokens_in"], record["tokens_out"]) == (usage.input_tokens, usage.output_tokens)
    assert record["tokens_cached"] == 0 and record["cost"] is None and record["stream"] is False
    assert record["provider"] == "p" and record["key_id"] and record["ttft_ms"] is not None


def test_the_provider_is_asked_for_an_uncompressed_body_whatever_the_client_accepts(
    scripted: Scripted, make_proxy: Make
) -> None:
    """A client's ``accept-encoding: gzip`` never reaches the provider: a compressed reply would
    hide its usage (and its content, from translation and failover) from the proxy."""
    tf.UsageRecorderFactory.instances.clear()
    scripted.default = Reply(
        200,
        json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": "mock-gpt",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
            }
        ).encode(),
    )
    proxy = make_proxy(_config(f"{scripted.url}/v1"))
    client = openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key="sk-client",
        max_retries=0,
        timeout=10,
        default_headers={"accept-encoding": "gzip, deflate, br"},
    )
    client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hello"}])
    assert scripted.requests[-1].headers.get("accept-encoding") == "identity"
    usage = _exchange_usage()
    assert (usage.input_tokens, usage.output_tokens, usage.input_source) == (11, 3, Source.PROVIDER)


def test_a_failed_over_attempt_is_accounted_to_its_own_provider_and_model(scripted: Scripted, make_proxy: Make) -> None:
    """Failover re-points the route before the failed attempt completes: that attempt's usage
    still names the provider and model it was sent to (and is priced as such), not the retry's."""
    tf.UsageRecorderFactory.instances.clear()
    ok = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "mock-gpt",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }
    scripted.replies.append(Reply(500, b'{"error": {"message": "boom", "type": "server_error"}}'))
    scripted.default = Reply(200, json.dumps(ok).encode())
    config = _config(f"{scripted.url}/v1")
    routing = config["filters"][1]["config"]
    first = {**routing["providers"][0], "name": "first", "models": {"gpt-x": "mock-first"}}
    second = {**routing["providers"][0], "name": "second", "priority": 1, "models": {"gpt-x": "mock-gpt"}}
    routing["providers"] = [first, second]
    config["filters"].insert(2, {"name": "failover", "config": {}})
    proxy = make_proxy(config)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hello"}])
    assert [r.body["model"] for r in scripted.requests] == ["mock-first", "mock-gpt"]
    usage = _exchange_usage()  # waits for the exchange to complete
    rec = tf.UsageRecorderFactory.instances[-1]
    (_, failed), (_, served) = rec.attempts
    assert (failed.provider, failed.model, failed.output_tokens) == ("first", "mock-first", 0)
    assert failed.cost is None  # mock-first has no price: not priced as the retry's mock-gpt
    assert (served.provider, served.model, served.input_tokens) == ("second", "mock-gpt", 11)
    assert served.cost is not None and usage.input_tokens == 11
