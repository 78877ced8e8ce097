"""``type: gemini`` end to end: the openai and anthropic SDKs (and a Responses client) through the
proxy to the mock provider in Gemini mode (``:generateContent`` / ``:streamGenerateContent?alt=sse``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest

from llmproxy import Source, Usage
from llmproxy.mock import MockServer
from tests import filters_for_tests as tf
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}, "n": {"type": "integer"}},
                "additionalProperties": False,
            },
        },
    }
]


def _config(mock: MockServer) -> dict[str, Any]:
    return {
        "filters": [
            {"name": "metering"},
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "g",
                            "type": "gemini",
                            "base_url": f"http://127.0.0.1:{mock.port}/v1beta",
                            "keys": ["goog-test-key-123456"],
                            "models": {"gem": "gemini-2.5-flash"},
                        }
                    ]
                },
            },
            {"name": "tests.filters_for_tests:UsageRecorderFactory"},
        ]
    }


@pytest.fixture
def gproxy(mock: MockServer, make_proxy: Make) -> RunningProxy:
    tf.UsageRecorderFactory.instances.clear()
    return make_proxy(_config(mock))


def _usage(timeout: float = 3.0) -> Usage:
    rec = tf.UsageRecorderFactory.instances[-1]
    deadline = time.monotonic() + timeout
    while not rec.exchanges and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.exchanges, "no exchange completed"
    usage = rec.exchanges[-1]
    assert isinstance(usage, Usage)
    return usage


def _oai(proxy: RunningProxy, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10, default_headers=headers
    )


def _ant(proxy: RunningProxy, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10, default_headers=headers
    )


def test_openai_json_reaches_generate_content(mock: MockServer, gproxy: RunningProxy) -> None:
    reply = _oai(gproxy, **{"x-mock-tokens": "5"}).chat.completions.create(
        model="gem",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        temperature=0.5,
        max_tokens=50,
    )
    assert reply.choices[0].message.content == "lorem ipsum dolor sit amet "
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gemini-2.5-flash"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    seen = mock.requests[-1]
    assert seen.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert seen.headers.get("x-goog-api-key") == "goog-test-key-123456"
    assert "authorization" not in seen.headers
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "hello there"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"temperature": 0.5, "maxOutputTokens": 50},
    }
    usage = _usage()
    assert usage.output_tokens == 5 and usage.input_tokens == reply.usage.prompt_tokens
    assert usage.input_source is Source.PROVIDER and usage.output_source is Source.PROVIDER
    assert (usage.model, usage.provider) == ("gemini-2.5-flash", "g")


def test_openai_stream_with_usage(mock: MockServer, gproxy: RunningProxy) -> None:
    chunks = list(
        _oai(gproxy, **{"x-mock-tokens": "4"}).chat.completions.create(
            model="gem",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "lorem ipsum dolor sit "
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert mock.requests[-1].path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    usage = _usage()
    assert usage.output_tokens == 4 and usage.output_source is Source.PROVIDER
    assert not usage.extra.get("partial")


def test_openai_tool_calls_json_and_stream(mock: MockServer, gproxy: RunningProxy) -> None:
    client = _oai(gproxy, **{"x-mock-tool-calls": "2"})
    reply = client.chat.completions.create(
        model="gem", messages=[{"role": "user", "content": "look"}], tools=TOOLS, tool_choice="required"
    )
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["lookup", "lookup"]
    assert calls[1].function.arguments == '{"q":"call 1","n":1}'
    assert reply.choices[0].finish_reason == "tool_calls"
    body = mock.requests[-1].body
    assert body is not None
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "lookup",
                    "description": "Look something up",
                    "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}},
                }
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    chunks = list(
        client.chat.completions.create(
            model="gem", messages=[{"role": "user", "content": "look"}], tools=TOOLS, stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name if d.function else None) for d in deltas] == [(0, "lookup"), (1, "lookup")]
    # the follow-up turn: tool results go back as functionResponse parts named after their call
    follow = client.chat.completions.create(
        model="gem",
        messages=[
            {"role": "user", "content": "look"},
            {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": '{"answer": 42}'},
            {"role": "tool", "tool_call_id": calls[1].id, "content": "plain"},
        ],
        tools=TOOLS,
        extra_headers={"x-mock-tool-calls": "0"},
    )
    assert follow.choices[0].message.content
    contents = mock.requests[-1].body["contents"]  # type: ignore[index]
    assert contents[1] == {
        "role": "model",
        "parts": [
            {"functionCall": {"name": "lookup", "args": {"q": "call 0", "n": 0}}},
            {"functionCall": {"name": "lookup", "args": {"q": "call 1", "n": 1}}},
        ],
    }
    assert contents[2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "lookup", "response": {"answer": 42}}},
            {"functionResponse": {"name": "lookup", "response": {"result": "plain"}}},
        ],
    }


def test_anthropic_json_stream_and_tools(mock: MockServer, gproxy: RunningProxy) -> None:
    client = _ant(gproxy, **{"x-mock-tokens": "3"})
    message = client.messages.create(
        model="gem", max_tokens=100, system="sys", messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "lorem ipsum dolor "
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 3
    seen = mock.requests[-1]
    assert "anthropic-version" not in seen.headers and "x-api-key" not in seen.headers
    assert seen.body is not None and seen.body["systemInstruction"] == {"parts": [{"text": "sys"}]}
    with client.messages.stream(model="gem", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "lorem ipsum dolor " and final.usage.output_tokens == 3
    usage = _usage()
    assert usage.output_tokens == 3 and usage.output_source is Source.PROVIDER
    tooled = _ant(gproxy, **{"x-mock-tool-calls": "1"}).messages.create(
        model="gem",
        max_tokens=100,
        messages=[{"role": "user", "content": "look"}],
        tools=[{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
    )
    assert tooled.stop_reason == "tool_use"
    assert tooled.content[0].type == "tool_use" and tooled.content[0].input == {"q": "call 0", "n": 0}


def test_responses_client_json_and_stream(gproxy: RunningProxy) -> None:
    client = _oai(gproxy, **{"x-mock-tokens": "2"})
    response = client.responses.create(model="gem", input="hello", store=False)
    assert response.output_text == "lorem ipsum "
    assert response.usage is not None and response.usage.output_tokens == 2
    events = list(client.responses.create(model="gem", input="hello", stream=True, store=False))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "lorem ipsum "


def test_provider_error_in_each_protocol(gproxy: RunningProxy) -> None:
    with pytest.raises(openai.RateLimitError) as oai_error:
        _oai(gproxy, **{"x-mock-status": "429"}).chat.completions.create(
            model="gem", messages=[{"role": "user", "content": "hi"}]
        )
    assert oai_error.value.body["code"] == "RESOURCE_EXHAUSTED"  # type: ignore[index]
    assert oai_error.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.InternalServerError) as ant_error:
        _ant(gproxy, **{"x-mock-status": "503"}).messages.create(
            model="gem", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert ant_error.value.status_code == 503
    assert ant_error.value.body["error"]["type"] == "api_error"  # type: ignore[index]  (anthropic_type_for_status)


def test_safety_blocks_are_errors(gproxy: RunningProxy) -> None:
    client = _oai(gproxy)
    for marker in ("[[mock:block-prompt]]", "[[mock:block-response]]"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="gem", messages=[{"role": "user", "content": marker}])
        assert exc.value.body["code"] == "content_filter"  # type: ignore[index]
        with pytest.raises(openai.APIError) as streamed:
            messages = [{"role": "user", "content": marker}]
            list(client.chat.completions.create(model="gem", messages=messages, stream=True))  # type: ignore[arg-type]
        assert "blocked" in str(streamed.value)
    with pytest.raises(anthropic.BadRequestError) as ant:
        _ant(gproxy).messages.create(
            model="gem", max_tokens=10, messages=[{"role": "user", "content": "[[mock:block-prompt]]"}]
        )
    assert ant.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_remote_image_url_is_a_clear_400(gproxy: RunningProxy) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        _oai(gproxy).chat.completions.create(
            model="gem",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        )
    assert exc.value.body["param"] == "messages[0].content[0].image_url.url"  # type: ignore[index]


def test_stream_cut_is_an_error_event(gproxy: RunningProxy) -> None:
    url = gproxy.url + "/v1/chat/completions"
    payload = {"model": "gem", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", url, json=payload, headers={"x-mock-fault": "drop", "x-mock-stall-after": "2"}) as r:
        body = b"".join(r.iter_bytes())
    assert b'"error"' in body


def test_failover_moves_off_a_rate_limited_gemini_key(mock: MockServer, make_proxy: Make) -> None:
    from llmproxy.mock import KeyBehaviour

    mock.config.keys["goog-limited-key"] = KeyBehaviour(status=429)
    raw = _config(mock)
    routing = raw["filters"][1]["config"]
    routing["providers"][0]["keys"] = ["goog-limited-key", "goog-good-key"]
    raw["filters"].insert(2, {"name": "failover", "config": {"max_attempts": 2, "backoff": {"base": 0.001}}})
    tf.UsageRecorderFactory.instances.clear()
    proxy = make_proxy(raw)
    client = _oai(proxy)
    for _ in range(2):  # whichever key the round robin starts on
        reply = client.chat.completions.create(model="gem", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    keys = [r.headers.get("x-goog-api-key") for r in mock.requests]
    assert "goog-limited-key" in keys and keys.count("goog-good-key") == 2


def test_count_tokens_is_counted_here_and_embeddings_are_refused(mock: MockServer, gproxy: RunningProxy) -> None:
    before = len(mock.requests)
    count = _ant(gproxy).messages.count_tokens(model="gem", messages=[{"role": "user", "content": "hello there"}])
    assert count.input_tokens > 0 and len(mock.requests) == before  # metering's tokenizer, not the provider
    with pytest.raises(openai.BadRequestError) as exc:
        _oai(gproxy).embeddings.create(model="gem", input="hi")
    assert exc.value.body["code"] == "model_not_supported_for_api"  # type: ignore[index]
