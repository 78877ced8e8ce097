"""Black-box red-team probes over real sockets.

Each table is a class of probe from the hardening issue, in variants the
hardening tests do not already pin. A probe the proxy fails is kept as a
strict xfail with what came back, so a fix flips it to a pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import anthropic
import openai
import pytest

from llmproxy.mock import MockServer

from .support import LoopThread, RunningProxy, status_of, talk

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
MHEAD = b"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\n"
MBODY = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
PROVIDER_KEY = "sk-live-provider-SECRET-T123"
MASKED = "sk-live-*****T123"
CLIENT_KEY = "sk-client-SECRET-9876"

Proxies = Callable[[dict[str, Any]], RunningProxy]


def _cl(body: bytes = BODY) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def _talk(port: int, data: bytes, shut: bool = False, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send ``data``; return what came back and whether the proxy closed within ``timeout``."""
    response, closed, _ = talk(port, data, shut, timeout)
    return response, closed


def _body(response: bytes) -> Any:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def _openai_shaped(response: bytes) -> None:
    body = _body(response)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body


def _anthropic_shaped(response: bytes) -> None:
    body = _body(response)
    assert body.get("type") == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"}, body


@pytest.fixture
def strict(mock: MockServer, make_proxy: Proxies) -> RunningProxy:
    return make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"max_body_bytes": 65536, "header_timeout": 0.5, "body_timeout": 0.3},
        }
    )


# -- 1. request framing variants: refused with one response and a close -------------------------

