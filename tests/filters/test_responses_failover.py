"""Failover in the middle of a ``previous_response_id`` conversation, between bridged and
pass-through providers of one model (routing + failover, the official openai SDK, a scripted
provider behind every provider).

The conversation lives where it was made: one bridged here is in the conversation store, so
every bridged target (the first or a retry) gets its history and the pass-through provider,
which does not know the id, is never tried; one made at a pass-through provider stays there
(a bridged target has nothing to continue).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from tests.filters.scripted_provider import Reply, Scripted
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude",
    "content": [{"type": "text", "text": "first answer"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 2},
}
CHAT_ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "duo",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "second answer"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}
NATIVE_ANSWER = {
    "id": "resp_provider_2",
    "object": "response",
    "created_at": 1,
    "status": "completed",
    "model": "duo",
    "output": [
        {
            "id": "msg_p",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "native", "annotations": []}],
        }
    ],
    "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
}
DOWN = Reply(503, b'{"error":{"message":"overloaded","type":"server_error"}}')


def _config(scripted: Scripted, **first: Any) -> dict[str, Any]:
    common = {"keys": ["k1"], "models": ["duo"], "timeouts": {"connect": 1, "headers": 3, "idle": 3, "total": 10}}
    providers = [
        {"name": "native", "type": "openai", "base_url": scripted.url + "/v1", "priority": 0, **common, **first},
        {"name": "claude", "type": "anthropic", "base_url": scripted.url, "priority": 1, **common},
        {
            "name": "chatonly",
            "type": "openai",
            "native_responses": False,
            "base_url": scripted.url + "/v1",
            "priority": 2,
            **common,
        },
    ]
    return {
        "server": {"access_log": "off"},
        "filters": [
            {"name": "routing", "config": {"providers": providers}},
            {"name": "failover", "config": {"max_attempts": 3, "backoff": {"base": 0.01, "max": 0.02}}},
        ],
    }


@pytest.fixture
def client(scripted: Scripted, make_proxy: Make) -> openai.OpenAI:
    proxy = make_proxy(_config(scripted))
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


def _bridged_first_turn(client: openai.OpenAI, scripted: Scripted) -> str:
    """A conversation started on the Anthropic provider (pinned): bridged, so stored here."""
    scripted.replies.append(Reply(200, orjson.dumps(ANSWER)))
    first = client.responses.create(
        model="duo", input="first question", extra_headers={"x-llmproxy-provider": "claude"}
    )
    assert first.output_text == "first answer"
    scripted.requests.clear()
    return first.id


def _texts(body: dict[str, Any]) -> list[str]:
    """The conversation's texts in a Messages or Chat request body, in order."""
    out: list[str] = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(block["text"] for block in content if block.get("type") == "text")
    return out


def test_retry_onto_another_bridged_target_carries_the_history(client: openai.OpenAI, scripted: Scripted) -> None:
    previous = _bridged_first_turn(client, scripted)
    scripted.replies.extend([DOWN, Reply(200, orjson.dumps(CHAT_ANSWER))])
    reply = client.responses.create(model="duo", input="second question", previous_response_id=previous)
    assert reply.output_text == "second answer"
    paths = [seen.target for seen in scripted.requests]
    # the pass-through provider (first by priority) does not know a bridged id: never tried
    assert paths == ["/v1/messages", "/v1/chat/completions"]
    history = ["first question", "first answer", "second question"]
    assert _texts(scripted.requests[0].body) == history
    assert _texts(scripted.requests[1].body) == history  # the retry got the stored history too
    # and the follow-up is stored in turn, with the whole conversation
    scripted.replies.append(Reply(200, orjson.dumps(CHAT_ANSWER)))
    client.responses.create(
        model="duo", input="third", previous_response_id=reply.id, extra_headers={"x-llmproxy-provider": "chatonly"}
    )
    assert _texts(scripted.requests[-1].body) == [*history, "second answer", "third"]


def test_a_provider_made_id_stays_with_the_pass_through_provider(scripted: Scripted, make_proxy: Make) -> None:
    proxy = make_proxy(_config(scripted, keys=["k1", "k2"]))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    scripted.replies.extend([DOWN, Reply(200, orjson.dumps(NATIVE_ANSWER))])
    reply = client.responses.create(model="duo", input="more", previous_response_id="resp_provider_1")
    assert reply.output_text == "native"
    assert [seen.target for seen in scripted.requests] == ["/v1/responses", "/v1/responses"]
    assert all(seen.body["previous_response_id"] == "resp_provider_1" for seen in scripted.requests)


def test_a_provider_made_id_is_not_bridged_when_the_pass_through_provider_fails(
    client: openai.OpenAI, scripted: Scripted
) -> None:
    """Without the cut, the retry would reach a bridged target as a new conversation, its past lost."""
    scripted.replies.extend([DOWN, DOWN, DOWN])
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="duo", input="more", previous_response_id="resp_provider_1")
    assert {seen.target for seen in scripted.requests} == {"/v1/responses"}


def test_a_bridged_id_sent_first_to_the_pass_through_provider_goes_to_a_bridged_one(
    client: openai.OpenAI, scripted: Scripted
) -> None:
    previous = _bridged_first_turn(client, scripted)
    scripted.replies.append(Reply(200, orjson.dumps(ANSWER)))
    client.responses.create(model="duo", input="second question", previous_response_id=previous)
    assert [seen.target for seen in scripted.requests] == ["/v1/messages"]
    assert _texts(scripted.requests[0].body) == ["first question", "first answer", "second question"]
