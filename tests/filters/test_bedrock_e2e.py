"""``type: bedrock`` end to end: the openai and anthropic SDKs through the proxy to the mock's Bedrock mode.

The mock checks every SigV4 signature by recomputing it with botocore from
the test's secret (``aws_credentials``), so a request whose body changed
after signing, or signed with a wrong secret, fails with 403.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from llmproxy import Usage
from llmproxy.mock import MockServer
from tests import filters_for_tests as tf
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

KEY_ID = "AKIDMOCKEXAMPLE00001"
SECRET = "mock-secret-key/EXAMPLE+0000000000000000"
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"


def _config(mock: MockServer, **provider: Any) -> dict[str, Any]:
    entry = {
        "name": "bedrock",
        "type": "bedrock",
        "region": "us-east-1",
        "base_url": f"http://127.0.0.1:{mock.port}",
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
        "models": {"claude-bedrock": MODEL},
        **provider,
    }
    return {
        "filters": [
            {"name": "routing", "config": {"providers": [entry]}},
            {"name": "tests.filters_for_tests:UsageRecorderFactory"},
        ]
    }


@pytest.fixture
def signed_mock(mock: MockServer) -> MockServer:
    mock.config.aws_credentials = {KEY_ID: SECRET}
    return mock


def _usage(timeout: float = 3.0) -> Usage:
    rec = tf.UsageRecorderFactory.instances[-1]
    deadline = time.monotonic() + timeout
    while not rec.attempts and time.monotonic() < deadline:
        time.sleep(0.01)  # on_attempt_complete runs on the proxy's loop
    usage = rec.attempts[-1][1]
    assert isinstance(usage, Usage)
    return usage


def _openai(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


def _anthropic(proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)


def test_openai_chat_json_reaches_converse_signed(signed_mock: MockServer, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(signed_mock))
    reply = _openai(proxy).chat.completions.create(
        model="claude-bedrock",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=5,
        temperature=0.2,
        stop=["END"],
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"  # maxTokens 5 < the mock's 16 tokens
    seen = signed_mock.requests[-1]
    assert seen.path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert seen.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY_ID}/")
    assert seen.body == {
        "system": [{"text": "be brief"}],
        "messages": [{"role": "user", "content": [{"text": "hello"}]}],
        "inferenceConfig": {"maxTokens": 5, "temperature": 0.2, "stopSequences": ["END"]},
    }
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    usage = _usage()
    assert (usage.input_tokens, usage.output_tokens) == (reply.usage.prompt_tokens, 5)


def test_openai_chat_stream_from_event_stream(signed_mock: MockServer, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(signed_mock))
    chunks = list(
        _openai(proxy).chat.completions.create(
            model="claude-bedrock",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert signed_mock.requests[-1].path.endswith("/converse-stream")
    usage = _usage()
    assert usage.output_tokens == 16 and usage.provider == "bedrock"


def test_anthropic_messages_json_and_stream_with_tools(signed_mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(signed_mock))
    client = _anthropic(proxy)
    tools: Any = [
        {"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {}}}
    ]
    message = client.messages.create(
        model="claude-bedrock",
        max_tokens=100,
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,
        extra_headers={"x-mock-tool-calls": "1"},
    )
    assert message.stop_reason == "tool_use"
    use = message.content[0]
    assert use.type == "tool_use" and use.name == "get_weather" and isinstance(use.input, dict)
    assert signed_mock.requests[-1].body["toolConfig"] == {  # type: ignore[index]
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "description": "weather",
                    "inputSchema": {"json": {"type": "object", "properties": {}}},
                }
            }
        ]
    }
    # the tool result goes back as toolResult
    followup = client.messages.create(
        model="claude-bedrock",
        max_tokens=100,
        tools=tools,
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ],
    )
    assert followup.content[0].type == "text"
    sent = signed_mock.requests[-1].body["messages"]  # type: ignore[index]
    assert sent[1]["content"] == [{"toolUse": {"toolUseId": use.id, "name": "get_weather", "input": {}}}]
    assert sent[2]["content"] == [{"toolResult": {"toolUseId": use.id, "content": [{"text": "sunny"}]}}]
    with client.messages.stream(
        model="claude-bedrock",
        max_tokens=100,
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,
        extra_headers={"x-mock-tool-calls": "1"},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].name == "get_weather"
    assert final.usage.output_tokens > 0


def test_claude_cache_control_and_thinking_survive(signed_mock: MockServer, make_proxy: Make) -> None:
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(_config(signed_mock))
    client = _anthropic(proxy)
    message = client.messages.create(
        model="claude-bedrock",
        max_tokens=2000,
        system=[{"type": "text", "text": "long context", "cache_control": {"type": "ephemeral"}}],
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "hi"}],
    )
    body = signed_mock.requests[-1].body
    assert body is not None
    assert body["system"] == [{"text": "long context"}, {"cachePoint": {"type": "default"}}]
    assert body["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert message.content[0].type == "thinking" and message.content[0].signature == "sig-mock"
    assert message.usage.cache_read_input_tokens == 8 and message.usage.cache_creation_input_tokens == 4
    usage = _usage()
    assert usage.cache_read_tokens == 8 and usage.cache_write_tokens == 4
    assert usage.input_tokens == message.usage.input_tokens + 12  # the whole prompt (OTel rule)
    with client.messages.stream(
        model="claude-bedrock",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "hi"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == "Let me think."
    assert final.content[0].signature == "sig-mock"
    assert final.content[1].type == "text"


def test_errors_map_into_each_client_protocol(signed_mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(signed_mock))
    with pytest.raises(openai.RateLimitError) as caught:
        _openai(proxy).chat.completions.create(
            model="claude-bedrock", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-status": "429"}
        )
    assert "ThrottlingException" in str(caught.value)
    with pytest.raises(anthropic.BadRequestError) as bad:
        _anthropic(proxy).messages.create(
            model="claude-bedrock",
            max_tokens=10,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "400"},
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "ValidationException" in bad.value.body["error"]["message"]  # type: ignore[index]


def test_a_wrong_secret_fails_the_signature_check(signed_mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(signed_mock, aws_secret_access_key="not-the-secret"))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _openai(proxy).chat.completions.create(model="claude-bedrock", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 403


def test_bedrock_api_key_is_a_bearer_token(mock: MockServer, make_proxy: Make) -> None:
    config = _config(mock)
    entry = config["filters"][0]["config"]["providers"][0]
    del entry["aws_access_key_id"], entry["aws_secret_access_key"]
    entry["keys"] = ["bedrock-api-key-123456"]
    proxy = make_proxy(config)
    _openai(proxy).chat.completions.create(model="claude-bedrock", messages=[{"role": "user", "content": "x"}])
    assert mock.requests[-1].headers["authorization"] == "Bearer bedrock-api-key-123456"


def test_openai_responses_client_is_bridged_to_converse(signed_mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(signed_mock))
    client = _openai(proxy)
    response = client.responses.create(model="claude-bedrock", input="hello", max_output_tokens=50, store=False)
    assert response.output_text and len(response.output_text.split()) == 16
    events = list(client.responses.create(model="claude-bedrock", input="hello", stream=True, store=False))
    assert events[-1].type == "response.completed"


def _two_providers(mock: MockServer, failover: dict[str, Any]) -> dict[str, Any]:
    first = _config(mock)["filters"][0]["config"]["providers"][0]
    second = {**first, "name": "bedrock-b", "aws_access_key_id": "AKIDMOCKEXAMPLE00002", "priority": 1}
    return {
        "filters": [
            {"name": "routing", "config": {"providers": [first, second]}},
            {"name": "failover", "config": failover},
        ]
    }


def test_failover_re_signs_and_holds_the_decoded_stream(signed_mock: MockServer, make_proxy: Make) -> None:
    from llmproxy.mock import KeyBehaviour

    signed_mock.config.aws_credentials["AKIDMOCKEXAMPLE00002"] = SECRET
    signed_mock.config.keys = {KEY_ID: KeyBehaviour(status=429)}  # the first provider's key is throttled
    proxy = make_proxy(_two_providers(signed_mock, {}))
    chunks = list(
        _openai(proxy).chat.completions.create(
            model="claude-bedrock", messages=[{"role": "user", "content": "hello"}], stream=True
        )
    )
    assert len("".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split()) == 16
    tried = [r.headers["authorization"].split("Credential=")[1].split("/")[0] for r in signed_mock.requests]
    assert tried == [KEY_ID, "AKIDMOCKEXAMPLE00002"]  # each attempt signed with its own credentials


def test_a_stream_cut_before_content_is_retried(signed_mock: MockServer, make_proxy: Make) -> None:
    from llmproxy.mock import KeyBehaviour

    signed_mock.config.aws_credentials["AKIDMOCKEXAMPLE00002"] = SECRET
    signed_mock.config.keys = {KEY_ID: KeyBehaviour(fault="drop")}
    proxy = make_proxy(_two_providers(signed_mock, {}))
    with _anthropic(proxy).messages.stream(
        model="claude-bedrock",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-stall-after": "0"},
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.usage.output_tokens == 16
    assert len(signed_mock.requests) == 2


def test_a_corrupt_frame_ends_the_stream_with_an_error(signed_mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(signed_mock))
    with pytest.raises(openai.APIError):
        list(
            _openai(proxy).chat.completions.create(
                model="claude-bedrock",
                messages=[{"role": "user", "content": "hello"}],
                stream=True,
                extra_headers={"x-mock-fault": "malformed"},
            )
        )


def test_an_ejected_bedrock_key_is_restored_by_a_signed_probe(signed_mock: MockServer, make_proxy: Make) -> None:
    """Health probes go through the core's upstream client, which signs them like attempts:
    the mock checks every signature, so an unsigned (or wrongly signed) probe keeps the key ejected."""
    from llmproxy.mock import KeyBehaviour

    from .test_failover import admin

    signed_mock.config.keys = {KEY_ID: KeyBehaviour(status=401)}
    config = _config(signed_mock)
    config["filters"].insert(1, {"name": "failover", "config": {"eject_for": 0.2, "health_check": {"interval": 0.2}}})
    proxy = make_proxy(config)
    with pytest.raises(openai.APIStatusError):
        _openai(proxy).chat.completions.create(model="claude-bedrock", messages=[{"role": "user", "content": "hi"}])
    assert [row["state"] for row in admin(proxy.port)["keys"]] == ["ejected"]
    signed_mock.config.keys = {}  # the key works again
    deadline = time.monotonic() + 10
    while admin(proxy.port)["keys"][0]["state"] != "healthy" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert admin(proxy.port)["keys"][0]["state"] == "healthy"
    probes = [r for r in signed_mock.requests if r.headers.get("x-llmproxy-probe") == "1"]
    assert probes and all("Credential=" + KEY_ID in r.headers["authorization"] for r in probes)
    assert probes[-1].path.endswith("/converse")
