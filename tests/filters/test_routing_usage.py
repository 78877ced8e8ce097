"""Provider usage on every path: ``attempt.usage`` for each protocol pair and mode.

A scripted provider answers every request with the reply a test chose (usage
present, absent, split across Anthropic's ``message_start`` and
``message_delta``, with cache and reasoning tokens); a real proxy with the
routing filter sits in front, and a recorder filter reads ``attempt.usage``
in ``on_attempt_complete``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from llmproxy import Source, Usage
from llmproxy.filters.routing.usage import StreamUsage, from_anthropic, from_openai
from tests import filters_for_tests as tf
from tests.filters.scripted_provider import Reply, Scripted
from tests.support import RunningProxy, raw_exchange

Make = Callable[[dict[str, Any]], RunningProxy]


def _json_reply(body: dict[str, Any]) -> Reply:
    return Reply(200, orjson.dumps(body))


def _sse_reply(events: list[tuple[str | None, dict[str, Any] | str]]) -> Reply:
    """A stream, sent chunked in small pieces (the proxy must frame it again)."""
    out: list[bytes] = []
    for name, data in events:
        payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
        out.append((b"event: %s\n" % name.encode() if name else b"") + b"data: " + payload + b"\n\n")
    return Reply(200, out, "text/event-stream")


def _is_stream(reply: Reply) -> bool:
    return reply.content_type == "text/event-stream"


OPENAI_USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
ANTHROPIC_USAGE = {
    "input_tokens": 10,
    "output_tokens": 5,
    "cache_read_input_tokens": 3,
    "cache_creation_input_tokens": 2,
}

OPENAI_JSON = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}],
    "usage": OPENAI_USAGE,
}
ANTHROPIC_JSON = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "hi there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": ANTHROPIC_USAGE,
}


def _openai_chunks(usage: dict[str, Any] | None) -> list[tuple[str | None, dict[str, Any] | str]]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {"content": "hi there"}}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    ]
    if usage is not None:
        events.append((None, {**base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return events


def _anthropic_events(start_usage: dict[str, Any], delta_usage: dict[str, Any] | None) -> list[Any]:
    message = {**ANTHROPIC_JSON, "content": [], "stop_reason": None, "usage": start_usage}
    events: list[Any] = [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi there"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    if delta_usage is not None:
        events += [
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage}),
            ("message_stop", {"type": "message_stop"}),
        ]
    return events


def _proxy(make_proxy: Make, port: int, provider_type: str) -> tf.UsageRecorderFactory:
    tf.UsageRecorderFactory.instances.clear()
    base = f"http://127.0.0.1:{port}" + ("/v1" if provider_type == "openai" else "")
    proxy = make_proxy(
        {
            "filters": [
                {
                    "name": "routing",
                    "config": {
                        "providers": [
                            {
                                "name": "p",
                                "type": provider_type,
                                "base_url": base,
                                "keys": ["sk-test-key-123456"],
                                "models": {"m": "m"},
                            }
                        ]
                    },
                },
                {"name": "tests.filters_for_tests:UsageRecorderFactory"},
            ]
        }
    )
    _proxy.port = proxy.port  # type: ignore[attr-defined]
    return tf.UsageRecorderFactory.instances[-1]


def _ask(port: int, client: str, stream: bool, include_usage: bool = False) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    if client == "anthropic":
        body["max_tokens"] = 32
        path = b"/v1/messages"
    else:
        path = b"/v1/chat/completions"
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    head = b"POST %s HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    head += b"Connection: close\r\n\r\n"
    return raw_exchange(port, head % (path, len(data)) + data)


def _only_usage(rec: tf.UsageRecorderFactory) -> Usage | None:
    assert len(rec.attempts) == 1, rec.attempts
    outcome, usage = rec.attempts[0]
    assert outcome == "completed"
    return usage  # type: ignore[no-any-return]


OPENAI_EXPECTED = (10, 5, 4, 0, 2)  # input, output, cache read, cache write, reasoning
ANTHROPIC_EXPECTED = (15, 5, 3, 2, 0)


def _numbers(u: Usage) -> tuple[int, int, int, int, int]:
    return (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens)


@pytest.mark.parametrize("client", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("provider", "reply", "expected"),
    [
        ("openai", _json_reply(OPENAI_JSON), OPENAI_EXPECTED),
        ("anthropic", _json_reply(ANTHROPIC_JSON), ANTHROPIC_EXPECTED),
        ("openai", _sse_reply(_openai_chunks(OPENAI_USAGE)), OPENAI_EXPECTED),
        (
            "anthropic",
            _sse_reply(
                _anthropic_events(
                    {
                        "input_tokens": 10,
                        "output_tokens": 1,
                        "cache_read_input_tokens": 3,
                        "cache_creation_input_tokens": 2,
                    },
                    {"output_tokens": 5},
                )
            ),
            ANTHROPIC_EXPECTED,
        ),
    ],
    ids=["openai-json", "anthropic-json", "openai-stream", "anthropic-stream-split"],
)
def test_provider_usage_on_every_pair_and_mode(
    scripted: Scripted, make_proxy: Make, client: str, provider: str, reply: Reply, expected: tuple[int, ...]
) -> None:
    scripted.default = reply
    rec = _proxy(make_proxy, scripted.port, provider)
    stream = _is_stream(reply)
    response = _ask(_proxy.port, client, stream)  # type: ignore[attr-defined]
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert b"hi there" in response
    usage = _only_usage(rec)
    assert usage is not None
    assert _numbers(usage) == expected
    assert usage.input_source is Source.PROVIDER and usage.output_source is Source.PROVIDER
    assert "partial" not in usage.extra
    assert (usage.model, usage.provider) == ("m", "p") and usage.key_id
    assert usage.provider_usage is not None


@pytest.mark.parametrize("client", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("provider", "reply"),
    [
        ("openai", _json_reply({k: v for k, v in OPENAI_JSON.items() if k != "usage"})),
        ("anthropic", _json_reply({k: v for k, v in ANTHROPIC_JSON.items() if k != "usage"})),
        ("openai", _sse_reply(_openai_chunks(None))),
    ],
    ids=["openai-json", "anthropic-json", "openai-stream"],
)
def test_no_provider_usage_leaves_none(
    scripted: Scripted, make_proxy: Make, client: str, provider: str, reply: Reply
) -> None:
    scripted.default = reply
    rec = _proxy(make_proxy, scripted.port, provider)
    response = _ask(_proxy.port, client, _is_stream(reply))  # type: ignore[attr-defined]
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert _only_usage(rec) is None


def test_anthropic_stream_cut_before_message_delta_is_partial(scripted: Scripted, make_proxy: Make) -> None:
    scripted.default = _sse_reply(_anthropic_events({"input_tokens": 10, "output_tokens": 1}, None))
    rec = _proxy(make_proxy, scripted.port, "anthropic")
    _ask(_proxy.port, "anthropic", True)  # type: ignore[attr-defined]
    _, usage = rec.attempts[0]
    assert usage is not None and usage.input_tokens == 10
    assert usage.extra.get("partial") is True  # output is a running figure: metering counts the text


@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
def test_the_injected_usage_chunk_reaches_the_client_only_when_asked(
    scripted: Scripted, make_proxy: Make, asked: bool
) -> None:
    scripted.default = _sse_reply(_openai_chunks(OPENAI_USAGE))
    rec = _proxy(make_proxy, scripted.port, "openai")
    response = _ask(_proxy.port, "openai", True, include_usage=asked)  # type: ignore[attr-defined]
    assert (b'"choices":[],"usage"' in response) is asked
    assert response.count(b"data: ") == (5 if asked else 4)
    usage = _only_usage(rec)
    assert usage is not None and _numbers(usage) == OPENAI_EXPECTED


def test_the_openai_usage_chunk_becomes_anthropic_usage_for_an_anthropic_client(
    scripted: Scripted, make_proxy: Make
) -> None:
    scripted.default = _sse_reply(_openai_chunks(OPENAI_USAGE))
    _proxy(make_proxy, scripted.port, "openai")
    response = _ask(_proxy.port, "anthropic", True)  # type: ignore[attr-defined]
    delta = [line for line in response.split(b"\n") if line.startswith(b"data: ") and b"message_delta" in line]
    assert delta, response
    usage = orjson.loads(delta[-1][6:])["usage"]
    # the OpenAI prompt count includes its cached part; Anthropic's input_tokens does not
    assert usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) == 10
    assert usage["output_tokens"] == 5


# -- the readers themselves -----------------------------------------------------------
def test_readers_follow_the_genai_rule() -> None:
    u = from_anthropic(ANTHROPIC_USAGE)
    assert _numbers(u) == ANTHROPIC_EXPECTED
    o = from_openai(OPENAI_USAGE)
    assert _numbers(o) == OPENAI_EXPECTED
    r = from_openai(
        {
            "input_tokens": 7,
            "output_tokens": 3,
            "input_tokens_details": {"cached_tokens": 1},
            "output_tokens_details": {"reasoning_tokens": 2},
        }
    )  # Responses API shape
    assert _numbers(r) == (7, 3, 1, 0, 2)
    e = from_openai({"prompt_tokens": 8, "total_tokens": 8})  # embeddings
    assert _numbers(e) == (8, 0, 0, 0, 0) and "partial" not in e.extra


def test_stream_usage_replaces_cumulative_counts_and_never_adds() -> None:
    acc = StreamUsage("anthropic")
    acc.take({"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}})
    acc.take({"type": "message_delta", "usage": {"output_tokens": 4}})
    acc.take({"type": "message_delta", "usage": {"output_tokens": 9, "input_tokens": None}})
    result = acc.result()
    assert result is not None and (result.input_tokens, result.output_tokens) == (10, 9)
    assert "partial" not in result.extra


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_usage_events_finds_exactly_the_usage_events_of_a_batch(line_end: bytes) -> None:
    from llmproxy.filters.routing.usage import usage_events

    events = [
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}',
        b'data: {"choices":[],"usage":{"prompt_tokens":3}}',
    ]
    batch = b"".join(e.replace(b"\n", line_end) + line_end * 2 for e in events * 3)
    found = usage_events(batch)
    assert [payload["usage"] for _, payload in found] == [{"prompt_tokens": 3}] * 3
    assert all(event.endswith(line_end * 2) and event in batch for event, _ in found)


def _sse_whole(events: list[tuple[str | None, dict[str, Any] | str]]) -> Reply:
    """A stream sent as one piece (a provider that buffered it, or a fast burst): one big batch."""
    reply = _sse_reply(events)
    body = reply.body
    assert isinstance(body, list)
    return Reply(200, body, "text/event-stream", piece=sum(map(len, body)))


def _padded(events: list[Any], at: int, make: Callable[[int], tuple[str | None, dict[str, Any]]]) -> list[Any]:
    """``events`` with 60 content events inserted at ``at``: a batch far longer than routing's
    whole-batch threshold, so only its ends are searched."""
    return events[:at] + [make(i) for i in range(60)] + events[at:]


def _openai_piece(i: int) -> tuple[str | None, dict[str, Any]]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return None, {**base, "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]}


def _anthropic_piece(i: int) -> tuple[str | None, dict[str, Any]]:
    delta = {"type": "text_delta", "text": f" word{i}"}
    return "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}


@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
def test_an_openai_stream_in_one_piece_keeps_its_usage_finish_and_drops_only_the_injected_chunk(
    scripted: Scripted, make_proxy: Make, asked: bool
) -> None:
    events = _padded(_openai_chunks(OPENAI_USAGE), 2, _openai_piece)
    scripted.default = _sse_whole(events)
    rec = _proxy(make_proxy, scripted.port, "openai")
    response = _ask(_proxy.port, "openai", True, include_usage=asked)  # type: ignore[attr-defined]
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert (b'"choices":[],"usage"' in response) is asked
    assert response.count(b"data: ") == len(events) - (0 if asked else 1)
    assert b" word0" in response and b" word59" in response and response.rstrip().endswith(b"0")
    usage = _only_usage(rec)
    assert usage is not None and _numbers(usage) == OPENAI_EXPECTED
    assert rec.finishes == [("stop",)]


def test_an_anthropic_stream_in_one_piece_keeps_message_start_and_message_delta_usage(
    scripted: Scripted, make_proxy: Make
) -> None:
    start = {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}
    events = _padded(_anthropic_events(start, {"output_tokens": 5}), 3, _anthropic_piece)
    scripted.default = _sse_whole(events)
    rec = _proxy(make_proxy, scripted.port, "anthropic")
    response = _ask(_proxy.port, "anthropic", True)  # type: ignore[attr-defined]
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert response.count(b"event: ") == len(events)
    usage = _only_usage(rec)
    assert usage is not None and _numbers(usage) == ANTHROPIC_EXPECTED
    assert "partial" not in usage.extra
    assert rec.finishes == [("end_turn",)]
