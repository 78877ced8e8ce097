"""A filter that passes :class:`proxy.testing.ChainHarness` behaves the same in the server.

Each case runs one chain twice with the same scripted upstream replies: once
through the harness (fake sockets), once through a real proxy over loopback
sockets in front of :class:`ScriptedServer`, a hand-written upstream that
plays the same :class:`~proxy.testing.ScriptedReply` objects on the wire
(an ``UpstreamError`` in a body: the connection is cut there; ``error``: it
is closed before a response). Compared: the status, the whole response head
(framing included; ``connection`` aside), the body bytes or SSE events
(error messages aside: the pool words its own), the attempts' outcomes and
statuses, and every request as it reached the upstream.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import orjson
import pytest

from llmproxy import Exchange, FactoryContext, Filter, FilterFactory
from llmproxy.attempt import Attempt
from llmproxy.errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError
from llmproxy.filters.failover import FailoverFactory
from llmproxy.filters.headers import HeadersFilterFactory
from llmproxy.filters.routing import RoutingFactory
from llmproxy.http.sse import SseFramer, parse_event
from llmproxy.testing import ChainHarness, ScriptedReply

from .. import filters_for_tests as tf
from ..support import LoopThread, RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]


class OutcomeFilter(Filter):
    factory: OutcomeFactory

    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> None:
        self.factory.attempts.append((attempt.number, attempt.outcome.value, attempt.status))


class OutcomeFactory(FilterFactory):
    """Records every attempt's outcome (the server's side is read back from the last instance)."""

    filter_class = OutcomeFilter
    instances: ClassVar[list[OutcomeFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.attempts: list[tuple[int, str, int | None]] = []
        OutcomeFactory.instances.append(self)


@dataclass
class Seen:
    """One request as it reached an upstream."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


class ScriptedServer:
    """An upstream on a loopback socket answering each request with the next scripted reply."""

    def __init__(self) -> None:
        self.replies: list[ScriptedReply] = []
        self.seen: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            fields = []
            for line in lines[1:]:
                if line:
                    name, value = line.split(":", 1)
                    fields.append((name.strip().lower().encode(), value.strip().encode("latin-1")))
            length = int(dict(fields).get(b"content-length", b"0"))
            body = await reader.readexactly(length) if length else b""
            self.seen.append(Seen(method, path, fields, body))
            reply = self.replies.pop(0)
            if reply.error is not None:
                return  # closed before a response: what the pool sees of a dead upstream
            await self._answer(writer, reply)
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, reply: ScriptedReply) -> None:
        out = [b"HTTP/1.1 %d Scripted\r\n" % reply.status]
        out += [b"%s: %s\r\n" % kv for kv in reply.fields()]
        out.append(b"connection: close\r\n\r\n")
        writer.write(b"".join(out))
        chunked = reply.content_length() is None
        for piece in reply.pieces():
            await writer.drain()
            await asyncio.sleep(0.002)  # one read per piece at the proxy, as the harness plays them
            if isinstance(piece, UpstreamError):
                writer.transport.abort()
                return
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture
def upstream(loop_thread: LoopThread) -> Any:
    server = ScriptedServer()
    loop_thread.call(server.start())
    yield server
    loop_thread.call(server.close())


@dataclass
class ClientView:
    """What a client received, normalised for the comparison."""

    status: int | None
    headers: list[tuple[bytes, bytes]]
    body: Any
    aborted: bool


def _normalise_body(body: bytes, sse: bool) -> Any:
    """Bytes as they are, but error messages blanked (the pool words its own)."""

    def blank(data: bytes) -> Any:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if isinstance(value, dict) and isinstance(value.get("error"), dict):
            value["error"]["message"] = "..."
        return value

    if not sse:
        return blank(body)
    framer = SseFramer()
    events = [*framer.feed(body), framer.flush()]
    return [(e.event, blank(e.data)) for e in map(parse_event, events) if e.data or e.event]


def _view(status: int | None, fields: list[tuple[bytes, bytes]], body: bytes, aborted: bool) -> ClientView:
    ctype = dict(fields).get(b"content-type", b"")
    normal = _normalise_body(body, ctype.startswith(b"text/event-stream"))
    envelope = isinstance(normal, dict) and "error" in normal
    headers = sorted(
        (k, b"(length of the envelope)" if envelope and k == b"content-length" else v)
        for k, v in fields
        if k not in (b"connection", b"keep-alive")
    )
    return ClientView(status, headers, normal, aborted)


