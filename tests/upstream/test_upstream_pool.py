"""The upstream client on its own, against the mock provider: framing contract and reuse."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from llmproxy.errors import UpstreamProtocolError
from llmproxy.mock import MockServer
from llmproxy.upstream import UpstreamPool, UpstreamTarget

from ..support import LoopThread

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


Call = tuple[bytes, bytes, list[tuple[bytes, bytes]]]


async def _send_all(factory: Callable[[], asyncio.Protocol], calls: list[Call]) -> tuple[list[tuple[int, bytes]], int]:
    """Serve ``factory`` on a free port and send it ``calls`` (method, target, headers) through one
    pool, in turn; the (status, body) of each and the idle connections left."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    pool = UpstreamPool()
    target = UpstreamTarget.from_url("raw", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    results = []
    try:
        for method, path, headers in calls:
            response = await pool.send(target, method, path, headers, b"")
            body = b""
            while chunk := await response.read():
                body += chunk
            response.release()
            results.append((response.status, body))
        (origin,) = pool._pools.values()
        return results, len(origin.idle)
    finally:
        await pool.close()
        server.close()


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

    headers = [(b"host", b"raw.test"), (b"x-trace", b"a b"), (b"accept", b"*/*")]
    calls = [(method, b"/v1/models?x=1", headers) for method in (b"HEAD", b"GET")]
    results, idle = loop_thread.call(_send_all(lambda: _RecordingUpstream(received, replies), calls))
    assert results == [(200, b""), (200, b"ok")]
    assert idle == 1  # one connection carried both
    head = b"/v1/models?x=1 HTTP/1.1\r\nhost: raw.test\r\nx-trace: a b\r\naccept: */*\r\n\r\n"
    assert bytes(received) == b"HEAD " + head + b"GET " + head


class _PacedUpstream(asyncio.Protocol):
    """A raw upstream answering each request with ``pieces``, one write every 5 ms."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"GET"):
            loop = asyncio.get_running_loop()
            for i, piece in enumerate(self.pieces):
                loop.call_later(0.005 * i, self.transport.write, piece)


async def _get_all(pieces: list[bytes], requests: int = 1) -> tuple[list[tuple[int, bytes]], int]:
    """GET ``requests`` times from a paced upstream; the results and the idle connections left."""
    return await _send_all(lambda: _PacedUpstream(pieces), [(b"GET", b"/", [(b"host", b"raw.test")])] * requests)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def test_a_chunked_body_split_anywhere_across_reads_is_decoded_and_the_connection_reused(
    loop_thread: LoopThread,
) -> None:
    body = b"6\r\ndata: \r\n3;ext=1\r\nab\n\r\n1\r\n\n\r\n0\r\nx-trailer: dropped\r\n\r\n"
    # the head with the start of the first size line, then pieces cut inside sizes, data and CRLFs
    pieces = [CHUNKED_HEAD + body[:1], body[1:4], body[4:9], body[9:10], body[10:30], body[30:]]
    results, idle = loop_thread.call(_get_all(pieces, requests=2))
    assert results == [(200, b"data: ab\n\n")] * 2
    assert idle == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"zz\r\nhello\r\n0\r\n\r\n", "invalid chunked body: invalid chunk-size"),
        (b"5\r\nhelloX\r\n0\r\n\r\n", "invalid chunked body: chunk data not followed by CRLF"),
        (b"5\r\nhello\r\n", "closed the connection mid-response"),  # then the upstream closes
    ],
)
def test_a_broken_chunked_body_is_an_upstream_protocol_error(
    loop_thread: LoopThread, body: bytes, message: str
) -> None:
    class Closing(_PacedUpstream):
        def data_received(self, data: bytes) -> None:
            self.transport.write(CHUNKED_HEAD + body)
            asyncio.get_running_loop().call_later(0.01, self.transport.close)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Closing([]), "127.0.0.1", 0)
        pool = UpstreamPool()
        target = UpstreamTarget.from_url("raw", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            response = await pool.send(target, b"GET", b"/", [(b"host", b"raw.test")], b"")
            with pytest.raises(UpstreamProtocolError, match=message):
                while await response.read():
                    pass
            response.close()
        finally:
            await pool.close()
            server.close()

    loop_thread.call(run())


@pytest.mark.parametrize(
    "reply",
    [
        CHUNKED_HEAD + b"2\r\nok\r\n0\r\n\r\nEXTRA",  # bytes after the body
        # chunked with a Content-Length is refused outright: see test_hardening_upstream.py
    ],
    ids=["bytes after the body"],
)
def test_a_chunked_response_framed_ambiguously_is_read_but_its_connection_never_reused(
    loop_thread: LoopThread, reply: bytes
) -> None:
    results, idle = loop_thread.call(_get_all([reply], requests=1))
    assert results == [(200, b"ok")]
    assert idle == 0


def test_each_response_gets_a_fresh_reader(loop_thread: LoopThread, mock: MockServer) -> None:
    """Nothing of one response (head, counters, chunks, end, error) is left for the next on a reused connection."""

    async def run() -> None:
        pool = UpstreamPool()
        target = UpstreamTarget.from_url("mock", f"http://127.0.0.1:{mock.port}")
        readers = []
        for _ in range(3):
            response = await pool.send(target, b"POST", b"/v1/chat/completions", _headers(target, len(BODY)), BODY)
            (origin,) = pool._pools.values()
            (conn,) = origin.active
            readers.append(conn.reader)
            while await response.read():
                pass
            response.release()
            assert conn.reader is not readers[-1]
            fresh = conn.reader
            assert fresh.head is None and not fresh.chunks and not fresh.eom and fresh.error is None
            assert not fresh.request_sent and fresh.body_length is None and fresh.keep_alive
        assert len({id(r) for r in readers}) == 3
        await pool.close()

    loop_thread.call(run())
