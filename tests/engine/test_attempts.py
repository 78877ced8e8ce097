"""The core contract: one Attempt per upstream try, finished once on every path,
and observers that see exactly the bytes the client receives.

Real proxies on loopback in front of the mock provider; a recording filter
sits in the chain with routing and failover.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest

from llmproxy import Action, Exchange, FactoryContext, Filter, FilterFactory
from llmproxy.attempt import Attempt, Outcome
from llmproxy.mock import KeyBehaviour, MockConfig, MockServer, start_mock

from ..support import LoopThread

HI: list[Any] = [{"role": "user", "content": "hello there"}]
GOOD, BAD, DROP0, DROP = "sk-good-key-1", "sk-bad-key-401", "sk-drop-before-content", "sk-drop-mid-stream"


class _Recorder(Filter):
    """Records every attempt outcome and every observed body byte."""

    mutates_response_body = False
    factory: _RecorderFactory

    def on_request_headers(self, exchange: Exchange) -> Action:
        if exchange.request.headers.get("x-reply-locally") == "request":
            exchange.send_local_reply(200, {"local": True})
        return Action.CONTINUE

    def on_response_headers(self, exchange: Exchange) -> Action:
        if exchange.request.headers.get("x-reply-locally") == "response":
            exchange.send_local_reply(299, {"local": True})
        return Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        self.factory.observed.setdefault(exchange.id, bytearray()).extend(data)
        return Action.CONTINUE

    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> None:
        assert attempt.outcome is not Outcome.PENDING
        self.factory.attempts.append((exchange.id, attempt))

    def on_exchange_complete(self, exchange: Exchange) -> None:
        self.factory.completed.append((exchange.id, len(self.factory.attempts_of(exchange.id))))


class _RecorderFactory(FilterFactory):
    filter_class = _Recorder
    fail_open = True
    instances: ClassVar[list[_RecorderFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.attempts: list[tuple[str, Attempt]] = []
        self.completed: list[tuple[str, int]] = []
        self.observed: dict[str, bytearray] = {}
        _RecorderFactory.instances.append(self)

    def attempts_of(self, exchange_id: str) -> list[Attempt]:
        return [a for rid, a in self.attempts if rid == exchange_id]


@pytest.fixture
def keyed_mock(loop_thread: LoopThread) -> Iterator[MockServer]:
    keys = {
        BAD: KeyBehaviour(status=401),
        DROP0: KeyBehaviour(fault="drop"),
        DROP: KeyBehaviour(fault="drop"),
        GOOD: KeyBehaviour(),
    }
    server = loop_thread.call(start_mock("127.0.0.1", 0, MockConfig(tokens=6, keys=keys)))
    yield server
    loop_thread.call(server.close())


def _config(port: int, keys: list[str], *, kind: str = "openai", failover: bool = True) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
    provider = {"name": "p", "type": kind, "base_url": base, "keys": keys, "models": ["m"]}
    filters: list[dict[str, Any]] = [{"name": "routing", "config": {"providers": [provider]}}]
    if failover:
        filters.append({"name": "failover", "config": {"max_attempts": 3, "failure_threshold": 100}})
    filters.append({"name": "tests.engine.test_attempts:_RecorderFactory"})
    return {"server": {"access_log": "off"}, "filters": filters}


def _request(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    raw = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: p\r\ncontent-type: application/json\r\n%sContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (path.encode(), extra, len(raw), raw)
    )


def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request``; return status, headers and the de-chunked body the client received."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return int(lines[0].split()[1]), headers, body


def _wait(predicate: Any) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _only_exchange(factory: _RecorderFactory) -> str:
    _wait(lambda: factory.completed)
    ((rid, _),) = factory.completed
    return rid


# -- one Attempt per try, finished once on every path -----------------------------------


@pytest.mark.parametrize(
    ("keys", "stream", "headers", "expected"),
    [
        # the first key is refused (401): retried on the second, which completes
        ([BAD, GOOD], False, {}, [(Outcome.RETRIED, 401, False), (Outcome.COMPLETED, 200, True)]),
        ([BAD, GOOD], True, {}, [(Outcome.RETRIED, 401, False), (Outcome.COMPLETED, 200, True)]),
        # a stream that dies before its first content is retried invisibly (the hooks saw its 502)
        (
            [DROP0, GOOD],
            True,
            {"x-mock-stall-after": "0"},
            [(Outcome.RETRIED, 502, False), (Outcome.COMPLETED, 200, True)],
        ),
        # a JSON reply cut short (held to its end) is a failed attempt, retried
        ([DROP0, GOOD], False, {}, [(Outcome.RETRIED, 502, False), (Outcome.COMPLETED, 200, True)]),
        # every key fails: the last attempt fails, and the proxy answers for it (its own 401)
        ([BAD], False, {}, [(Outcome.FAILED, 401, False)]),
        # a response hook answers locally instead of relaying: abandoned
        ([GOOD], False, {"x-reply-locally": "response"}, [(Outcome.ABANDONED, 200, False)]),
    ],
)
def test_every_attempt_is_finished_exactly_once(
    keyed_mock: MockServer,
    make_proxy: Any,
    keys: list[str],
    stream: bool,
    headers: dict[str, str],
    expected: list[tuple[Outcome, int, bool]],
) -> None:
    proxy = make_proxy(_config(keyed_mock.port, keys))
    factory = _RecorderFactory.instances[-1]
    body: dict[str, Any] = {"model": "m", "messages": HI, "stream": stream}
    _exchange(proxy.port, _request("/v1/chat/completions", body, headers))
    rid = _only_exchange(factory)
    attempts = factory.attempts_of(rid)
    got = [(a.outcome, a.status, a.head_sent) for a in attempts]
    assert got == expected
    assert [a.number for a in attempts] == list(range(1, len(expected) + 1))
    assert len({id(a) for a in attempts}) == len(attempts)
    assert factory.completed == [(rid, len(expected))]  # every attempt finished before the exchange
    assert sum(a.head_sent for a in attempts) <= 1
    assert all(a.key_id for a in attempts)


def test_an_attempt_failing_after_its_head_is_failed_with_its_error(keyed_mock: MockServer, make_proxy: Any) -> None:
    proxy = make_proxy(_config(keyed_mock.port, [DROP]))
    factory = _RecorderFactory.instances[-1]
    body = {"model": "m", "messages": HI, "stream": True}
    status, _, received = _exchange(proxy.port, _request("/v1/chat/completions", body, {"x-mock-stall-after": "2"}))
    assert status == 200 and b'data: {"error"' in received
    (attempt,) = factory.attempts_of(_only_exchange(factory))
    assert (attempt.outcome, attempt.head_sent) == (Outcome.FAILED, True)
    assert attempt.error is not None and attempt.error.status == 502


def test_a_client_gone_mid_stream_abandons_the_attempt(keyed_mock: MockServer, make_proxy: Any) -> None:
    proxy = make_proxy(_config(keyed_mock.port, [GOOD]))
    factory = _RecorderFactory.instances[-1]
    body = {"model": "m", "messages": HI, "stream": True}
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(_request("/v1/chat/completions", body, {"x-mock-itl-ms": "200", "x-mock-tokens": "50"}))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    (attempt,) = factory.attempts_of(_only_exchange(factory))
    assert (attempt.outcome, attempt.head_sent) == (Outcome.ABANDONED, True)


def test_a_local_reply_before_any_attempt_makes_none(keyed_mock: MockServer, make_proxy: Any) -> None:
    proxy = make_proxy(_config(keyed_mock.port, [GOOD]))
    factory = _RecorderFactory.instances[-1]
    status, _, _ = _exchange(
        proxy.port, _request("/v1/chat/completions", {"model": "m", "messages": HI}, {"x-reply-locally": "request"})
    )
    assert status == 200
    rid = _only_exchange(factory)
    assert factory.attempts_of(rid) == [] and factory.completed == [(rid, 0)]


# -- observers see what the client receives ---------------------------------------------


@pytest.mark.parametrize(
    ("keys", "kind", "path", "body", "headers"),
    [
        # retried stream: the dead first attempt's events are never observed
        ([DROP0, GOOD], "openai", "/v1/chat/completions", {"stream": True}, {"x-mock-stall-after": "0"}),
        # the usage chunk routing injected and strips again is never observed
        ([GOOD], "openai", "/v1/chat/completions", {"stream": True}, {}),
        # translated streams: observers see the client's protocol, not the provider's
        ([GOOD], "anthropic", "/v1/chat/completions", {"stream": True}, {}),
        ([GOOD], "openai", "/v1/messages", {"stream": True, "max_tokens": 20}, {}),
        # JSON, held to its end and translated
        ([GOOD], "anthropic", "/v1/chat/completions", {}, {}),
        ([DROP0, GOOD], "openai", "/v1/chat/completions", {}, {}),
    ],
)
def test_observers_see_exactly_the_bytes_the_client_receives(
    keyed_mock: MockServer,
    make_proxy: Any,
    keys: list[str],
    kind: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    proxy = make_proxy(_config(keyed_mock.port, keys, kind=kind))
    factory = _RecorderFactory.instances[-1]
    status, _, received = _exchange(proxy.port, _request(path, {"model": "m", "messages": HI, **body}, headers))
    assert status == 200
    rid = _only_exchange(factory)
    assert received and bytes(factory.observed[rid]) == received
    assert b'"choices":[]' not in received  # the usage-only chunk was stripped before anyone saw it
    if path == "/v1/messages":
        assert b"event: message_start" in received
    elif body.get("stream"):
        assert b"chat.completion.chunk" in received and b"[DONE]" in received
