"""Tests for :mod:`proxy.mock`, driven by the official SDKs and raw sockets.

The SDK tests prove the mock is wire-compatible with real clients; the raw
socket tests cover HTTP framing (pipelining, chunked bodies, errors) that the
SDKs never exercise.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from llmproxy.mock import (
    MAX_LOG,
    KeyBehaviour,
    MockConfig,
    MockServer,
    ReceivedRequest,
    mock_config_from_dict,
    start_mock,
)

WORDS = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
]
MESSAGES: list[Any] = [{"role": "user", "content": "hello world, how are you?"}]  # 25 chars -> 6 prompt tokens
OPENAI_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
    for name in ("search", "lookup")
]
ANTHROPIC_TOOLS: list[Any] = [
    {"name": name, "input_schema": {"type": "object", "properties": {}}} for name in ("search", "lookup")
]

MakeMock = Callable[..., Awaitable[MockServer]]


def text(n: int) -> str:
    return "".join(f"{WORDS[i % len(WORDS)]} " for i in range(n))


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
async def make_mock() -> AsyncIterator[MakeMock]:
    servers: list[MockServer] = []

    async def make(**config: Any) -> MockServer:
        server = await start_mock(port=0, config=MockConfig(**config))
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def mock(make_mock: MakeMock) -> MockServer:
    return await make_mock()


def openai_client(server: MockServer, key: str = "sk-test", timeout: float = 5.0) -> openai.AsyncOpenAI:
    """An SDK client; ``timeout`` bounds reads (stall tests), connecting gets 5 s on a loaded machine."""
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1",
        api_key=key,
        max_retries=0,
        timeout=openai.Timeout(timeout, connect=5.0),
    )


def anthropic_client(server: MockServer, key: str = "sk-ant-test") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{server.port}", api_key=key, max_retries=0, timeout=5.0)


@pytest.fixture
async def oai(mock: MockServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(mock) as client:
        yield client


@pytest.fixture
async def claude(mock: MockServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic_client(mock) as client:
        yield client


# -- raw HTTP helpers -----------------------------------------------------------


def http_request(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    lines = [f"{method} {path} HTTP/1.1", "host: mock"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if data or method == "POST":
        lines.append(f"content-length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def chat_request(body: Any, headers: dict[str, str] | None = None) -> bytes:
    return http_request("POST", "/v1/chat/completions", body, headers)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one response: Content-Length, chunked or close-delimited."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if status == 100:
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, headers, body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return status, headers, await reader.read()


async def exchange(
    server: MockServer | int, data: bytes, responses: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data`` on a fresh connection to a mock (or a port); read ``responses`` replies."""
    port = server if isinstance(server, int) else server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return [await asyncio.wait_for(read_response(reader), 5) for _ in range(responses)]
    finally:
        writer.close()


# -- OpenAI chat completions ----------------------------------------------------------


async def test_chat_completion_is_real_shaped(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text(16)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (6, 16, 22)


async def test_max_tokens_below_reply_length_finishes_with_length(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    assert reply.choices[0].message.content == text(3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream_matches_openai_shape(oai: openai.AsyncOpenAI, include_usage: bool) -> None:
    options: Any = {"include_usage": True} if include_usage else openai.omit
    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options=options, extra_headers={"x-mock-tokens": "5"}
    )
    chunks = [chunk async for chunk in stream]
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].model == "gpt-4o"
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    body = chunks[1:6]
    assert "".join(c.choices[0].delta.content or "" for c in body) == text(5)
    finish = chunks[6]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    if include_usage:
        assert len(chunks) == 8
        assert chunks[7].choices == []
        assert chunks[7].usage is not None and chunks[7].usage.completion_tokens == 5
    else:
        assert len(chunks) == 7
        assert all(c.usage is None for c in chunks)


async def test_stream_events_are_paced_by_ttft_and_itl(oai: openai.AsyncOpenAI) -> None:
    headers = {"x-mock-tokens": "4", "x-mock-ttft-ms": "80", "x-mock-itl-ms": "25"}
    started = time.perf_counter()
    stream = await oai.chat.completions.create(model="m", messages=MESSAGES, stream=True, extra_headers=headers)
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == 4
    assert arrivals[0] >= 0.07
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap >= 0.015 for gap in gaps), gaps


