"""The routing filter end to end: the official SDKs, the proxy and the mock provider on real sockets.

Covered here: protocol translation both ways (OpenAI SDK to an Anthropic-type
provider, Anthropic SDK to an OpenAI-type provider; streaming or not; text and
parallel tool calls; stop reasons; usage), credentials per adapter, model
mapping, aliases and the provider hint, the ``include_usage`` injection,
provider errors in the client's protocol, bad input, ``GET /v1/models`` and
the weighted split. Golden transcripts end to end are in
``test_routing_golden_e2e.py``; the table alone in ``test_routing_table.py``.

The mock does not record requests to paths it does not serve (Azure's
``/openai/deployments/...``), so the Azure test uses :class:`Scripted`, a
small recording provider on the standard library's HTTP server.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from llmproxy.filters.routing import RoutingFactory, RoutingTable
from llmproxy.mock import MockServer

from ..support import LoopThread, RunningProxy
from .scripted_provider import Reply, Scripted

Make = Callable[[dict[str, Any]], RunningProxy]

OPENAI_CLIENT_KEY = "sk-client-openai-0000"
ANTHROPIC_CLIENT_KEY = "sk-client-anthropic-0000"
PROVIDER_KEYS = ("sk-oa-1", "sk-oa-2", "sk-an-1")

# What the mock generates (see proxy/mock/): reply text is these
# words in order, each followed by a space; tool call i (0-based) has the
# compact JSON arguments {"q":"call i","n":i} and cycles through the
# request's tool names.
VOCAB = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


def mock_text(tokens: int) -> str:
    return "".join(f"{VOCAB[i]} " for i in range(tokens))


def mock_args(i: int) -> str:
    return json.dumps({"q": f"call {i}", "n": i}, separators=(",", ":"))


OPENAI_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
ANTHROPIC_TOOLS: list[Any] = [
    {"name": "get_weather", "input_schema": {"type": "object"}},
    {"name": "get_time", "input_schema": {"type": "object"}},
]
TOOL_NAMES = ["get_weather", "get_time"]
HI: list[Any] = [{"role": "user", "content": "hello there"}]


def routing(providers: list[dict[str, Any]], aliases: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"providers": providers}
    if aliases is not None:
        config["aliases"] = aliases
    return {"server": {"access_log": "off"}, "filters": [{"name": "routing", "config": config}]}


def standard_providers(port: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "oa",
            "type": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "keys": ["sk-oa-1", "sk-oa-2"],
            "models": {
                "gpt-x": "mock-gpt",
                "gpt-pre-*": "mock-gpt-prefixed",
                "keep-*": "",
                "both": "mock-gpt-both",
                "emb": "mock-embedding",
            },
            "headers": {"x-provider-extra": "oa"},
        },
        {
            "name": "an",
            "type": "anthropic",
            "base_url": f"http://127.0.0.1:{port}",
            "keys": ["sk-an-1"],
            "anthropic_version": "2023-01-01",
            "models": {"claude-x": "mock-claude", "both": "mock-claude-both", "mock-claude-*": ""},
        },
        {
            "name": "keyless",
            "type": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "keys": ["${ROUTING_TEST_SURELY_UNSET_VAR:-}"],
            "needs_key": False,  # a local server: no key sent, none needed
            "models": ["orphan"],
        },
    ]


ALIASES = {"smart": [{"provider": "an", "model": "mock-claude-smart", "weight": 1}]}


@pytest.fixture
def routed(mock: MockServer, make_proxy: Make) -> RunningProxy:
    """A proxy routing to ``mock`` through an OpenAI-type and an Anthropic-type provider."""
    return make_proxy(routing(standard_providers(mock.port), ALIASES))


def oa_client(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=OPENAI_CLIENT_KEY, max_retries=0, timeout=10)


def an_client(proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=ANTHROPIC_CLIENT_KEY, max_retries=0, timeout=10)


def direct(mock: MockServer, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx2.Response:
    """Ask the mock itself (the oracle for what a provider answers to a body)."""
    return httpx2.post(f"http://127.0.0.1:{mock.port}{path}", json=body, headers=headers or {}, timeout=10)


def mock_headers(received: Any) -> dict[str, str]:
    """The ``x-mock-*`` switches of a recorded request, to send the same request again."""
    return {k: v for k, v in received.headers.items() if k.startswith("x-mock-")}


def assert_no_client_key(headers: dict[str, str]) -> None:
    for value in headers.values():
        assert "sk-client" not in value, headers


# ---------------------------------------------------------------------------
# The OpenAI SDK against an Anthropic-type provider
# ---------------------------------------------------------------------------


def test_openai_sdk_to_anthropic_provider(routed: RunningProxy, mock: MockServer) -> None:
    reply = oa_client(routed).chat.completions.create(
        model="claude-x", messages=HI, extra_headers={"x-mock-tokens": "5"}
    )
    received = mock.requests[-1]
    assert (received.path, received.model, received.stream) == ("/v1/messages", "mock-claude", False)
    assert received.body is not None and received.body["max_tokens"] == 4096  # the adapter's default
    assert reply.object == "chat.completion" and reply.model == "mock-claude"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == mock_text(5)
    assert choice.finish_reason == "stop"
    oracle = direct(mock, "/v1/messages", received.body, {"x-mock-tokens": "5"}).json()["usage"]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (oracle["input_tokens"], 5)
    assert reply.usage.total_tokens == oracle["input_tokens"] + 5


@pytest.mark.parametrize("calls", [1, 3])
def test_openai_sdk_tool_calls_from_anthropic_provider(routed: RunningProxy, mock: MockServer, calls: int) -> None:
    reply = oa_client(routed).chat.completions.create(
        model="claude-x", messages=HI, tools=OPENAI_TOOLS, extra_headers={"x-mock-tool-calls": str(calls)}
    )
    sent = mock.requests[-1].body
    assert sent is not None and [t["name"] for t in sent["tools"]] == TOOL_NAMES
    assert sent["tools"][0]["input_schema"] == {"type": "object"}
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    tool_calls = [c for c in choice.message.tool_calls or () if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    # byte-exact: the arguments are the mock's JSON, not merely equivalent JSON
    assert [c.function.arguments for c in tool_calls] == [mock_args(i) for i in range(calls)]
    assert [c.function.name for c in tool_calls] == [TOOL_NAMES[i % 2] for i in range(calls)]
    assert len({c.id for c in tool_calls}) == calls and all(c.type == "function" for c in tool_calls)
    assert reply.usage is not None and reply.usage.completion_tokens > 0


@dataclass
class ChatStream:
    """What an OpenAI SDK stream delivered, chunk by chunk."""

    text: str = ""
    args: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    ids: dict[int, str] = field(default_factory=dict)
    finish: list[str] = field(default_factory=list)
    usage_chunks: list[Any] = field(default_factory=list)
    chunks: int = 0


def read_chat_stream(stream: Any) -> ChatStream:
    out = ChatStream()
    for chunk in stream:
        out.chunks += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            out.usage_chunks.append(chunk)
        for choice in chunk.choices:
            out.text += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                out.args[call.index] = out.args.get(call.index, "") + (call.function.arguments or "")
                if call.function.name:
                    out.names[call.index] = call.function.name
                if call.id:
                    out.ids[call.index] = call.id
            if choice.finish_reason is not None:
                out.finish.append(choice.finish_reason)
    return out


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("calls", [0, 1, 3])
def test_openai_sdk_streams_from_anthropic_provider(
    routed: RunningProxy, mock: MockServer, calls: int, include_usage: bool
) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = oa_client(routed).chat.completions.create(
        model="claude-x",
        messages=HI,
        tools=OPENAI_TOOLS,
        stream=True,
        extra_headers={"x-mock-tool-calls": str(calls), "x-mock-tokens": "6"},
        **extra,
    )
    got = read_chat_stream(stream)
    received = mock.requests[-1]
    assert (received.path, received.stream) == ("/v1/messages", True)
    assert got.chunks > calls * 3  # really streamed: at least one chunk per argument fragment
    if calls:
        assert got.text == ""
        assert got.args == {i: mock_args(i) for i in range(calls)}
        assert all(json.loads(a) == {"q": f"call {i}", "n": i} for i, a in got.args.items())
        assert got.names == {i: TOOL_NAMES[i % 2] for i in range(calls)}
        assert len(set(got.ids.values())) == calls
        assert got.finish == ["tool_calls"]
    else:
        assert got.text == mock_text(6) and got.args == {}
        assert got.finish == ["stop"]
    if include_usage:
        assert len(got.usage_chunks) == 1
        usage_chunk = got.usage_chunks[0]
        assert usage_chunk.choices == []
        assert received.body is not None
        oracle = direct(mock, "/v1/messages", {**received.body, "stream": False}, mock_headers(received))
        expected = oracle.json()["usage"]
        assert usage_chunk.usage.prompt_tokens == expected["input_tokens"]
        assert usage_chunk.usage.completion_tokens == expected["output_tokens"]
    else:
        assert got.usage_chunks == []


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_length_finish_from_anthropic_max_tokens(
    routed: RunningProxy, mock: MockServer, stream: bool
) -> None:
    client = oa_client(routed)
    kwargs: dict[str, Any] = {"model": "claude-x", "messages": HI, "max_tokens": 3}
    if stream:
        got = read_chat_stream(client.chat.completions.create(stream=True, **kwargs))
        text, finish = got.text, got.finish
    else:
        reply = client.chat.completions.create(**kwargs)
        text, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
    assert mock.requests[-1].body["max_tokens"] == 3  # type: ignore[index]
    assert (text, finish) == (mock_text(3), ["length"])


# ---------------------------------------------------------------------------
# The Anthropic SDK against an OpenAI-type provider
# ---------------------------------------------------------------------------


def test_anthropic_sdk_to_openai_provider(routed: RunningProxy, mock: MockServer) -> None:
    message = an_client(routed).messages.create(
        model="gpt-x", max_tokens=100, messages=HI, extra_headers={"x-mock-tokens": "4"}
    )
    received = mock.requests[-1]
    assert (received.path, received.model) == ("/v1/chat/completions", "mock-gpt")
    assert received.body is not None and received.body["max_tokens"] == 100
    assert message.type == "message" and message.role == "assistant" and message.model == "mock-gpt"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == mock_text(4)  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    oracle = direct(mock, "/v1/chat/completions", received.body, {"x-mock-tokens": "4"}).json()["usage"]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (oracle["prompt_tokens"], 4)


@pytest.mark.parametrize("calls", [1, 3])
def test_anthropic_sdk_tool_use_from_openai_provider(routed: RunningProxy, mock: MockServer, calls: int) -> None:
    message = an_client(routed).messages.create(
        model="gpt-x",
        max_tokens=100,
        messages=HI,
        tools=ANTHROPIC_TOOLS,
        extra_headers={"x-mock-tool-calls": str(calls)},
    )
    sent = mock.requests[-1].body
    assert sent is not None
    assert [t["function"]["name"] for t in sent["tools"]] == TOOL_NAMES
    assert message.stop_reason == "tool_use"
    blocks = [b for b in message.content if b.type == "tool_use"]
    assert [b.input for b in blocks] == [{"q": f"call {i}", "n": i} for i in range(calls)]
    assert [b.name for b in blocks] == [TOOL_NAMES[i % 2] for i in range(calls)]
    assert len({b.id for b in blocks}) == calls


@pytest.mark.parametrize("calls", [0, 1, 3])
def test_anthropic_sdk_streams_from_openai_provider(routed: RunningProxy, mock: MockServer, calls: int) -> None:
    fragments: dict[int, str] = {}
    events: list[str] = []
    with an_client(routed).messages.stream(
        model="gpt-x",
        max_tokens=100,
        messages=HI,
        tools=ANTHROPIC_TOOLS,
        extra_headers={"x-mock-tool-calls": str(calls), "x-mock-tokens": "6"},
    ) as stream:
        for event in stream:
            events.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments[event.index] = fragments.get(event.index, "") + event.delta.partial_json
        final = stream.get_final_message()
    received = mock.requests[-1]
    assert received.body is not None and received.stream
    assert received.body["stream_options"] == {"include_usage": True}  # so the usage always arrives
    assert events[0] == "message_start" and events[-1] == "message_stop"
    if calls:
        tool_blocks = [b for b in final.content if b.type == "tool_use"]
        # each block's fragments join to exactly the mock's JSON
        assert [fragments[i] for i in range(calls)] == [mock_args(i) for i in range(calls)]
        assert [b.input for b in tool_blocks] == [{"q": f"call {i}", "n": i} for i in range(calls)]
        assert [b.name for b in tool_blocks] == [TOOL_NAMES[i % 2] for i in range(calls)]
        assert final.stop_reason == "tool_use"
    else:
        assert [b.type for b in final.content] == ["text"]
        assert final.content[0].text == mock_text(6)  # type: ignore[union-attr]
        assert events.count("text") == 6  # one SDK text event per provider delta
        assert final.stop_reason == "end_turn"
    oracle = direct(mock, "/v1/chat/completions", {**received.body, "stream": False}, mock_headers(received))
    usage = oracle.json()["usage"]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_max_tokens_stop_from_openai_length(routed: RunningProxy, stream: bool) -> None:
    client = an_client(routed)
    final: anthropic.types.Message
    if stream:
        with client.messages.stream(model="gpt-x", max_tokens=2, messages=HI) as s:
            final = s.get_final_message()
    else:
        final = client.messages.create(model="gpt-x", max_tokens=2, messages=HI)
    assert final.stop_reason == "max_tokens"
    assert final.content[0].text == mock_text(2)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------
# Credentials, paths and headers the provider receives
# ---------------------------------------------------------------------------


def test_openai_provider_gets_its_own_keys_in_turn(routed: RunningProxy, mock: MockServer) -> None:
    client = oa_client(routed)
    for _ in range(4):
        client.chat.completions.create(model="gpt-x", messages=HI, extra_headers={"x-mock-tokens": "1"})
    auths = [r.headers.get("authorization") for r in mock.requests]
    assert auths == ["Bearer sk-oa-1", "Bearer sk-oa-2", "Bearer sk-oa-1", "Bearer sk-oa-2"]
    for r in mock.requests:
        assert (r.path, r.model) == ("/v1/chat/completions", "mock-gpt")
        assert "x-api-key" not in r.headers and "api-key" not in r.headers
        assert r.headers["x-provider-extra"] == "oa"
        assert_no_client_key(r.headers)


@pytest.mark.parametrize(
    ("sdk", "version"),
    [
        ("openai", "2023-01-01"),  # no client header: the configured anthropic_version
        ("anthropic", "2024-02-02"),  # an Anthropic client's own header wins
    ],
)
def test_anthropic_provider_gets_x_api_key_and_version(
    routed: RunningProxy, mock: MockServer, sdk: str, version: str
) -> None:
    if sdk == "openai":
        oa_client(routed).chat.completions.create(
            model="claude-x", messages=HI, extra_headers={"OpenAI-Organization": "org-client"}
        )
    else:
        an_client(routed).messages.create(
            model="claude-x", max_tokens=10, messages=HI, extra_headers={"anthropic-version": version}
        )
    received = mock.requests[-1]
    assert (received.path, received.model, received.credential) == ("/v1/messages", "mock-claude", "sk-an-1")
    assert received.headers["x-api-key"] == "sk-an-1"
    assert received.headers["anthropic-version"] == version
    assert "authorization" not in received.headers
    assert not [h for h in received.headers if h.startswith("openai-")]
    assert_no_client_key(received.headers)


def test_openai_provider_gets_no_anthropic_headers(routed: RunningProxy, mock: MockServer) -> None:
    an_client(routed).messages.create(
        model="gpt-x", max_tokens=10, messages=HI, extra_headers={"anthropic-beta": "tools-2024-04-04"}
    )
    received = mock.requests[-1]
    assert received.credential in ("sk-oa-1", "sk-oa-2")
    assert not [h for h in received.headers if h.startswith("anthropic-")], received.headers
    assert "x-api-key" not in received.headers
    assert_no_client_key(received.headers)


# -- a recording provider for paths the mock does not serve (.scripted_provider) ----------


CHAT_COMPLETION = {
    "id": "chatcmpl-az",
    "object": "chat.completion",
    "created": 1,
    "model": "my-deployment",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "from azure"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


def test_azure_provider_gets_deployment_path_api_version_and_api_key(scripted: Scripted, make_proxy: Make) -> None:
    proxy = make_proxy(
        routing(
            [
                {
                    "name": "az",
                    "type": "azure",
                    "base_url": scripted.url,
                    "keys": ["az-key-1", "az-key-2"],
                    "api_version": "2024-06-01",
                    "models": {"gpt-az": "my-deployment", "gpt-az-odd": "dep/with space"},
                }
            ]
        )
    )
    scripted.replies.extend(Reply(body=json.dumps(CHAT_COMPLETION).encode()) for _ in range(3))
    reply = oa_client(proxy).chat.completions.create(model="gpt-az", messages=HI)
    assert reply.choices[0].message.content == "from azure"
    message = an_client(proxy).messages.create(model="gpt-az", max_tokens=5, messages=HI)  # translated
    assert message.content[0].text == "from azure"  # type: ignore[union-attr]
    oa_client(proxy).chat.completions.create(model="gpt-az-odd", messages=HI)
    first, second, third = scripted.requests
    assert first.target == "/openai/deployments/my-deployment/chat/completions?api-version=2024-06-01"
    assert third.target == "/openai/deployments/dep%2Fwith%20space/chat/completions?api-version=2024-06-01"
    assert [r.headers["api-key"] for r in scripted.requests] == ["az-key-1", "az-key-2", "az-key-1"]
    for seen in scripted.requests:
        assert "authorization" not in seen.headers and "x-api-key" not in seen.headers
        assert not [h for h in seen.headers if h.startswith("anthropic-")]
        assert_no_client_key(seen.headers)
    assert first.body["model"] == "my-deployment" and second.body["model"] == "my-deployment"
    assert second.body["max_tokens"] == 5 and second.body["messages"] == HI


def test_azure_provider_pointed_at_the_mock_gets_a_passed_through_404(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(
        routing(
            [{"name": "az", "type": "azure", "base_url": f"http://127.0.0.1:{mock.port}", "key": "k", "models": ["d"]}]
        )
    )
    with pytest.raises(openai.NotFoundError) as info:
        oa_client(proxy).chat.completions.create(model="d", messages=HI)
    assert "/openai/deployments/d/chat/completions" in info.value.message
    assert mock.requests == []  # the mock records only the paths it serves


# ---------------------------------------------------------------------------
# Model mapping, aliases and the provider hint
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "path", "provider_model"),
    [
        ("gpt-x", "/v1/chat/completions", "mock-gpt"),  # exact
        ("gpt-pre-2025", "/v1/chat/completions", "mock-gpt-prefixed"),  # prefix*
        ("keep-me-as-is", "/v1/chat/completions", "keep-me-as-is"),  # "" keeps the name
        ("gpt-", "/v1/chat/completions", "catch-all"),  # no prefix matches: "*"
        ("llama-3", "/v1/chat/completions", "catch-all"),  # "*"
        ("smart", "/v1/messages", "mock-claude-smart"),  # an alias wins over "*"
    ],
)
def test_model_mapping(mock: MockServer, make_proxy: Make, model: str, path: str, provider_model: str) -> None:
    providers = standard_providers(mock.port)
    providers[0]["models"]["*"] = "catch-all"  # on "oa": exact, then the longest prefix, then "*"
    proxy = make_proxy(routing(providers, ALIASES))
    reply = oa_client(proxy).chat.completions.create(model=model, messages=HI)
    assert reply.model == provider_model  # the mock echoes the name it was asked for
    assert (mock.requests[-1].path, mock.requests[-1].model) == (path, provider_model)


def test_without_a_wildcard_the_prefix_does_not_match_other_names(routed: RunningProxy, mock: MockServer) -> None:
    with pytest.raises(openai.NotFoundError):
        oa_client(routed).chat.completions.create(model="gpt-pr", messages=HI)
    assert mock.requests == []


@pytest.mark.parametrize(
    ("hint", "path", "model"),
    [("an", "/v1/messages", "mock-claude-both"), ("oa", "/v1/chat/completions", "mock-gpt-both")],
)
def test_hint_pins_the_provider_and_is_not_forwarded(
    routed: RunningProxy, mock: MockServer, hint: str, path: str, model: str
) -> None:
    client = oa_client(routed)
    for _ in range(12):
        client.chat.completions.create(model="both", messages=HI, extra_headers={"x-llmproxy-provider": hint})
    assert {(r.path, r.model) for r in mock.requests} == {(path, model)}
    assert all("x-llmproxy-provider" not in r.headers for r in mock.requests)


def test_without_hint_both_providers_serve_a_shared_model(routed: RunningProxy, mock: MockServer) -> None:
    client = oa_client(routed)
    for _ in range(40):
        client.chat.completions.create(model="both", messages=HI, extra_headers={"x-mock-tokens": "1"})
    assert {r.model for r in mock.requests} == {"mock-gpt-both", "mock-claude-both"}


def test_hint_naming_an_unknown_provider_is_400(routed: RunningProxy, mock: MockServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oa_client(routed).chat.completions.create(
            model="gpt-x", messages=HI, extra_headers={"x-llmproxy-provider": "bedrock"}
        )
    body = info.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("unknown_provider", "x-llmproxy-provider")
    assert "bedrock" in body["message"]
    assert mock.requests == []


def test_hint_naming_a_provider_that_does_not_serve_the_model_is_400(routed: RunningProxy, mock: MockServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        an_client(routed).messages.create(
            model="gpt-x", max_tokens=5, messages=HI, extra_headers={"x-llmproxy-provider": "an"}
        )
    body = info.value.body
    assert isinstance(body, dict)
    error = body.get("error", body)
    assert "'an'" in error["message"] and "gpt-x" in error["message"]
    assert mock.requests == []


# ---------------------------------------------------------------------------
# OpenAI streams: include_usage is injected upstream, its chunk removed downstream
# ---------------------------------------------------------------------------

_IDS = re.compile(rb'"(chatcmpl-|call_)[0-9a-f]{14}"')
_CREATED = re.compile(rb'"created":\d+')


def normalise_sse(raw: bytes) -> bytes:
    return _CREATED.sub(b'"created":0', _IDS.sub(rb'"\1ID"', raw))


def raw_stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    with httpx2.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return b"".join(response.iter_raw())


def split_usage_chunk(raw: bytes) -> tuple[bytes, list[bytes]]:
    """The stream without its usage-only chunks, and those chunks."""
    events = [e + b"\n\n" for e in raw.split(b"\n\n") if e]
    usage = [e for e in events if b'"choices":[]' in e]
    return b"".join(e for e in events if e not in usage), usage


@pytest.mark.parametrize("calls", [0, 2])
@pytest.mark.parametrize(
    ("options", "client_gets_usage"),
    [(None, False), ({"include_usage": False}, False), ({"include_usage": True}, True)],
)
def test_openai_stream_usage_injection_is_invisible(
    routed: RunningProxy, mock: MockServer, options: dict[str, bool] | None, client_gets_usage: bool, calls: int
) -> None:
    body: dict[str, Any] = {"model": "gpt-x", "messages": HI, "stream": True, "tools": OPENAI_TOOLS}
    if options is not None:
        body["stream_options"] = options
    headers = {"authorization": f"Bearer {OPENAI_CLIENT_KEY}", "x-mock-tool-calls": str(calls), "x-mock-tokens": "5"}
    through_proxy = raw_stream(routed.url + "/v1/chat/completions", body, headers)
    sent = mock.requests[-1].body
    assert sent is not None
    assert sent["stream_options"] == {"include_usage": True}
    # the same request straight to the provider
    straight = raw_stream(f"http://127.0.0.1:{mock.port}/v1/chat/completions", sent, headers)
    without_usage, usage_chunks = split_usage_chunk(straight)
    assert len(usage_chunks) == 1 and straight.endswith(b"data: [DONE]\n\n")
    expected = straight if client_gets_usage else without_usage
    assert normalise_sse(through_proxy) == normalise_sse(expected)


def test_non_streaming_request_gets_no_stream_options(routed: RunningProxy, mock: MockServer) -> None:
    oa_client(routed).chat.completions.create(model="gpt-x", messages=HI)
    assert mock.requests[-1].body is not None and "stream_options" not in mock.requests[-1].body


def test_openai_sdk_same_protocol_stream_usage(routed: RunningProxy) -> None:
    client = oa_client(routed)
    plain = read_chat_stream(client.chat.completions.create(model="gpt-x", messages=HI, stream=True))
    assert plain.usage_chunks == [] and plain.text == mock_text(8) + "sed do eiusmod tempor incididunt ut labore et "
    asked = read_chat_stream(
        client.chat.completions.create(model="gpt-x", messages=HI, stream=True, stream_options={"include_usage": True})
    )
    assert len(asked.usage_chunks) == 1 and asked.usage_chunks[0].usage.completion_tokens == 16


# ---------------------------------------------------------------------------
# Provider errors come back in the client's protocol, with the provider's status
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc_type", "openai_type"),
    [
        (400, openai.BadRequestError, "invalid_request_error"),
        (401, openai.AuthenticationError, "authentication_error"),
        (403, openai.PermissionDeniedError, "permission_error"),
        (429, openai.RateLimitError, "rate_limit_error"),
        (500, openai.InternalServerError, "server_error"),
        (529, openai.InternalServerError, "server_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_provider_error_becomes_openai_error(
    routed: RunningProxy,
    mock: MockServer,
    status: int,
    exc_type: type[openai.APIStatusError],
    openai_type: str,
    stream: bool,
) -> None:
    headers = {"x-mock-status": str(status), "x-mock-retry-after": "7"}
    with pytest.raises(exc_type) as info:
        reply = oa_client(routed).chat.completions.create(
            model="claude-x", messages=HI, stream=stream, extra_headers=headers
        )
        if stream:
            list(reply)  # type: ignore[arg-type]
    assert mock.requests[-1].path == "/v1/messages"
    err = info.value
    assert err.status_code == status
    body = err.body
    assert isinstance(body, dict)
    assert body["type"] == openai_type
    assert body["message"] == f"mock: injected {status} (x-mock-status)"
    assert set(body) == {"message", "type", "param", "code"}
    assert err.response.headers.get("retry-after") == "7"
    assert err.response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("status", "exc_type", "anthropic_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "api_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_openai_provider_error_becomes_anthropic_error(
    routed: RunningProxy,
    mock: MockServer,
    status: int,
    exc_type: type[anthropic.APIStatusError],
    anthropic_type: str,
    stream: bool,
) -> None:
    client = an_client(routed)
    headers = {"x-mock-status": str(status)}
    with pytest.raises(exc_type) as info:
        if stream:
            with client.messages.stream(model="gpt-x", max_tokens=5, messages=HI, extra_headers=headers) as s:
                s.get_final_message()
        else:
            client.messages.create(model="gpt-x", max_tokens=5, messages=HI, extra_headers=headers)
    assert mock.requests[-1].path == "/v1/chat/completions"
    assert info.value.status_code == status
    body: Any = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == anthropic_type
    if status in (401, 403):  # the provider refused the proxy's key: the proxy's own words, never the provider's
        assert "refused the credential the proxy holds" in body["error"]["message"]
    else:
        assert body["error"]["message"] == f"mock: injected {status} (x-mock-status)"


def test_same_protocol_errors_pass_through_untouched(routed: RunningProxy, mock: MockServer) -> None:
    headers = {"x-mock-status": "429"}
    with pytest.raises(anthropic.RateLimitError) as a_info:
        an_client(routed).messages.create(model="claude-x", max_tokens=5, messages=HI, extra_headers=headers)
    assert a_info.value.body == direct(mock, "/v1/messages", {"model": "m"}, headers).json()
    with pytest.raises(openai.RateLimitError) as o_info:
        oa_client(routed).chat.completions.create(model="gpt-x", messages=HI, extra_headers=headers)
    assert {"error": o_info.value.body} == direct(mock, "/v1/chat/completions", {"model": "m"}, headers).json()


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_connect_failure_is_an_anthropic_error_for_anthropic_clients(make_proxy: Make, kind: str) -> None:
    port = dead_port()
    base = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
    proxy = make_proxy(routing([{"name": "down", "type": kind, "base_url": base, "key": "k", "models": ["m"]}]))
    with pytest.raises(anthropic.APIStatusError) as info:
        an_client(proxy).messages.create(model="m", max_tokens=5, messages=HI)
    assert info.value.status_code == 502
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error" and body["error"]["message"]
    with pytest.raises(openai.InternalServerError) as o_info:
        oa_client(proxy).chat.completions.create(model="m", messages=HI)
    assert o_info.value.status_code == 502
    assert o_info.value.body["code"] == "upstream_connect_error"  # type: ignore[index]


def test_reset_by_anthropic_provider_is_an_anthropic_error(routed: RunningProxy) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        an_client(routed).messages.create(
            model="claude-x", max_tokens=5, messages=HI, extra_headers={"x-mock-fault": "reset"}
        )
    assert info.value.status_code == 502
    assert info.value.body["type"] == "error"  # type: ignore[index]


# ---------------------------------------------------------------------------
# Bad input is answered locally, and nothing reaches a provider
# ---------------------------------------------------------------------------


def post(proxy: RunningProxy, path: str, content: bytes) -> httpx2.Response:
    return httpx2.post(
        proxy.url + path,
        content=content,
        headers={"content-type": "application/json", "authorization": f"Bearer {OPENAI_CLIENT_KEY}"},
        timeout=10,
    )


def error_of(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error


def anthropic_error_of(response: httpx2.Response) -> dict[str, Any]:
    """The inner error of Anthropic's envelope, which is all an Anthropic client is sent."""
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"type", "message"}, error
    return error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_unknown_model_is_404_model_not_found(routed: RunningProxy, mock: MockServer, path: str) -> None:
    body = json.dumps({"model": "no-such-model-7", "max_tokens": 5, "messages": HI}).encode()
    response = post(routed, path, body)
    assert response.status_code == 404
    if path == "/v1/messages":
        error = anthropic_error_of(response)
        assert error["type"] == "not_found_error"
    else:
        error = error_of(response)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "no-such-model-7" in error["message"]
    for key in PROVIDER_KEYS:
        assert key not in response.text
    assert mock.requests == []


