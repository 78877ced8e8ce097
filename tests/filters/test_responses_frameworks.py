"""Real clients of the Responses API against bridged models: the OpenAI Agents SDK's tool loop
(``Runner`` with ``OpenAIResponsesModel``, streamed and not) and LangChain's
``ChatOpenAI(use_responses_api=True)`` (invoke, stream, tools), over a proxy whose model is served
by an Anthropic-type provider (the mock, or a scripted one when the test needs a tool call
followed by a final answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from llmproxy.mock import MockServer
from tests.filters.scripted_provider import Reply, Scripted
from tests.filters.test_routing_usage import _sse_reply
from tests.support import RunningProxy

agents = pytest.importorskip("agents")
langchain_openai = pytest.importorskip("langchain_openai")

Make = Callable[[dict[str, Any]], RunningProxy]


def _routing(provider: dict[str, Any]) -> dict[str, Any]:
    return {"filters": [{"name": "routing", "config": {"providers": [provider]}}]}


def _anthropic(base_url: str) -> dict[str, Any]:
    return {"name": "an", "type": "anthropic", "base_url": base_url, "keys": ["sk-an"], "models": ["claude"]}


def _message(content: list[dict[str, Any]], stop: str) -> Reply:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    return Reply(200, orjson.dumps(body))


def _tool_then_answer(scripted: Scripted) -> None:
    scripted.replies.append(
        _message([{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}], "tool_use")
    )
    scripted.replies.append(_message([{"type": "text", "text": "It is sunny in Paris."}], "end_turn"))


def _streamed(content: list[dict[str, Any]], stop: str) -> Reply:
    """The Anthropic event stream of a message with ``content`` (text or tool_use blocks)."""
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "usage": {}}
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    for i, block in enumerate(content):
        if block["type"] == "text":
            opened, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
        else:
            opened = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": opened}))
        events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    usage = {"input_tokens": 10, "output_tokens": 5}
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    return _sse_reply(events)


TOOL_USE = [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]
ANSWER = [{"type": "text", "text": "It is sunny in Paris."}]


@pytest.mark.parametrize("stream", [False, True])
def test_agents_sdk_tool_loop(scripted: Scripted, make_proxy: Make, stream: bool) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would upload traces to OpenAI otherwise
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        calls.append(city)
        return "sunny"

    make = _streamed if stream else _message
    scripted.replies.extend([make(TOOL_USE, "tool_use"), make(ANSWER, "end_turn")])
    proxy = make_proxy(_routing(_anthropic(scripted.url)))

    async def run() -> Any:
        client = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0)
        agent = Agent(
            name="weather",
            instructions="Answer with the weather.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model="claude", openai_client=client),
        )
        if stream:
            result = Runner.run_streamed(agent, "Weather in Paris?")
            kinds = [event.type async for event in result.stream_events()]
            assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
        else:
            result = await Runner.run(agent, "Weather in Paris?")
        await client.close()
        return result

    result = asyncio.run(run())
    assert calls == ["Paris"]
    assert result.final_output == "It is sunny in Paris."
    first, follow = (r.body for r in scripted.requests)
    assert first["system"] == "Answer with the weather." and first.get("stream", False) is stream
    assert [b["type"] for b in follow["messages"][1]["content"]] == ["tool_use"]
    assert follow["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}


def test_langchain_use_responses_api(mock: MockServer, make_proxy: Make) -> None:
    from langchain_openai import ChatOpenAI

    proxy = make_proxy(_routing(_anthropic(f"http://127.0.0.1:{mock.port}")))
    llm = ChatOpenAI(
        model="claude",
        base_url=proxy.url + "/v1",
        api_key="sk-client",  # type: ignore[arg-type]
        use_responses_api=True,
        max_retries=0,
        default_headers={"x-mock-tokens": "3"},
    )
    reply = llm.invoke("hello")
    assert reply.text == "lorem ipsum dolor "
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 3
    chunks = list(llm.stream("hello"))
    assert "".join(c.text for c in chunks) == "lorem ipsum dolor "
    tools = llm.bind_tools(
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    )
    called = tools.invoke("go", extra_headers={"x-mock-tool-calls": "1"})
    assert [c["name"] for c in called.tool_calls] == ["f"]