async def test_non_stream_reply_waits_for_the_whole_generation(oai: openai.AsyncOpenAI) -> None:
    headers = {"x-mock-tokens": "5", "x-mock-ttft-ms": "50", "x-mock-itl-ms": "20"}
    started = time.perf_counter()
    await oai.chat.completions.create(model="m", messages=MESSAGES, extra_headers=headers)
    assert time.perf_counter() - started >= 0.125  # ttft + 4 * itl


async def test_tool_calls_non_stream_cycle_through_tools(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(
        model="m", messages=MESSAGES, tools=OPENAI_TOOLS, extra_headers={"x-mock-tool-calls": "3"}
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["search", "lookup", "search"]  # type: ignore[union-attr]
    assert [json.loads(c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        {"q": f"call {i}", "n": i} for i in range(3)
    ]
    assert len({c.id for c in calls}) == 3


async def test_tool_call_stream_is_reassembled_by_the_sdk(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model="m", messages=MESSAGES, tools=OPENAI_TOOLS, extra_headers={"x-mock-tool-calls": "2"}
    ) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("search", {"q": "call 0", "n": 0}),
        ("lookup", {"q": "call 1", "n": 1}),
    ]


async def test_tool_call_stream_fragments_arguments(mock: MockServer) -> None:
    body = {"model": "m", "messages": MESSAGES, "tools": OPENAI_TOOLS, "stream": True}
    [(status, _, raw)] = await exchange(mock, chat_request(body, {"x-mock-tool-calls": "1"}))
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert status == 200
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "search", "arguments": ""}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:] if "tool_calls" in d]
    assert len(fragments) == 3
    assert json.loads("".join(fragments)) == {"q": "call 0", "n": 0}


