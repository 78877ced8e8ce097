"""Golden tests: a relayed stream merged into the complete message (``merged_response``), and its
GenAI output messages (``output_messages``), for OpenAI and Anthropic streams with parallel tool calls."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from llmproxy.filters.metering.merged import merged_response
from llmproxy.filters.tracing.content import Redactor, input_messages, output_messages


def sse(events: list[tuple[str | None, Any]]) -> bytes:
    out = []
    for name, data in events:
        payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
        out.append((b"event: %s\n" % name.encode() if name else b"") + b"data: " + payload + b"\n\n")
    return b"".join(out)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def oa(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 17,
        "model": "gpt-4o",
        "choices": choices,
        **extra,
    }


OPENAI_TOOLS = sse(
    [
        (None, oa([{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}])),
        (None, oa([{"index": 0, "delta": {"content": "Checking "}, "finish_reason": None}])),
        (None, oa([{"index": 0, "delta": {"content": "both."}, "finish_reason": None}])),
        (
            None,
            oa(
                [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_a",
                                    "type": "function",
                                    "function": {"name": "weather", "arguments": ""},
                                }
                            ]
                        },
                        "finish_reason": None,
                    }
                ]
            ),
        ),
        (
            None,
            oa(
                [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
                        "finish_reason": None,
                    }
                ]
            ),
        ),
        (
            None,
            oa(
                [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 1,
                                    "id": "call_b",
                                    "type": "function",
                                    "function": {"name": "time", "arguments": '{"tz"'},
                                }
                            ]
                        },
                        "finish_reason": None,
                    }
                ]
            ),
        ),
        (
            None,
            oa(
                [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                        "finish_reason": None,
                    }
                ]
            ),
        ),
        (
            None,
            oa(
                [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 1, "function": {"arguments": ':"CET"}'}}]},
                        "finish_reason": None,
                    }
                ]
            ),
        ),
        (None, oa([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
        (None, oa([], usage={"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29})),
        (None, "[DONE]"),
    ]
)

OPENAI_GOLDEN = {
    "id": "chatcmpl-9",
    "object": "chat.completion",
    "created": 17,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": '{"tz":"CET"}'}},
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
}

ANTHROPIC_TOOLS = sse(
    [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-x",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 30, "output_tokens": 1, "cache_read_input_tokens": 5},
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "look."}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
            },
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_b", "name": "time", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"tz": "CET"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 42},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)

ANTHROPIC_GOLDEN = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b", "name": "time", "input": {"tz": "CET"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 30, "output_tokens": 42, "cache_read_input_tokens": 5},
}


@pytest.mark.parametrize("piece", [7, 64, 100000])
def test_openai_stream_with_parallel_tool_calls_merges_into_the_completion(piece: int) -> None:
    assert merged_response(split(OPENAI_TOOLS, piece), "openai", True) == OPENAI_GOLDEN


@pytest.mark.parametrize("piece", [7, 64, 100000])
def test_anthropic_stream_with_parallel_tool_uses_merges_into_the_message(piece: int) -> None:
    assert merged_response(split(ANTHROPIC_TOOLS, piece), "anthropic", True) == ANTHROPIC_GOLDEN


def test_a_json_body_is_its_own_merge() -> None:
    body = orjson.dumps(OPENAI_GOLDEN)
    assert merged_response(split(body, 5), "openai", False) == OPENAI_GOLDEN


def test_a_cut_stream_merges_what_arrived_and_bad_events_are_skipped() -> None:
    cut = ANTHROPIC_TOOLS[: ANTHROPIC_TOOLS.index(b"content_block_stop")] + b"data: {not json\n\n"
    merged = merged_response([cut], "anthropic", True)
    assert merged is not None
    assert merged["content"] == [{"type": "text", "text": "Let me look."}]
    assert merged["stop_reason"] is None
    assert merged_response([b"data: [DONE]\n\n"], "openai", True) is None


def test_output_messages_golden() -> None:
    assert output_messages(OPENAI_GOLDEN, "openai") == [
        {
            "role": "assistant",
            "parts": [
                {"type": "text", "content": "Checking both."},
                {"type": "tool_call", "id": "call_a", "name": "weather", "arguments": {"city": "Paris"}},
                {"type": "tool_call", "id": "call_b", "name": "time", "arguments": {"tz": "CET"}},
            ],
            "finish_reason": "tool_calls",
        }
    ]
    assert output_messages(ANTHROPIC_GOLDEN, "anthropic") == [
        {
            "role": "assistant",
            "parts": [
                {"type": "text", "content": "Let me look."},
                {"type": "tool_call", "id": "toolu_a", "name": "weather", "arguments": {"city": "Paris"}},
                {"type": "tool_call", "id": "toolu_b", "name": "time", "arguments": {"tz": "CET"}},
            ],
            "finish_reason": "tool_use",
        }
    ]


def test_input_messages_golden() -> None:
    openai_body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
    }
    assert input_messages(openai_body, "openai") == (
        [
            {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
            {"role": "user", "parts": [{"type": "text", "content": "Weather?"}, {"type": "image_url"}]},
            {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "w", "arguments": {"a": 1}}]},
            {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "sunny"}]},
        ],
        [],
    )
    anthropic_body = {
        "model": "m",
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
        ],
    }
    assert input_messages(anthropic_body, "anthropic") == (
        [
            {"role": "user", "parts": [{"type": "text", "content": "Weather?"}]},
            {"role": "assistant", "parts": [{"type": "tool_call", "id": "t1", "name": "w", "arguments": {"a": 1}}]},
            {"role": "user", "parts": [{"type": "tool_call_response", "id": "t1", "response": "sunny"}]},
        ],
        [{"type": "text", "content": "Be brief."}],
    )


def test_the_redactor_replaces_known_secrets_default_shapes_and_configured_patterns() -> None:
    redactor = Redactor([r"sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}", r"\b\d{3}-\d{2}-\d{4}\b"], ["provider-secret-value"])
    value = {
        "parts": [
            {"content": "key sk-abcdefghijklmnopqrstuv, ssn 123-45-6789, provider-secret-value and client-key-1234"}
        ]
    }
    out = redactor.value(value, ("client-key-1234",))
    assert out == {"parts": [{"content": "key [REDACTED], ssn [REDACTED], [REDACTED] and [REDACTED]"}]}
    assert value["parts"][0]["content"].startswith("key sk-")  # the input is not changed
