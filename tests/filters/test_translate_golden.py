"""Golden transcripts for filters.translate, plus the official SDKs as stream parsers.

Each file in ``tests/data/translate/`` is one recorded-style case: ``kind``
names the translator, ``args`` its keyword arguments, ``input`` what the
provider (or client) sent and ``expected`` what the translator must produce.
Streams are lists of raw SSE events; they are compared event by event as
(event name, JSON value) pairs, ignoring only the chunk's ``created``. Streams to a
Responses client (``*_stream_to_responses``) are stored as ``{"event", "data"}`` pairs with
the random ids renumbered in first-seen order and ``created_at`` dropped. Every stream is also
replayed split at every byte, in every direction, by ``test_translate_splits``.

The SDK tests serve the translated bytes through ``httpx2.MockTransport``
(the SDKs' own transport seam, no sockets), cut into small pieces so the SDK
decoders reassemble events, and check that tool-call arguments come out of
the SDK exactly as the provider sent them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from llmproxy.filters.translate import (
    ChainedStream,
    ChatStreamToMessagesStream,
    ChatStreamToResponsesStream,
    MessagesStreamToChatStream,
    TranslationError,
    anthropic_error_to_openai,
    chat_request_to_messages,
    chat_response_to_messages,
    messages_request_to_chat,
    messages_response_to_chat,
    openai_error_to_anthropic,
)
from tests.filters.sse_replay import events, renumber

DATA = Path(__file__).resolve().parents[1] / "data" / "translate"
CASES = sorted(DATA.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text())
    return case


def parse_sse(raw: str) -> tuple[str | None, str]:
    """The ``event`` name and joined ``data`` of one raw SSE event."""
    name: str | None = None
    data: list[str] = []
    for line in raw.rstrip("\n").split("\n"):
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return name, "\n".join(data)


def normalise(raw_events: list[str]) -> list[tuple[str | None, object]]:
    """(event, value) pairs: ``[DONE]`` stays a string, JSON is parsed, ``created`` dropped."""
    out: list[tuple[str | None, object]] = []
    for raw in raw_events:
        name, data = parse_sse(raw)
        value: object = data
        if data != "[DONE]":
            parsed = json.loads(data)
            if isinstance(parsed, dict):
                parsed.pop("created", None)
            value = parsed
        out.append((name, value))
    return out


def split_events(stream: bytes) -> list[str]:
    text = stream.decode()
    assert text == "" or text.endswith("\n\n"), "stream must end on an event boundary"
    return [event + "\n\n" for event in text.split("\n\n") if event]


Translator = MessagesStreamToChatStream | ChatStreamToMessagesStream | ChatStreamToResponsesStream | ChainedStream

#: Streams to a Responses client: from a Chat provider, and from an Anthropic one (through Chat).
RESPONSES_KINDS = ("chat_stream_to_responses", "messages_stream_to_responses")


def responses_translator(kind: str, model: str) -> ChatStreamToResponsesStream | ChainedStream:
    """The routing filter's translator for a Responses client of a Chat (or Anthropic) provider."""
    responses = ChatStreamToResponsesStream(request={"model": model}, response_id="resp_golden", model=model)
    if kind == "messages_stream_to_responses":
        return ChainedStream(MessagesStreamToChatStream(model=model, include_usage=True), responses)
    return responses


def run_stream(translator: Translator, events: list[str]) -> bytes:
    """Feed raw SSE events one by one; check each output is whole events."""
    out = bytearray()
    for raw in events:
        name, data = parse_sse(raw)
        piece = translator.feed(name.encode() if name is not None else None, data.encode())
        assert piece == b"" or piece.endswith(b"\n\n"), piece
        out += piece
    tail = translator.finish()
    assert translator.finish() == b"", "finish() must be idempotent"
    return bytes(out + tail)


def without_created(value: Any) -> Any:
    if isinstance(value, dict):
        value = dict(value)
        value.pop("created", None)
    return value


