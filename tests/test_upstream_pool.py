"""The upstream client on its own, against the mock provider: framing contract and reuse."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.errors import UpstreamProtocolError
from proxy.mock_upstream import MockServer
from proxy.upstream import UpstreamPool, UpstreamTarget

from .support import LoopThread

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def _headers(target: UpstreamTarget, length: int | None) -> list[tuple[bytes, bytes]]:
    out = [(b"host", target.host_header), (b"content-type", b"application/json")]
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out


async def _exchange(pool: UpstreamPool, target: UpstreamTarget, length: int | None) -> tuple[int, bytes]:
    response = await pool.send(target, b"POST", b"/v1/chat/completions", _headers(target, length), BODY)
    body = b""
    while chunk := await response.read():
        body += chunk
    response.release()
    return response.status, body


def test_requests_reuse_one_connection_and_read_whole_bodies(loop_thread: LoopThread, mock: MockServer) -> None:
    async def run() -> None:
        pool = UpstreamPool()
        target = UpstreamTarget.from_url("mock", f"http://127.0.0.1:{mock.port}")
        for _ in range(3):
            status, body = await _exchange(pool, target, len(BODY))
            assert status == 200 and body.endswith(b"}")
        (origin,) = pool._pools.values()
        assert len(origin.idle) == 1 and not origin.active
        await pool.close()

    loop_thread.call(run())
    assert len(mock.requests) == 3


@pytest.mark.parametrize("length", [None, len(BODY) - 1, len(BODY) + 1])
def test_a_body_not_framed_by_its_content_length_is_refused_before_sending(
    loop_thread: LoopThread, mock: MockServer, length: int | None
) -> None:
    async def run() -> None:
        pool = UpstreamPool()
        target = UpstreamTarget.from_url("mock", f"http://127.0.0.1:{mock.port}")
        with pytest.raises(UpstreamProtocolError):
            await _exchange(pool, target, length)
        await pool.close()

    loop_thread.call(run())
    assert mock.requests == []


@pytest.mark.parametrize(
    ("method", "target", "headers", "reason"),
    [
        (b"POST", b"/v1/chat completions", [(b"host", b"h")], "invalid target"),
        (b"POST", b"/v1\r\nX-Injected: 1", [(b"host", b"h")], "invalid target"),
        (b"PO ST", b"/v1", [(b"host", b"h")], "invalid method"),
        (b"POST", b"/v1", [], "exactly one Host"),
        (b"POST", b"/v1", [(b"host", b"h"), (b"host", b"i")], "exactly one Host"),
        (b"POST", b"/v1", [(b"host", b"h"), (b"transfer-encoding", b"chunked")], "Transfer-Encoding"),
        (b"POST", b"/v1", [(b"host", b"h"), (b"content-length", b"2"), (b"content-length", b"2")], "more than one"),
    ],
)
def test_a_request_head_that_cannot_be_framed_is_refused_before_sending(
    loop_thread: LoopThread, mock: MockServer, method: bytes, target: bytes, headers: list[Any], reason: str
) -> None:
    async def run() -> None:
        pool = UpstreamPool()
        upstream = UpstreamTarget.from_url("mock", f"http://127.0.0.1:{mock.port}")
        body = b"{}"
        fields = headers if any(k == b"content-length" for k, _ in headers) else [*headers, (b"content-length", b"2")]
        with pytest.raises(UpstreamProtocolError, match=reason):
            await pool.send(upstream, method, target, fields, body)
        await pool.close()

    loop_thread.call(run())
    assert mock.requests == []


class _RecordingUpstream(asyncio.Protocol):
    """A raw upstream: records what it receives and answers each request head with ``replies``, in turn."""

    def __init__(self, received: bytearray, replies: list[bytes]) -> None:
        self.received = received
        self.replies = replies

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if data.startswith((b"GET", b"HEAD", b"POST")) and self.replies:
            self.transport.write(self.replies.pop(0))  # type: ignore[attr-defined]


def test_the_request_is_written_as_given_and_a_head_response_has_no_body(loop_thread: LoopThread) -> None:
    """The head is the proxy's own serialisation (fields in order, as given), and h11 reads the
    response knowing the method: the Content-Length of a HEAD response frames no body, so the
    connection carries the next request."""
    received = bytearray()
    replies = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",  # to HEAD: no body follows
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ]

    async def run() -> tuple[list[tuple[int, bytes]], int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _RecordingUpstream(received, replies), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        target = UpstreamTarget.from_url("raw", f"http://127.0.0.1:{port}")
        results = []
        for method in (b"HEAD", b"GET"):
            headers = [(b"host", b"raw.test"), (b"x-trace", b"a b"), (b"accept", b"*/*")]
            response = await pool.send(target, method, b"/v1/models?x=1", headers, b"")
            body = b""
            while chunk := await response.read():
                body += chunk
            response.release()
            results.append((response.status, body))
        (origin,) = pool._pools.values()
        idle = len(origin.idle)
        await pool.close()
        server.close()
        return results, idle

    results, idle = loop_thread.call(run())
    assert results == [(200, b""), (200, b"ok")]
    assert idle == 1  # one connection carried both
    head = b"/v1/models?x=1 HTTP/1.1\r\nhost: raw.test\r\nx-trace: a b\r\naccept: */*\r\n\r\n"
    assert bytes(received) == b"HEAD " + head + b"GET " + head
