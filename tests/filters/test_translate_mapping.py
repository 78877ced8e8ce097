"""Fields both Chat Completions and Messages have map both ways; what cannot map is a named 400.

``user`` <-> ``metadata.user_id``, ``stop`` <-> ``stop_sequences``, images by URL and base64,
documents (base64 PDF, plain text): unit by unit, as a round trip, and over real sockets with
both official SDKs against a scripted provider (what the provider received is checked).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest

from llmproxy.filters.translate import TranslationError, chat_request_to_messages, messages_request_to_chat
from tests.filters.scripted_provider import Reply, Scripted
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

PNG = "iVBORw0KGgo="
PDF = "JVBERi0xLjQK"

CHAT_PARTS: list[Any] = [
    {"type": "text", "text": "look"},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    {"type": "file", "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF}"}},
]
MESSAGES_BLOCKS: list[Any] = [
    {"type": "text", "text": "look"},
    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    {
        "type": "document",
        "title": "report.pdf",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
    },
]


def test_chat_to_messages_maps_user_stop_images_and_documents() -> None:
    body = {"messages": [{"role": "user", "content": CHAT_PARTS}], "user": "u-42", "stop": ["END", "STOP"]}
    out = chat_request_to_messages(body, model="claude")
    assert out["metadata"] == {"user_id": "u-42"}
    assert out["stop_sequences"] == ["END", "STOP"]
    assert out["messages"] == [{"role": "user", "content": MESSAGES_BLOCKS}]
    single = chat_request_to_messages({"messages": [{"role": "user", "content": "x"}], "stop": "END"}, model="c")
    assert single["stop_sequences"] == ["END"]
    safety = chat_request_to_messages({"messages": [], "safety_identifier": "s-1"}, model="c")
    assert safety["metadata"] == {"user_id": "s-1"}


def test_messages_to_chat_maps_user_stop_images_and_documents() -> None:
    body = {
        "max_tokens": 10,
        "messages": [{"role": "user", "content": MESSAGES_BLOCKS}],
        "metadata": {"user_id": "u-42"},
        "stop_sequences": ["END", "STOP"],
    }
    out = messages_request_to_chat(body, model="gpt")
    assert out["user"] == "u-42" and out["stop"] == ["END", "STOP"]
    assert out["messages"] == [{"role": "user", "content": CHAT_PARTS}]
    text_doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain words"}}
    doc = messages_request_to_chat({"messages": [{"role": "user", "content": [text_doc]}]}, model="gpt")
    assert doc["messages"] == [{"role": "user", "content": "plain words"}]


def test_round_trips() -> None:
    chat = {"messages": [{"role": "user", "content": CHAT_PARTS}], "user": "u-1", "stop": ["END"]}
    back = messages_request_to_chat(chat_request_to_messages(chat, model="claude"), model="gpt")
    assert back["messages"] == chat["messages"] and back["user"] == "u-1" and back["stop"] == ["END"]
    messages = {
        "max_tokens": 10,
        "messages": [{"role": "user", "content": MESSAGES_BLOCKS}],
        "metadata": {"user_id": "u-1"},
        "stop_sequences": ["END"],
    }
    again = chat_request_to_messages(messages_request_to_chat(messages, model="gpt"), model="claude")
    assert again["messages"] == messages["messages"]
    assert again["metadata"] == {"user_id": "u-1"} and again["stop_sequences"] == ["END"]


def _user(part: Any) -> list[Any]:
    return [{"role": "user", "content": [part]}]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop": 5}, "stop"),
        ({"stop": ["END", 1]}, "stop"),
        ({"user": 42}, "user"),
        ({"safety_identifier": ["x"]}, "safety_identifier"),
        ({"messages": _user({"type": "file", "file": {"file_id": "file-abc"}})}, "messages[0].content[0]"),
        (
            {"messages": _user({"type": "file", "file": {"file_data": "data:text/plain;base64,aGk="}})},
            "messages[0].content[0]",
        ),
        (
            {"messages": _user({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}})},
            "messages[0].content[0]",
        ),
        (
            {"messages": _user({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})},
            "messages[0].content[0]",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
                    {"type": "custom", "custom": {"name": "g"}},
                ]
            },
            "tools[1].type",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
            },
            "tool_choice",
        ),
    ],
)
def test_chat_fields_anthropic_cannot_take_are_named(extra: dict[str, Any], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(TranslationError) as err:
        chat_request_to_messages(body, model="claude")
    assert err.value.param == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"stop_sequences": ["END", None]}, "stop_sequences"),
        ({"metadata": "u"}, "metadata"),
        ({"metadata": {"user_id": 7}}, "metadata.user_id"),
        (
            {"messages": _user({"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}})},
            "messages[0].content[0]",
        ),
        (
            {"messages": _user({"type": "document", "source": {"type": "content", "content": []}})},
            "messages[0].content[0]",
        ),
        (
            {"messages": _user({"type": "document", "source": {"type": "file", "file_id": "file_1"}})},
            "messages[0].content[0]",
        ),
        (
            {"messages": _user({"type": "image", "source": {"type": "file", "file_id": "file_1"}})},
            "messages[0].content[0].source",
        ),
        (
            {
                "tools": [
                    {"name": "f", "input_schema": {"type": "object"}},
                    {"type": "web_search_20250305", "name": "ws"},
                ]
            },
            "tools[1].type",
        ),
    ],
)
def test_messages_fields_openai_cannot_take_are_named(extra: dict[str, Any], param: str) -> None:
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(TranslationError) as err:
        messages_request_to_chat(body, model="gpt")
    assert err.value.param == param


# -- over the wire ------------------------------------------------------------------------------


def _config(scripted: Scripted) -> dict[str, Any]:
    providers = [
        {"name": "oa", "type": "openai", "base_url": scripted.url + "/v1", "keys": ["k"], "models": ["gpt-x"]},
        {"name": "an", "type": "anthropic", "base_url": scripted.url, "keys": ["k"], "models": ["claude-x"]},
    ]
    return {"filters": [{"name": "routing", "config": {"providers": providers}}]}


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "stop_sequence",
    "stop_sequence": "END",
    "usage": {"input_tokens": 3, "output_tokens": 1},
}
COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-x",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def test_openai_client_of_anthropic_over_the_wire(scripted: Scripted, make_proxy: Make) -> None:
    proxy = make_proxy(_config(scripted))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    scripted.replies.append(Reply(200, orjson.dumps(MESSAGE)))
    reply = client.chat.completions.create(
        model="claude-x", messages=[{"role": "user", "content": CHAT_PARTS}], user="u-42", stop=["END"]
    )
    assert reply.choices[0].finish_reason == "stop"
    sent = scripted.requests[-1].body
    assert sent["metadata"] == {"user_id": "u-42"} and sent["stop_sequences"] == ["END"]
    assert sent["messages"] == [{"role": "user", "content": MESSAGES_BLOCKS}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="claude-x",
            messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}],
        )
    assert err.value.param == "messages[0].content[0]" and "PDF" in str(err.value)
    assert len(scripted.requests) == 1  # refused before any provider call


def test_anthropic_client_of_openai_over_the_wire(scripted: Scripted, make_proxy: Make) -> None:
    proxy = make_proxy(_config(scripted))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    scripted.replies.append(Reply(200, orjson.dumps(COMPLETION)))
    reply = client.messages.create(
        model="gpt-x",
        max_tokens=10,
        messages=[{"role": "user", "content": MESSAGES_BLOCKS}],
        metadata={"user_id": "u-42"},
        stop_sequences=["END"],
    )
    assert reply.content[0].type == "text"
    sent = scripted.requests[-1].body
    assert sent["user"] == "u-42" and sent["stop"] == ["END"]
    assert sent["messages"] == [{"role": "user", "content": CHAT_PARTS}]
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(
            model="gpt-x",
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}],
                }
            ],
        )
    assert "messages[0].content[0]" in str(err.value)
    assert len(scripted.requests) == 1
