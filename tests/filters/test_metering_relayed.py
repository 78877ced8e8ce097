"""relayed_output: text, tool arguments, reasoning and usage from relayed bytes."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from llmproxy.filters.metering.relayed import RelayedOutput, relayed_output
from llmproxy.mock import MockServer


def sse(*objs: Any, crlf: bool = False, event: bool = False) -> list[bytes]:
    """One chunk per event (``data:`` JSON, or a raw string such as ``[DONE]``)."""
    nl = "\r\n" if crlf else "\n"
    out = []
    for obj in objs:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        head = f"event: {obj['type']}{nl}" if event and isinstance(obj, dict) else ""
        out.append(f"{head}data: {data}{nl}{nl}".encode())
    return out


def delta(**d: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]}


OPENAI_STREAM = sse(
    delta(role="assistant", content=""),
    delta(reasoning_content="Let me think. "),
    delta(content="Hello"),
    delta(content=", wörld"),
    delta(tool_calls=[{"index": 0, "id": "t", "type": "function", "function": {"name": "get", "arguments": ""}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": '{"q": 1'}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": "}"}}]),
    {"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
    "[DONE]",
)
ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 9, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi "}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "there"}},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "t", "name": "get"}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"q":'}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": " 1}"}},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}},
    {"type": "message_stop"},
    event=True,
)
OPENAI_JSON = json.dumps(
    {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "Hello",
                    "reasoning": "why",
                    "tool_calls": [{"id": "t", "type": "function", "function": {"name": "get", "arguments": "{}"}}],
                }
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
).encode()
ANTHROPIC_JSON = json.dumps(
    {
        "content": [
            {"type": "thinking", "thinking": "Hmm.", "signature": "x"},
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "t", "name": "get", "input": {"q": 1}},
        ],
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
).encode()

OPENAI_STREAM_OUT = RelayedOutput(
    "Hello, wörld", 'get{"q": 1}', "Let me think. ", {"prompt_tokens": 5, "completion_tokens": 7}, True
)
ANTHROPIC_STREAM_OUT = RelayedOutput("Hi there", 'get{"q": 1}', "Hmm.", {"input_tokens": 9, "output_tokens": 12}, True)


def resplit(chunks: list[bytes], size: int) -> list[bytes]:
    whole = b"".join(chunks)
    return [whole[i : i + size] for i in range(0, len(whole), size)]


@pytest.mark.parametrize(
    ("chunks", "protocol", "is_sse", "expected"),
    [
        (OPENAI_STREAM, "openai", True, OPENAI_STREAM_OUT),
        (ANTHROPIC_STREAM, "anthropic", True, ANTHROPIC_STREAM_OUT),
        (
            [OPENAI_JSON[:10], OPENAI_JSON[10:]],
            "openai",
            False,
            RelayedOutput("Hello", "get{}", "why", {"prompt_tokens": 3, "completion_tokens": 4}, True),
        ),
        (
            [ANTHROPIC_JSON],
            "anthropic",
            False,
            RelayedOutput("Hi", 'get{"q":1}', "Hmm.", {"input_tokens": 3, "output_tokens": 4}, True),
        ),
        (  # legacy completions
            sse({"choices": [{"text": "ab"}]}, {"choices": [{"text": "c"}]}, "[DONE]"),
            "openai",
            True,
            RelayedOutput("abc", complete=True),
        ),
        ([b'{"choices":[{"text":"xy"}]}'], "openai", False, RelayedOutput("xy", complete=True)),
    ],
)
def test_goldens(chunks: list[bytes], protocol: str, is_sse: bool, expected: RelayedOutput) -> None:
    assert relayed_output(chunks, protocol, is_sse) == expected


@pytest.mark.parametrize("size", [1, 3, 7, 64])
@pytest.mark.parametrize(
    ("stream", "protocol", "expected"),
    [(OPENAI_STREAM, "openai", OPENAI_STREAM_OUT), (ANTHROPIC_STREAM, "anthropic", ANTHROPIC_STREAM_OUT)],
)
def test_any_split(stream: list[bytes], protocol: str, expected: RelayedOutput, size: int) -> None:
    assert relayed_output(resplit(stream, size), protocol, True) == expected


def test_crlf_cr_and_multiline_data() -> None:
    crlf = sse(delta(content="a"), delta(content="b"), "[DONE]", crlf=True)
    assert relayed_output(resplit(crlf, 5), "openai", True) == RelayedOutput("ab", complete=True)
    cr = [b'data: {"choices":[{"delta":{"content":"x"}}]}\r\r', b"data: [DONE]\r\r"]
    assert relayed_output(cr, "openai", True) == RelayedOutput("x", complete=True)
    # one JSON object over two data lines (joined with \n, which JSON allows between tokens)
    multi = [b'data: {"choices":[{"delta":\ndata: {"content":"m"}}]}\n\n', b"data: [DONE]\n\n"]
    assert relayed_output(multi, "openai", True) == RelayedOutput("m", complete=True)


_TEXT_DELTA = b'{"type":"content_block_delta","delta":{"type":"text_delta","text":"t"}}'
_HALF = _TEXT_DELTA.index(b'"delta"')


@pytest.mark.parametrize(
    "event",
    [
        b"event: content_block_delta\ndata: " + _TEXT_DELTA + b"\n\n",
        b"event: content_block_delta\r\ndata: " + _TEXT_DELTA + b"\r\n\n",
        b"event: e\ndata: " + _TEXT_DELTA[:_HALF] + b"\ndata: " + _TEXT_DELTA[_HALF:] + b"\n\n",
        b"data:" + _TEXT_DELTA + b"\n\n",
        b": keep-alive\ndata: " + _TEXT_DELTA + b"\n\n",
        b"event: x\rdata: " + _TEXT_DELTA + b"\n\n",
    ],
)
def test_event_shapes(event: bytes) -> None:
    """Shapes around the one-data-line fast path read the same as through parse_event."""
    stop = b'data: {"type":"message_stop"}\n\n'
    assert relayed_output([event, stop], "anthropic", True) == RelayedOutput("t", complete=True)


def test_cr_between_data_lines() -> None:
    """A bare CR ends a data line too: the fast path must not take it for part of the data."""
    usage = b'data: {"type":"message_delta",\rdata: "usage":{"output_tokens":3}}\n\n'
    out = relayed_output([usage], "anthropic", True)
    assert out.provider_usage == {"output_tokens": 3}


def test_truncated_streams() -> None:
    cut = b"".join(OPENAI_STREAM[:4])  # no usage chunk, no [DONE]
    out = relayed_output([cut[: cut.rindex(b"ld")]], "openai", True)  # and the last event cut mid-way
    assert (out.text, out.reasoning, out.complete, out.provider_usage) == ("Hello, wör", "Let me think. ", False, None)
    out = relayed_output(ANTHROPIC_STREAM[:8], "anthropic", True)
    assert out == RelayedOutput("Hi there", "", "Hmm.", {"input_tokens": 9, "output_tokens": 1}, False)


@pytest.mark.parametrize(
    ("body", "protocol", "text", "tools", "reasoning"),
    [
        (OPENAI_JSON[: OPENAI_JSON.index(b"Hello") + 3], "openai", "Hel", "", ""),
        (OPENAI_JSON[: OPENAI_JSON.index(b"{}")], "openai", "Hello", "", "why"),
        (ANTHROPIC_JSON[: ANTHROPIC_JSON.index(b"Hi") + 1], "anthropic", "H", "", "Hmm."),
        (b'{"content":[{"type":"text","text":"a\\"b\\u00e9\\u00', "anthropic", 'a"bé', "", ""),
        (b'{"choices":[{"message":{"content":"x\\', "openai", "x", "", ""),
        (b'{"choices":[{"message":{"content":"caf\xc3', "openai", "caf\ufffd", "", ""),
    ],
)
def test_truncated_bodies(body: bytes, protocol: str, text: str, tools: str, reasoning: str) -> None:
    out = relayed_output([body], protocol, False)
    assert (out.text, out.tool_arguments, out.reasoning, out.complete) == (text, tools, reasoning, False)


@pytest.mark.parametrize(
    ("chunks", "protocol", "is_sse"),
    [
        ([b"\x00\xff garbage"], "openai", False),
        ([b"\x00\xff garbage\n\n", b"data: [1, 2]\n\n", b"data: {\n\n", b": comment\n\n"], "openai", True),
        ([b"[]"], "anthropic", False),
        ([b'{"content": "not a list", "usage": 3}'], "anthropic", False),
        ([b'{"choices": [1, {"delta": 2}, {"message": {"tool_calls": [1, {"function": 3}]}}]}'], "openai", False),
        ([b'data: {"type": "content_block_delta", "delta": 1}\n\n'], "anthropic", True),
        ([], "openai", True),
        ([b'{"choices":[{"message":{"content":"x"}}]}'], "other", False),
    ],
)
def test_garbage_never_raises(chunks: list[bytes], protocol: str, is_sse: bool) -> None:
    out = relayed_output(chunks, protocol, is_sse)
    assert out.text == "" and out.tool_arguments == "" and out.reasoning == ""


def test_large_stream_is_linear() -> None:
    one = sse(delta(content="word "))[0]
    for n in (20_000, 80_000):
        started = time.perf_counter()
        out = relayed_output([one] * n + [b"data: [DONE]\n\n"], "openai", True)
        elapsed = time.perf_counter() - started
        assert len(out.text) == 5 * n and out.complete
    assert elapsed < 2.0
    body = b'{"choices":[{"message":{"content":"' + b"ab\\n" * 1_000_000  # 4 MB, truncated
    started = time.perf_counter()
    assert len(relayed_output([body], "openai", False).text) == 3_000_000
    assert time.perf_counter() - started < 2.0


# --- goldens from the real mock provider --------------------------------------------------


def fetch(mock: MockServer, path: str, payload: dict[str, Any], headers: dict[str, str]) -> bytes:
    request = urllib.request.Request(
        f"http://127.0.0.1:{mock.port}{path}",
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer sk-test", "x-api-key": "sk-test"}
        | headers,
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
    return body


def expected_from_json(body: bytes, protocol: str) -> tuple[str, str]:
    obj = json.loads(body)
    if protocol == "openai":
        message = obj["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        tools = "".join(c["function"]["name"] + c["function"]["arguments"] for c in calls)
        return message.get("content") or "", tools
    text = "".join(b["text"] for b in obj["content"] if b["type"] == "text")
    tools = "".join(
        b["name"] + json.dumps(b["input"], separators=(",", ":")) for b in obj["content"] if b["type"] == "tool_use"
    )
    return text, tools


@pytest.mark.parametrize(("protocol", "path"), [("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages")])
@pytest.mark.parametrize("tool_calls", ["0", "1"])
def test_mock_goldens(mock: MockServer, protocol: str, path: str, tool_calls: str) -> None:
    payload: dict[str, Any] = {"model": "mock-model", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-mock-tokens": "24", "x-mock-tool-calls": tool_calls, "anthropic-version": "2023-06-01"}
    body = fetch(mock, path, payload, headers)
    text, tools = expected_from_json(body, protocol)
    assert text or tools
    whole = relayed_output([body[:17], body[17:]], protocol, False)
    assert (whole.text, whole.tool_arguments, whole.complete) == (text, tools, True)
    assert whole.provider_usage is not None
    stream = fetch(mock, path, payload | {"stream": True, "stream_options": {"include_usage": True}}, headers)
    streamed = relayed_output(resplit([stream], 13), protocol, True)
    assert streamed.complete and streamed.text == text
    if tools:
        assert json.loads(streamed.tool_arguments.removeprefix(tools.split("{")[0])) == json.loads(
            tools.removeprefix(tools.split("{")[0])
        )
    cut = relayed_output([stream[: len(stream) // 2]], protocol, True)
    assert not cut.complete and (text.startswith(cut.text) or cut.tool_arguments)