def test_a_provider_that_needs_no_key_is_sent_none(routed: RunningProxy, mock: MockServer) -> None:
    response = post(routed, "/v1/chat/completions", json.dumps({"model": "orphan", "messages": HI}).encode())
    assert response.status_code == 200
    received = mock.requests[-1]
    assert "authorization" not in received.headers
    assert received.body["model"] == "orphan"  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "content", "code", "param"),
    [
        ("/v1/chat/completions", b"{not json", "invalid_json", None),
        ("/v1/messages", b"model=gpt-x", "invalid_json", None),
        ("/v1/chat/completions", b"[1, 2]", "invalid_request", None),
        ("/v1/chat/completions", b'{"messages": []}', "missing_model", "model"),
        ("/v1/chat/completions", b'{"model": 42, "messages": []}', "missing_model", "model"),
        ("/v1/messages", b'{"model": "", "max_tokens": 5, "messages": []}', "missing_model", "model"),
        ("/v1/chat/completions", b'{"model": "gpt-x"}', "missing_messages", "messages"),
        ("/v1/messages", b'{"model": "claude-x", "max_tokens": 5}', "missing_messages", "messages"),
        ("/v1/chat/completions", b'{"model": "gpt-x", "messages": "hi"}', "missing_messages", "messages"),
    ],
)
def test_bad_request_bodies_are_400(
    routed: RunningProxy, mock: MockServer, path: str, content: bytes, code: str, param: str | None
) -> None:
    response = post(routed, path, content)
    assert response.status_code == 400, response.text
    if path == "/v1/messages":  # the proxy's own errors are Anthropic-shaped for Anthropic clients
        assert anthropic_error_of(response)["type"] == "invalid_request_error"
    else:
        error = error_of(response)
        assert (error["code"], error["param"]) == (code, param)
    assert mock.requests == []


