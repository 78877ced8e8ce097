"""The golden translation transcripts (``tests/data/translate``) end to end through the proxy.

* Request cases: the golden *input* is posted to the proxy, which routes it
  to the mock provider across protocols; what the mock received must equal
  the golden *expected* body (the provider mapping gives the golden model
  name, so nothing is left out of the comparison).
* Response, stream and error cases: a scripted provider (``Scripted``, from
  ``test_routing.py``) answers with the golden *input*, cut into 7-byte TCP
  writes for streams; what the client receives must equal the golden
  *expected* (streams compared event by event, ``created`` ignored).
* Stream cases once more through the official SDK, which must reassemble
  text and tool-call arguments exactly as the provider sent them.

Unit-level checks of the same transcripts, without the proxy, are in
``test_translate_golden.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from llmproxy.mock import MockServer

from ..support import RunningProxy
from .test_routing import Reply, Scripted, routing
from .test_translate_golden import (
    CASES,
    anthropic_provider_sent,
    load,
    normalise,
    openai_provider_sent,
    split_events,
    without_created,
)

Make = Callable[[dict[str, Any]], RunningProxy]

C2M = "chat_request_to_messages"  # OpenAI client, Anthropic provider
M2C = "messages_request_to_chat"  # Anthropic client, OpenAI provider


def cases(*kinds: str) -> list[Path]:
    return [p for p in CASES if load(p)["kind"] in kinds]


def model_map(kind: str) -> dict[str, str]:
    """Client model -> golden provider model, over every request case of ``kind``."""
    out: dict[str, str] = {}
    for path in cases(kind):
        case = load(path)
        client_model, provider_model = case["input"]["model"], case["args"]["model"]
        assert out.setdefault(client_model, provider_model) == provider_model, "golden models must be consistent"
    return out


@pytest.fixture
def golden_proxy(mock: MockServer, make_proxy: Make) -> RunningProxy:
    """OpenAI-client models go to the mock's Anthropic API and vice versa."""
    return make_proxy(
        routing(
            [
                {
                    "name": "an",
                    "type": "anthropic",
                    "base_url": f"http://127.0.0.1:{mock.port}",
                    "key": "sk-an",
                    "models": model_map(C2M),
                },
                {
                    "name": "oa",
                    "type": "openai",
                    "base_url": f"http://127.0.0.1:{mock.port}/v1",
                    "key": "sk-oa",
                    "models": model_map(M2C),
                },
            ]
        )
    )


def test_golden_request_cases_exist() -> None:
    assert len(cases(C2M)) >= 5 and len(cases(M2C)) >= 5
    assert set(model_map(C2M)).isdisjoint(model_map(M2C))


@pytest.mark.parametrize("path", cases(C2M, M2C), ids=lambda p: p.stem)
def test_golden_request_reaches_the_provider_translated(
    golden_proxy: RunningProxy, mock: MockServer, path: Path
) -> None:
    case = load(path)
    client_path, provider_path = (
        ("/v1/chat/completions", "/v1/messages") if case["kind"] == C2M else ("/v1/messages", "/v1/chat/completions")
    )
    response = httpx2.post(golden_proxy.url + client_path, json=case["input"], timeout=10)
    assert response.status_code == 200, response.text
    assert len(mock.requests) == 1
    received = mock.requests[0]
    assert (received.method, received.path) == ("POST", provider_path)
    assert received.body == case["expected"]
    assert received.stream is (case["input"].get("stream") is True)


# ---------------------------------------------------------------------------
# Golden provider answers, replayed by a scripted provider
# ---------------------------------------------------------------------------

RESPONSE_KINDS = {
    # kind: (client protocol, provider type, golden payload is a stream, is an error)
    "messages_response_to_chat": ("openai", "anthropic", False, False),
    "messages_stream_to_chat": ("openai", "anthropic", True, False),
    "anthropic_error_to_openai": ("openai", "anthropic", False, True),
    "chat_response_to_messages": ("anthropic", "openai", False, False),
    "chat_stream_to_messages": ("anthropic", "openai", True, False),
    "openai_error_to_anthropic": ("anthropic", "openai", False, True),
}


def golden_client_model(client: str) -> str:
    """The one model name the golden answers for ``client`` carry (served as-is by its provider)."""
    names = {
        load(p)["args"]["model"]
        for p in cases(*(k for k, v in RESPONSE_KINDS.items() if v[0] == client))
        if "model" in load(p)["args"]
    }
    assert len(names) == 1, names
    return names.pop()


CLIENT_MODEL = {client: golden_client_model(client) for client in ("openai", "anthropic")}


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()


@pytest.fixture
def replay_proxy(scripted: Scripted, make_proxy: Make) -> RunningProxy:
    return make_proxy(
        routing(
            [
                {
                    "name": "an",
                    "type": "anthropic",
                    "base_url": scripted.url,
                    "key": "sk-an",
                    "models": [CLIENT_MODEL["openai"]],
                },
                {
                    "name": "oa",
                    "type": "openai",
                    "base_url": scripted.url + "/v1",
                    "key": "sk-oa",
                    "models": [CLIENT_MODEL["anthropic"]],
                },
            ]
        )
    )