def translate(case: dict[str, Any]) -> Any:
    kind, args, data = case["kind"], case["args"], case["input"]
    if kind == "chat_request_to_messages":
        return chat_request_to_messages(data, **args)
    if kind == "messages_response_to_chat":
        return messages_response_to_chat(data, **args)
    if kind == "messages_request_to_chat":
        return messages_request_to_chat(data, **args)
    if kind == "chat_response_to_messages":
        return chat_response_to_messages(data, **args)
    if kind == "anthropic_error_to_openai":
        return orjson.loads(anthropic_error_to_openai(data.encode(), args["status"]))
    if kind == "openai_error_to_anthropic":
        return orjson.loads(openai_error_to_anthropic(data.encode(), args["status"]))
    if kind == "messages_stream_to_chat":
        return split_events(run_stream(MessagesStreamToChatStream(**args), data))
    if kind == "chat_stream_to_messages":
        return split_events(run_stream(ChatStreamToMessagesStream(**args), data))
    if kind in RESPONSES_KINDS:
        translator = responses_translator(kind, args["model"])
        return [{"event": n, "data": d} for n, d in renumber()(events(run_stream(translator, data)))]
    raise AssertionError(f"unknown kind {kind}")


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path: Path) -> None:
    case = load(path)
    got = translate(case)
    if case["kind"].endswith("_stream_to_chat") or case["kind"].endswith("_stream_to_messages"):
        assert normalise(got) == normalise(case["expected"])
    else:
        assert without_created(got) == without_created(case["expected"])


def test_golden_set_covers_every_direction() -> None:
    kinds = {load(p)["kind"] for p in CASES}
    assert kinds == {
        "chat_request_to_messages",
        "messages_response_to_chat",
        "messages_stream_to_chat",
        "messages_request_to_chat",
        "chat_response_to_messages",
        "chat_stream_to_messages",
        "anthropic_error_to_openai",
        "openai_error_to_anthropic",
        *RESPONSES_KINDS,
    }


# ---------------------------------------------------------------------------
# The official SDKs parse the translated streams
# ---------------------------------------------------------------------------


def pieces(body: bytes, size: int = 7) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def mock_http(body: bytes) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=pieces(body))

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def stream_cases(kind: str) -> list[Path]:
    return [p for p in CASES if load(p)["kind"] == kind]


def anthropic_provider_sent(events: list[str]) -> tuple[str, dict[int, str], str | None]:
    """Text, tool arguments by Anthropic block index, and error type in a provider stream."""
    text: list[str] = []
    args: dict[int, str] = {}
    error = None
    for raw in events:
        _, data = parse_sse(raw)
        payload = json.loads(data)
        if payload["type"] == "content_block_start" and payload["content_block"]["type"] == "tool_use":
            args[payload["index"]] = ""
        elif payload["type"] == "content_block_delta":
            delta = payload["delta"]
            if delta["type"] == "text_delta":
                text.append(delta["text"])
            elif delta["type"] == "input_json_delta" and payload["index"] in args:
                args[payload["index"]] += delta["partial_json"]
        elif payload["type"] == "error":
            error = payload["error"]["type"]
    return "".join(text), args, error