async def test_tool_calls_header_without_tools_gives_text(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-mock-tool-calls": "2"})
    assert reply.choices[0].message.content == text(16)
    assert reply.choices[0].message.tool_calls is None


# -- other OpenAI endpoints -------------------------------------------------------------


async def test_legacy_completions_whole_and_streamed(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.completions.create(model="davinci-002", prompt="say something nice", max_tokens=4)
    assert whole.object == "text_completion"
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text(4), "length")
    stream = await oai.completions.create(
        model="davinci-002", prompt="hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text(16)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


async def test_embeddings_float_and_base64_agree(oai: openai.AsyncOpenAI) -> None:
    as_base64 = await oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    as_float = await oai.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    assert [len(d.embedding) for d in as_float.data] == [8, 8]
    assert [d.embedding for d in as_base64.data] == [d.embedding for d in as_float.data]
    assert as_float.data[0].embedding != as_float.data[1].embedding
    assert as_float.usage.prompt_tokens >= 1


async def test_models_list(oai: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in oai.models.list()]
    assert "gpt-4o-mini" in ids and len(ids) >= 2


async def test_responses_api_minimal(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.responses.create(model="gpt-4o", input="hello there", extra_headers={"x-mock-tokens": "3"})
    assert reply.status == "completed"
    assert reply.output_text == text(3)
    assert reply.model == "gpt-4o"


async def test_responses_api_streams_its_event_sequence(oai: openai.AsyncOpenAI) -> None:
    async with oai.responses.stream(model="gpt-4o", input="hello", extra_headers={"x-mock-tokens": "3"}) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.output_text == text(3) and final.usage is not None and final.usage.output_tokens == 3


async def test_responses_api_function_calls_streamed(oai: openai.AsyncOpenAI) -> None:
    tools: list[Any] = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]
    headers = {"x-mock-tool-calls": "2"}
    async with oai.responses.stream(model="gpt-4o", input="hi", tools=tools, extra_headers=headers) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds.count("response.function_call_arguments.done") == 2
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"q":"call 0","n":0}'), ("f", '{"q":"call 1","n":1}')]


async def test_responses_api_keeps_responses_for_previous_response_id(oai: openai.AsyncOpenAI) -> None:
    first = await oai.responses.create(model="gpt-4o", input="a" * 400, extra_headers={"x-mock-tokens": "3"})
    second = await oai.responses.create(model="gpt-4o", input="b", previous_response_id=first.id)
    assert first.usage is not None and second.usage is not None
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == first.usage.total_tokens + 1  # the earlier turn counts in the prompt
    with pytest.raises(openai.BadRequestError, match="not found"):
        await oai.responses.create(model="gpt-4o", input="b", previous_response_id="resp_nope")
    unstored = await oai.responses.create(model="gpt-4o", input="c", store=False)
    with pytest.raises(openai.BadRequestError):
        await oai.responses.create(model="gpt-4o", input="d", previous_response_id=unstored.id)


async def test_model_prefix_is_prepended_to_the_echo(make_mock: MakeMock) -> None:
    server = await make_mock(model_prefix="mock/")
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.model == "mock/gpt-4o"
    assert server.requests[-1].model == "gpt-4o"


# -- Anthropic ------------------------------------------------------------------------


async def test_anthropic_message_is_real_shaped(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES)
    assert message.id.startswith("msg_")
    assert (message.type, message.role, message.model) == ("message", "assistant", "claude-x")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == text(16)  # type: ignore[union-attr]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (6, 16)
    short = await claude.messages.create(model="claude-x", max_tokens=2, messages=MESSAGES)
    assert short.stop_reason == "max_tokens"


async def test_anthropic_stream_events_in_order(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(
        model="claude-x", max_tokens=100, messages=MESSAGES, stream=True, extra_headers={"x-mock-tokens": "3"}
    )
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]
    assert start.type == "message_start" and start.message.usage.output_tokens == 1
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == text(3)  # type: ignore[union-attr]
    delta = events[-2]
    assert delta.type == "message_delta"
    assert (delta.delta.stop_reason, delta.usage.output_tokens) == ("end_turn", 3)


async def test_anthropic_stream_wire_has_event_lines_and_ping(mock: MockServer) -> None:
    body = {"model": "c", "max_tokens": 10, "messages": MESSAGES, "stream": True}
    [(status, headers, raw)] = await exchange(mock, http_request("POST", "/v1/messages", body, {"x-mock-tokens": "1"}))
    names = [line[7:] for line in raw.decode().split("\n") if line.startswith("event: ")]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_anthropic_tool_use_stream_is_reassembled_by_the_sdk(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="c", max_tokens=100, messages=MESSAGES, tools=ANTHROPIC_TOOLS, extra_headers={"x-mock-tool-calls": "2"}
    ) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    blocks = [(b.type, b.name, b.input) for b in message.content]  # type: ignore[union-attr]
    assert blocks == [("tool_use", "search", {"q": "call 0", "n": 0}), ("tool_use", "lookup", {"q": "call 1", "n": 1})]
    assert all(b.id.startswith("toolu_") for b in message.content)  # type: ignore[union-attr]


async def test_anthropic_tool_use_non_stream(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="c", max_tokens=100, messages=MESSAGES, tools=ANTHROPIC_TOOLS, extra_headers={"x-mock-tool-calls": "1"}
    )
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "tool_use" and message.content[0].input == {"q": "call 0", "n": 0}


async def test_anthropic_errors_use_anthropic_envelope(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        await claude.messages.create(
            model="c",
            max_tokens=10,
            messages=MESSAGES,
            extra_headers={"x-mock-status": "429", "x-mock-retry-after": "3"},
        )
    assert info.value.response.headers["retry-after"] == "3"
    body: Any = info.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["message"]


# -- faults -----------------------------------------------------------------------------


async def test_429_with_retry_after_is_a_rate_limit_error(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-mock-status": "429", "x-mock-retry-after": "2"}
        )
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"x-mock-status": "500"}, openai.InternalServerError),
        ({"x-mock-status": "503"}, openai.InternalServerError),
        ({"x-mock-status": "401"}, openai.AuthenticationError),
        ({"x-mock-fault": "reset"}, openai.APIConnectionError),
        ({"x-mock-fault": "drop"}, openai.APIConnectionError),
        ({"x-mock-fault": "stall"}, openai.APITimeoutError),
        ({"x-mock-fault": "malformed"}, json.JSONDecodeError),
        ({"x-mock-status": "99"}, openai.BadRequestError),
        ({"x-mock-fault": "explode"}, openai.BadRequestError),
        ({"x-mock-tokens": "many"}, openai.BadRequestError),
    ],
)
async def test_non_stream_faults(mock: MockServer, headers: dict[str, str], error: type[Exception]) -> None:
    async with openai_client(mock, timeout=0.3) as client:
        with pytest.raises(error):
            await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers=headers)
    assert mock.requests[-1].headers.items() >= headers.items()  # recorded before the fault


