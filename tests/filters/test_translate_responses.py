"""The Responses <-> Chat translation, unit by unit: request mapping, named refusals, the reply
object, the stream's event sequence (one upstream stream split at every byte boundary gives the
same events), reasoning and thinking."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from llmproxy.filters.translate import (
    ChatStreamToResponsesStream,
    TranslationError,
    chat_response_to_responses,
    responses_request_to_chat,
)
from llmproxy.filters.translate.responses import decode_thinking, encode_thinking
from tests.filters.sse_replay import replay, splits


def test_request_mapping() -> None:
    body = {
        "model": "m",
        "instructions": "be brief",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "look"},
                    {"type": "input_image", "image_url": "https://x/i.png", "detail": "low"},
                ],
            },
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": '{"a":2}'},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
            {"type": "reasoning", "summary": [], "encrypted_content": "opaque-openai"},
        ],
        "tools": [
            {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}
        ],
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": False,
        "max_output_tokens": 99,
        "temperature": 0.5,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
        "reasoning": {"effort": "medium", "summary": "auto"},
        "safety_identifier": "u-1",
        "stream": True,
        "store": True,
        "include": ["reasoning.encrypted_content"],
        "metadata": {"k": "v"},
    }
    out = responses_request_to_chat(body, model="provider-m")
    assert out["model"] == "provider-m"
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
                {"id": "c2", "type": "function", "function": {"name": "f", "arguments": '{"a":2}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True},
        }
    ]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert out["parallel_tool_calls"] is False
    assert out["max_tokens"] == 99 and out["temperature"] == 0.5 and out["user"] == "u-1"
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }
    assert out["reasoning_effort"] == "medium"
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert not {"store", "include", "metadata", "instructions", "input"} & set(out)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "i"}]}, "input[0].type"),
        ({"input": [{"type": "web_search_call", "id": "i"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": 3}, "input"),
        ({"input": "x", "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "prompt": {"id": "p"}}, "prompt"),
        ({"input": "x", "max_tool_calls": 3}, "max_tool_calls"),
        ({"input": "x", "instructions": ["a"]}, "instructions"),
    ],
)
def test_what_cannot_be_bridged_is_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(TranslationError) as err:
        responses_request_to_chat({"model": "m", **body}, model="m")
    assert err.value.param == param


def test_history_comes_first_and_keeps_item_numbers_apart() -> None:
    history = [{"role": "user", "content": "a"}, {"type": "message", "role": "assistant", "content": "b"}]
    out = responses_request_to_chat({"model": "m", "input": "c"}, model="m", history=history)
    assert [(m["role"], m["content"]) for m in out["messages"]] == [("user", "a"), ("assistant", "b"), ("user", "c")]
    with pytest.raises(TranslationError) as err:
        responses_request_to_chat({"model": "m", "input": "c"}, model="m", history=[{"type": "bogus"}])
    assert err.value.param == "input[-1].type"  # a stored item, not one of this request's


def test_reply_object() -> None:
    chat = {
        "id": "chatcmpl-1",
        "created": 7,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {
                    "role": "assistant",
                    "content": "hi",
                    "reasoning_content": "hmm",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    }
    out = chat_response_to_responses(
        chat, request={"model": "m", "input": "x", "store": False}, response_id="resp_1", model="m"
    )
    assert (out["id"], out["object"], out["created_at"], out["status"]) == ("resp_1", "response", 7, "incomplete")
    assert out["incomplete_details"] == {"reason": "max_output_tokens"} and out["store"] is False
    assert [i["type"] for i in out["output"]] == ["reasoning", "message", "function_call"]
    assert out["output"][0]["summary"] == [{"type": "summary_text", "text": "hmm"}]
    assert out["output"][1]["content"][0]["text"] == "hi"
    assert out["output"][2]["call_id"] == "call_1" and out["output"][2]["name"] == "f"
    assert out["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 15,
    }
    with pytest.raises(TranslationError):
        chat_response_to_responses({"choices": []}, request={}, response_id="r", model="m")


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


STREAM = (
    _chunk({"role": "assistant", "content": ""})
    + _chunk({"reasoning_content": "think"})
    + _chunk({"content": "Hé"})
    + _chunk({"content": "llo"})
    + _chunk(
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    )
    + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]})
    + _chunk(
        {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    )
    + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})  # interleaved: still its own item
    + _chunk({}, "tool_calls")
    + b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    + b"data: [DONE]\n\n"
)


def _translate(pieces: list[bytes]) -> list[dict[str, Any]]:
    translator = ChatStreamToResponsesStream(request={"model": "m"}, response_id="resp_1", model="m")
    out = replay(translator, pieces)
    events = []
    for raw in out.split(b"\n\n"):
        if raw:
            name, data = raw.split(b"\n", 1)
            payload = orjson.loads(data[len(b"data: ") :])
            assert name == b"event: " + payload["type"].encode()
            events.append(payload)
    return events


def _normal(events: list[dict[str, Any]]) -> list[Any]:
    """Events with the random item ids replaced by their first-seen order."""
    ids: dict[str, str] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (ids.setdefault(v, f"id{len(ids)}") if k in ("id", "item_id") else walk(v))
                for k, v in node.items()
                if k != "created_at"
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return [walk(e) for e in events]


def test_stream_events_and_every_split() -> None:
    whole = _translate([STREAM])
    kinds = [e["type"] for e in whole]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",  # reasoning
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",  # message
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # call a
        "response.function_call_arguments.delta",
        "response.output_item.added",  # call b
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",  # call a's late fragment
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
    final = whole[-1]["response"]
    assert final["status"] == "completed"
    assert [(i["type"], i.get("arguments")) for i in final["output"]] == [
        ("reasoning", None),
        ("message", None),
        ("function_call", '{"x":1}'),
        ("function_call", "{}"),
    ]
    assert final["output"][1]["content"][0]["text"] == "Héllo"
    assert final["usage"]["input_tokens"] == 3 and final["usage"]["output_tokens"] == 4
    expected = _normal(whole)
    for pieces in splits(STREAM):
        assert _normal(_translate(pieces)) == expected, [len(p) for p in pieces]


def test_stream_cut_before_finish_fails() -> None:
    translator = ChatStreamToResponsesStream(request={"model": "m"}, response_id="resp_1", model="m")
    translator.feed(None, orjson.dumps({"choices": [{"index": 0, "delta": {"content": "x"}}]}))
    tail = translator.finish()
    assert b"event: response.failed" in tail and translator.failed
    assert translator.finish() == b""  # idempotent


def test_thinking_round_trips_through_encrypted_content() -> None:
    blocks = [{"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "redacted_thinking", "data": "d"}]
    assert decode_thinking(encode_thinking(blocks)) == blocks
    assert decode_thinking("gAAAAABo-not-ours") == [] and decode_thinking(None) == []
    items = [
        {"role": "user", "content": "q"},
        {"type": "reasoning", "summary": [], "encrypted_content": encode_thinking(blocks)},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    ]
    kept = responses_request_to_chat({"model": "m", "input": items}, model="m", keep_thinking=True)
    assert kept["messages"][1]["thinking_blocks"] == blocks
    plain = responses_request_to_chat({"model": "m", "input": items}, model="m")
    assert "thinking_blocks" not in plain["messages"][1]  # never sent to a Chat provider


def test_tool_call_deltas_without_an_index() -> None:
    translator = ChatStreamToResponsesStream(request={"model": "m"}, response_id="resp_1", model="m")

    def feed(delta: dict[str, Any], finish: str | None = None) -> None:
        translator.feed(None, orjson.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))

    feed({"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": '{"x"'}}]})
    feed({"tool_calls": [{"function": {"arguments": ":1}"}}]})
    feed({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "{}"}}]})
    feed({}, "tool_calls")
    translator.finish()
    assert translator.response is not None
    calls = [(i["call_id"], i["name"], i["arguments"]) for i in translator.response["output"]]
    assert calls == [("a", "f", '{"x":1}'), ("b", "g", "{}")]


def test_content_parts_in_a_chat_reply() -> None:
    chat = {"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}]}
    out = chat_response_to_responses(chat, request={}, response_id="r", model="m")
    assert out["output"][0]["content"][0]["text"] == "ab"


def test_streamed_refusal_is_a_refusal_part() -> None:
    stream = (
        _chunk({"role": "assistant", "content": ""}) + _chunk({"refusal": "I can't"}) + _chunk({"refusal": " help."})
    )
    events = _translate([stream + _chunk({}, "stop") + b"data: [DONE]\n\n"])
    kinds = [e["type"] for e in events]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1]["response"]["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't help."}]
