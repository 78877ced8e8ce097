"""Reasoning survives the bridge: Anthropic thinking (with its signature) reaches an openai SDK
Responses client as a reasoning item (summary text + opaque ``encrypted_content``), JSON and
streamed, and a tool-loop follow-up replays the thinking block, signature included, before the
``tool_use`` it came with (Anthropic refuses the turn otherwise). A scripted Anthropic provider
answers; the requests it received are checked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from tests.filters.scripted_provider import Reply, Scripted
from tests.filters.test_routing_usage import _sse_reply
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

SIGNATURE = "EqQBCgIYAhIMsig"
TOOLS: list[Any] = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
USAGE = {"input_tokens": 20, "output_tokens": 9}


def _message() -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [
            {"type": "thinking", "thinking": "I should look it up.", "signature": SIGNATURE},
            {"type": "redacted_thinking", "data": "REDACTED=="},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": USAGE,
    }


def _events() -> Reply:
    """The same message as an Anthropic stream, sent one byte per chunk (the proxy frames it again)."""
    reply = _stream_events()
    reply.piece = 1
    return reply


def _stream_events() -> Reply:
    start = {**_message(), "content": [], "stop_reason": None, "usage": {"input_tokens": 20, "output_tokens": 1}}
    thinking = {"type": "thinking", "thinking": "", "signature": ""}
    tool = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
    return _sse_reply(
        [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": thinking}),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "I should "},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "look it up."},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "signature_delta", "signature": SIGNATURE},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 1,
                    "content_block": {"type": "redacted_thinking", "data": "REDACTED=="},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 1}),
            ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": tool}),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": '{"q": "x"}'},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 2}),
            (
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": USAGE},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    )


def _final_text() -> Reply:
    body = {**_message(), "content": [{"type": "text", "text": "done"}], "stop_reason": "end_turn"}
    return Reply(200, orjson.dumps(body))


@pytest.fixture
def client(scripted: Scripted, make_proxy: Make) -> openai.OpenAI:
    provider = {"name": "an", "type": "anthropic", "base_url": scripted.url, "keys": ["sk-an"], "models": ["claude"]}
    proxy = make_proxy({"filters": [{"name": "routing", "config": {"providers": [provider]}}]})
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


def _assistant_turn(scripted: Scripted) -> list[dict[str, Any]]:
    body = scripted.requests[-1].body
    turns = [t for t in body["messages"] if t["role"] == "assistant"]
    assert len(turns) == 1
    content: list[dict[str, Any]] = turns[0]["content"]
    return content


EXPECTED_REPLAY = [
    {"type": "thinking", "thinking": "I should look it up.", "signature": SIGNATURE},
    {"type": "redacted_thinking", "data": "REDACTED=="},
    {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_reaches_the_client_and_is_replayed(client: openai.OpenAI, scripted: Scripted, stream: bool) -> None:
    scripted.replies.append(_events() if stream else Reply(200, orjson.dumps(_message())))
    scripted.replies.append(_final_text())
    if stream:
        with client.responses.stream(model="claude", input="find x", tools=TOOLS, reasoning={"effort": "low"}) as s:
            kinds = [e.type for e in s]
            first = s.get_final_response()
        assert kinds.count("response.reasoning_summary_text.delta") == 2
        assert "response.reasoning_summary_part.done" in kinds
    else:
        first = client.responses.create(model="claude", input="find x", tools=TOOLS, reasoning={"effort": "low"})
    reasoning = [item for item in first.output if item.type == "reasoning"]
    assert len(reasoning) == 1
    assert [p.text for p in reasoning[0].summary] == ["I should look it up."]
    assert reasoning[0].encrypted_content  # opaque: the thinking blocks, signatures included
    call = next(item for item in first.output if item.type == "function_call")
    # the Agents-style loop: every output item goes back, then the tool's output
    follow: list[Any] = [{"role": "user", "content": "find x"}]
    follow += [item.model_dump(exclude_none=True) for item in first.output]
    follow.append({"type": "function_call_output", "call_id": call.call_id, "output": "42"})
    second = client.responses.create(model="claude", input=follow, tools=TOOLS, reasoning={"effort": "low"})
    assert second.output_text == "done"
    assert _assistant_turn(scripted) == EXPECTED_REPLAY


def test_previous_response_id_replays_thinking(client: openai.OpenAI, scripted: Scripted) -> None:
    scripted.replies.append(Reply(200, orjson.dumps(_message())))
    scripted.replies.append(_final_text())
    first = client.responses.create(model="claude", input="find x", tools=TOOLS, reasoning={"effort": "low"})
    call = next(item for item in first.output if item.type == "function_call")
    client.responses.create(
        model="claude",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
        tools=TOOLS,
    )
    assert _assistant_turn(scripted) == EXPECTED_REPLAY


def test_chat_client_gets_reasoning_content_and_thinking_blocks(client: openai.OpenAI, scripted: Scripted) -> None:
    scripted.replies.append(Reply(200, orjson.dumps(_message())))
    scripted.replies.append(_final_text())
    reply = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "find x"}],
        tools=[{"type": "function", "function": {"name": "lookup"}}],
    )
    message = reply.choices[0].message.model_dump()
    assert message["reasoning_content"] == "I should look it up."
    assert message["thinking_blocks"] == EXPECTED_REPLAY[:2]
    # sent back as is (the LiteLLM convention), the blocks are replayed
    client.chat.completions.create(
        model="claude",
        messages=[
            {"role": "user", "content": "find x"},
            {**message, "content": None},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "42"},
        ],
    )
    assert _assistant_turn(scripted) == EXPECTED_REPLAY


def test_cache_tokens_and_cache_control_cross_the_bridge(client: openai.OpenAI, scripted: Scripted) -> None:
    usage = {"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20, "output_tokens": 3}
    body = {**_message(), "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "usage": usage}
    scripted.replies.append(Reply(200, orjson.dumps(body)))
    cached = {"type": "ephemeral"}
    reply = client.responses.create(
        model="claude",
        input=[
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "long document", "cache_control": cached}],  # type: ignore[typeddict-unknown-key]
            }
        ],
    )
    assert reply.usage is not None
    assert reply.usage.input_tokens == 125 and reply.usage.input_tokens_details.cached_tokens == 100
    sent = scripted.requests[-1].body
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "long document", "cache_control": cached}]
