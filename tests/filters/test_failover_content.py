"""Failover's first-content decision, on parsed events, per stream protocol.

Failover holds a successful stream until its first content event, so that a
stream failing before it is retried invisibly, and releases it at that
event, after which a failure is the client's to see (no retry). The decision
used to be a regex on raw bytes (``"content":"``), so valid JSON with other
whitespace (``"content": "x"``) was held to the end and a stall after it was
retried as if nothing had been sent.

:func:`filters.failover.stream.classify` is checked event by event, then the
proxy over real sockets against a hand-written provider that sends chosen
events and then stalls (or ends), per protocol: OpenAI chat, Anthropic
messages, OpenAI Responses. The provider's idle timeout is 0.25 s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmproxy.filters.failover.stream import Kind, classify

from ..support import LoopThread, RunningProxy
from .test_failover import config

MODEL = "m"
IDLE = 0.25

CONTENT, NOTHING, END, ERROR = Kind.CONTENT, Kind.NOTHING, Kind.END, Kind.ERROR


def ev(data: str, event: str | None = None) -> bytes:
    """One raw event; a multi-line ``data`` becomes several ``data:`` lines."""
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def chat(delta: str, extra: str = "") -> bytes:
    return ev(
        '{"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": ' + delta + extra + "}]}"
    )


def anthropic(kind: str, body: str) -> bytes:
    return ev('{"type": "' + kind + '", ' + body + "}", kind)


def responses(kind: str, body: str = "") -> bytes:
    return ev('{"type": "' + kind + '"' + (", " + body if body else "") + "}", kind)


PRETTY_CHAT = """{
  "id": "c1",
  "choices": [
    {
      "index": 0,
      "delta": {
        "content": "x"
      }
    }
  ]
}"""

EVENTS: list[tuple[str, bytes, Kind]] = [
    # -- OpenAI chat -------------------------------------------------------------------------
    ("chat-compact", b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n', CONTENT),
    ("chat-space-after-colon", chat('{"content": "x"}'), CONTENT),
    ("chat-space-both-sides", ev('{"choices": [{"delta": {"content" : "x"}}]}'), CONTENT),
    ("chat-tabs-newline-escape", ev('{"choices":[{"delta":{"content":\t"\\n"}}]}'), CONTENT),
    ("chat-pretty-multiline", ev(PRETTY_CHAT), CONTENT),
    ("chat-crlf", b'data: {"choices": [{"delta": {"content": "x"}}]}\r\n\r\n', CONTENT),
    ("chat-no-space-after-data", b'data:{"choices": [{"delta": {"content": "x"}}]}\n\n', CONTENT),
    ("chat-role-and-content", chat('{"role": "assistant", "content": "Hi"}'), CONTENT),
    ("chat-second-choice", ev('{"choices": [{"delta": {}}, {"index": 1, "delta": {"content": "y"}}]}'), CONTENT),
    ("chat-refusal", chat('{"refusal": "I can\'t"}'), CONTENT),
    ("chat-reasoning-content", chat('{"reasoning_content": "think"}'), CONTENT),
    ("chat-reasoning", chat('{"reasoning": "think"}'), CONTENT),
    (
        "chat-tool-call",
        chat('{"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]}'),
        CONTENT,
    ),
    ("chat-function-call", chat('{"function_call": {"name": "f", "arguments": ""}}'), CONTENT),
    (
        "chat-legacy-completions-text",
        ev('{"object": "text_completion", "choices": [{"text": "x", "index": 0}]}'),
        CONTENT,
    ),
    ("chat-role-only", chat('{"role": "assistant"}'), NOTHING),
    ("chat-role-empty-content", chat('{"role": "assistant", "content": ""}'), NOTHING),
    ("chat-empty-content-spaced", chat('{"content" : ""}'), NOTHING),
    ("chat-null-content", chat('{"content": null}'), NOTHING),
    ("chat-empty-tool-calls", chat('{"tool_calls": []}'), NOTHING),
    ("chat-finish-only", ev('{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'), NOTHING),
    ("chat-usage-only", ev('{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}}'), NOTHING),
    ("chat-legacy-empty-text", ev('{"choices": [{"text": "", "index": 0}]}'), NOTHING),
    (
        "chat-content-word-in-id",
        ev('{"id": "\\"content\\":\\"x", "choices": [{"delta": {"role": "assistant"}}]}'),
        NOTHING,
    ),
    ("chat-comment", b": keep-alive\n\n", NOTHING),
    ("chat-not-json", ev("delta text"), NOTHING),
    ("chat-done", b"data: [DONE]\n\n", END),
    ("chat-done-spaced", b"data:  [DONE] \n\n", END),
    ("chat-error", ev('{"error": {"message": "overloaded", "type": "server_error"}}'), ERROR),
    ("chat-error-spaced", ev('{ "error" : {"message": "overloaded"} }'), ERROR),
    ("chat-error-null", ev('{"error": null, "choices": [{"delta": {"content": "x"}}]}'), CONTENT),
    ("event-error", b"event: error\ndata: whatever\n\n", ERROR),
    # -- Anthropic messages --------------------------------------------------------------------
    ("anthropic-message-start", anthropic("message_start", '"message": {"id": "m", "content": []}'), NOTHING),
    ("anthropic-ping", anthropic("ping", '"x": 1'), NOTHING),
    (
        "anthropic-text-block-start",
        anthropic("content_block_start", '"index": 0, "content_block": {"type": "text", "text": ""}'),
        NOTHING,
    ),
    (
        "anthropic-text-delta",
        anthropic("content_block_delta", '"index": 0, "delta": {"type": "text_delta", "text": "x"}'),
        CONTENT,
    ),
    (
        "anthropic-text-delta-compact",
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}\n\n',
        CONTENT,
    ),
    (
        "anthropic-empty-text-delta",
        anthropic("content_block_delta", '"index": 0, "delta": {"type": "text_delta", "text": ""}'),
        NOTHING,
    ),
    (
        "anthropic-thinking-delta",
        anthropic("content_block_delta", '"index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}'),
        CONTENT,
    ),
    (
        "anthropic-input-json-delta",
        anthropic("content_block_delta", '"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\\"a"}'),
        CONTENT,
    ),
    (
        "anthropic-tool-use-start",
        anthropic(
            "content_block_start",
            '"index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}',
        ),
        CONTENT,
    ),
    (
        "anthropic-server-tool-use-start",
        anthropic(
            "content_block_start", '"index": 1, "content_block": {"type": "server_tool_use", "id": "t", "name": "web"}'
        ),
        CONTENT,
    ),
    ("anthropic-message-delta", anthropic("message_delta", '"delta": {"stop_reason": "end_turn"}'), NOTHING),
    ("anthropic-message-stop", anthropic("message_stop", '"x": 0'), END),
    ("anthropic-message-stop-no-name", ev('{"type": "message_stop"}'), END),
    ("anthropic-error", anthropic("error", '"error": {"type": "overloaded_error", "message": "Overloaded"}'), ERROR),
    ("anthropic-error-no-name", ev('{"type": "error", "error": {"type": "overloaded_error"}}'), ERROR),
    # -- OpenAI Responses ------------------------------------------------------------------------
    ("responses-created", responses("response.created", '"response": {"id": "r", "output": []}'), NOTHING),
    ("responses-in-progress", responses("response.in_progress", '"response": {"id": "r"}'), NOTHING),
    (
        "responses-message-item-added",
        responses("response.output_item.added", '"item": {"type": "message", "content": []}'),
        NOTHING,
    ),
    (
        "responses-reasoning-item-added",
        responses("response.output_item.added", '"item": {"type": "reasoning"}'),
        NOTHING,
    ),
    (
        "responses-function-call-item-added",
        responses("response.output_item.added", '"item": {"type": "function_call", "name": "f", "arguments": ""}'),
        CONTENT,
    ),
    ("responses-output-text-delta", responses("response.output_text.delta", '"delta": "x"'), CONTENT),
    ("responses-output-text-delta-spaced", ev('{"type" : "response.output_text.delta" , "delta" : "x"}'), CONTENT),
    ("responses-empty-delta", responses("response.output_text.delta", '"delta": ""'), NOTHING),
    ("responses-function-args-delta", responses("response.function_call_arguments.delta", '"delta": "{"'), CONTENT),
    ("responses-reasoning-summary-delta", responses("response.reasoning_summary_text.delta", '"delta": "hm"'), CONTENT),
    ("responses-refusal-delta", responses("response.refusal.delta", '"delta": "no"'), CONTENT),
    ("responses-completed", responses("response.completed", '"response": {"id": "r"}'), END),
    ("responses-incomplete", responses("response.incomplete", '"response": {"id": "r"}'), END),
    ("responses-failed", responses("response.failed", '"response": {"error": {"code": "server_error"}}'), ERROR),
    ("responses-error", ev('{"type": "error", "code": "server_error", "message": "boom"}', "error"), ERROR),
]


@pytest.mark.parametrize(("raw", "kind"), [(raw, kind) for _, raw, kind in EVENTS], ids=[n for n, _, _ in EVENTS])
def test_classify_event(raw: bytes, kind: Kind) -> None:
    assert classify(raw) is kind
    assert classify(raw.rstrip(b"\r\n")) is kind  # an unterminated last event, as flushed at the end


# -- over real sockets ------------------------------------------------------------------------------


class ScriptedProvider:
    """A provider that answers attempt ``n`` with ``scripts[n]`` (the last one repeats).

    A script is ``(events, end)``: the SSE events to send (chunked), then
    ``"stall"`` (send nothing more, until the proxy hangs up) or ``"end"``.
    ``open_stalls`` counts stalled connections the proxy has not closed yet.
    """

    def __init__(self, scripts: list[tuple[list[bytes], str]]) -> None:
        self.scripts = scripts
        self.attempts = 0
        self.open_stalls = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        for writer in self._writers:
            writer.close()
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        events, end = self.scripts[min(self.attempts, len(self.scripts) - 1)]
        self.attempts += 1
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        if end == "end":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        self.open_stalls += 1
        try:
            await reader.read()  # until the proxy hangs up
        except ConnectionError:
            pass
        finally:
            self.open_stalls -= 1
            writer.close()


PROTOCOLS: dict[str, tuple[str, str, dict[str, Any], list[bytes]]] = {
    # name: (client path, provider type, request body, a complete good stream)
    "chat": (
        "/v1/chat/completions",
        "openai",
        {"messages": [{"role": "user", "content": "hi"}]},
        [chat('{"role": "assistant"}'), chat('{"content": "GOOD"}'), b"data: [DONE]\n\n"],
    ),
    "anthropic": (
        "/v1/messages",
        "anthropic",
        {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        [
            anthropic("message_start", '"message": {"id": "m", "content": []}'),
            anthropic("content_block_delta", '"index": 0, "delta": {"type": "text_delta", "text": "GOOD"}'),
            anthropic("message_stop", '"x": 0'),
        ],
    ),
    "responses": (
        "/v1/responses",
        "openai",
        {"input": "hi"},
        [
            responses("response.created", '"response": {"id": "r"}'),
            responses("response.output_text.delta", '"delta": "GOOD"'),
            responses("response.completed", '"response": {"id": "r"}'),
        ],
    ),
}


def _provider_config(port: int, kind: str) -> dict[str, Any]:
    return {
        "name": "p",
        "type": kind,
        "base_url": f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else ""),
        "keys": ["sk-content-one", "sk-content-two"],
        "models": [MODEL],
        "timeouts": {"connect": 1, "headers": 1, "idle": IDLE, "total": 5},
    }


@pytest.fixture
def scripted(loop_thread: LoopThread) -> Iterator[Callable[[list[tuple[list[bytes], str]]], ScriptedProvider]]:
    started: list[ScriptedProvider] = []

    def start(scripts: list[tuple[list[bytes], str]]) -> ScriptedProvider:
        provider = ScriptedProvider(scripts)
        loop_thread.call(provider.start())
        started.append(provider)
        return provider

    yield start
    for provider in started:
        loop_thread.call(provider.close())


class StreamClient:
    """A raw-socket client that reads a streamed response as it arrives."""

    def __init__(self, port: int, path: str, body: dict[str, Any]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        payload = json.dumps({"model": MODEL, "stream": True, **body}).encode()
        self.sock.sendall(
            b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (path.encode(), len(payload), payload)
        )
        self.received = bytearray()

    def read_until(self, marker: bytes) -> bool:
        """Read until ``marker`` arrived (True) or the proxy closed (False)."""
        while marker not in self.received:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.received += chunk
        return True

    def read_all(self) -> bytes:
        self.read_until(b"\x00never\x00")
        self.sock.close()
        return bytes(self.received)

    def attempts(self) -> str:
        head = bytes(self.received).split(b"\r\n\r\n", 1)[0].decode().lower()
        return next(
            line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.startswith("x-llmproxy-attempts")
        )


MARK = "MARK"

# (protocol, events of the first attempt, how it ends, whether they are released as they are)
STREAMS: list[tuple[str, str, list[bytes], str, bool]] = [
    (
        "chat-spaced-content-then-stall",
        "chat",
        [chat('{"role": "assistant"}'), chat('{"content": "MARK"}')],
        "stall",
        True,
    ),
    ("chat-spaced-both-sides", "chat", [ev('{"choices": [{"delta": {"content" : "MARK"}}]}')], "stall", True),
    ("chat-pretty-printed", "chat", [ev(PRETTY_CHAT.replace('"x"', '"MARK"'))], "stall", True),
    (
        "chat-spaced-tool-call",
        "chat",
        [chat('{"tool_calls": [{"index": 0, "id": "MARK", "function": {"name": "f", "arguments": ""}}]}')],
        "stall",
        True,
    ),
    (
        "chat-role-only-then-stall",
        "chat",
        [chat('{"role": "assistant", "content": ""}', ', "x": "MARK"')],
        "stall",
        False,
    ),
    (
        "chat-empty-content-then-stall",
        "chat",
        [ev('{"id": "MARK", "choices": [{"delta": {"content" : ""}}]}')],
        "stall",
        False,
    ),
    ("chat-error-before-content", "chat", [ev('{ "error" : {"message": "MARK"} }')], "stall", False),
    ("chat-ends-without-done", "chat", [chat('{"role": "assistant"}', ', "x": "MARK"')], "end", False),
    (
        "chat-no-content-but-done",
        "chat",
        [ev('{"id": "MARK", "choices": [{"delta": {}, "finish_reason": "stop"}]}'), b"data: [DONE]\n\n"],
        "end",
        True,
    ),
    (
        "anthropic-spaced-text-delta",
        "anthropic",
        [
            anthropic("message_start", '"message": {"id": "m", "content": []}'),
            anthropic("content_block_delta", '"index": 0, "delta": {"type": "text_delta", "text": "MARK"}'),
        ],
        "stall",
        True,
    ),
    (
        "anthropic-tool-use-start",
        "anthropic",
        [
            anthropic(
                "content_block_start", '"index": 0, "content_block": {"type": "tool_use", "id": "MARK", "name": "f"}'
            )
        ],
        "stall",
        True,
    ),
    (
        "anthropic-start-and-ping-then-stall",
        "anthropic",
        [anthropic("message_start", '"message": {"id": "MARK", "content": []}'), anthropic("ping", '"x": 1')],
        "stall",
        False,
    ),
    (
        "anthropic-error-event",
        "anthropic",
        [anthropic("error", '"error": {"type": "overloaded_error", "message": "MARK"}')],
        "stall",
        False,
    ),
    (
        "responses-spaced-text-delta",
        "responses",
        [
            responses("response.created", '"response": {"id": "r"}'),
            ev('{"type" : "response.output_text.delta", "delta" : "MARK"}'),
        ],
        "stall",
        True,
    ),
    (
        "responses-function-args-delta",
        "responses",
        [responses("response.function_call_arguments.delta", '"delta": "MARK"')],
        "stall",
        True,
    ),
    (
        "responses-created-then-stall",
        "responses",
        [responses("response.created", '"response": {"id": "MARK"}')],
        "stall",
        False,
    ),
    ("responses-failed", "responses", [responses("response.failed", '"response": {"id": "MARK"}')], "stall", False),
]


@pytest.mark.parametrize(
    ("protocol", "events", "end", "released"), [row[1:] for row in STREAMS], ids=[row[0] for row in STREAMS]
)
def test_a_held_stream_is_released_at_its_first_content_and_retried_only_before_it(
    scripted: Callable[[list[tuple[list[bytes], str]]], ScriptedProvider],
    make_proxy: Callable[[dict[str, Any]], RunningProxy],
    protocol: str,
    events: list[bytes],
    end: str,
    released: bool,
) -> None:
    path, kind, body, good = PROTOCOLS[protocol]
    upstream = scripted([(events, end), (good, "end")])
    proxy = make_proxy(config("memory", [_provider_config(upstream.port, kind)], {"failure_threshold": 5}))
    client = StreamClient(proxy.port, path, body)
    reply = client.read_all()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    if released:
        # what the first attempt sent reached the client, and it was not retried, stall or not
        assert MARK.encode() in reply
        assert (client.attempts(), upstream.attempts) == ("1", 1)
        if end == "stall":
            assert b"GOOD" not in reply and b'"error"' in reply.rsplit(b"MARK", 1)[1]  # the stall: an SSE error
    else:
        # held, then retried invisibly: nothing of the first attempt reached the client
        assert MARK.encode() not in reply
        assert (client.attempts(), upstream.attempts) == ("2", 2)
        assert b"GOOD" in reply


def test_first_token_with_spaced_json_reaches_the_client_at_once_and_its_stall_is_not_retried(
    scripted: Callable[[list[tuple[list[bytes], str]]], ScriptedProvider],
    make_proxy: Callable[[dict[str, Any]], RunningProxy],
) -> None:
    first = [chat('{"role": "assistant", "content": ""}'), chat('{"content": "x"}')]
    upstream = scripted([(first, "stall"), ([chat('{"content": "retried"}'), b"data: [DONE]\n\n"], "end")])
    provider = _provider_config(upstream.port, "openai")
    provider["timeouts"]["idle"] = 1.0  # the stall: far longer than a loopback read
    proxy = make_proxy(config("memory", [provider], {"failure_threshold": 5}))
    started = time.monotonic()
    client = StreamClient(proxy.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert client.read_until(b'"content": "x"')
    # The token came while the provider was still stalling: it was not held.
    assert upstream.open_stalls == 1, time.monotonic() - started
    assert client.attempts() == "1"
    rest = client.read_all()
    tail = rest.split(b'"content": "x"', 1)[1]
    assert b'"error"' in tail and b"retried" not in tail and b"[DONE]" not in tail
    assert upstream.attempts == 1


@pytest.mark.parametrize(
    ("protocol", "error"),
    [
        ("chat", ev('{ "error" : {"message": "overloaded", "type": "server_error"} }')),
        ("chat", ev('{\n  "error": {\n    "message": "overloaded"\n  }\n}')),
        ("chat", b"event: error\ndata: {}\n\n"),
        ("anthropic", anthropic("error", '"error": {"type": "overloaded_error", "message": "Overloaded"}')),
        ("anthropic", ev('{"type": "error", "error": {"type": "overloaded_error"}}')),
        ("responses", responses("response.failed", '"response": {"error": {"code": "server_error"}}')),
        ("responses", ev('{"type": "error", "code": "server_error"}', "error")),
    ],
    ids=[
        "chat-spaced",
        "chat-pretty",
        "chat-event-error",
        "anthropic",
        "anthropic-no-name",
        "responses-failed",
        "responses-error",
    ],
)
def test_an_error_event_before_content_is_retried_at_once_not_after_the_idle_timeout(
    scripted: Callable[[list[tuple[list[bytes], str]]], ScriptedProvider],
    make_proxy: Callable[[dict[str, Any]], RunningProxy],
    protocol: str,
    error: bytes,
) -> None:
    path, kind, body, good = PROTOCOLS[protocol]
    upstream = scripted([([error], "stall"), (good, "end")])
    provider = _provider_config(upstream.port, kind)
    provider["timeouts"]["idle"] = 5.0  # a stall the proxy must not wait for
    proxy = make_proxy(config("memory", [provider], {"failure_threshold": 5}))
    started = time.monotonic()
    client = StreamClient(proxy.port, path, body)
    reply = client.read_all()
    assert time.monotonic() - started < 3.0  # coarse: the error, not the 5 s idle timeout, ended the attempt
    assert (client.attempts(), upstream.attempts) == ("2", 2)
    assert b"GOOD" in reply and b"overloaded" not in reply.lower()
