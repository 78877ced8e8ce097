"""Hostile upstreams: ambiguous framing, oversized heads, odd statuses, pool fairness, SSE events.

Every case drives the upstream client (or the whole proxy) over real loopback
sockets against a hand-written upstream that answers with scripted bytes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import h11
import pytest

from proxy.errors import UpstreamProtocolError
from proxy.upstream import UpstreamPool, UpstreamTarget

from .support import LoopThread, RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
PLANTED = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n"PLANTED"'


class _Scripted(asyncio.Protocol):
    """An upstream answering each request head with the next scripted reply (``OK`` once they
    run out), written whole, in ``piece``-byte writes, or byte by byte (``piece=1``).

    ``log`` is shared by every connection of one server: ``("conn",)`` per connection,
    ``("req", head)`` per request head, in arrival order.
    """

    def __init__(
        self,
        replies: list[bytes],
        log: list[tuple[Any, ...]],
        piece: int = 0,
        delay: float = 0.0,
    ) -> None:
        self.replies = replies
        self.log = log
        self.piece = piece
        self.delay = delay
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.log.append(("conn",))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.log.append(("req", head))
            reply = self.replies.pop(0) if self.replies else OK
            asyncio.get_running_loop().create_task(self._write(reply))

    async def _write(self, reply: bytes) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.piece:
            self.transport.write(reply)
            return
        for i in range(0, len(reply), self.piece):
            if self.transport.is_closing():
                return
            self.transport.write(reply[i : i + self.piece])
            await asyncio.sleep(0)  # one loop turn: the client reads each piece on its own


async def _serve(
    replies: list[bytes], log: list[tuple[Any, ...]], piece: int = 0, delay: float = 0.0
) -> tuple[asyncio.Server, UpstreamTarget]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Scripted(replies, log, piece, delay), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, UpstreamTarget.from_url("raw", f"http://127.0.0.1:{port}")


async def _get(pool: UpstreamPool, target: UpstreamTarget) -> tuple[int, bytes]:
    response = await pool.send(target, b"GET", b"/v1/models", [(b"host", b"raw.test")], b"")
    body = b""
    while chunk := await response.read():
        body += chunk
    response.release()
    return response.status, body


def _refused_then_fresh(
    loop_thread: LoopThread, reply: bytes, piece: int = 0, **pool_args: Any
) -> tuple[str, list[tuple[Any, ...]]]:
    """Send a GET answered by ``reply``: the UpstreamProtocolError's message; then a second GET
    (answered ``OK``) must go on a fresh connection. Returns the message and the server's log."""
    log: list[tuple[Any, ...]] = []

    async def run() -> str:
        server, target = await _serve([reply], log, piece)
        pool = UpstreamPool(**pool_args)
        try:
            with pytest.raises(UpstreamProtocolError) as caught:
                await _get(pool, target)
            (origin,) = pool._pools.values()
            assert not origin.idle and not origin.active
            assert await _get(pool, target) == (200, b'{"ok":true}')
            return caught.value.message
        finally:
            await pool.close()
            server.close()

    message = loop_thread.call(run())
    assert [entry[0] for entry in log] == ["conn", "req", "conn", "req"]  # never reused
    return message, log


# -- 1a. ambiguous framing is a 502 and the connection is closed ----------------------------

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
_CHUNKED_PLANT = b"%x\r\n%s\r\n0\r\n\r\n" % (
    len(b"hello" + PLANTED),
    b"hello" + PLANTED,
)