def _over_sockets(port: int, path: str, body: bytes, headers: list[tuple[str, str]]) -> ClientView:
    """Send exactly the head the harness builds, read the response with h11 (a strict client)."""
    head = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target=path, headers=headers))  # state only; bytes sent raw
    status: int | None = None
    fields: list[tuple[bytes, bytes]] = []
    received = bytearray()
    aborted = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        client.send(h11.Data(data=body))
        client.send(h11.EndOfMessage())
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:  # the body was cut short: the proxy aborted the connection
                aborted = True
                break
            if event is h11.NEED_DATA:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                try:
                    client.receive_data(chunk)
                except h11.RemoteProtocolError:
                    aborted = True
                    break
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                fields = [(bytes(k), bytes(v)) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                aborted = True
                break
    return _view(status, fields, bytes(received), aborted)


def _spec_name(cls: type[FilterFactory]) -> str:
    return {RoutingFactory: "routing", FailoverFactory: "failover", HeadersFilterFactory: "headers"}.get(
        cls, f"{cls.__module__}:{cls.__name__}"
    )


@dataclass
class Case:
    id: str
    chain: list[tuple[type[FilterFactory], dict[str, Any]]]
    replies: list[ScriptedReply]
    json: Any
    headers: dict[str, str] | None = None
    #: Chain without a default upstream (routing chooses it).
    routed: bool = False


URL = "http://127.0.0.1:{port}"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
EMPTY = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
RESET = UpstreamProtocolError("reset")


def _routing(keys: list[str]) -> list[tuple[type[FilterFactory], dict[str, Any]]]:
    provider = {"name": "p", "type": "openai", "base_url": URL + "/v1", "keys": keys, "models": ["m"]}
    return [(RoutingFactory, {"providers": [provider]}), (FailoverFactory, {"max_attempts": 3})]


CASES = [
    Case(
        "plain-json",
        [(HeadersFilterFactory, {"response": {"set": {"x-served-by": "llmproxy"}}})],
        [ScriptedReply(json={"ok": 1})],
        CHAT,
    ),
    Case(
        "retry-elsewhere",
        [(tf.RetryElsewhereFactory, {"fallback_url": URL + "/fallback"})],
        [ScriptedReply(503, json={"error": {"message": "busy"}}), ScriptedReply(json={"ok": 2})],
        CHAT,
    ),
    Case(
        "retry-after-connect-failure",
        [(tf.RetryElsewhereFactory, {"fallback_url": URL})],
        [ScriptedReply(error=UpstreamConnectError("closed")), ScriptedReply(json={"ok": 3})],
        CHAT,
    ),
    Case("failure-before-head", [], [ScriptedReply(error=UpstreamProtocolError("closed"))], CHAT),
    Case(
        "sse-rewrite-and-observer",
        [(tf.ObserverFactory, {}), (tf.SseRewriteFactory, {})],
        [ScriptedReply(events=["token 1", "token 2", "[DONE]"])],
        STREAM,
    ),
    Case("stream-cut-mid-body", [(tf.ObserverFactory, {})], [ScriptedReply(events=[CHUNK, RESET])], STREAM),
    Case(
        "held-json-cut-short",
        [],
        [ScriptedReply(chunks=[b'{"a":', RESET], headers={"content-type": "application/json"})],
        CHAT,
    ),
    Case(
        "body-cut-after-head",
        [(tf.ObserverFactory, {})],
        [ScriptedReply(chunks=[b"abc", RESET], headers={"content-type": "text/plain"})],
        CHAT,
    ),
    Case(
        "held-stream-retried",
        [(tf.HoldUntilContentFactory, {})],
        [ScriptedReply(events=[EMPTY, RESET]), ScriptedReply(events=[EMPTY, CHUNK, "[DONE]"])],
        STREAM,
    ),
    Case(
        "pause-replace-body",
        [(tf.ReplaceBodyFactory, {})],
        [ScriptedReply(chunks=[b'{"a":', b"1}"], headers={"content-type": "application/json"})],
        CHAT,
    ),
    Case("skip-body", [(tf.UpperUnlessSkippedFactory, {})], [ScriptedReply(body=b"hello")], CHAT, {"x-skip-body": "1"}),
    Case("mutate-body", [(tf.UpperUnlessSkippedFactory, {})], [ScriptedReply(chunks=[b"hel", b"lo"])], CHAT),
    Case("local-reply", [(tf.BlockFactory, {})], [], CHAT, {"x-block": "1"}),
    Case(
        "failover-next-key",
        _routing(["sk-a", "sk-b"]),
        [ScriptedReply(500, json={"error": {"message": "boom"}}), ScriptedReply(json={"ok": 4})],
        CHAT,
        routed=True,
    ),
    Case(
        "failover-revoked-key-stream",
        _routing(["sk-a", "sk-b"]),
        [ScriptedReply(401, json={"error": {"message": "bad key"}}), ScriptedReply(events=[CHUNK, "[DONE]"])],
        STREAM,
        routed=True,
    ),
]


def _fill(value: Any, port: int) -> Any:
    if isinstance(value, str):
        return value.replace("{port}", str(port))
    if isinstance(value, dict):
        return {k: _fill(v, port) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, port) for v in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_harness_and_server_agree(case: Case, upstream: ScriptedServer, make_proxy: Make) -> None:
    chain = [(cls, _fill(config, upstream.port)) for cls, config in case.chain]
    chain.append((OutcomeFactory, {}))
    base = None if case.routed else URL.format(port=upstream.port)
    body = orjson.dumps(case.json)
    headers = [("host", "proxy.test"), ("x-request-id", "compare-1"), *(case.headers or {}).items()]
    wire_headers = [*headers, ("content-type", "application/json"), ("content-length", str(len(body)))]

    with ChainHarness([(cls, config, _spec_name(cls)) for cls, config in chain], upstream=base) as h:
        h.reply(*case.replies)
        got = h.send(json=case.json, headers=dict(headers))
        harness_view = _view(got.status, got.headers.raw(), got.body, got.aborted)
        harness_attempts = h.factories[-1].attempts  # type: ignore[attr-defined]
        harness_sent = [(q.method, q.path, q.headers.raw(), q.body) for q in got.upstream_requests]

    upstream.replies = list(case.replies)
    config: dict[str, Any] = {
        "server": {"access_log": "off"},
        "filters": [{"name": _spec_name(cls), "config": config} for cls, config in chain],
    }
    if base is not None:
        config["upstream"] = {"url": base}
    running = make_proxy(config)
    server_view = _over_sockets(running.port, "/v1/chat/completions", body, wire_headers)
    server_attempts = OutcomeFactory.instances[-1].attempts
    server_sent = [(s.method, s.path, s.headers, s.body) for s in upstream.seen]

    assert harness_view == server_view
    assert harness_attempts == server_attempts
    assert harness_sent == server_sent
    assert upstream.replies == []  # the server used exactly the scripted replies