REFUSED: list[tuple[str, bytes, tuple[int, ...]]] = [
    ("http09", b"GET /healthz\r\n\r\n", (400, 505)),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400, 505)),
    ("http2-version", b"GET /healthz HTTP/2.0\r\nHost: proxy\r\n\r\n", (400, 505)),
    ("http3-version", b"GET /healthz HTTP/3\r\nHost: proxy\r\n\r\n", (400, 505)),
    ("lower-version", b"GET /healthz http/1.1\r\nHost: proxy\r\n\r\n", (400,)),
    ("double-space", b"GET  /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n", (400,)),
    ("trailing-space-line", b"GET /healthz HTTP/1.1 \r\nHost: proxy\r\n\r\n", (400,)),
    ("tab-separator", b"GET\t/healthz HTTP/1.1\r\nHost: proxy\r\n\r\n", (400,)),
    ("leading-fold", HEAD.replace(b"\r\nHost", b"\r\n Host") + _cl() + b"\r\n" + BODY, (400,)),
    ("empty-header-name", HEAD + b": v\r\n" + _cl() + b"\r\n" + BODY, (400,)),
    ("colon-in-name-start", HEAD + b":authority: x\r\n" + _cl() + b"\r\n" + BODY, (400,)),
    ("te-gzip-chunked", HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", (400, 501)),
    ("te-identity-only", HEAD + b"Transfer-Encoding: identity\r\n\r\n", (400, 501)),
    ("te-empty", HEAD + b"Transfer-Encoding:\r\n\r\n", (400, 501)),
    ("te-chunked-comma", HEAD + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", (400, 501)),
    ("te-comma-chunked", HEAD + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", (400, 501)),
    ("te-chunked-chunked", HEAD + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", (400, 501)),
    ("te-nul", HEAD + b"Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n", (400,)),
    ("te-and-cl-cased", HEAD + b"transfer-ENCODING: chunked\r\ncontent-LENGTH: 5\r\n\r\n0\r\n\r\n", (400,)),
    ("cl-huge", HEAD + b"Content-Length: 99999999999999999999999999999\r\n\r\n", (400, 413)),
    ("cl-1-2", HEAD + b"Content-Length: 1, 2\r\n\r\nxx", (400,)),
    ("cl-decimal", HEAD + b"Content-Length: 5.0\r\n\r\nhello", (400,)),
    ("cl-exponent", HEAD + b"Content-Length: 5e0\r\n\r\nhello", (400,)),
    ("cl-unicode-digit", HEAD + "Content-Length: \u0665\r\n\r\nhello".encode(), (400,)),
    ("cl-underscore", HEAD + b"Content-Length: 1_0\r\n\r\nhelloworld", (400,)),
    ("cl-duplicate-one-empty", HEAD + b"Content-Length: 5\r\nContent-Length:\r\n\r\nhello", (400,)),
    ("get-with-chunked-junk", b"GET /healthz HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", (400,)),
    ("lf-in-chunk-after-data", HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n\r\n0\r\n\r\n", (400,)),
    ("chunk-5-space-semi-ext", HEAD + b'Transfer-Encoding: chunked\r\n\r\n5;"q"\r\nhello\r\n0\r\n\r\n', (400,)),
    ("chunk-negative-zero", HEAD + b"Transfer-Encoding: chunked\r\n\r\n-0\r\n\r\n", (400,)),
    ("lone-cr-head-end", HEAD + _cl() + b"\r\r\n" + BODY, (400,)),
    ("cr-in-name", HEAD + b"X\rA: 1\r\n" + _cl() + b"\r\n" + BODY, (400,)),
    ("lf-in-target", b"GET /heal\nthz HTTP/1.1\r\nHost: proxy\r\n\r\n", (400,)),
    ("cr-in-target", b"GET /heal\rthz HTTP/1.1\r\nHost: proxy\r\n\r\n", (400,)),
    ("space-in-target", b"GET /heal thz HTTP/1.1\r\nHost: proxy\r\n\r\n", (400,)),
    ("no-host-11", b"GET /healthz HTTP/1.1\r\n\r\n", (400,)),
    ("absolute-host-mismatch-bad", b"GET http://a b/healthz HTTP/1.1\r\nHost: proxy\r\n\r\n", (400,)),
]


@pytest.mark.parametrize(("name", "data", "statuses"), REFUSED, ids=[c[0] for c in REFUSED])
def test_framing_variant_is_refused_once_and_closed(
    name: str, data: bytes, statuses: tuple[int, ...], strict: RunningProxy, mock: MockServer
) -> None:
    response, closed = _talk(strict.port, data + PIPELINED)
    assert response, "no response"
    assert status_of(response) in statuses, response[:300]
    assert closed, "connection kept open after a framing error"
    assert response.count(b"HTTP/1.1 ") == 1, "a pipelined request after the bad one was answered"
    assert mock.requests == []


ACCEPTED: list[tuple[str, bytes]] = [
    ("te-capital-chunked", HEAD + b"Transfer-Encoding: Chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ("te-trailing-space", HEAD + b"Transfer-Encoding: chunked \r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ("te-leading-tab", HEAD + b"Transfer-Encoding:\tchunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ("cl-leading-space", HEAD + b"Content-Length:  %d\r\n\r\n%s" % (len(BODY), BODY)),
    ("cl-trailing-tab", HEAD + b"Content-Length: %d\t\r\n\r\n%s" % (len(BODY), BODY)),
    ("cl-leading-zeros", HEAD + b"Content-Length: 000%d\r\n\r\n%s" % (len(BODY), BODY)),
    ("absolute-https-port", HEAD.replace(b"/v1", b"https://other:8443/v1") + _cl() + b"\r\n" + BODY),
    ("absolute-http-mismatched-host", HEAD.replace(b"/v1", b"http://elsewhere/v1") + _cl() + b"\r\n" + BODY),
    (
        "expect-continue-cl-0",
        b"GET /v1/models HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
    ),
    ("expect-continue-body-sent", HEAD + b"Expect: 100-continue\r\n" + _cl() + b"\r\n" + BODY),
    ("expect-cased", HEAD + b"Expect: 100-Continue\r\n" + _cl() + b"\r\n" + BODY),
]


@pytest.mark.parametrize(("name", "data"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_legal_framing_variant_is_answered_once_and_the_next_request_too(
    name: str, data: bytes, strict: RunningProxy, mock: MockServer
) -> None:
    response, _ = _talk(strict.port, data + PIPELINED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    finals = [s for s in response.split(b"HTTP/1.1 ")[1:] if not s.startswith(b"100 ")]
    assert len(finals) == 2, response[:600]
    assert finals[0].startswith(b"200 "), response[:600]
    assert finals[1].startswith(b"200 "), response[:600]


def test_same_valued_cl_list_is_either_accepted_or_refused_and_closed(strict: RunningProxy) -> None:
    data = HEAD + b"Content-Length: %d, %d\r\n\r\n%s" % (len(BODY), len(BODY), BODY)
    response, closed = _talk(strict.port, data + PIPELINED)
    status = status_of(response)
    assert status in (200, 400), response[:300]
    if status == 400:
        assert closed and response.count(b"HTTP/1.1 ") == 1


# -- 2. the connection layer's errors are in the client's protocol -----------------------------------


def _xf(reason: str, *values: Any) -> Any:
    return pytest.param(*values, marks=pytest.mark.xfail(strict=True, reason=reason), id=str(values[0]))


def _ided(case: Any) -> Any:
    return case if hasattr(case, "marks") else pytest.param(*case, id=str(case[0]))


MESSAGES_CONN_ERRORS: list[Any] = [
    ("400-bad-cl", MHEAD + b"Content-Length: x\r\n\r\n", 400),
    ("400-cl-te", MHEAD + _cl(MBODY) + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("400-bad-chunk", MHEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("400-ctl-in-value", MHEAD + b"X-A: \x01\r\n" + _cl(MBODY) + b"\r\n" + MBODY, 400),
    ("413-cl", MHEAD + b"Content-Length: 99999999\r\n\r\n", 413),
    ("413-chunk", MHEAD + b"Transfer-Encoding: chunked\r\n\r\nfffffff\r\n", 413),
    ("431-big-head", MHEAD + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ("431-many-fields", MHEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    ("408-body", MHEAD + _cl(MBODY) + b"\r\n" + MBODY[:5], 408),
    ("408-head", MHEAD + b"X-Partial: 1\r\n", 408),
    ("405-get", b"GET /v1/messages HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n", 405),
    (
        "404-unknown-sub",
        b"POST /v1/messages/nope HTTP/1.1\r\nHost: p\r\nConnection: close\r\n" + _cl(MBODY) + b"\r\n" + MBODY,
        404,
    ),
    ("400-not-json", MHEAD + b"Connection: close\r\nContent-Length: 3\r\n\r\n{x}", 400),
]


@pytest.mark.parametrize(("name", "data", "status"), [_ided(c) for c in MESSAGES_CONN_ERRORS])
def test_errors_on_messages_are_anthropic_shaped(name: str, data: bytes, status: int, strict: RunningProxy) -> None:
    response, _ = _talk(strict.port, data)
    assert status_of(response) == status, response[:300]
    _anthropic_shaped(response)


OPENAI_CONN_ERRORS: list[tuple[str, bytes, int]] = [
    (n, d.replace(b"/v1/messages", b"/v1/chat/completions"), s)
    for n, d, s in (c.values if hasattr(c, "values") else c for c in MESSAGES_CONN_ERRORS)
    if n != "404-unknown-sub"
] + [("404-unknown-path", b"GET /v1/nope HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n", 404)]


@pytest.mark.parametrize(("name", "data", "status"), OPENAI_CONN_ERRORS, ids=[c[0] for c in OPENAI_CONN_ERRORS])
def test_errors_on_openai_paths_are_openai_shaped(name: str, data: bytes, status: int, strict: RunningProxy) -> None:
    response, _ = _talk(strict.port, data)
    assert status_of(response) == status, response[:300]
    _openai_shaped(response)


# -- 3. slowloris ---------------------------------------------------------------------------------


def test_many_slow_heads_fill_max_connections_then_free_it(mock: MockServer, make_proxy: Proxies) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"max_connections": 3, "header_timeout": 0.4},
        }
    )
    slow = [socket.create_connection(("127.0.0.1", proxy.port), timeout=3) for _ in range(3)]
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p")
        time.sleep(0.1)
        over, closed = _talk(proxy.port, HEAD + b"Connection: close\r\n" + _cl() + b"\r\n" + BODY)
        assert status_of(over) == 503 and closed, over[:300]
        for sock in slow:
            data = sock.recv(65536)
            assert status_of(data) == 408, data[:300]
        time.sleep(0.1)
        again, _ = _talk(proxy.port, HEAD + b"Connection: close\r\n" + _cl() + b"\r\n" + BODY)
        assert status_of(again) == 200, again[:300]
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize(
    "partial",
    [b"P", b"POST /v1/chat/completions", b"POST /v1/chat/completions HTTP/1.1\r\n", HEAD + b"X-A: 1"],
)
def test_partial_head_then_silence_is_408_then_close(partial: bytes, strict: RunningProxy) -> None:
    started = time.monotonic()
    response, closed = _talk(strict.port, partial)
    assert status_of(response) == 408, response[:300]
    assert closed and time.monotonic() - started < 2.0


def test_idle_keepalive_connection_between_requests_is_closed_silently(mock: MockServer, make_proxy: Proxies) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "server": {"access_log": "off"},
            "limits": {"keepalive_timeout": 0.3, "header_timeout": 5},
        }
    )
    response, closed = _talk(proxy.port, HEAD + _cl() + b"\r\n" + BODY)
    assert closed
    assert response.count(b"HTTP/1.1 ") == 1 and status_of(response) == 200, response[-300:]


# -- 4. a hostile upstream --------------------------------------------------------------------------


def _ok(content: str = "hi") -> bytes:
    return json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


def _sse_chunk(text: str) -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _json_reply(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


CHUNKED_JSON = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"

#: script -> (bytes written, close after)
SCRIPTS: dict[bytes, tuple[bytes, bool]] = {
    b"ok": (_json_reply(b"200 OK", _ok()), False),
    b"1xx-then-200": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + _json_reply(b"200 OK", _ok()),
        False,
    ),
    b"101": (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", False),
    b"longer-than-cl": (
        _json_reply(b"200 OK", _ok())
        + b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 18\r\n\r\n{"smuggled": true}',
        False,
    ),
    b"cl-cl-same": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\ncontent-length: %d\r\n\r\n%s"
        % (len(_ok()), len(_ok()), _ok()),
        False,
    ),
    b"cl-list": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d, 3\r\n\r\n%s" % (len(_ok()), _ok()),
        False,
    ),
    b"cl-plus": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: +%d\r\n\r\n%s" % (len(_ok()), _ok()),
        False,
    ),
    b"chunk-0x": (
        CHUNKED_JSON + b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(_ok()), _ok()),
        False,
    ),
    b"chunk-overflow": (
        CHUNKED_JSON + b"fffffffffffffffffffff\r\nxx",
        False,
    ),
    b"chunk-too-long-data": (
        CHUNKED_JSON + b"2\r\n{}XX\r\n0\r\n\r\n",
        False,
    ),
    b"bad-status-line": (b"HTTP/1.1 OK 200\r\ncontent-length: 0\r\n\r\n", False),
    b"no-reason-junk": (b"HTTP/1.1 200\x01OK\r\ncontent-length: 2\r\n\r\n{}", False),
    b"http10-status-no-crlf": (b"HTTP/1.1 200 OK\ncontent-length: 2\n\n{}", False),
    b"reset-after-head": (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n", True),
    b"stall-after-head": (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n", False),
    b"sse-stall": (
        SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(_sse_chunk("hel")), _sse_chunk("hel")),
        False,
    ),
    b"sse-error-quotes-key": (
        SSE_HEAD
        + b"connection: close\r\n\r\n"
        + _sse_chunk("hel")
        + b'data: {"error":{"message":"key '
        + PROVIDER_KEY.encode()
        + b" or "
        + MASKED.encode()
        + b' revoked","type":"x"}}\n\n',
        True,
    ),
    b"status-line-quotes-key": (b"HTTP/1.1 2OO " + PROVIDER_KEY.encode() + b"\r\ncontent-length: 0\r\n\r\n", False),
    b"chunk-line-quotes-key": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        + PROVIDER_KEY.encode()
        + b"\r\n",
        False,
    ),
    b"header-quotes-key": (_json_reply(b"200 OK", _ok(), b"x-debug-key: " + PROVIDER_KEY.encode() + b"\r\n"), False),
    b"500-text-quotes-key": (
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\nkey %s"
        % (len(PROVIDER_KEY) + 4, PROVIDER_KEY.encode()),
        False,
    ),
    b"429-quotes-masked": (
        _json_reply(
            b"429 Too Many Requests", json.dumps({"error": {"message": f"slow down {MASKED}", "type": "x"}}).encode()
        ),
        False,
    ),
}


class _Hostile(asyncio.Protocol):
    """Answers each request by its ``x-script`` header from :data:`SCRIPTS`; records request heads."""

    heads: ClassVar[list[bytes]] = []
    transports: ClassVar[list[asyncio.Transport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        _Hostile.transports.append(self.transport)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            _Hostile.heads.append(head)
            script = next(
                (ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"x-script:")),
                b"ok",
            )
            reply, close = SCRIPTS[script]
            self.transport.write(reply)
            if close:
                self.transport.close()
                return


@pytest.fixture
def hostile(loop_thread: LoopThread) -> Iterator[int]:
    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_Hostile, "127.0.0.1", 0)

    _Hostile.heads.clear()
    _Hostile.transports.clear()
    server = loop_thread.call(start())
    yield server.sockets[0].getsockname()[1]

    async def stop() -> None:
        for t in _Hostile.transports:
            t.close()
        server.close()

    loop_thread.call(stop())


def _hostile_proxy(make_proxy: Proxies, port: int, routed: bool = False) -> RunningProxy:
    limits = {"header_timeout": 2, "max_sse_event_bytes": 65536}
    timeouts = {"connect": 1, "headers": 1, "idle": 0.4, "total": 3}
    if routed:
        provider = {
            "name": "p",
            "type": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "keys": [PROVIDER_KEY],
            "models": ["m"],
            "timeouts": timeouts,
        }
        return make_proxy(
            {
                "server": {"access_log": "off"},
                "limits": limits,
                "filters": [{"name": "routing", "config": {"providers": [provider]}}],
            }
        )
    return make_proxy(
        {
            "upstream": {
                "url": f"http://127.0.0.1:{port}",
                "headers": {"authorization": f"Bearer {PROVIDER_KEY}"},
                "timeouts": timeouts,
            },
            "server": {"access_log": "off"},
            "limits": limits,
        }
    )


def _ask(port: int, script: bytes, body: bytes = BODY, extra: bytes = b"") -> tuple[bytes, bool]:
    data = HEAD + b"x-script: " + script + b"\r\n" + extra + _cl(body) + b"\r\n" + body
    return _talk(port, data, timeout=4)


UPSTREAM_FAULTS: list[Any] = [
    (b"1xx-then-200", 200),
    (b"101", 502),
    (b"cl-list", 502),
    (b"cl-plus", 502),
    (b"chunk-0x", 502),
    (b"chunk-overflow", 502),
    (b"chunk-too-long-data", 502),
    (b"bad-status-line", 502),
    (b"no-reason-junk", 502),
    _xf(
        "bare-LF upstream head is accepted (downstream refuses it; upstream is lenient)", b"http10-status-no-crlf", 502
    ),
    (b"reset-after-head", 502),
    (b"stall-after-head", 504),
]


@pytest.mark.parametrize(("script", "status"), [_ided(c) for c in UPSTREAM_FAULTS])
def test_hostile_upstream_reply_is_one_clean_status_and_the_next_request_is_clean(
    script: bytes, status: int, hostile: int, make_proxy: Proxies
) -> None:
    proxy = _hostile_proxy(make_proxy, hostile)
    response, _ = _ask(proxy.port, script)
    assert len(re.findall(rb"(?m)^HTTP/1\.1 ", response)) == 1, response[:600]
    assert status_of(response) == status, response[:600]
    if status != 200:
        _openai_shaped(response)
    again, _ = _ask(proxy.port, b"ok", extra=b"Connection: close\r\n")
    assert status_of(again) == 200 and _body(again)["choices"][0]["message"]["content"] == "hi", again[:600]


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize(
    "script",
    [
        b"bad-status-line",
        b"no-reason-junk",
        b"chunk-0x",
        b"cl-plus",
        b"101",
    ],
)
def test_an_upstream_protocol_error_never_quotes_upstream_bytes(
    script: bytes, routed: bool, hostile: int, make_proxy: Proxies
) -> None:
    proxy = _hostile_proxy(make_proxy, hostile, routed)
    response, _ = _ask(proxy.port, script)
    message = _body(response)["error"]["message"]
    for tell in ("bytearray(", "b'", 'b"', "\\x", "HTTP/1.1"):
        assert tell not in message, message


def test_upstream_bytes_past_content_length_never_reach_the_next_client(hostile: int, make_proxy: Proxies) -> None:
    proxy = _hostile_proxy(make_proxy, hostile)
    first, _ = _ask(proxy.port, b"longer-than-cl", extra=b"Connection: close\r\n")
    assert status_of(first) in (200, 502), first[:600]
    for _ in range(3):
        again, _ = _ask(proxy.port, b"ok", extra=b"Connection: close\r\n")
        assert b"smuggled" not in again, again[:600]
        assert status_of(again) == 200, again[:600]


def test_duplicate_equal_upstream_content_length_is_either_relayed_or_refused(
    hostile: int, make_proxy: Proxies
) -> None:
    proxy = _hostile_proxy(make_proxy, hostile)
    response, _ = _ask(proxy.port, b"cl-cl-same")
    assert status_of(response) in (200, 502), response[:300]
    assert response.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize(
    "script",
    [
        b"header-quotes-key",
        b"500-text-quotes-key",
        b"429-quotes-masked",
        b"status-line-quotes-key",
        b"chunk-line-quotes-key",
    ],
)
def test_provider_replies_never_show_the_provider_key(
    script: bytes, routed: bool, hostile: int, make_proxy: Proxies
) -> None:
    proxy = _hostile_proxy(make_proxy, hostile, routed)
    response, _ = _ask(proxy.port, script)
    assert PROVIDER_KEY.encode() not in response, response[:600]
    assert MASKED.encode() not in response, response[:600]


@pytest.mark.parametrize("routed", [False, True])
def test_a_mid_stream_provider_error_quoting_the_key_is_redacted(
    routed: bool, hostile: int, make_proxy: Proxies
) -> None:
    proxy = _hostile_proxy(make_proxy, hostile, routed)
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    response, _ = _ask(proxy.port, b"sse-error-quotes-key", body)
    assert status_of(response) == 200
    assert PROVIDER_KEY.encode() not in response, response[-600:]
    assert MASKED.encode() not in response, response[-600:]


@pytest.mark.parametrize("routed", [False, True])
def test_the_openai_sdk_raises_on_a_stalled_stream(routed: bool, hostile: int, make_proxy: Proxies) -> None:
    proxy = _hostile_proxy(make_proxy, hostile, routed)
    client = openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key=CLIENT_KEY,
        max_retries=0,
        timeout=5,
        default_headers={"x-script": "sse-stall"},
    )
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_the_anthropic_sdk_raises_on_a_stalled_translated_stream(hostile: int, make_proxy: Proxies) -> None:
    proxy = _hostile_proxy(make_proxy, hostile, routed=True)
    client = anthropic.Anthropic(
        base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=5, default_headers={"x-script": "sse-stall"}
    )
    hi: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.APIError), client.messages.stream(model="m", max_tokens=5, messages=hi) as s:
        for _ in s:
            pass


@pytest.mark.parametrize("script", [b"stall-after-head", b"reset-after-head", b"chunk-0x"])
def test_translated_upstream_fault_is_anthropic_shaped(script: bytes, hostile: int, make_proxy: Proxies) -> None:
    proxy = _hostile_proxy(make_proxy, hostile, routed=True)
    data = MHEAD + b"x-script: " + script + b"\r\nConnection: close\r\n" + _cl(MBODY) + b"\r\n" + MBODY
    response, _ = _talk(proxy.port, data, timeout=4)
    assert status_of(response) in (502, 504), response[:300]
    _anthropic_shaped(response)


# -- 5. client secrets never reach the provider or the logs ------------------------------------------

CLIENT_SECRETS: list[Any] = [
    ("authorization", b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n", b""),
    ("authorization-lower-basic", b"authorization: Basic " + CLIENT_KEY.encode() + b"\r\n", b""),
    ("x-api-key", b"x-api-key: " + CLIENT_KEY.encode() + b"\r\n", b""),
    ("X-API-KEY", b"X-API-KEY: " + CLIENT_KEY.encode() + b"\r\n", b""),
    ("api-key", b"api-key: " + CLIENT_KEY.encode() + b"\r\n", b""),
    ("proxy-authorization", b"Proxy-Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n", b""),
    ("connection-named-auth", b"Connection: x-api-key\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n", b""),
    ("query-key", b"", b"?key=" + CLIENT_KEY.encode()),
    ("query-api_key-encoded-value", b"", b"?api_key=" + CLIENT_KEY.replace("-", "%2D").encode()),
    ("query-Key", b"", b"?Key=" + CLIENT_KEY.encode()),
    ("query-token", b"", b"?token=" + CLIENT_KEY.encode()),
    ("query-encoded-name", b"", b"?%6Bey=" + CLIENT_KEY.encode()),
    ("query-twice", b"", b"?key=a&key=" + CLIENT_KEY.encode()),
    ("query-semicolon", b"", b"?x=1;key=" + CLIENT_KEY.encode()),
]


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize(("name", "header", "query"), [_ided(c) for c in CLIENT_SECRETS])
def test_client_secrets_never_reach_the_provider_or_the_logs(
    name: str,
    header: bytes,
    query: bytes,
    routed: bool,
    hostile: int,
    make_proxy: Proxies,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = _hostile_proxy(make_proxy, hostile, routed)
    head = HEAD.replace(b"completions ", b"completions" + query + b" ")
    data = head + header + b"Connection: close\r\n" + _cl() + b"\r\n" + BODY
    response, _ = _talk(proxy.port, data, timeout=4)
    assert status_of(response) == 200, response[:300]
    sent = b"\n".join(_Hostile.heads)
    assert CLIENT_KEY.encode() not in sent, sent
    assert CLIENT_KEY.replace("-", "%2D").encode() not in sent, sent
    time.sleep(0.05)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert CLIENT_KEY not in logged


# -- 6. JSON bodies -------------------------------------------------------------------------------

BAD_JSON: list[tuple[str, bytes]] = [
    ("invalid-utf8-in-string", b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}'),
    ("overlong-utf8", b'{"model":"m","messages":[{"role":"user","content":"\xc0\xaf"}]}'),
    ("lone-surrogate-escape", b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'),
    ("top-level-array", b'[{"model":"m"}]'),
    ("top-level-string", b'"model"'),
    ("top-level-number", b"12"),
    ("top-level-null", b"null"),
    ("huge-integer", b'{"model":"m","max_tokens":' + b"9" * 400 + b',"messages":[]}'),
    ("huge-float", b'{"model":"m","temperature":1e999999,"messages":[]}'),
    ("nan", b'{"model":"m","temperature":NaN,"messages":[]}'),
    ("bom", b'\xef\xbb\xbf{"model":"m","messages":[]}'),
    ("trailing-garbage", b'{"model":"m","messages":[]}x'),
    ("two-documents", b'{"model":"m","messages":[]}{"model":"n"}'),
    ("empty", b""),
    ("deep-objects-5000", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    ("model-not-string", b'{"model":["m"],"messages":[]}'),
    ("model-huge-int", b'{"model":' + b"9" * 30 + b',"messages":[]}'),
]
#: Valid JSON objects a pass-through proxy may forward (only routing reads the model).
FORWARDABLE = {"model-not-string", "model-huge-int"}


JSON_CASES = [
    pytest.param(
        name,
        body,
        routed,
        id=f"{name}-{'routed' if routed else 'passthrough'}",
        marks=[],
    )
    for name, body in BAD_JSON
    for routed in (False, True)
]


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/messages"])
@pytest.mark.parametrize(("name", "body", "routed"), JSON_CASES)
def test_bad_json_is_a_shaped_4xx_never_a_500(
    name: str,
    body: bytes,
    path: bytes,
    routed: bool,
    hostile: int,
    make_proxy: Proxies,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = _hostile_proxy(make_proxy, hostile, routed)
    data = b"POST %s HTTP/1.1\r\nHost: p\r\nConnection: close\r\n%s\r\n%s" % (path, _cl(body), body)
    response, _ = _talk(proxy.port, data, timeout=4)
    status = status_of(response)
    if not routed and name in FORWARDABLE:
        assert status == 200, response[:400]
        return
    assert 400 <= status < 500, response[:400]
    (_anthropic_shaped if path == b"/v1/messages" else _openai_shaped)(response)
    assert _Hostile.heads == []
    time.sleep(0.05)
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]


# -- 7. late additions: logs of upstream protocol errors, SSE events past the cap --------------------


def test_a_bad_upstream_status_line_quoting_the_key_is_not_logged(
    hostile: int, make_proxy: Proxies, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = _hostile_proxy(make_proxy, hostile, routed=True)
    response, _ = _ask(proxy.port, b"status-line-quotes-key")
    assert status_of(response) == 502
    time.sleep(0.05)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert PROVIDER_KEY not in logged, logged


SCRIPTS[b"sse-huge-event"] = (
    SSE_HEAD + b"connection: close\r\n\r\n" + _sse_chunk("hel") + b"data: " + b"a" * 1024 * 1024 + b"\n\n",
    True,
)


@pytest.mark.parametrize("routed", [True])  # pass-through with no filter relays events unframed, by design
def test_an_sse_event_past_the_cap_raises_in_the_openai_sdk(routed: bool, hostile: int, make_proxy: Proxies) -> None:
    proxy = _hostile_proxy(make_proxy, hostile, routed)
    client = openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key=CLIENT_KEY,
        max_retries=0,
        timeout=5,
        default_headers={"x-script": "sse-huge-event"},
    )
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