@pytest.mark.parametrize(
    ("headers", "received", "error"),
    [
        ({"x-mock-fault": "drop"}, 3, openai.APIConnectionError),  # role chunk + 2 content chunks
        ({"x-mock-fault": "drop", "x-mock-stall-after": "0"}, 1, openai.APIConnectionError),
        ({"x-mock-fault": "drop", "x-mock-stall-after": "4", "x-mock-itl-ms": "5"}, 5, openai.APIConnectionError),
        ({"x-mock-fault": "stall"}, 3, openai.APITimeoutError),
        ({"x-mock-fault": "malformed"}, 1, json.JSONDecodeError),
    ],
)
async def test_stream_faults(mock: MockServer, headers: dict[str, str], received: int, error: type[Exception]) -> None:
    chunks = []
    async with openai_client(mock, timeout=0.3) as client:
        with pytest.raises(error):
            stream = await client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, extra_headers=headers
            )
            async for chunk in stream:
                chunks.append(chunk)
    assert len(chunks) == received
    assert chunks[0].choices[0].delta.role == "assistant"


async def test_malformed_body_is_not_json(mock: MockServer) -> None:
    body = {"model": "m", "messages": MESSAGES}
    [(status, _, raw)] = await exchange(mock, chat_request(body, {"x-mock-fault": "malformed"}))
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


async def test_key_fault_recovers_after_times(make_mock: MakeMock) -> None:
    server = await make_mock(keys={"sk-flaky": KeyBehaviour(status=500, times=2)})
    async with openai_client(server, key="sk-flaky") as flaky, openai_client(server, key="sk-fine") as fine:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                await flaky.chat.completions.create(model="m", messages=MESSAGES)
        healthy = await fine.chat.completions.create(model="m", messages=MESSAGES)
        recovered = [await flaky.chat.completions.create(model="m", messages=MESSAGES) for _ in range(2)]
    assert [r.choices[0].finish_reason for r in (healthy, *recovered)] == ["stop", "stop", "stop"]
    assert [r.credential for r in server.requests] == ["sk-flaky", "sk-flaky", "sk-fine", "sk-flaky", "sk-flaky"]


async def test_header_fault_wins_over_key_fault(make_mock: MakeMock) -> None:
    server = await make_mock(keys={"sk-limited": KeyBehaviour(status=429, retry_after=1.5)})
    async with openai_client(server, key="sk-limited") as client:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-mock-status": "502"})
    assert limited.value.response.headers["retry-after"] == "1.5"


async def test_key_reset_fault_from_config(make_mock: MakeMock) -> None:
    server = await make_mock(keys={"sk-reset": KeyBehaviour(fault="reset", times=1)})
    async with openai_client(server, key="sk-reset") as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        reply = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices[0].message.content == text(16)


