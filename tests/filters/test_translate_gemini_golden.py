"""Golden transcripts for the Gemini codec (:mod:`llmproxy.filters.translate.gemini`).

Each file in ``tests/data/translate_gemini/`` is one case written from
Gemini's API reference (``GenerateContentRequest``/``Response``,
``usageMetadata``, ``promptFeedback``, the ``google.rpc`` error envelope):
``kind`` names the direction, ``input`` what the client (or Gemini) sent,
``expected`` what must come out. Streams are lists of raw SSE events as
Gemini frames them (``data: ...\\r\\n\\r\\n``); outputs are compared event
by event as (event name, JSON) pairs with ``created`` dropped.
Regenerate after a deliberate change with ``GOLDEN_UPDATE=1`` (and review the diff).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmproxy import parse_event, split_events
from llmproxy.filters.translate import (
    ChainedStream,
    ChatStreamToMessagesStream,
    CodecRefusal,
    anthropic_envelope_from_openai,
    chat_response_to_messages,
    messages_request_to_chat,
)
from llmproxy.filters.translate.gemini import (
    GeminiCodec,
    GeminiStreamDecoder,
    chat_request_to_gemini,
    gemini_error_to_chat,
    gemini_usage,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "translate_gemini"
CASES = sorted(DATA.glob("*.json"))
CODEC = GeminiCodec()


def _events(data: bytes) -> list[Any]:
    out: list[Any] = []
    for raw in split_events(data):
        event = parse_event(raw)
        payload: Any = event.data.decode()
        if payload != "[DONE]":
            payload = orjson.loads(event.data)
            if isinstance(payload, dict):
                payload.pop("created", None)
        out.append([event.event.decode() if event.event else None, payload])
    return out


def _response(body: dict[str, Any]) -> dict[str, Any]:
    try:
        out = CODEC.decode_response(body, model="gem")
    except CodecRefusal as refusal:
        return {"refused": refusal.status, "envelope": refusal.envelope}
    out.pop("created", None)
    return out


def _stream(chunks: list[str], *, to_messages: bool) -> list[Any]:
    decoder = GeminiStreamDecoder(model="gem", include_usage=True)
    translator: Any = ChainedStream(decoder, ChatStreamToMessagesStream(model="gem")) if to_messages else decoder
    out = b""
    for chunk in chunks:
        for raw in split_events(chunk.encode()):
            event = parse_event(raw)
            out += translator.feed(event.event, event.data)
    out += translator.finish()
    usage = decoder.usage
    summary = None if usage is None else [usage.input_tokens, usage.output_tokens, usage.reasoning_tokens]
    return [_events(out), summary]


def run(case: dict[str, Any]) -> Any:
    kind, data = case["kind"], case["input"]
    if kind == "chat_request_to_gemini":
        return chat_request_to_gemini(data)
    if kind == "messages_request_to_gemini":
        return chat_request_to_gemini(messages_request_to_chat(data, model="gem"))
    if kind == "gemini_response_to_chat":
        usage = gemini_usage(data["usageMetadata"])
        return [
            _response(data),
            [usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.reasoning_tokens],
        ]
    if kind == "gemini_response_to_messages":
        out = chat_response_to_messages(CODEC.decode_response(data, model="gem"), model="gem")
        return out
    if kind == "gemini_stream_to_chat":
        return _stream(data, to_messages=False)
    if kind == "gemini_stream_to_messages":
        return _stream(data, to_messages=True)
    body = data.encode() if isinstance(data, str) else orjson.dumps(data)
    status, envelope = gemini_error_to_chat(body, case["status"])
    if kind == "gemini_error_to_chat":
        return [status, envelope]
    if kind == "gemini_error_to_messages":
        return [status, anthropic_envelope_from_openai(envelope["error"], status=status)]
    raise AssertionError(f"unknown kind {kind}")


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path: Path) -> None:
    case = json.loads(path.read_text())
    got = json.loads(json.dumps(run(case)))
    if os.environ.get("GOLDEN_UPDATE"):
        case["expected"] = got
        path.write_text(json.dumps(case, indent=2, ensure_ascii=False) + "\n")
    assert got == case["expected"]


def test_golden_set_covers_every_direction() -> None:
    kinds = {json.loads(p.read_text())["kind"] for p in CASES}
    assert kinds == {
        "chat_request_to_gemini",
        "messages_request_to_gemini",
        "gemini_response_to_chat",
        "gemini_response_to_messages",
        "gemini_stream_to_chat",
        "gemini_stream_to_messages",
        "gemini_error_to_chat",
        "gemini_error_to_messages",
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "custom", "custom": {"name": "t"}}]},
            "tools[0].type",
        ),
        ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_untranslatable_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    from llmproxy.filters.translate import TranslationError

    with pytest.raises(TranslationError) as exc:
        chat_request_to_gemini(body)
    assert exc.value.param == param


def test_stream_split_anywhere_gives_the_same_events() -> None:
    """The proxy hands the decoder whole events, but Gemini's CRLF framing must survive any batching."""
    case = json.loads((DATA / "stream_text.json").read_text())
    whole = "".join(case["input"]).encode()
    for cut in range(1, len(whole)):
        pieces = [whole[:cut], whole[cut:]]
        decoder = GeminiStreamDecoder(model="gem", include_usage=True)
        out = b""
        rest = b""
        for piece in pieces:
            rest += piece
            last = max(rest.rfind(b"\r\n\r\n"), -1)
            if last < 0:
                continue
            ready, rest = rest[: last + 4], rest[last + 4 :]
            for raw in split_events(ready):
                event = parse_event(raw)
                out += decoder.feed(event.event, event.data)
        out += decoder.finish()
        assert _events(out) == case["expected"][0]
