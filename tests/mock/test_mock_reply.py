"""The mock's content switches: ``x-mock-reply``, ``x-mock-tool-args`` and ``x-mock-chunk-chars``, per protocol."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from llmproxy.mock import MockServer

TEXT = "the quick brown fox jumps"
HEADERS = {"x-mock-reply": TEXT, "x-mock-chunk-chars": "4"}
PIECES = ["the ", "quic", "k br", "own ", "fox ", "jump", "s"]


def _oa(mock: MockServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{mock.port}/v1", api_key="k", max_retries=0)


def test_chat_reply_and_chunks(mock: MockServer) -> None:
    client = _oa(mock)
    messages: Any = [{"role": "user", "content": "hi"}]
    assert (
        client.chat.completions.create(model="m", messages=messages, extra_headers=HEADERS).choices[0].message.content
        == TEXT
    )
    stream = client.chat.completions.create(model="m", messages=messages, extra_headers=HEADERS, stream=True)
    assert [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content] == PIECES


def test_chat_reply_word_by_word_without_chunk_chars(mock: MockServer) -> None:
    stream = _oa(mock).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-reply": TEXT}, stream=True
    )
    assert [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content] == [
        "the ",
        "quick ",
        "brown ",
        "fox ",
        "jumps",
    ]


def test_responses_and_completions_reply(mock: MockServer) -> None:
    client = _oa(mock)
    assert client.responses.create(model="m", input="hi", extra_headers=HEADERS).output_text == TEXT
    events = client.responses.create(model="m", input="hi", extra_headers=HEADERS, stream=True)
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == PIECES
    assert client.completions.create(model="m", prompt="hi", extra_headers=HEADERS).choices[0].text == TEXT


def test_messages_reply_and_tool_args(mock: MockServer) -> None:
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{mock.port}", api_key="k", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    reply = client.messages.create(model="m", max_tokens=9, messages=messages, extra_headers=HEADERS)
    assert reply.content[0].type == "text" and reply.content[0].text == TEXT
    args = '{"q":"find it"}'
    headers = {"x-mock-tool-args": args, "x-mock-chunk-chars": "5"}
    stream = client.messages.create(model="m", max_tokens=9, messages=messages, extra_headers=headers, stream=True)
    frags = [
        e.delta.partial_json for e in stream if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert frags == ['{"q":', '"find', ' it"}']


@pytest.mark.parametrize("value", ["0", "x", "-3"])
def test_bad_chunk_chars_is_a_400(mock: MockServer, value: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _oa(mock).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-chunk-chars": value}
        )
    assert "x-mock-chunk-chars" in info.value.message