def anthropic_thinking_sent(events: list[str]) -> list[dict[str, Any]]:
    """The thinking and redacted_thinking blocks of a provider stream, as whole blocks."""
    blocks: dict[int, dict[str, Any]] = {}
    for raw in events:
        payload = json.loads(parse_sse(raw)[1])
        if payload["type"] == "content_block_start" and payload["content_block"]["type"] == "redacted_thinking":
            blocks[payload["index"]] = payload["content_block"]
        elif payload["type"] == "content_block_start" and payload["content_block"]["type"] == "thinking":
            blocks[payload["index"]] = {"type": "thinking", "thinking": "", "signature": ""}
        elif payload["type"] == "content_block_delta" and payload["index"] in blocks:
            delta = payload["delta"]
            if delta["type"] == "thinking_delta":
                blocks[payload["index"]]["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                blocks[payload["index"]]["signature"] = delta["signature"]
    return [blocks[i] for i in sorted(blocks)]


@pytest.mark.parametrize("path", stream_cases("messages_stream_to_chat"), ids=lambda p: p.stem)
def test_openai_sdk_reassembles_translated_stream(path: Path) -> None:
    case = load(path)
    body = run_stream(MessagesStreamToChatStream(**case["args"]), case["input"])
    text, args, error = anthropic_provider_sent(case["input"])
    client = openai.OpenAI(api_key="sk-test", base_url="http://llmproxy.test/v1", http_client=mock_http(body))
    stream = client.chat.completions.create(
        model="llmproxy-test-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    if error is not None:
        with pytest.raises(openai.APIError):
            for chunk in stream:
                state.handle_chunk(chunk)
        return
    for chunk in stream:
        state.handle_chunk(chunk)
    final = state.current_completion_snapshot
    message = final.choices[0].message
    assert (message.content or "") == text
    calls = message.tool_calls or []
    # Byte-exact: the SDK's concatenated arguments are the provider's partial_json, joined.
    assert [call.function.arguments for call in calls] == [args[i] for i in sorted(args)]
    assert [json.loads(call.function.arguments) for call in calls] == [json.loads(args[i]) for i in sorted(args)]
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # Thinking blocks, signatures included, come out of the SDK's accumulator whole and in order.
    assert [
        {k: v for k, v in b.items() if k != "index"} for b in getattr(message, "thinking_blocks", None) or ()
    ] == anthropic_thinking_sent(case["input"])
    if case["args"]["include_usage"]:
        assert final.usage is not None and final.usage.total_tokens > 0


def openai_provider_sent(events: list[str]) -> tuple[str, dict[int, str], bool]:
    """Text, tool arguments by OpenAI tool index, and whether an error came, in a provider stream."""
    text: list[str] = []
    args: dict[int, str] = {}
    error = False
    for raw in events:
        _, data = parse_sse(raw)
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            error = True
            continue
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or ():
                args[call["index"]] = args.get(call["index"], "") + (call["function"].get("arguments") or "")
    return "".join(text), args, error


@pytest.mark.parametrize("path", stream_cases("chat_stream_to_messages"), ids=lambda p: p.stem)
def test_anthropic_sdk_accumulates_translated_stream(path: Path) -> None:
    case = load(path)
    body = run_stream(ChatStreamToMessagesStream(**case["args"]), case["input"])
    text, args, error = openai_provider_sent(case["input"])
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url="http://llmproxy.test", http_client=mock_http(body))

    def request() -> Any:
        return client.messages.stream(
            model="llmproxy-test-model", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )

    if error:
        with pytest.raises(anthropic.APIStatusError), request() as stream:
            stream.get_final_message()
        return
    fragments: dict[int, str] = {}
    with request() as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments[event.index] = fragments.get(event.index, "") + event.delta.partial_json
        final = stream.get_final_message()
    assert "".join(b.text for b in final.content if b.type == "text") == text
    tool_blocks = [i for i, b in enumerate(final.content) if b.type == "tool_use"]
    # Byte-exact per block, and the SDK's parsed input equals the provider's JSON.
    assert [fragments.get(i, "") for i in tool_blocks] == [args[k] for k in sorted(args)]
    assert [final.content[i].input for i in tool_blocks] == [json.loads(args[k]) for k in sorted(args)]
    assert final.stop_reason is not None
    if args:
        assert final.stop_reason == "tool_use"


# ---------------------------------------------------------------------------
# Edge cases outside the transcripts
# ---------------------------------------------------------------------------

MALFORMED_CHAT_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "messages[0].content[0]",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
        "messages[0].content[0]",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/svg,<svg/>"}}]}
            ]
        },
        "messages[0].content[0]",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                }
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
        "messages[0].content",
    ),
]


