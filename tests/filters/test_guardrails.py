"""The ``guardrails`` filter end to end: real proxy, the mock provider told what to reply, the official SDKs.

A secret split over several SSE events (text or tool-call argument fragments)
never reaches the client, in every protocol and through translation; what
the client gets equals the redaction of the whole text; a request block makes
no upstream call; a mid-stream block ends the stream with an error the SDK
raises; remote checks fail open or closed on a slow service.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from llmproxy.filters.guardrails.rules import RuleSet, parse_rules
from llmproxy.mock import MockServer
from llmproxy.runtime.app import check_config
from llmproxy.runtime.config import ConfigError, parse_config
from tests.support import LoopThread, RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

SECRET = "sk-proj-Abc123Def456Ghi789Jkl012Mno345"
REPLY = f"Sure, the key is {SECRET} and mail bob.smith@example.com for more."
REDACT = [
    {"name": "secrets", "detectors": ["secrets"], "action": "redact"},
    {"detector": "email", "action": "redact"},
]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    }
]
ANTHROPIC_TOOLS = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
RESPONSES_TOOLS = [
    {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}
]


def expected(text: str, rules: list[dict[str, Any]] = REDACT) -> str:
    """The whole-text redaction of ``text``."""
    return RuleSet(parse_rules(rules, "test")).apply(text)[0]


def config(port: int, rules: list[dict[str, Any]], window: int = 128, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": "off"},
        "filters": [
            {"name": "guardrails", "config": {"window": window, "rules": rules, **extra}},
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "oa",
                            "type": "openai",
                            "base_url": f"http://127.0.0.1:{port}/v1",
                            "keys": ["sk-test-key-123456"],
                            "models": {"gpt-x": "mock-gpt"},
                        },
                        {
                            "name": "an",
                            "type": "anthropic",
                            "base_url": f"http://127.0.0.1:{port}",
                            "keys": ["sk-ant-test"],
                            "models": {"claude-x": "mock-claude"},
                        },
                    ]
                },
            },
        ],
    }


def oa(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


def an(proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)


def reply_headers(text: str, chunk: int) -> dict[str, str]:
    return {"x-mock-reply": text, "x-mock-chunk-chars": str(chunk)}


def chat_text(proxy: RunningProxy, model: str, stream: bool, headers: dict[str, str]) -> str:
    client = oa(proxy)
    messages: Any = [{"role": "user", "content": "hi"}]
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, extra_headers=headers)
        return reply.choices[0].message.content or ""
    parts = []
    for chunk in client.chat.completions.create(model=model, messages=messages, extra_headers=headers, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def messages_text(proxy: RunningProxy, model: str, stream: bool, headers: dict[str, str]) -> str:
    client = an(proxy)
    messages: Any = [{"role": "user", "content": "hi"}]
    if not stream:
        reply = client.messages.create(model=model, max_tokens=500, messages=messages, extra_headers=headers)
        return "".join(b.text for b in reply.content if b.type == "text")
    parts = []
    for event in client.messages.create(
        model=model, max_tokens=500, messages=messages, extra_headers=headers, stream=True
    ):
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            parts.append(event.delta.text)
    return "".join(parts)


def responses_text(proxy: RunningProxy, model: str, stream: bool, headers: dict[str, str]) -> str:
    client = oa(proxy)
    if not stream:
        return client.responses.create(model=model, input="hi", extra_headers=headers).output_text
    parts = []
    done = ""
    for event in client.responses.create(model=model, input="hi", extra_headers=headers, stream=True):
        if event.type == "response.output_text.delta":
            parts.append(event.delta)
        elif event.type == "response.output_text.done":
            done = event.text
    assert done == "".join(parts)
    return "".join(parts)


CLIENTS = {"chat": chat_text, "messages": messages_text, "responses": responses_text}


@pytest.mark.parametrize("model", ["gpt-x", "claude-x"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", sorted(CLIENTS))
def test_a_secret_split_over_three_events_never_reaches_the_sdk(
    mock: MockServer, make_proxy: Make, api: str, stream: bool, model: str
) -> None:
    proxy = make_proxy(config(mock.port, REDACT))
    # 12 characters per event: the 37-character key straddles 4 events, the email 3
    text = CLIENTS[api](proxy, model, stream, reply_headers(REPLY, 12))
    assert SECRET not in text and "bob.smith" not in text
    assert text == expected(REPLY) == "Sure, the key is [redacted:secrets] and mail [redacted:email] for more."


def _chat_args(proxy: RunningProxy, model: str, stream: bool, headers: dict[str, str]) -> str:
    client = oa(proxy)
    messages: Any = [{"role": "user", "content": "hi"}]
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, extra_headers=headers)
        calls = reply.choices[0].message.tool_calls or []
        return "".join(c.function.arguments for c in calls)  # type: ignore[union-attr]
    parts = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, extra_headers=headers, stream=True
    ):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.function and call.function.arguments:
                parts.append(call.function.arguments)
    return "".join(parts)


def _messages_args(proxy: RunningProxy, model: str, stream: bool, headers: dict[str, str]) -> str:
    client = an(proxy)
    messages: Any = [{"role": "user", "content": "hi"}]
    if not stream:
        reply = client.messages.create(
            model=model, max_tokens=500, messages=messages, tools=ANTHROPIC_TOOLS, extra_headers=headers
        )
        return json.dumps([b.input for b in reply.content if b.type == "tool_use"])
    parts = []
    for event in client.messages.create(
        model=model, max_tokens=500, messages=messages, tools=ANTHROPIC_TOOLS, extra_headers=headers, stream=True
    ):
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            parts.append(event.delta.partial_json)
    return "".join(parts)


def _responses_args(proxy: RunningProxy, model: str, stream: bool, headers: dict[str, str]) -> str:
    client = oa(proxy)
    tools: Any = RESPONSES_TOOLS
    if not stream:
        reply = client.responses.create(model=model, input="hi", tools=tools, extra_headers=headers)
        return "".join(getattr(item, "arguments", "") for item in reply.output)
    parts = []
    for event in client.responses.create(model=model, input="hi", tools=tools, extra_headers=headers, stream=True):
        if event.type == "response.function_call_arguments.delta":
            parts.append(event.delta)
        elif event.type == "response.function_call_arguments.done":
            assert event.arguments == "".join(parts)
    return "".join(parts)


ARGS = {"chat": _chat_args, "messages": _messages_args, "responses": _responses_args}


@pytest.mark.parametrize("model", ["gpt-x", "claude-x"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", sorted(ARGS))
def test_a_secret_split_over_tool_argument_fragments_never_reaches_the_sdk(
    mock: MockServer, make_proxy: Make, api: str, stream: bool, model: str
) -> None:
    proxy = make_proxy(config(mock.port, REDACT))
    args = json.dumps({"q": f"use {SECRET} now"}, separators=(",", ":"))
    headers = {"x-mock-tool-args": args, "x-mock-chunk-chars": "13"}
    got = ARGS[api](proxy, model, stream, headers)
    assert SECRET not in got and "Abc123" not in got
    want = expected(args)
    if api == "messages" and not stream:
        assert json.loads(got) == [json.loads(want)]
    else:
        assert json.loads(got) == json.loads(want) == {"q": "use [redacted:secrets] now"}


def test_a_blocked_request_makes_no_upstream_call(mock: MockServer, make_proxy: Make) -> None:
    rules = [{"name": "banned", "deny": ["forbidden-word"], "side": "request"}]
    proxy = make_proxy(config(mock.port, rules))
    with pytest.raises(openai.BadRequestError) as info:
        oa(proxy).chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "say the FORBIDDEN-WORD please"}]
        )
    assert info.value.status_code == 400 and info.value.code == "guardrail_blocked"
    assert "banned" in info.value.message and "forbidden" not in info.value.message.lower()
    with pytest.raises(anthropic.BadRequestError) as ainfo:
        an(proxy).messages.create(
            model="claude-x",
            max_tokens=10,
            system="you know the forbidden-word",
            messages=[{"role": "user", "content": "hi"}],
        )
    body: Any = ainfo.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "banned" in body["error"]["message"]
    assert mock.requests == []
    # word boundaries: a longer word is not the denied one
    reply = oa(proxy).chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "the forbidden-wordsmith"}]
    )
    assert reply.choices and len(mock.requests) == 1


def test_a_redacted_request_goes_upstream_redacted(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(mock.port, [{"name": "secrets", "detectors": ["secrets"], "action": "redact"}]))
    oa(proxy).chat.completions.create(
        model="claude-x",
        messages=[
            {"role": "system", "content": f"key {SECRET}"},
            {"role": "user", "content": [{"type": "text", "text": f"my aws key is AKIAABCDEFGHIJKLMNOP, {SECRET}"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"k": SECRET})}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": f"result {SECRET}"},
        ],
    )
    sent = json.dumps(mock.requests[-1].body)
    assert SECRET not in sent and "AKIAABCDEFGHIJKLMNOP" not in sent
    assert sent.count("[redacted:secrets]") == 5


def test_a_block_mid_stream_ends_the_stream_with_an_error(mock: MockServer, make_proxy: Make) -> None:
    rules = [{"name": "no-keys", "detectors": ["secrets"], "action": "block", "side": "response"}]
    proxy = make_proxy(config(mock.port, rules))
    text = "word " * 60 + SECRET + " and more words after it" * 10
    headers = {**reply_headers(text, 5), "x-mock-itl-ms": "1"}
    seen: list[str] = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        for chunk in oa(proxy).chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}], extra_headers=headers, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)
    assert "no-keys" in info.value.message
    assert seen and SECRET[:8] not in "".join(seen)
    with pytest.raises(anthropic.APIStatusError) as ainfo:
        for _ in an(proxy).messages.create(
            model="claude-x",
            max_tokens=500,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=headers,
            stream=True,
        ):
            pass
    assert "no-keys" in str(ainfo.value)
    # the Responses stream's error is an event the SDK yields (type "error"), and the stream ends there
    events = list(oa(proxy).responses.create(model="gpt-x", input="hi", extra_headers=headers, stream=True))
    assert events[-1].type == "error" and events[-1].code == "guardrail_blocked"
    assert "no-keys" in events[-1].message
    assert time.monotonic() - started < 5


def test_log_rules_log_without_the_text_and_pass_it(
    mock: MockServer, make_proxy: Make, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(config(mock.port, [{"detector": "email", "action": "log"}]))
    with caplog.at_level(logging.INFO, logger="llmproxy.guardrails"):
        text = chat_text(proxy, "gpt-x", True, reply_headers(REPLY, 7))
        deadline = time.monotonic() + 3
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
    assert text == REPLY
    lines = [r.getMessage() for r in caplog.records]
    assert "guardrail email matched on the response (logged only)" in lines
    assert not any("bob.smith" in line for line in lines)


def test_rules_are_scoped_by_model(mock: MockServer, make_proxy: Make) -> None:
    rules = [{"detector": "email", "action": "redact", "models": ["claude-*"]}]
    proxy = make_proxy(config(mock.port, rules))
    headers = reply_headers(REPLY, 9)
    assert chat_text(proxy, "gpt-x", True, headers) == REPLY
    assert "[redacted:email]" in chat_text(proxy, "claude-x", True, headers)


# -- property: random texts, random positions, random chunk sizes ---------------------------


def test_random_secrets_at_random_positions_and_chunk_sizes_never_leak(mock: MockServer, make_proxy: Make) -> None:
    import random

    rng = random.Random(18)
    rules = [{"name": "s", "detectors": ["secrets", "pii"], "action": "redact"}]
    proxy = make_proxy(config(mock.port, rules))
    secrets = [SECRET, "AKIAQWERTYUIOPASDFGH", "ghp_" + "a1B2" * 9, "joe.bloggs@example.org", "4111 1111 1111 1111"]
    words = ["alpha", "beta", "4", "2024", "x@", "sk-", "AKIA", "the", "-", "gh", "(555)"]
    for _ in range(12):
        parts = [rng.choice(words) for _ in range(rng.randint(5, 40))]
        planted = rng.sample(secrets, rng.randint(1, 3))
        for secret in planted:
            parts.insert(rng.randint(0, len(parts)), secret)
        text = " ".join(parts)
        got = chat_text(proxy, rng.choice(["gpt-x", "claude-x"]), True, reply_headers(text, rng.randint(1, 17)))
        for secret in planted:
            assert secret not in got
        assert got == expected(text, rules)


# -- remote checks -----------------------------------------------------------------------------


@pytest.fixture
def slow_checker(loop_thread: LoopThread) -> Iterator[dict[str, Any]]:
    """A verdict service: answers ``{"flagged": ...}`` after ``delay`` seconds; counts its calls."""
    state: dict[str, Any] = {"delay": 0.0, "flagged": False, "calls": 0, "bodies": []}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            state["bodies"].append(json.loads(await reader.readexactly(length)))
            state["calls"] += 1
            await asyncio.sleep(state["delay"])
            body = json.dumps({"flagged": state["flagged"], "reason": "test"}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
            writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    server = loop_thread.call(start())
    state["port"] = server.sockets[0].getsockname()[1]
    yield state

    async def stop() -> None:
        server.close()

    loop_thread.call(stop())


def _remote_rules(port: int, failure: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/check"
    return [
        {"name": "mod", "remote": {"url": url, "timeout": 0.3, "failure": failure}},
        {"name": "mod-log", "remote": {"url": url, "timeout": 0.3, "failure": failure}, "action": "log"},
    ]


def test_remote_check_blocks_when_flagged_and_is_called_once(
    mock: MockServer, make_proxy: Make, slow_checker: dict[str, Any]
) -> None:
    proxy = make_proxy(config(mock.port, _remote_rules(slow_checker["port"], "closed")))
    oa(proxy).chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "fine"}])
    assert slow_checker["calls"] == 1  # two rules, one service: one call per request
    assert slow_checker["bodies"][0]["messages"] == [{"role": "user", "content": "fine"}]
    slow_checker["flagged"] = True
    with pytest.raises(openai.BadRequestError) as info:
        oa(proxy).chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "bad"}])
    assert info.value.code == "guardrail_blocked" and "mod" in info.value.message
    assert len(mock.requests) == 1


def test_remote_check_slow_service_fail_open(mock: MockServer, make_proxy: Make, slow_checker: dict[str, Any]) -> None:
    slow_checker["delay"] = 2.0
    slow_checker["flagged"] = True
    proxy = make_proxy(config(mock.port, _remote_rules(slow_checker["port"], "open")))
    started = time.monotonic()
    reply = oa(proxy).chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices and time.monotonic() - started < 1.5
    assert len(mock.requests) == 1


def test_remote_check_slow_service_fail_closed(
    mock: MockServer, make_proxy: Make, slow_checker: dict[str, Any]
) -> None:
    slow_checker["delay"] = 2.0
    proxy = make_proxy(config(mock.port, _remote_rules(slow_checker["port"], "closed")))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        oa(proxy).chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503 and info.value.code == "guardrail_unavailable"
    assert time.monotonic() - started < 1.5
    with pytest.raises(anthropic.InternalServerError):
        an(proxy).messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert mock.requests == []


# -- startup -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "field", "reason"),
    [
        ([{"name": "r", "regex": "(unclosed"}], "rules[0].regex", "invalid regular expression"),
        ([{"name": "r", "regex": "a*"}], "rules[0].regex", "empty string"),
        ([{"detector": "passport"}], "rules[0].detector", "unknown detector"),
        ([{"detector": "email", "action": "shout"}], "rules[0].action", "unknown action"),
        ([{"regex": "x"}], "rules[0].name", "required"),
        ([{"name": "r"}], "rules[0]", "exactly one of"),
        ([{"detector": "email", "side": "sideways"}], "rules[0].side", "must be one of"),
        ([{"detector": "email", "colour": 1}], "rules[0].colour", "unknown key"),
        ([{"name": "m", "remote": {"url": "http://x", "failure": "maybe"}}], "rules[0].remote.failure", "open or"),
        ([{"name": "m", "remote": {"url": "http://x"}, "action": "redact"}], "rules[0].action", "redact"),
        ([], "rules", "non-empty"),
    ],
)
async def test_bad_config_is_refused_naming_file_field_and_reason(
    rules: list[dict[str, Any]], field: str, reason: str
) -> None:
    raw = config(1, rules)
    with pytest.raises(ConfigError) as info:
        await check_config(parse_config(raw, "guard.yaml"))
    message = str(info.value)
    assert "guard.yaml" in message and field in message and reason in message


def test_rules_are_scoped_by_principal_and_team(mock: MockServer, make_proxy: Make) -> None:
    rules = [
        {"name": "alice-only", "detector": "email", "action": "redact", "principals": ["alice"]},
        {"name": "team-ops", "detectors": ["secrets"], "action": "redact", "teams": ["ops"]},
    ]
    raw = config(mock.port, rules)
    keys = [
        {"name": "alice", "key": "sk-demo-alice-key", "team": "research"},
        {"name": "bob", "key": "sk-demo-bob-key", "team": "ops"},
    ]
    raw["filters"].insert(0, {"name": "auth", "config": {"keys": keys}})
    proxy = make_proxy(raw)
    headers = reply_headers(REPLY, 6)

    def ask(key: str) -> str:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=10)
        parts = []
        for chunk in client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}], extra_headers=headers, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    assert ask("sk-demo-alice-key") == f"Sure, the key is {SECRET} and mail [redacted:alice-only] for more."
    assert ask("sk-demo-bob-key") == "Sure, the key is [redacted:team-ops] and mail bob.smith@example.com for more."


def test_a_blocked_json_response_is_an_error_in_the_client_protocol(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(config(mock.port, [{"name": "no-keys", "detectors": ["secrets"], "side": "response"}]))
    headers = reply_headers(REPLY, 6)
    with pytest.raises(openai.BadRequestError) as info:
        oa(proxy).chat.completions.create(
            model="claude-x", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
    assert info.value.code == "guardrail_blocked" and SECRET not in str(info.value.body)
    with pytest.raises(anthropic.BadRequestError) as ainfo:
        an(proxy).messages.create(
            model="gpt-x", max_tokens=50, messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
    assert "no-keys" in str(ainfo.value) and SECRET not in str(ainfo.value.body)


def test_a_block_mid_stream_drops_the_upstream(mock: MockServer, make_proxy: Make) -> None:
    rules = [{"name": "no-keys", "detectors": ["secrets"], "action": "block", "side": "response"}]
    proxy = make_proxy(config(mock.port, rules))
    # the whole stream would take ~20 s (4000 events, 5 ms apart); the key comes early
    text = "start " * 30 + SECRET + " tail" * 4000
    headers = {**reply_headers(text, 5), "x-mock-itl-ms": "5"}
    started = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in oa(proxy).chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}], extra_headers=headers, stream=True
        ):
            pass
    deadline = time.monotonic() + 5
    while mock.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mock.connections == 0  # the proxy closed its upstream connection: the mock stopped streaming
    assert time.monotonic() - started < 10