async def test_require_key_rejects_unknown_keys(make_mock: MakeMock) -> None:
    server = await make_mock(require_key=True, valid_keys={"sk-good"}, keys={"sk-known": KeyBehaviour()})
    async with openai_client(server, key="sk-bad") as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"
    for key in ("sk-good", "sk-known"):
        async with openai_client(server, key=key) as good:
            assert (await good.chat.completions.create(model="m", messages=MESSAGES)).choices
    async with anthropic_client(server, key="sk-bad") as claude:
        with pytest.raises(anthropic.AuthenticationError) as ainfo:
            await claude.messages.create(model="c", max_tokens=5, messages=MESSAGES)
    assert ainfo.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


# -- control endpoints and the request log ------------------------------------------------


async def test_mock_requests_reports_model_and_credential(
    mock: MockServer, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await claude.messages.create(model="claude-x", max_tokens=5, messages=MESSAGES, stream=True)
    raw_x_api_key = http_request("POST", "/v1/messages", {"model": "c", "messages": []}, {"x-api-key": "sk-raw"})
    await exchange(mock, raw_x_api_key)
    [(status, _, raw)] = await exchange(mock, http_request("GET", "/_mock/requests"))
    log = json.loads(raw)
    assert status == 200
    assert [(r["path"], r["model"], r["credential"], r["stream"]) for r in log] == [
        ("/v1/chat/completions", "gpt-4o-mini", "sk-test", False),
        ("/v1/messages", "claude-x", "sk-ant-test", True),
        ("/v1/messages", "c", "sk-raw", False),
    ]
    assert log[0]["body"]["messages"] == MESSAGES
    assert isinstance(mock.requests[0], ReceivedRequest)
    [(status, _, raw)] = await exchange(mock, http_request("DELETE", "/_mock/requests"))
    assert (status, json.loads(raw)) == (200, {"deleted": 3})
    assert mock.requests == []
    [(status, _, _)] = await exchange(mock, http_request("GET", "/_mock/health"))
    assert status == 200 and mock.requests == []  # control endpoints are not recorded


async def test_request_log_is_bounded(mock: MockServer) -> None:
    for i in range(MAX_LOG + 50):
        mock.record(ReceivedRequest("POST", "/v1/chat/completions", {}, str(i), None, False, None))
    assert len(mock.requests) <= MAX_LOG
    assert mock.requests[-1].model == str(MAX_LOG + 49)


# -- HTTP/1.1 framing -------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(mock: MockServer) -> None:
    slow = chat_request({"model": "first", "messages": MESSAGES}, {"x-mock-ttft-ms": "60"})
    fast = chat_request({"model": "second", "messages": MESSAGES})
    stream = chat_request({"model": "third", "messages": MESSAGES, "stream": True})
    models = http_request("GET", "/v1/models")
    replies = await exchange(mock, slow + fast + stream + models, responses=4)
    assert [status for status, _, _ in replies] == [200, 200, 200, 200]
    assert json.loads(replies[0][2])["model"] == "first"
    assert json.loads(replies[1][2])["model"] == "second"
    assert b'"model":"third"' in replies[2][2] and replies[2][2].endswith(b"data: [DONE]\n\n")
    assert json.loads(replies[3][2])["object"] == "list"


async def test_chunked_request_body(mock: MockServer) -> None:
    body = json.dumps({"model": "chunky", "messages": MESSAGES}).encode()
    pieces = [body[:10], body[10:30], body[30:]]
    chunked = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\nx-trailer: yes\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    for i in range(0, len(head + chunked), 7):  # dribble it in 7-byte segments
        writer.write((head + chunked)[i : i + 7])
        await writer.drain()
    status, _, raw = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == 200 and json.loads(raw)["model"] == "chunky"
    assert mock.requests[-1].body == {"model": "chunky", "messages": MESSAGES}


async def test_expect_100_continue(mock: MockServer) -> None:
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    writer.write(head)
    interim = await asyncio.wait_for(read_response(reader), 5)
    writer.write(body)
    final = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert (interim[0], final[0]) == (100, 200)


async def test_connection_close_is_honoured(mock: MockServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    writer.write(http_request("GET", "/v1/models", headers={"connection": "close"}))
    status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # server closed
    writer.close()
    assert (status, headers["connection"]) == (200, "close")


async def test_http10_stream_is_close_delimited(mock: MockServer) -> None:
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    request = b"POST /v1/chat/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    [(status, headers, raw)] = await exchange(mock, request)
    assert status == 200 and "transfer-encoding" not in headers
    assert raw.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /v1/models HTTP/2.0\r\n\r\n", 505),
        (b"GET /v1/models HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nname : v\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n{}", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 501),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: abc\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 999999999999\r\n\r\n", 413),
        (b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_http_gets_an_error_and_close(mock: MockServer, request_bytes: bytes, status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    writer.write(request_bytes)
    got, headers, raw = await asyncio.wait_for(read_response(reader), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert (got, headers["connection"]) == (status, "close")
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("request_bytes", "status", "envelope_key"),
    [
        (http_request("POST", "/v1/nope", {}), 404, "error"),
        (http_request("GET", "/v1/chat/completions"), 405, "error"),
        (http_request("POST", "/v1/chat/completions", b"{not json"), 400, "error"),
        (http_request("POST", "/v1/chat/completions", b"[1, 2]"), 400, "error"),
        (http_request("POST", "/v1/messages", b"{not json"), 400, "type"),
    ],
)
async def test_request_errors_use_provider_envelopes(
    mock: MockServer, request_bytes: bytes, status: int, envelope_key: str
) -> None:
    healthy = http_request("GET", "/_mock/health")
    replies = await exchange(mock, request_bytes + healthy, responses=2)  # the connection stays usable
    assert [r[0] for r in replies] == [status, 200]
    assert envelope_key in json.loads(replies[0][2])


# -- lifecycle --------------------------------------------------------------------------


async def test_client_disconnect_stops_the_stream_task(mock: MockServer) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    writer.write(http_request("POST", "/v1/chat/completions", body, {"x-mock-tokens": "1000", "x-mock-itl-ms": "10"}))
    await asyncio.wait_for(reader.readuntil(b"lorem"), 5)
    assert mock.active_tasks == 1
    writer.close()
    for _ in range(100):
        if mock.active_tasks == 0 and mock.connections == 0:
            break
        await asyncio.sleep(0.01)
    assert (mock.active_tasks, mock.connections) == (0, 0), repr(mock)


async def test_close_aborts_stalled_and_paced_connections(mock: MockServer) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    stalled = await asyncio.open_connection("127.0.0.1", mock.port)
    paced = await asyncio.open_connection("127.0.0.1", mock.port)
    stalled[1].write(http_request("POST", "/v1/chat/completions", body, {"x-mock-fault": "stall"}))
    paced[1].write(http_request("POST", "/v1/chat/completions", body, {"x-mock-itl-ms": "500"}))
    await asyncio.wait_for(stalled[0].readuntil(b"ipsum"), 5)
    await asyncio.wait_for(paced[0].readuntil(b"lorem"), 5)
    await asyncio.wait_for(mock.close(), 2)
    assert (mock.active_tasks, mock.connections) == (0, 0)
    for reader, writer in (stalled, paced):
        assert b"[DONE]" not in await asyncio.wait_for(reader.read(), 2)
        writer.close()


def test_serve_mock_runs_on_uvloop_until_sigterm() -> None:
    code = "from proxy.mock import serve_mock; serve_mock('127.0.0.1', 0)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().rsplit(":", 1)[1])

            async def probe() -> tuple[int, bytes]:
                [(status, _, raw)] = await exchange(port, chat_request({"model": "m"}))
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(chat_request({"model": "m"}, {"x-mock-fault": "reset"}))
                with pytest.raises(ConnectionResetError):  # SO_LINGER 0 makes a real RST on uvloop too
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
                return status, raw

            status, raw = asyncio.run(probe())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == text(16)


# -- configuration --------------------------------------------------------------------


def test_mock_config_from_dict_accepts_a_full_mapping() -> None:
    cfg = mock_config_from_dict(
        {
            "tokens": 4,
            "ttft": 0.1,
            "itl": 0,
            "require_key": True,
            "valid_keys": ["sk-a"],
            "model_prefix": "x/",
            "provider_headers": True,
            "keys": {"sk-b": {"status": 429, "retry_after": 2, "times": 3}, "sk-c": {"fault": "drop"}, "sk-d": None},
        }
    )
    assert (cfg.tokens, cfg.ttft, cfg.itl, cfg.require_key, cfg.valid_keys) == (4, 0.1, 0.0, True, {"sk-a"})
    assert cfg.provider_headers
    assert cfg.keys == {
        "sk-b": KeyBehaviour(status=429, retry_after=2.0, times=3),
        "sk-c": KeyBehaviour(fault="drop"),
        "sk-d": KeyBehaviour(),
    }
    assert mock_config_from_dict({}) == MockConfig()


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        ({"tokens": -1}, "tokens"),
        ({"tokens": "16"}, "tokens"),
        ({"ttft": "slow"}, "ttft"),
        ({"itl": -0.5}, "itl"),
        ({"require_key": "yes"}, "require_key"),
        ({"valid_keys": "sk-a"}, "valid_keys"),
        ({"model_prefix": 3}, "model_prefix"),
        ({"provider_headers": "yes"}, "provider_headers"),
        ({"tokenz": 3}, "tokenz"),
        ({"keys": ["sk-a"]}, "keys"),
        ({"keys": {"sk-a": {"status": 200}}}, "keys.sk-a.status"),
        ({"keys": {"sk-a": {"fault": "explode"}}}, "keys.sk-a.fault"),
        ({"keys": {"sk-a": {"times": -1}}}, "keys.sk-a.times"),
        ({"keys": {"sk-a": {"retry_after": "soon"}}}, "keys.sk-a.retry_after"),
        ({"keys": {"sk-a": {"statuz": 500}}}, "keys.sk-a.statuz"),
    ],
)
def test_mock_config_from_dict_names_the_bad_field(mapping: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        mock_config_from_dict(mapping)


def test_key_behaviour_validates_directly() -> None:
    with pytest.raises(ValueError, match="fault"):
        KeyBehaviour(fault="explode")
    with pytest.raises(ValueError, match="status"):
        KeyBehaviour(status=42)


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_headers_make_reply_heads_as_long_as_a_hosted_providers(
    make_mock: MakeMock, stream: bool
) -> None:
    plain = await make_mock()
    rich = await make_mock(provider_headers=True)
    heads = []
    for server in (plain, rich):
        async with openai_client(server) as client:
            response = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=stream
            )
            heads.append(response.headers)
            if stream:
                async for _ in response.parse():
                    pass
    assert "x-ratelimit-remaining-tokens" not in heads[0]
    assert heads[1]["x-ratelimit-remaining-tokens"] == "1999950"
    assert len(heads[1]) >= len(heads[0]) + 15


# -- stream framing (x-mock-sse-framing) --------------------------------------------------


async def _chunk_sizes(mock: MockServer, headers: dict[str, str]) -> tuple[int, list[int], bytes]:
    """The status, chunk sizes and body of one streamed chat reply, read chunk by chunk."""
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    try:
        writer.write(chat_request(body, {"x-mock-tokens": "5", **headers}))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ")[1])
        if b"transfer-encoding: chunked" not in head.lower():
            return status, [], await reader.read(65536)
        sizes, data = [], b""
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
            sizes.append(size)
            data += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, sizes, data
    finally:
        writer.close()


async def test_sse_framing_whole_sends_the_same_events_in_one_chunk(mock: MockServer) -> None:
    status, per_event, events = await _chunk_sizes(mock, {})
    assert status == 200 and len(per_event) == events.count(b"data:") > 5  # default: one chunk per event
    status, whole, same = await _chunk_sizes(mock, {"x-mock-sse-framing": "whole"})
    assert status == 200 and len(whole) == 1 and same.count(b"data:") == events.count(b"data:")
    assert whole[0] == sum(per_event)
    status, _, answer = await _chunk_sizes(mock, {"x-mock-sse-framing": "lumpy"})
    assert status == 400 and b"x-mock-sse-framing" in answer