def test_embeddings(routed: RunningProxy, mock: MockServer) -> None:
    client = oa_client(routed)
    result = client.embeddings.create(model="emb", input=["a", "b"])
    assert len(result.data) == 2 and result.model == "mock-embedding"
    assert (mock.requests[-1].path, mock.requests[-1].credential) == ("/v1/embeddings", "sk-oa-1")
    # an Anthropic-only model cannot embed: served, but not for this API (and the answer says so)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="claude-x", input="a")
    assert info.value.body["code"] == "model_not_supported_for_api"  # type: ignore[index]
    assert "claude-x" in info.value.message and "embeddings" in info.value.message
    assert len(mock.requests) == 1


def test_models_are_listed_locally(routed: RunningProxy, mock: MockServer) -> None:
    models = list(oa_client(routed).models.list())
    owners = {m.id: m.owned_by for m in models}
    assert owners == {
        "gpt-x": "oa",
        "both": "oa",
        "emb": "oa",
        "claude-x": "an",
        "orphan": "keyless",
        "smart": "llmproxy",
    }
    assert all(m.object == "model" for m in models)
    assert mock.requests == []


# ---------------------------------------------------------------------------
# Weighted split
# ---------------------------------------------------------------------------


async def post_many(port: int, request: bytes, total: int, connections: int) -> Counter[int]:
    """Send ``request`` ``total`` times over ``connections`` keep-alive sockets; count statuses."""
    statuses: Counter[int] = Counter()

    async def one_connection(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(n):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                statuses[int(head.split(b" ", 2)[1])] += 1
                # relayed untouched: the provider's Content-Length, not re-chunked
                length = next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
                await reader.readexactly(int(length.split(b":")[1]))
        finally:
            writer.close()

    share, rest = divmod(total, connections)
    await asyncio.gather(*(one_connection(share + (i < rest)) for i in range(connections)))
    return statuses


def test_weighted_alias_split(mock: MockServer, make_proxy: Make, loop_thread: LoopThread) -> None:
    base = f"http://127.0.0.1:{mock.port}/v1"
    proxy = make_proxy(
        routing(
            [
                {"name": "a", "type": "openai", "base_url": base, "key": "sk-split-a", "models": ["x", "model-a"]},
                {"name": "b", "type": "openai", "base_url": base, "key": "sk-split-b", "models": ["y", "model-b"]},
            ],
            {
                "split": [
                    {"provider": "a", "model": "model-a", "weight": 3},
                    {"provider": "b", "model": "model-b", "weight": 1},
                ]
            },
        )
    )
    # a seeded table, so the test cannot flake on an unlucky draw
    (factory,) = proxy.runtime.chain.factories
    assert isinstance(factory, RoutingFactory)
    old = factory.table
    factory.table = RoutingTable(list(old.providers.values()), old.aliases, rng=random.Random(2024))
    body = json.dumps({"model": "split", "messages": [{"role": "user", "content": "x"}]}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: llmproxy\r\ncontent-type: application/json\r\n"
        b"x-mock-tokens: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    total = 2000
    statuses = loop_thread.call(post_many(proxy.port, request, total, connections=4), timeout=60)
    assert statuses == Counter({200: total})
    by_key = Counter(r.credential for r in mock.requests)
    by_model = Counter(r.model for r in mock.requests)
    assert sum(by_key.values()) == total
    assert by_model == Counter({"model-a": by_key["sk-split-a"], "model-b": by_key["sk-split-b"]})
    assert abs(by_key["sk-split-a"] / total - 0.75) <= 0.03, by_key
    assert abs(by_key["sk-split-b"] / total - 0.25) <= 0.03, by_key
