"""Prompt caching across the translations, over real sockets with the official SDKs.

* ``cache_control`` marks reach an Anthropic provider untouched from an Anthropic client, and
  from an OpenAI Chat or Responses client at most 4 of them (the last 4: Anthropic refuses a
  fifth, and the latest breakpoints cover the most);
* cache token counts reach the client's usage in its own protocol:
  ``prompt_tokens_details.cached_tokens`` (Chat), ``cache_read_input_tokens`` (Messages),
  ``input_tokens_details.cached_tokens`` (Responses), JSON and streamed.

A scripted provider answers (the golden streams of ``tests/data/translate``) and records what
it was sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest

from llmproxy.filters.translate import chat_request_to_messages, responses_request_to_chat
from tests.filters.scripted_provider import Reply, Scripted
from tests.filters.test_translate_golden import DATA, load
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

EPHEMERAL = {"type": "ephemeral"}


def _config(scripted: Scripted) -> dict[str, Any]:
    providers = [
        {"name": "oa", "type": "openai", "base_url": scripted.url + "/v1", "keys": ["k"], "models": ["gpt-x"]},
        {
            "name": "chatonly",
            "type": "openai",
            "native_responses": False,
            "base_url": scripted.url + "/v1",
            "keys": ["k"],
            "models": ["chat-x"],
        },
        {"name": "an", "type": "anthropic", "base_url": scripted.url, "keys": ["k"], "models": ["claude-x"]},
    ]
    return {"filters": [{"name": "routing", "config": {"providers": providers}}]}


def _golden_stream(name: str) -> Reply:
    return Reply(200, [raw.encode() for raw in load(DATA / f"{name}.json")["input"]], "text/event-stream")


ANTHROPIC_STREAM = "c2m_stream_thinking_cache_parallel"  # cache reads 2048, writes 300, input 12
CHAT_STREAM = "m2c_stream_reasoning_cache_parallel"  # prompt 2360, cached 2048
ANTHROPIC_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 2048,
        "output_tokens": 5,
    },
}
CHAT_COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-x",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 2360,
        "completion_tokens": 5,
        "total_tokens": 2365,
        "prompt_tokens_details": {"cached_tokens": 2048},
    },
}


@pytest.fixture
def proxy(scripted: Scripted, make_proxy: Make) -> RunningProxy:
    return make_proxy(_config(scripted))


def _oa(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


def _an(proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)


# -- cache token counts in the client's protocol --------------------------------------------


def test_openai_chat_client_of_anthropic_sees_cached_tokens(proxy: RunningProxy, scripted: Scripted) -> None:
    scripted.replies.append(Reply(200, orjson.dumps(ANTHROPIC_MESSAGE)))
    scripted.replies.append(_golden_stream(ANTHROPIC_STREAM))
    client = _oa(proxy)
    reply = client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "hi"}])
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert (reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens) == (2360, 2048)
    chunks = list(
        client.chat.completions.create(
            model="claude-x",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (2360, 2048)


def test_anthropic_client_of_openai_sees_cache_reads(proxy: RunningProxy, scripted: Scripted) -> None:
    scripted.replies.append(Reply(200, orjson.dumps(CHAT_COMPLETION)))
    scripted.replies.append(_golden_stream(CHAT_STREAM))
    client = _an(proxy)
    ask: Any = {"model": "gpt-x", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    reply = client.messages.create(**ask)
    assert (reply.usage.input_tokens, reply.usage.cache_read_input_tokens) == (312, 2048)
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (312, 2048)


@pytest.mark.parametrize(
    ("model", "json_reply", "stream_reply"),
    [
        ("claude-x", ANTHROPIC_MESSAGE, ANTHROPIC_STREAM),
        ("chat-x", CHAT_COMPLETION, CHAT_STREAM),
    ],
)
def test_responses_client_sees_cached_tokens(
    proxy: RunningProxy, scripted: Scripted, model: str, json_reply: dict[str, Any], stream_reply: str
) -> None:
    scripted.replies.append(Reply(200, orjson.dumps(json_reply)))
    scripted.replies.append(_golden_stream(stream_reply))
    client = _oa(proxy)
    reply = client.responses.create(model=model, input="hi", store=False)
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.input_tokens_details.cached_tokens) == (2360, 2048)
    completed = [e for e in client.responses.create(model=model, input="hi", store=False, stream=True)]
    assert completed[-1].type == "response.completed"
    usage = completed[-1].response.usage
    assert usage is not None and (usage.input_tokens, usage.input_tokens_details.cached_tokens) == (2360, 2048)


# -- cache_control: never past Anthropic's 4 breakpoints --------------------------------------


def _marks(body: dict[str, Any]) -> list[str]:
    """The text of every block marked ``cache_control`` in a Messages request, in prompt order."""
    out: list[str] = []

    def scan(blocks: object) -> None:
        if isinstance(blocks, list):
            for block in blocks:
                if "cache_control" in block:
                    out.append(block.get("text") or block.get("type"))
                if block.get("type") == "tool_result":
                    scan(block.get("content"))

    scan(body.get("system"))
    for turn in body["messages"]:
        scan(turn["content"])
    return out


def _part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "cache_control": EPHEMERAL}


CHAT_MARKED: list[Any] = [
    {"role": "system", "content": [_part("s1"), _part("s2")]},
    {"role": "user", "content": [_part("u1"), {"type": "text", "text": "plain"}]},
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": [_part("u2"), _part("u3")]},
    {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": [_part("r1")]},
]


def test_chat_to_messages_keeps_the_last_four_marks() -> None:
    out = chat_request_to_messages({"messages": CHAT_MARKED}, model="claude")
    assert _marks(out) == ["u1", "u2", "u3", "r1"]  # six in prompt order (system first), the last four kept
    # the blocks stay, only the earliest marks go
    assert [b["text"] for b in out["system"]] == ["s1", "s2"]
    assert all("cache_control" not in b for b in out["system"])


def test_four_marks_or_fewer_are_untouched() -> None:
    messages = [{"role": "system", "content": [_part("s")]}, {"role": "user", "content": [_part("a"), _part("b")]}]
    out = chat_request_to_messages({"messages": messages}, model="claude")
    assert _marks(out) == ["s", "a", "b"]
    assert out["system"] == [{"type": "text", "text": "s", "cache_control": EPHEMERAL}]


def test_responses_to_messages_keeps_the_last_four_marks() -> None:
    parts = [{"type": "input_text", "text": f"p{i}", "cache_control": EPHEMERAL} for i in range(6)]
    chat = responses_request_to_chat({"model": "m", "input": [{"role": "user", "content": parts}]}, model="claude")
    out = chat_request_to_messages(chat, model="claude")
    assert _marks(out) == ["p2", "p3", "p4", "p5"]


def test_over_the_wire_only_four_marks_reach_anthropic(proxy: RunningProxy, scripted: Scripted) -> None:
    scripted.replies.extend([Reply(200, orjson.dumps(ANTHROPIC_MESSAGE)) for _ in range(3)])
    messages: Any = [{"role": "user", "content": [_part(f"u{i}") for i in range(6)]}]
    _oa(proxy).chat.completions.create(model="claude-x", messages=messages)
    assert _marks(scripted.requests[-1].body) == ["u2", "u3", "u4", "u5"]
    parts: Any = [{"type": "input_text", "text": f"p{i}", "cache_control": EPHEMERAL} for i in range(5)]
    _oa(proxy).responses.create(model="claude-x", input=[{"role": "user", "content": parts}], store=False)
    assert _marks(scripted.requests[-1].body) == ["p1", "p2", "p3", "p4"]
    # an Anthropic client's request to an Anthropic provider goes as it is, marks and all
    blocks: Any = [_part(f"a{i}") for i in range(5)]
    _an(proxy).messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": blocks}])
    assert _marks(scripted.requests[-1].body) == ["a0", "a1", "a2", "a3", "a4"]
