"""Hostile upstreams: ambiguous framing, oversized heads, odd statuses, pool fairness, SSE events.

Every case drives the upstream client (or the whole proxy) over real loopback
sockets against a hand-written upstream that answers with scripted bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import pytest

from llmproxy.errors import UpstreamProtocolError, UpstreamTimeout
from llmproxy.upstream import UpstreamPool, UpstreamTarget, _Grant, _OriginPool

from ..support import LoopThread, RunningProxy

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
        self, replies: list[bytes], log: list[tuple[Any, ...]], piece: int = 0, gate: asyncio.Event | None = None
    ) -> None:
        self.replies = replies
        self.log = log
        self.piece = piece
        self.gate = gate  # replies wait until it is set
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
        if self.gate is not None:
            await self.gate.wait()
        if not self.piece:
            self.transport.write(reply)
            return
        for i in range(0, len(reply), self.piece):
            if self.transport.is_closing():
                return
            self.transport.write(reply[i : i + self.piece])
            await asyncio.sleep(0)  # one loop turn: the client reads each piece on its own


async def _serve(
    replies: list[bytes], log: list[tuple[Any, ...]], piece: int = 0, gate: asyncio.Event | None = None
) -> tuple[asyncio.Server, UpstreamTarget]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Scripted(replies, log, piece, gate), "127.0.0.1", 0)
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
_CHUNKED_PLANT = b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"hello" + PLANTED), b"hello" + PLANTED)

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


def test_transfer_encoding_in_an_http_1_0_response_is_faulty_framing(loop_thread: LoopThread) -> None:
    message, _ = _refused_then_fresh(
        loop_thread, b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
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


def test_informational_heads_count_towards_the_head_limit(loop_thread: LoopThread) -> None:
    _refused_then_fresh(loop_thread, b"HTTP/1.1 100 Continue\r\n\r\n" * 100 + OK, 0, **_LIMITS)


@pytest.mark.parametrize("size", [70 * 1024, 250 * 1024])
def test_the_default_head_limit_is_64_kib_even_in_one_read(loop_thread: LoopThread, size: int) -> None:
    _refused_then_fresh(loop_thread, b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * size + b"\r\ncontent-length: 0\r\n\r\n")


# -- 1b. the client's framing is the proxy's own count ------------------------------------


@pytest.mark.parametrize(
    ("method", "reply", "length"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 2),
        (b"GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\nok", 2),
        (b"GET", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", None),
        (b"GET", b"HTTP/1.0 200 OK\r\n\r\nok", None),  # close-delimited
        (b"HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n", 42),  # frames nothing
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
        proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{target.port}"}, "server": {"access_log": "off"}})
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


# -- 4. pool fairness ---------------------------------------------------------------------


class _FakeConn:
    """Stands in for a connection in the synchronous pool policy."""

    def __init__(self, reusable: bool = True) -> None:
        from llmproxy.upstream import _ConnState

        self.state = _ConnState.ACTIVE
        self.idle_since = 0.0
        self._reusable = reusable
        self.aborted = False

    def reusable(self) -> bool:
        return self._reusable and not self.aborted

    def idle_usable(self) -> bool:
        return not self.aborted

    def reset_for_reuse(self) -> None:
        pass

    def abort(self) -> None:
        from llmproxy.upstream import _ConnState

        self.aborted = True
        self.state = _ConnState.CLOSED


def _policy(max_connections: int = 1) -> tuple[_OriginPool, asyncio.AbstractEventLoop]:
    return _OriginPool(("http", "h", 80, True, None), max_connections, 30.0, None), asyncio.new_event_loop()


def _state(pool: _OriginPool) -> str:
    return repr(pool).split(" ", 2)[2].rstrip(">")


def _connected(pool: _OriginPool, reusable: bool = True) -> Any:
    assert pool.acquire(0.0) is _Grant.SLOT
    conn = _FakeConn(reusable)
    pool.start_connection(conn)  # type: ignore[arg-type]
    return conn


def test_policy_a_released_connection_goes_to_the_oldest_waiter_not_a_newcomer() -> None:
    pool, loop = _policy()
    try:
        conn = _connected(pool)
        assert _state(pool) == "active=1 idle=0 reserved=0 waiting=0"
        assert pool.acquire(0.0) is None
        first, second = pool.queue(loop), pool.queue(loop)
        assert _state(pool) == "active=1 idle=0 reserved=0 waiting=2"
        pool.release(conn)
        assert first.result() is conn and not second.done()
        assert _state(pool) == "active=1 idle=0 reserved=0 waiting=1"
        assert pool.acquire(0.0) is None  # a newcomer queues behind `second`
        pool.release(conn)
        assert second.result() is conn
        pool.release(conn)
        assert _state(pool) == "active=0 idle=1 reserved=0 waiting=0"
        assert pool.acquire(0.0) is conn
    finally:
        loop.close()


def test_policy_a_freed_slot_is_reserved_for_the_oldest_waiter() -> None:
    pool, loop = _policy()
    try:
        conn = _connected(pool, reusable=False)
        waiter = pool.queue(loop)
        pool.release(conn)  # not reusable: closed, its slot goes to the waiter
        assert conn.aborted and waiter.result() is _Grant.SLOT
        assert _state(pool) == "active=0 idle=0 reserved=1 waiting=0"
        assert pool.acquire(0.0) is None and not pool.has_room()
    finally:
        loop.close()


def test_policy_a_waiter_that_gives_up_passes_on_what_it_was_granted() -> None:
    pool, loop = _policy()
    try:
        conn = _connected(pool)
        gone, next_one = pool.queue(loop), pool.queue(loop)
        pool.release(conn)
        assert gone.result() is conn
        pool.withdraw(gone)  # timed out or cancelled before it ran: the connection is not lost
        assert next_one.result() is conn
        assert _state(pool) == "active=1 idle=0 reserved=0 waiting=0"
        pool.withdraw(next_one)  # nobody else: idle
        assert _state(pool) == "active=0 idle=1 reserved=0 waiting=0"

        pool2, _ = _policy()
        conn2 = _connected(pool2, reusable=False)
        gone, next_one = pool2.queue(loop), pool2.queue(loop)
        pool2.release(conn2)
        assert gone.result() is _Grant.SLOT
        pool2.withdraw(gone)
        assert next_one.result() is _Grant.SLOT
        assert _state(pool2) == "active=0 idle=0 reserved=1 waiting=0"
        pool2.withdraw(next_one)
        assert _state(pool2) == "active=0 idle=0 reserved=0 waiting=0" and pool2.has_room()
    finally:
        loop.close()


def test_policy_a_waiter_leaving_the_line_is_forgotten_and_a_cancelled_one_skipped() -> None:
    pool, loop = _policy()
    try:
        conn = _connected(pool)
        left, cancelled, served = pool.queue(loop), pool.queue(loop), pool.queue(loop)
        pool.withdraw(left)
        assert left.cancelled() and _state(pool) == "active=1 idle=0 reserved=0 waiting=2"
        cancelled.cancel()  # its task was cancelled; its withdraw has not run yet
        pool.release(conn)
        assert served.result() is conn
        pool.withdraw(cancelled)
        assert _state(pool) == "active=1 idle=0 reserved=0 waiting=0"
    finally:
        loop.close()


def test_policy_a_connection_closed_while_idle_frees_its_slot_for_a_waiter() -> None:
    pool, loop = _policy(max_connections=2)
    try:
        first, second = _connected(pool), _connected(pool)
        pool.release(first)
        assert _state(pool) == "active=1 idle=1 reserved=0 waiting=0"
        assert pool.acquire(0.0) is first
        waiter = pool.queue(loop)
        pool.release(first)  # to the waiter at once
        assert waiter.result() is first
        late = pool.queue(loop)
        pool.active.discard(second)
        second.abort()
        pool.forget(second)  # the peer closed it: its slot is the late waiter's
        assert late.result() is _Grant.SLOT
        assert _state(pool) == "active=1 idle=0 reserved=1 waiting=0"
    finally:
        loop.close()


def test_a_caller_releasing_and_asking_again_queues_behind_the_waiter(loop_thread: LoopThread) -> None:
    """The retry path (close, send again in the same task) must not overtake a waiting request."""
    log: list[tuple[Any, ...]] = []

    async def run() -> None:
        server, target = await _serve([], log)
        pool = UpstreamPool(max_per_origin=1)
        try:
            headers = [(b"host", b"raw.test")]
            first = await pool.send(target, b"GET", b"/first", headers, b"")
            waiting = asyncio.create_task(_get_path(pool, target, b"/waiting"))
            await _until_waiting(pool, 1)
            while await first.read():
                pass
            first.release()
            # right after, in the same task and turn (no task switch before it asks the pool)
            assert await _get_path(pool, target, b"/again") == (200, b'{"ok":true}')
            assert await asyncio.wait_for(waiting, 5) == (200, b'{"ok":true}')
        finally:
            await pool.close()
            server.close()

    loop_thread.call(run())
    assert [entry[1].split(b" ")[1] for entry in log if entry[0] == "req"] == [b"/first", b"/waiting", b"/again"]


def test_a_retried_send_in_the_same_turn_does_not_overtake(loop_thread: LoopThread) -> None:
    log: list[tuple[Any, ...]] = []

    async def run() -> None:
        server, target = await _serve([], log)
        pool = UpstreamPool(max_per_origin=1)
        try:
            headers = [(b"host", b"raw.test")]
            first = await pool.send(target, b"GET", b"/first", headers, b"")
            waiting = asyncio.create_task(_get_path(pool, target, b"/waiting"))
            await _until_waiting(pool, 1)
            first.close()  # a retry: the response is dropped and the request sent again at once
            second = await pool.send(target, b"GET", b"/again", headers, b"")  # same task and turn
            second.close()
            assert (await waiting)[0] == 200
        finally:
            await pool.close()
            server.close()

    loop_thread.call(run())
    assert [entry[1].split(b" ")[1] for entry in log if entry[0] == "req"] == [b"/first", b"/waiting", b"/again"]


async def _until_waiting(pool: UpstreamPool, count: int) -> None:
    """Let the loop run until ``count`` callers wait in line (bounded: a few loop turns suffice)."""
    for _ in range(2000):
        if f"waiting={count}" in repr(pool):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(repr(pool))


async def _until_requests(log: list[tuple[Any, ...]], count: int) -> None:
    for _ in range(2000):
        if sum(entry[0] == "req" for entry in log) >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(log)


async def _get_path(pool: UpstreamPool, target: UpstreamTarget, path: bytes) -> tuple[int, bytes]:
    response = await pool.send(target, b"GET", path, [(b"host", b"raw.test")], b"")
    body = b""
    while chunk := await response.read():
        body += chunk
    response.release()
    return response.status, body


def test_a_waiter_cancelled_after_it_was_handed_the_connection_does_not_lose_it(loop_thread: LoopThread) -> None:
    async def run() -> None:
        server, target = await _serve([], [])
        pool = UpstreamPool(max_per_origin=1)
        try:
            first = await pool.send(target, b"GET", b"/first", [(b"host", b"raw.test")], b"")
            cancelled = asyncio.create_task(_get_path(pool, target, b"/cancelled"))
            served = asyncio.create_task(_get_path(pool, target, b"/served"))
            await _until_waiting(pool, 2)
            while await first.read():
                pass
            first.release()  # handed to `cancelled`, which is cancelled before it runs
            cancelled.cancel()
            assert await asyncio.wait_for(served, 2) == (200, b'{"ok":true}')
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            (origin,) = pool._pools.values()
            assert "active=0 idle=1 reserved=0 waiting=0" in repr(origin)
        finally:
            await pool.close()
            server.close()

    loop_thread.call(run())


def test_a_waiter_timing_out_leaves_the_line_and_the_next_is_served(loop_thread: LoopThread) -> None:
    async def run() -> None:
        server, target = await _serve([], [])
        pool = UpstreamPool(max_per_origin=1)
        impatient = dataclasses.replace(target, timeouts=dataclasses.replace(target.timeouts, connect=0.05))
        try:
            first = await pool.send(target, b"GET", b"/first", [(b"host", b"raw.test")], b"")
            timing_out = asyncio.create_task(_get_path(pool, impatient, b"/impatient"))
            served = asyncio.create_task(_get_path(pool, target, b"/served"))
            with pytest.raises(UpstreamTimeout):
                await timing_out
            (origin,) = pool._pools.values()
            assert "active=1 idle=0 reserved=0 waiting=1" in repr(origin)
            while await first.read():
                pass
            first.release()
            assert await asyncio.wait_for(served, 2) == (200, b'{"ok":true}')
        finally:
            await pool.close()
            server.close()

    loop_thread.call(run())


def test_queued_requests_through_the_proxy_complete_in_arrival_order(loop_thread: LoopThread, make_proxy: Make) -> None:
    log: list[tuple[Any, ...]] = []
    gate = asyncio.Event()  # the upstream answers nothing until all six are in line
    server, target = loop_thread.call(_serve([], log, gate=gate))
    finished: list[int] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        request = b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Seq: %d\r\nConnection: close\r\n\r\n" % i
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        with lock:
            finished.append(i)

    try:
        proxy = make_proxy(
            {
                "upstream": {"url": f"http://127.0.0.1:{target.port}"},
                "pool": {"max_per_origin": 1},
                "server": {"access_log": "off"},
            }
        )
        threads = []
        for i in range(6):
            thread = threading.Thread(target=client, args=(i,))
            thread.start()
            threads.append(thread)
            # arrival order 0, 1, 2 ...: the next client starts once this one is in line
            loop_thread.call(_until_waiting(proxy.runtime.pool, i) if i else _until_requests(log, 1))
        loop_thread.loop.call_soon_threadsafe(gate.set)
        for thread in threads:
            thread.join(10)
    finally:
        loop_thread.loop.call_soon_threadsafe(gate.set)
        server.close()
    seqs = [
        int(line.split(b":")[1])
        for entry in log
        if entry[0] == "req"
        for line in entry[1].split(b"\r\n")
        if line.lower().startswith(b"x-seq:")
    ]
    assert seqs == list(range(6))  # one connection: served, and so completed, in that order
    assert sorted(finished) == list(range(6))


# -- 5. SSE events over the framer's cap --------------------------------------------------

_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunked(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("filter_name", "started"),
    [("ReplaceBodyFactory", False), ("ObserverFactory", True)],
    ids=["held: before the response started", "observed: streaming"],
)
def test_an_upstream_event_over_the_cap_is_a_typed_502_without_a_traceback(
    loop_thread: LoopThread, make_proxy: Make, caplog: pytest.LogCaptureFixture, filter_name: str, started: bool
) -> None:
    reply = _SSE_HEAD + _chunked(b'data: {"small":1}\n\n', b"data: " + b"x" * 5000 + b"\n\n")
    server, target = loop_thread.call(_serve([reply] * 3, []))
    try:
        proxy = make_proxy(
            {
                "upstream": {"url": f"http://127.0.0.1:{target.port}"},
                "filters": [{"name": f"tests.filters_for_tests:{filter_name}", "config": {}}],
                "server": {"access_log": "off"},
            }
        )
        proxy.runtime.limits = dataclasses.replace(proxy.runtime.limits, max_sse_event_bytes=1024)
        caplog.set_level(logging.WARNING)
        request = b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    finally:
        server.close()
    if started:
        assert data.startswith(b"HTTP/1.1 200")
        assert b'data: {"small":1}' in data and b'data: {"error":' in data
        assert b"upstream_event_too_large" in data
    else:
        # nothing had gone downstream: a failed attempt, whose 502 the response hooks see
        # (and this filter replaces, as it replaces any body)
        assert data.startswith(b"HTTP/1.1 502")
        assert b'"replaced":true' in data
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_a_caller_cancelled_while_connecting_frees_its_slot(loop_thread: LoopThread) -> None:
    """A client gone while its upstream connection is being made: the slot is not leaked."""

    async def run() -> None:
        server, target = await _serve([], [])
        pool = UpstreamPool(max_per_origin=1)
        try:
            for _ in range(3):
                connecting = asyncio.create_task(_get_path(pool, target, b"/gone"))
                await asyncio.sleep(0)  # it reserved the slot and is inside create_connection
                connecting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await connecting
            (origin,) = pool._pools.values()
            assert "active=0 idle=0 reserved=0 waiting=0" in repr(origin)
            assert await asyncio.wait_for(_get_path(pool, target, b"/served"), 2) == (200, b'{"ok":true}')
        finally:
            await pool.close()
            server.close()

    loop_thread.call(run())