def provider_reply(case: dict[str, Any]) -> Reply:
    _, _, stream, error = RESPONSE_KINDS[case["kind"]]
    if stream:
        return Reply(200, [event.encode() for event in case["input"]], "text/event-stream")
    if error:
        body = case["input"].encode()
        return Reply(case["args"]["status"], body, "application/json" if body.startswith(b"{") else "text/plain")
    return Reply(200, json.dumps(case["input"]).encode())


def client_request(case: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    client, _, stream, _ = RESPONSE_KINDS[case["kind"]]
    body: dict[str, Any] = {"model": CLIENT_MODEL[client], "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
        if client == "openai" and case["args"].get("include_usage"):
            body["stream_options"] = {"include_usage": True}
    if client == "openai":
        return "/v1/chat/completions", body
    return "/v1/messages", {**body, "max_tokens": 64}


@pytest.mark.parametrize("path", cases(*RESPONSE_KINDS), ids=lambda p: p.stem)
def test_golden_provider_answer_reaches_the_client_translated(
    replay_proxy: RunningProxy, scripted: Scripted, path: Path
) -> None:
    case = load(path)
    _, provider, stream, error = RESPONSE_KINDS[case["kind"]]
    scripted.replies.append(provider_reply(case))
    client_path, body = client_request(case)
    with httpx2.stream("POST", replay_proxy.url + client_path, json=body, timeout=10) as response:
        raw = b"".join(response.iter_raw())
    (seen,) = scripted.requests
    assert seen.target == ("/v1/messages" if provider == "anthropic" else "/v1/chat/completions")
    expected_status = case["args"]["status"] if error else 200
    assert response.status_code == expected_status, raw
    if stream:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert normalise(split_events(raw)) == normalise(case["expected"])
    elif error and expected_status in (401, 403):
        # the provider refused the proxy's key: its text (which quotes the key) is never relayed
        got, expected = json.loads(raw), case["expected"]
        assert got["error"]["type"] == expected["error"]["type"] and set(got) == set(expected)
        assert "refused the credential the proxy holds" in got["error"]["message"]
        assert b"sk-" not in raw
    else:
        assert response.headers["content-type"].startswith("application/json")
        assert without_created(json.loads(raw)) == without_created(case["expected"])


@pytest.mark.parametrize("path", cases("messages_stream_to_chat"), ids=lambda p: p.stem)
def test_openai_sdk_parses_golden_stream_through_the_proxy(
    replay_proxy: RunningProxy, scripted: Scripted, path: Path
) -> None:
    case = load(path)
    scripted.replies.append(provider_reply(case))
    text, args, error = anthropic_provider_sent(case["input"])
    client = openai.OpenAI(base_url=replay_proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    stream = client.chat.completions.create(
        model=CLIENT_MODEL["openai"],
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True} if case["args"]["include_usage"] else openai.omit,
    )
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    chunks = 0
    if error is not None:
        with pytest.raises(openai.APIError):
            for chunk in stream:
                state.handle_chunk(chunk)
        return
    for chunk in stream:
        chunks += 1
        state.handle_chunk(chunk)
    final = state.current_completion_snapshot
    message = final.choices[0].message
    assert (message.content or "") == text
    calls = message.tool_calls or []
    assert [c.function.arguments for c in calls] == [args[i] for i in sorted(args)]
    assert chunks == len([e for e in case["expected"] if e != "data: [DONE]\n\n"])
    if case["args"]["include_usage"]:
        assert final.usage is not None and final.usage.total_tokens > 0


@pytest.mark.parametrize("path", cases("chat_stream_to_messages"), ids=lambda p: p.stem)
@pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")  # the golden model name
def test_anthropic_sdk_parses_golden_stream_through_the_proxy(
    replay_proxy: RunningProxy, scripted: Scripted, path: Path
) -> None:
    case = load(path)
    scripted.replies.append(provider_reply(case))
    text, args, error = openai_provider_sent(case["input"])
    client = anthropic.Anthropic(base_url=replay_proxy.url, api_key="sk-client", max_retries=0, timeout=10)

    def request() -> Any:
        return client.messages.stream(
            model=CLIENT_MODEL["anthropic"], max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )

    if error:
        with pytest.raises(anthropic.APIStatusError), request() as stream:
            stream.get_final_message()
        return
    fragments: dict[int, str] = {}
    events = 0
    with request() as stream:
        for event in stream:
            events += 1
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments[event.index] = fragments.get(event.index, "") + event.delta.partial_json
        final = stream.get_final_message()
    assert events >= len(case["expected"])  # the SDK adds text/input_json events of its own
    assert "".join(b.text for b in final.content if b.type == "text") == text
    tool_blocks = [i for i, b in enumerate(final.content) if b.type == "tool_use"]
    assert [fragments.get(i, "") for i in tool_blocks] == [args[k] for k in sorted(args)]
    assert [final.content[i].input for i in tool_blocks] == [json.loads(args[k]) for k in sorted(args)]
    assert final.stop_reason is not None
