"""Translation fidelity over real sockets: parallel tool calls streamed to an Anthropic client
arrive fragment by fragment for every call; fields Anthropic cannot take are named 400s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from llmproxy.mock import MockServer
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]


def _config(port: int) -> dict[str, Any]:
    providers = [
        {
            "name": "oa",
            "type": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "keys": ["sk-oa"],
            "models": {"gpt-x": "mock-gpt"},
        },
        {
            "name": "an",
            "type": "anthropic",
            "base_url": f"http://127.0.0.1:{port}",
            "keys": ["sk-an"],
            "models": {"claude-x": "mock-claude"},
        },
    ]
    return {"filters": [{"name": "routing", "config": {"providers": providers}}]}


def test_parallel_tool_calls_stream_incrementally_to_an_anthropic_client(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(mock.port))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    tools: list[Any] = [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]
    fragments: dict[int, list[str]] = {}
    with client.messages.stream(
        model="gpt-x",
        max_tokens=100,
        messages=[{"role": "user", "content": "go"}],
        tools=tools,
        extra_headers={"x-mock-tool-calls": "2"},
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments.setdefault(event.index, []).append(event.delta.partial_json)
        final = stream.get_final_message()
    assert sorted(fragments) == [0, 1]
    assert all(len(parts) == 3 for parts in fragments.values())  # the mock's three fragments, for both calls
    assert [block.input for block in final.content if block.type == "tool_use"] == [
        {"q": "call 0", "n": 0},
        {"q": "call 1", "n": 1},
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"reasoning_effort": "low", "max_tokens": 500}, "reasoning_effort"),
    ],
)
def test_what_anthropic_cannot_take_is_a_named_400(
    mock: MockServer, make_proxy: Make, extra: dict[str, Any], param: str
) -> None:
    proxy = make_proxy(_config(mock.port))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "hi"}], **extra)
    assert err.value.param == param
    assert not [r for r in mock.requests if r.path == "/v1/messages"]  # refused before any provider call


def test_reasoning_effort_fits_the_budget_under_max_tokens(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(mock.port))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    client.chat.completions.create(
        model="claude-x", messages=[{"role": "user", "content": "hi"}], reasoning_effort="high", max_tokens=3000
    )
    sent = mock.requests[-1].body
    assert sent is not None
    assert sent["max_tokens"] == 3000 and sent["thinking"] == {"type": "enabled", "budget_tokens": 2999}


def test_models_list_in_anthropic_shape_for_anthropic_clients(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(mock.port))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    page = client.models.list()
    assert [(m.id, m.type) for m in page.data] == [("gpt-x", "model"), ("claude-x", "model")]
    assert page.has_more is False and page.first_id == "gpt-x" and page.last_id == "claude-x"
    oa = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    assert [m.id for m in oa.models.list()] == ["gpt-x", "claude-x"]


def test_a_model_served_but_not_for_this_api_says_so(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(mock.port))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="claude-x", input="hi")
    assert err.value.code == "model_not_supported_for_api" and "not for the embeddings API" in str(err.value)
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nope", input="hi")
    assert missing.value.code == "model_not_found"


def _chat_provider(scripted: Any) -> dict[str, Any]:
    provider = {"name": "ds", "type": "openai", "base_url": scripted.url + "/v1", "keys": ["k"], "models": ["ds"]}
    return {"filters": [{"name": "routing", "config": {"providers": [provider]}}]}


def test_reasoning_content_becomes_thinking_for_anthropic_clients(scripted: Any, make_proxy: Make) -> None:
    """DeepSeek-style ``reasoning_content``, JSON and streamed, reaches an Anthropic client as a thinking block."""
    import orjson

    from tests.filters.scripted_provider import Reply
    from tests.filters.test_routing_usage import _sse_reply

    message = {"role": "assistant", "content": "42", "reasoning_content": "6 times 7"}
    whole = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }
    base = {"id": "c1", "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[None, dict[str, Any]]:
        return None, {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    usage = {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    scripted.replies.append(Reply(200, orjson.dumps(whole)))
    scripted.replies.append(
        _sse_reply(
            [
                chunk({"role": "assistant", "content": ""}),
                chunk({"reasoning_content": "6 times "}),
                chunk({"reasoning_content": "7"}),
                chunk({"content": "42"}),
                chunk({}, "stop"),
                (None, usage),
                (None, "[DONE]"),
            ]
        )
    )
    proxy = make_proxy(_chat_provider(scripted))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    ask: Any = {"model": "ds", "max_tokens": 50, "messages": [{"role": "user", "content": "6*7?"}]}
    reply = client.messages.create(**ask)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in reply.content] == [
        ("thinking", "6 times 7"),
        ("text", "42"),
    ]
    with client.messages.stream(**ask) as stream:
        kinds = [(e.type, getattr(e, "index", None)) for e in stream]
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", "6 times 7"),
        ("text", "42"),
    ]
    assert ("content_block_stop", 0) in kinds and kinds.index(("content_block_stop", 0)) < kinds.index(
        ("content_block_start", 1)
    )
    # sent back, the thinking block is not given to the provider (DeepSeek refuses reasoning_content in input)
    client.messages.create(
        model="ds",
        max_tokens=50,
        messages=[
            {"role": "user", "content": "6*7?"},
            {"role": "assistant", "content": [b.model_dump() for b in final.content]},
            {"role": "user", "content": "and 6*8?"},
        ],
    )
    sent = scripted.requests[-1].body
    assert sent["messages"][1] == {"role": "assistant", "content": "42"}