@pytest.mark.parametrize(("body", "param"), MALFORMED_CHAT_REQUESTS)
def test_chat_request_rejects_untranslatable_input(body: dict[str, Any], param: str) -> None:
    with pytest.raises(TranslationError) as info:
        chat_request_to_messages(body, model="claude")
    assert info.value.param == param


MALFORMED_MESSAGES_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
        "messages[0].content[0].source",
    ),
    ({"system": 3, "messages": []}, "system"),
]


@pytest.mark.parametrize(("body", "param"), MALFORMED_MESSAGES_REQUESTS)
def test_messages_request_rejects_untranslatable_input(body: dict[str, Any], param: str) -> None:
    with pytest.raises(TranslationError) as info:
        messages_request_to_chat(body, model="gpt-4o")
    assert info.value.param == param


def test_stream_event_that_is_not_json_raises() -> None:
    with pytest.raises(TranslationError):
        MessagesStreamToChatStream(model="m", include_usage=False).feed(b"message_start", b"{oops")
    with pytest.raises(TranslationError):
        ChatStreamToMessagesStream(model="m").feed(None, b"[1, 2]")


def test_lone_surrogate_fragments_pass_through() -> None:
    """An astral character split across two deltas as escaped surrogates still round-trips."""
    t = MessagesStreamToChatStream(model="m", include_usage=False)
    t.feed(b"message_start", b'{"type":"message_start","message":{"id":"msg_1","usage":{}}}')
    out = t.feed(None, b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\\ud83c"}}')
    out += t.feed(None, b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\\udf0d"}}')
    texts = [json.loads(data)["choices"][0]["delta"]["content"] for _, data in map(parse_sse, split_events(out))]
    assert "".join(texts).encode("utf-16", "surrogatepass").decode("utf-16") == "\U0001f30d"


def test_text_after_tool_call_gets_its_own_block() -> None:
    t = ChatStreamToMessagesStream(model="claude")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return orjson.dumps({"id": "chatcmpl-1", "choices": [choice]})

    out = t.feed(None, chunk({"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "f", "arguments": "{}"}}]}))
    out += t.feed(None, chunk({"content": "done"}))
    out += t.feed(None, chunk({}, "tool_calls"))
    out += t.feed(None, b"[DONE]")
    events = [(name, json.loads(data)) for name, data in map(parse_sse, split_events(out))]
    starts = [data["content_block"]["type"] for name, data in events if name == "content_block_start"]
    assert starts == ["tool_use", "text"]
    assert [name for name, _ in events][-2:] == ["message_delta", "message_stop"]
    assert t.finish() == b""


def test_chat_stream_without_any_chunk_finishes_empty() -> None:
    assert ChatStreamToMessagesStream(model="claude").finish() == b""


def test_truncated_anthropic_stream_still_ends_with_done() -> None:
    t = MessagesStreamToChatStream(model="m", include_usage=False)
    t.feed(b"message_start", b'{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":3}}}')
    assert t.finish() == b"data: [DONE]\n\n"
    assert t.feed(b"message_stop", b'{"type":"message_stop"}') == b""


@pytest.mark.parametrize(
    ("status", "anthropic_type", "openai_type"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, "permission_error", "permission_error"),
        (404, "not_found_error", "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "api_error", "server_error"),
        (503, "api_error", "server_error"),
        (529, "overloaded_error", "server_error"),
    ],
)
def test_error_types_follow_status(status: int, anthropic_type: str, openai_type: str) -> None:
    converted = orjson.loads(openai_error_to_anthropic(b'{"error":{"message":"m","type":"x"}}', status))
    assert converted == {"type": "error", "error": {"type": anthropic_type, "message": "m"}}
    back = orjson.loads(anthropic_error_to_openai(b"not json at all", status))
    assert back == {"error": {"message": "not json at all", "type": openai_type, "param": None, "code": anthropic_type}}


def test_empty_error_body_is_wrapped() -> None:
    body = orjson.loads(anthropic_error_to_openai(b"", 502))
    assert body["error"]["message"] == "(empty error body)"
    assert set(body["error"]) == {"message", "type", "param", "code"}