AMBIGUOUS = {
    "CL then TE": b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n" + _CHUNKED_PLANT,
    "TE then CL": b"transfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n" + _CHUNKED_PLANT,
    "CL 0 and TE": b"content-length: 0\r\ntransfer-encoding: chunked\r\n\r\n" + _CHUNKED_PLANT,
    "differing CLs": b"content-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    "differing CL list": b"content-length: 5, 6\r\n\r\nhello!",
    "gzip, chunked": b"transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "chunked, gzip": b"transfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "identity": b"transfer-encoding: identity\r\n\r\nhello",
    "chunked, chunked": b"transfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "two TE fields": b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE with an empty value": b"transfer-encoding: \r\n\r\nhello",
    "CL +5": b"content-length: +5\r\n\r\nhello",
    "CL 5 5": b"content-length: 5 5\r\n\r\nhello",
    "CL 0x5": b"content-length: 0x5\r\n\r\nhello",
    "CL -1": b"content-length: -1\r\n\r\nhello",
    "CL empty": b"content-length: \r\n\r\nhello",
    "CL 21 digits": b"content-length: 100000000000000000000\r\n\r\nhello",
    "CL past 2**63-1": b"content-length: 9223372036854775808\r\n\r\nhello",
}


@pytest.mark.parametrize("fields", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
def test_a_response_with_ambiguous_framing_is_a_protocol_error_and_its_connection_closed(
    loop_thread: LoopThread, fields: bytes
) -> None:
    _refused_then_fresh(loop_thread, _HEAD + fields)


def test_transfer_encoding_in_an_http_1_0_response_is_faulty_framing(
    loop_thread: LoopThread,
) -> None:
    message, _ = _refused_then_fresh(
        loop_thread,
        b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert "HTTP/1.0" in message


# -- 3. a status outside 100-599 ----------------------------------------------------------


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"700", b"999", b"20", b"2000", b"abc"])
def test_a_status_outside_100_to_599_is_a_protocol_error_and_its_connection_closed(
    loop_thread: LoopThread, status: bytes
) -> None:
    _refused_then_fresh(loop_thread, b"HTTP/1.1 %s X\r\ncontent-length: 2\r\n\r\nok" % status)


# -- 2. response-head limits, whatever the read boundaries --------------------------------

_LIMITS = {"max_head_bytes": 2048, "max_head_fields": 20}


def _head_with(fields: int, filler: int) -> bytes:
    lines = b"".join(b"x-f%d: v\r\n" % i for i in range(fields - 2))
    return b"HTTP/1.1 200 OK\r\n" + lines + b"x-fill: " + b"a" * filler + b"\r\ncontent-length: 2\r\n\r\nok"


BIG_HEAD = _head_with(5, 2100)  # 5 fields, over 2048 bytes
MANY_FIELDS = _head_with(21, 10)  # 21 fields, well under 2048 bytes


@pytest.mark.parametrize("piece", [0, 1, 7, 512, 1500], ids=["one write", "byte by byte", "7", "512", "1500"])
@pytest.mark.parametrize("reply", [BIG_HEAD, MANY_FIELDS], ids=["too many bytes", "too many fields"])
def test_a_response_head_past_the_limits_is_refused_whatever_the_reads(
    loop_thread: LoopThread, reply: bytes, piece: int
) -> None:
    message, _ = _refused_then_fresh(loop_thread, reply, piece, **_LIMITS)
    assert "head" in message


@pytest.mark.parametrize("piece", [0, 1, 512])
def test_body_bytes_read_with_the_head_do_not_count_against_the_head_limit(loop_thread: LoopThread, piece: int) -> None:
    head = _head_with(20, 1500)
    head = head[: -len(b"content-length: 2\r\n\r\nok")]
    assert len(head) + len(b"content-length: 4000\r\n\r\n") <= 2048
    reply = head + b"content-length: 4000\r\n\r\n" + b"b" * 4000

    async def run() -> tuple[int, bytes]:
        server, target = await _serve([reply], [], piece)
        pool = UpstreamPool(**_LIMITS)
        try:
            return await _get(pool, target)
        finally:
            await pool.close()
            server.close()

    assert loop_thread.call(run()) == (200, b"b" * 4000)


