"""Failure classification from the adapter, driven through the proxy.

A scripted provider answers the first request (key A) with a provider-specific
error and the next one normally; the tests check what failover did: retried on
key B or not, and the state it left key A in (admin page). Also the adapters'
``classify`` and the ``retry_after`` header rules without sockets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from llmproxy.filters.routing.adapters import ADAPTERS, FailureKind
from llmproxy.filters.routing.adapters.failures import retry_after
from tests.filters.scripted_provider import Reply, Scripted
from tests.filters.test_failover import call, key_state
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]
KA, KB = "sk-key-a-0001", "sk-key-b-0002"
OK_CHAT = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
OK_MESSAGES = json.dumps(
    {
        "id": "msg",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
).encode()


def _openai_error(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}}).encode()


def _anthropic_error(type_: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}}).encode()


def _proxy(make_proxy: Make, scripted: Scripted, kind: str) -> RunningProxy:
    base = scripted.url if kind == "anthropic" else f"{scripted.url}/v1"
    provider = {"name": "p", "type": kind, "base_url": base, "keys": [KA, KB], "models": ["m"]}
    return make_proxy(
        {
            "server": {"access_log": "off"},
            "filters": [
                {"name": "routing", "config": {"providers": [provider]}},
                {"name": "failover", "config": {"cooldown": 30, "eject_for": 600}},
            ],
        }
    )


def _chat(proxy: RunningProxy) -> Any:
    return call(
        proxy.port, "POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )


def _keys_seen(scripted: Scripted) -> list[str]:
    out = []
    for seen in scripted.requests:
        credential = seen.headers.get("authorization", "").removeprefix("Bearer ") or seen.headers.get(
            "x-api-key", seen.headers.get("api-key", "")
        )
        out.append(credential)
    return out


def test_openai_insufficient_quota_ejects_the_key_instead_of_cooling_it(scripted: Scripted, make_proxy: Make) -> None:
    scripted.replies.append(
        Reply(429, _openai_error("You exceeded your quota", "insufficient_quota", "insufficient_quota"))
    )
    scripted.default = Reply(200, OK_CHAT)
    proxy = _proxy(make_proxy, scripted, "openai")
    reply = _chat(proxy)
    assert (reply.status, reply.attempts) == (200, "2")
    assert _keys_seen(scripted) == [KA, KB]
    row = key_state(proxy.port, KA)
    assert (row["state"], row["reason"]) == ("ejected", "quota")
    assert row["until"] - time.time() > 500  # eject_for, not the 30 s cooldown


def test_a_plain_429_cools_for_retry_after_ms(scripted: Scripted, make_proxy: Make) -> None:
    scripted.replies.append(
        Reply(429, _openai_error("slow down", "requests", "rate_limit_exceeded"), headers=(("retry-after-ms", "7500"),))
    )
    scripted.default = Reply(200, OK_CHAT)
    proxy = _proxy(make_proxy, scripted, "openai")
    assert _chat(proxy).status == 200
    row = key_state(proxy.port, KA)
    assert (row["state"], row["reason"]) == ("cooling", "rate_limited")
    assert 5 < row["until"] - time.time() <= 7.5


def test_a_429_cools_for_the_exhausted_x_ratelimit_reset(scripted: Scripted, make_proxy: Make) -> None:
    headers = (
        ("x-ratelimit-remaining-requests", "10"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "2m0s"),
    )
    scripted.replies.append(Reply(429, _openai_error("tokens", "tokens", "rate_limit_exceeded"), headers=headers))
    scripted.default = Reply(200, OK_CHAT)
    proxy = _proxy(make_proxy, scripted, "openai")
    assert _chat(proxy).status == 200
    row = key_state(proxy.port, KA)
    assert row["state"] == "cooling"
    assert 110 < row["until"] - time.time() <= 120


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("azure", _openai_error("The response was filtered", "invalid_request_error", "content_filter")),
        ("openai", _openai_error("maximum context length is 8192", "invalid_request_error", "context_length_exceeded")),
        ("openai", _openai_error("bad", "invalid_request_error", "invalid_value")),
    ],
    ids=["azure-content-filter", "context-length", "bad-request"],
)
def test_a_request_fault_is_relayed_not_retried_and_the_key_stays_healthy(
    kind: str, body: bytes, scripted: Scripted, make_proxy: Make
) -> None:
    scripted.replies.append(Reply(400, body))
    scripted.default = Reply(200, OK_CHAT)
    proxy = _proxy(make_proxy, scripted, kind)
    reply = _chat(proxy)
    assert reply.status == 400 and reply.attempts == "1"
    assert len(scripted.requests) == 1
    assert json.loads(reply.body) == json.loads(body)  # the provider's own error, whole
    row = key_state(proxy.port, KA)
    assert (row["state"], row["failures"]) == ("healthy", 0)


def test_anthropic_529_overloaded_is_retried_on_the_next_key(scripted: Scripted, make_proxy: Make) -> None:
    scripted.replies.append(Reply(529, _anthropic_error("overloaded_error", "Overloaded")))
    scripted.default = Reply(200, OK_MESSAGES)
    proxy = _proxy(make_proxy, scripted, "anthropic")
    reply = call(
        proxy.port,
        "POST",
        "/v1/messages",
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    )
    assert (reply.status, reply.attempts) == (200, "2")
    assert _keys_seen(scripted) == [KA, KB]
    row = key_state(proxy.port, KA)
    assert (row["state"], row["failures"]) == ("healthy", 1)  # counted, below the threshold


def test_anthropic_credit_balance_ejects_the_key(scripted: Scripted, make_proxy: Make) -> None:
    scripted.replies.append(
        Reply(400, _anthropic_error("invalid_request_error", "Your credit balance is too low to access the API"))
    )
    scripted.default = Reply(200, OK_MESSAGES)
    proxy = _proxy(make_proxy, scripted, "anthropic")
    reply = call(
        proxy.port,
        "POST",
        "/v1/messages",
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    )
    assert (reply.status, reply.attempts) == (200, "2")
    assert key_state(proxy.port, KA)["reason"] == "quota"


# -- without sockets -----------------------------------------------------------------


def _adapter(kind: str) -> Any:
    return ADAPTERS[kind]({})


@pytest.mark.parametrize(
    ("kind", "status", "body", "expected"),
    [
        ("openai", 429, b'{"error":{"code":"insufficient_quota"}}', FailureKind.QUOTA),
        ("openai", 429, b'{"error":{"code":"rate_limit_exceeded"}}', FailureKind.RATE_LIMITED),
        ("openai", 401, b"", FailureKind.AUTH),
        ("openai", 500, b"", FailureKind.SERVER),
        ("openai", 503, b"", FailureKind.OVERLOADED),
        ("openai", 404, b"", FailureKind.BAD_REQUEST),
        ("openai", 200, b"", FailureKind.OK),
        ("groq", 429, b'{"error":{"code":"insufficient_quota"}}', FailureKind.QUOTA),
        ("azure", 400, b'{"error":{"code":"content_filter"}}', FailureKind.CONTENT_FILTER),
        ("anthropic", 529, b'{"type":"error","error":{"type":"overloaded_error"}}', FailureKind.OVERLOADED),
        ("anthropic", 400, b'{"error":{"message":"prompt is too long: 300000 tokens"}}', FailureKind.CONTEXT_LENGTH),
    ],
)
def test_classify(kind: str, status: int, body: bytes, expected: FailureKind) -> None:
    assert _adapter(kind).classify(status, {}.get, body, 0.0).kind is expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "9"}, 9.0),
        ({"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "1m30s"}, 90.0),
        (
            {
                "x-ratelimit-reset-requests": "20ms",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "9s",
            },
            0.02,
        ),
        (
            {"anthropic-ratelimit-tokens-reset": "1970-01-01T00:01:40Z", "anthropic-ratelimit-tokens-remaining": "0"},
            40.0,
        ),
        ({"x-ratelimit-reset-tokens": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: float | None) -> None:
    assert (
        retry_after(headers.get, 60.0) == pytest.approx(expected)
        if expected is not None
        else retry_after(headers.get, 60.0) is None
    )


def test_probe_request_is_the_adapters() -> None:
    method, path, headers, body = _adapter("anthropic").probe_request("claude-x")
    assert (method, path) == ("POST", "/v1/messages")
    assert (b"anthropic-version", b"2023-06-01") in headers
    assert json.loads(body)["max_tokens"] == 1
    assert _adapter("openai").probe_request("m")[:2] == ("POST", "/chat/completions")
