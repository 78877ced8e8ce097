"""``POST /v1/responses`` for every model: the official openai SDK against a real proxy.

Three providers behind one proxy, all the project's mock: ``native`` (an
OpenAI-type provider that serves ``/v1/responses``: passed through), ``chat``
(OpenAI-type with ``native_responses: false``: bridged to Chat Completions)
and ``claude`` (Anthropic-type: bridged to Chat and on to Messages). Each is
driven with ``responses.create`` JSON and ``stream=True`` (the SDK's own event
models parse every event), with function tools and their outputs, and the
SDK's ``responses.stream`` helper, which checks the event sequence.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from llmproxy import Usage
from llmproxy.mock import MockServer
from tests import filters_for_tests as tf
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

MODELS = ["gpt-native", "gpt-chat", "claude-x"]
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def _config(port: int, **routing: Any) -> dict[str, Any]:
    return {
        "filters": [
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "native",
                            "type": "openai",
                            "base_url": f"http://127.0.0.1:{port}/v1",
                            "keys": ["sk-native"],
                            "models": {"gpt-native": "mock-native"},
                        },
                        {
                            "name": "chat",
                            "type": "openai",
                            "native_responses": False,
                            "base_url": f"http://127.0.0.1:{port}/v1",
                            "keys": ["sk-chat"],
                            "models": {"gpt-chat": "mock-chat"},
                        },
                        {
                            "name": "claude",
                            "type": "anthropic",
                            "base_url": f"http://127.0.0.1:{port}",
                            "keys": ["sk-ant"],
                            "models": {"claude-x": "mock-claude"},
                        },
                    ],
                    **routing,
                },
            },
            {"name": "tests.filters_for_tests:UsageRecorderFactory"},
        ]
    }


@pytest.fixture
def client(mock: MockServer, make_proxy: Make) -> openai.OpenAI:
    proxy = make_proxy(_config(mock.port))
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


def _last_usage(timeout: float = 3.0) -> Usage:
    rec = tf.UsageRecorderFactory.instances[-1]
    deadline = time.monotonic() + timeout
    while not rec.attempts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.attempts, "no attempt completed"
    usage = rec.attempts[-1][1]
    assert isinstance(usage, Usage)
    return usage


@pytest.mark.parametrize("model", MODELS)
def test_json_text(client: openai.OpenAI, mock: MockServer, model: str) -> None:
    reply = client.responses.create(
        model=model,
        input="hello there",
        instructions="be brief",
        max_output_tokens=50,
        extra_headers={"x-mock-tokens": "5"},
    )
    assert reply.object == "response" and reply.status == "completed"
    assert reply.id.startswith("resp_")
    assert reply.output_text == "lorem ipsum dolor sit amet "
    assert reply.usage is not None and reply.usage.output_tokens == 5 and reply.usage.input_tokens > 0
    usage = _last_usage()
    assert (usage.input_tokens, usage.output_tokens) == (reply.usage.input_tokens, 5)
    sent = mock.requests[-1]
    assert sent.body is not None
    if model == "gpt-chat":
        assert sent.path == "/v1/chat/completions"
        assert sent.body["messages"][0] == {"role": "system", "content": "be brief"}
        assert sent.body["max_tokens"] == 50
    elif model == "claude-x":
        assert sent.path == "/v1/messages"
        assert sent.body["system"] == "be brief" and sent.body["max_tokens"] == 50
    else:
        assert sent.path == "/v1/responses"


@pytest.mark.parametrize("model", MODELS)
def test_stream_text_events(client: openai.OpenAI, model: str) -> None:
    events = list(
        client.responses.create(model=model, input="hello", stream=True, extra_headers={"x-mock-tokens": "4"})
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds.count("response.output_text.delta") == 4
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "lorem ipsum dolor sit "
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == text
    assert done.response.usage is not None and done.response.usage.output_tokens == 4
    usage = _last_usage()
    assert usage.output_tokens == 4 and usage.input_tokens == done.response.usage.input_tokens


@pytest.mark.parametrize("model", MODELS)
def test_stream_helper_accumulates(client: openai.OpenAI, model: str) -> None:
    with client.responses.stream(model=model, input="hi", extra_headers={"x-mock-tokens": "3"}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "lorem ipsum dolor "


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_tool_loop(client: openai.OpenAI, mock: MockServer, model: str, stream: bool) -> None:
    """Two parallel function calls, then their outputs sent back: the Agents-style loop."""
    headers = {"x-mock-tool-calls": "2"}
    if stream:
        with client.responses.stream(model=model, input="weather?", tools=TOOLS, extra_headers=headers) as s:
            events = list(s)
            first = s.get_final_response()
        kinds = [e.type for e in events]
        assert kinds.count("response.function_call_arguments.delta") >= 2
        assert kinds.count("response.function_call_arguments.done") == 2
    else:
        first = client.responses.create(model=model, input="weather?", tools=TOOLS, extra_headers=headers)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 2
    assert [json.loads(c.arguments) for c in calls] == [{"q": "call 0", "n": 0}, {"q": "call 1", "n": 1}]
    assert all(c.name == "get_weather" and c.call_id for c in calls)
    follow: list[Any] = [{"role": "user", "content": "weather?"}]
    follow += [c.model_dump(exclude_none=True) for c in calls]
    follow += [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls]
    second = client.responses.create(model=model, input=follow, tools=TOOLS, extra_headers={"x-mock-tokens": "2"})
    assert second.output_text == "lorem ipsum "
    sent = mock.requests[-1].body
    assert sent is not None
    if model == "gpt-chat":
        msgs = sent["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
        assert [t["id"] for t in msgs[1]["tool_calls"]] == [c.call_id for c in calls]
        assert msgs[2] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}
        assert sent["tools"][0]["function"]["name"] == "get_weather"
    elif model == "claude-x":
        msgs = sent["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
        assert [b["type"] for b in msgs[1]["content"]] == ["tool_use", "tool_use"]
        assert [b["tool_use_id"] for b in msgs[2]["content"]] == [c.call_id for c in calls]
        assert sent["tools"][0]["name"] == "get_weather"


@pytest.mark.parametrize("model", ["gpt-chat", "claude-x"])
def test_unbridgeable_fields_are_named_400s(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="hi", tools=[{"type": "web_search"}])
    assert err.value.param == "tools[0].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input=[{"type": "item_reference", "id": "x"}])
    assert err.value.param == "input[0].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="hi", background=True)
    assert err.value.param == "background"


def test_provider_error_is_an_openai_envelope(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model="claude-x", input="hi", extra_headers={"x-mock-status": "429"})
    assert isinstance(err.value.body, dict) and "message" in err.value.body


def test_reasoning_effort_becomes_anthropic_thinking(client: openai.OpenAI, mock: MockServer) -> None:
    client.responses.create(model="claude-x", input="think", reasoning={"effort": "low"})
    sent = mock.requests[-1].body
    assert sent is not None
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["max_tokens"] == 4096 + 1024
    client.responses.create(model="gpt-chat", input="think", reasoning={"effort": "high"})
    assert mock.requests[-1].body["reasoning_effort"] == "high"


# -- previous_response_id, store, GET/DELETE /v1/responses/{id} --------------------------------


def _texts(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["role"], m["content"]) for m in messages]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_follow_up(client: openai.OpenAI, mock: MockServer, model: str, stream: bool) -> None:
    headers = {"x-mock-tokens": "2"}
    if stream:
        with client.responses.stream(model=model, input="my name is Ada", extra_headers=headers) as s:
            list(s)
            first = s.get_final_response()
    else:
        first = client.responses.create(model=model, input="my name is Ada", extra_headers=headers)
    second = client.responses.create(
        model=model, input="what is my name?", previous_response_id=first.id, extra_headers=headers
    )
    assert second.output_text == "lorem ipsum "
    sent = mock.requests[-1].body
    assert sent is not None
    if model == "gpt-native":
        assert sent["previous_response_id"] == first.id  # the provider keeps it
        return
    assert second.previous_response_id == first.id
    if model == "gpt-chat":
        assert _texts(sent["messages"]) == [
            ("user", "my name is Ada"),
            ("assistant", "lorem ipsum "),
            ("user", "what is my name?"),
        ]
    else:
        assert _texts(sent["messages"]) == [
            ("user", "my name is Ada"),
            ("assistant", "lorem ipsum "),
            ("user", "what is my name?"),
        ]
    # and a third turn chains through both
    third = client.responses.create(model=model, input="again?", previous_response_id=second.id)
    sent = mock.requests[-1].body
    assert sent is not None and len(sent["messages"]) == 5 and third.status == "completed"


@pytest.mark.parametrize("model", ["gpt-chat", "claude-x"])
def test_stored_response_get_input_items_delete(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(model=model, input="hello", extra_headers={"x-mock-tokens": "2"})
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and got.usage == first.usage
    items = client.responses.input_items.list(first.id)
    assert [(i.type, getattr(i, "role", None)) for i in items.data] == [("message", "user")]
    second = client.responses.create(model=model, input="again", previous_response_id=first.id)
    newest_first = client.responses.input_items.list(second.id)
    assert [getattr(i, "role", None) for i in newest_first.data] == ["user", "assistant", "user"]
    oldest_first = client.responses.input_items.list(second.id, order="asc")
    assert oldest_first.data[0].content == "hello"  # type: ignore[union-attr]
    deleted = client.responses.delete(first.id)
    assert deleted is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)


@pytest.mark.parametrize("model", ["gpt-chat", "claude-x"])
def test_store_false_is_not_kept(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(model=model, input="hello", store=False)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="again", previous_response_id=first.id)
    assert err.value.param == "previous_response_id" and "not found" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_storage_off_is_a_clear_400(mock: MockServer, make_proxy: Make) -> None:
    config = _config(mock.port, responses={"store": False})
    routing = config["filters"][0]["config"]
    routing["providers"] = routing["providers"][1:]  # no provider serves /v1/responses itself
    proxy = make_proxy(config)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    first = client.responses.create(model="claude-x", input="hello")
    assert first.store is False  # nothing is kept, and the response says so
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="claude-x", input="again", previous_response_id=first.id)
    assert err.value.param == "previous_response_id" and err.value.code == "response_storage_disabled"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.retrieve(first.id)
    assert err.value.code == "response_storage_disabled"


def test_conversation_over_max_bytes_is_not_kept(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(_config(mock.port, responses={"max_bytes": 2048}))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    small = client.responses.create(model="gpt-chat", input="hello")
    assert client.responses.retrieve(small.id).id == small.id
    big = client.responses.create(model="gpt-chat", input="x" * 4000)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(big.id)


@pytest.mark.parametrize(
    ("responses", "message"),
    [
        ({"ttl": 0}, "responses.ttl: must be greater than 0"),
        ({"max_bytes": 10}, "responses.max_bytes: must be at least 1024"),
        ({"keep": 1}, "responses.keep: unknown key"),
    ],
)
def test_bad_responses_config_is_refused(responses: dict[str, Any], message: str) -> None:
    from llmproxy.filters.routing.conversations import ConversationSettings

    with pytest.raises(ValueError, match=message):
        ConversationSettings.parse(responses)


# -- errors in a stream that already started ----------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_upstream_drop_mid_stream_is_a_responses_error_event(client: openai.OpenAI, model: str) -> None:
    headers = {"x-mock-tokens": "20", "x-mock-fault": "drop", "x-mock-stall-after": "3"}
    events = list(client.responses.create(model=model, input="hi", stream=True, extra_headers=headers))
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "error" and last.message
    assert "response.completed" not in [e.type for e in events]


def test_provider_error_event_mid_stream_fails_the_response(scripted: Any, make_proxy: Make) -> None:
    from tests.filters.test_routing_usage import _sse_reply

    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c", "content": [], "usage": {}}
    scripted.default = _sse_reply(
        [
            ("message_start", {"type": "message_start", "message": start}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
            ),
            ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ]
    )
    provider = {"name": "an", "type": "anthropic", "base_url": scripted.url, "keys": ["k"], "models": ["c"]}
    proxy = make_proxy({"filters": [{"name": "routing", "config": {"providers": [provider]}}]})
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0, timeout=10)
    events = list(client.responses.create(model="c", input="hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed" and failed.response.error is not None
    assert failed.response.error.message == "Overloaded"
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel"]


# -- failover across protocols -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_failover_from_a_failing_chat_provider_to_anthropic(loop_thread: Any, make_proxy: Make, stream: bool) -> None:
    """The first provider (bridged to Chat) answers 500; the retry on the Anthropic provider is bridged
    afresh (Messages this time) and the client gets one clean Responses reply."""
    from llmproxy.mock import KeyBehaviour, MockConfig, start_mock

    server = loop_thread.call(
        start_mock("127.0.0.1", 0, MockConfig(tokens=3, keys={"sk-bad": KeyBehaviour(status=500)}))
    )
    try:
        providers = [
            {
                "name": "chat",
                "type": "openai",
                "native_responses": False,
                "base_url": f"http://127.0.0.1:{server.port}/v1",
                "keys": ["sk-bad"],
                "models": {"m": "mock-chat"},
            },
            {
                "name": "claude",
                "type": "anthropic",
                "base_url": f"http://127.0.0.1:{server.port}",
                "keys": ["sk-good"],
                "models": {"m": "mock-claude"},
                "priority": 1,
            },
        ]
        proxy = make_proxy(
            {
                "filters": [
                    {"name": "routing", "config": {"providers": providers}},
                    {"name": "failover", "config": {"max_attempts": 2}},
                ]
            }
        )
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
        if stream:
            events = list(client.responses.create(model="m", input="hi", stream=True))
            assert [e.type for e in events].count("response.created") == 1
            final = events[-1]
            assert final.type == "response.completed"
            text = final.response.output_text
        else:
            text = client.responses.create(model="m", input="hi").output_text
        assert text == "lorem ipsum dolor "
        assert [r.path for r in server.requests] == ["/v1/chat/completions", "/v1/messages"]
    finally:
        loop_thread.call(server.close())


def test_azure_is_bridged_to_its_deployment_chat_completions(scripted: Any, make_proxy: Make) -> None:
    import orjson

    from tests.filters.scripted_provider import Reply

    message = {"role": "assistant", "content": "hi from azure"}
    scripted.default = Reply(
        200,
        orjson.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
            }
        ),
    )
    provider = {
        "name": "az",
        "type": "azure",
        "base_url": scripted.url,
        "keys": ["az-key"],
        "api_version": "2024-10-21",
        "models": {"gpt-az": "my-deployment"},
    }
    proxy = make_proxy({"filters": [{"name": "routing", "config": {"providers": [provider]}}]})
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0, timeout=10)
    reply = client.responses.create(model="gpt-az", input="hello", instructions="be kind")
    assert reply.output_text == "hi from azure" and reply.usage is not None and reply.usage.total_tokens == 7
    seen = scripted.requests[-1]
    assert seen.target == "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
    assert seen.headers["api-key"] == "az-key"
    assert seen.body["messages"] == [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]


def test_storage_with_several_workers_needs_a_shared_store() -> None:
    from llmproxy import FactoryContext, MemoryStore
    from llmproxy.filters.routing.filter import RoutingFactory

    routing = _config(9)["filters"][0]["config"]
    context = FactoryContext(MemoryStore(), workers=2)
    assert RoutingFactory("routing", routing, context).conversations is None  # off unless asked for
    with pytest.raises(ValueError, match=r"responses.store: with server.workers above 1"):
        RoutingFactory("routing", {**routing, "responses": {"store": True}}, context)
    single = FactoryContext(MemoryStore(), workers=1)
    assert RoutingFactory("routing", routing, single).conversations is not None


def test_refusals_on_the_way_to_anthropic_name_the_responses_field(client: openai.OpenAI) -> None:
    schema = {"type": "json_schema", "name": "o", "schema": {"type": "object"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="claude-x", input="hi", text={"format": schema})  # type: ignore[typeddict-item]
    assert err.value.param == "text.format" and "text.format" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="claude-x", input="hi", reasoning={"effort": "low"}, max_output_tokens=500)
    assert err.value.param == "reasoning.effort"


def test_get_and_delete_of_a_pass_through_response_go_to_its_provider(client: openai.OpenAI, mock: MockServer) -> None:
    first = client.responses.create(model="gpt-native", input="hello", extra_headers={"x-mock-tokens": "2"})
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == "lorem ipsum "  # the mock's own stored copy
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    bridged = client.responses.create(model="claude-x", input="hello")
    assert client.responses.retrieve(bridged.id).id == bridged.id  # a bridged one is answered here