def test_informational_heads_count_towards_the_head_limit(
    loop_thread: LoopThread,
) -> None:
    _refused_then_fresh(loop_thread, b"HTTP/1.1 100 Continue\r\n\r\n" * 100 + OK, 0, **_LIMITS)


@pytest.mark.parametrize("size", [70 * 1024, 250 * 1024])
def test_the_default_head_limit_is_64_kib_even_in_one_read(loop_thread: LoopThread, size: int) -> None:
    _refused_then_fresh(
        loop_thread,
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * size + b"\r\ncontent-length: 0\r\n\r\n",
    )


# -- 1b. the client's framing is the proxy's own count ------------------------------------


@pytest.mark.parametrize(
    ("method", "reply", "length"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 2),
        (
            b"GET",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\nok",
            2,
        ),
        (
            b"GET",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            None,
        ),
        (b"GET", b"HTTP/1.0 200 OK\r\n\r\nok", None),  # close-delimited
        (
            b"HEAD",
            b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n",
            42,
        ),  # frames nothing
        (b"GET", b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n", None),
    ],
    ids=["counted", "equal duplicates", "chunked", "close-delimited", "HEAD", "204"],
)
def test_content_length_is_what_the_connection_counts(
    loop_thread: LoopThread, method: bytes, reply: bytes, length: int | None
) -> None:
    async def run() -> int | None:
        server, target = await _serve([reply], [])
        pool = UpstreamPool()
        try:
            response = await pool.send(target, method, b"/v1/models", [(b"host", b"raw.test")], b"")
            result = response.content_length
            response.close()
            return result
        finally:
            await pool.close()
            server.close()

    assert loop_thread.call(run()) == length


PLANTS = {
    "CL and TE": _HEAD + AMBIGUOUS["CL then TE"],
    "TE and CL": _HEAD + AMBIGUOUS["TE then CL"],
    "bytes past the Content-Length": _HEAD + b"content-length: 5\r\n\r\nhello" + PLANTED,
    "bytes after the chunked body": _HEAD + b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + PLANTED,
    "bytes after a 204": b"HTTP/1.1 204 No Content\r\n\r\n" + PLANTED,
    "gzip, chunked": _HEAD + b"transfer-encoding: gzip, chunked\r\n\r\n" + _CHUNKED_PLANT,
}


def _responses(data: bytes, methods: list[bytes]) -> list[tuple[int, bytes]]:
    """Parse the responses in ``data`` (read by a client that sent ``methods``), as h11 would."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[tuple[int, bytes]] = []
    for method in methods:
        if conn.our_state is h11.DONE:
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                break
        conn.send(h11.Request(method=method, target="/", headers=[("host", "p")]))
        conn.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if type(event) is h11.Response:
                status = event.status_code
            elif type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                out.append((status, body))
                break
            elif event is h11.NEED_DATA or type(event) is h11.ConnectionClosed:
                return out
    return out


@pytest.mark.parametrize("reply", PLANTS.values(), ids=PLANTS.keys())
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "keep-alive"])
def test_a_client_never_reads_a_response_planted_by_the_upstream(
    loop_thread: LoopThread, make_proxy: Make, reply: bytes, pipelined: bool
) -> None:
    log: list[tuple[Any, ...]] = []
    server, target = loop_thread.call(_serve([reply], log))
    try:
        proxy = make_proxy(
            {
                "upstream": {"url": f"http://127.0.0.1:{target.port}"},
                "server": {"access_log": "off"},
            }
        )
        request = b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n"
        received = b""
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as sock:
            sock.sendall(request * 2 if pipelined else request)
            if not pipelined:
                time.sleep(0.2)  # the first exchange is over before the second request
                sock.sendall(request)
            sock.settimeout(0.5)
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                received += chunk
    finally:
        server.close()
    assert b"PLANTED" not in received
    responses = _responses(received, [b"GET", b"GET"])
    assert len(responses) == 2, received
    assert responses[1] == (200, b'{"ok":true}'), received
    assert responses[0][0] in (200, 204, 502)
