"""Flow control: the FlowControl object on its own, and a request body to an upstream that reads slowly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest

from llmproxy.errors import UpstreamTimeout
from llmproxy.io.flow import FlowControl
from llmproxy.upstream import Timeouts, UpstreamPool, UpstreamTarget

from ..support import LoopThread, start_proxy


class _Transport:
    """Counts the reading calls FlowControl makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


def _flow() -> tuple[FlowControl, _Transport, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    transport = _Transport()
    return FlowControl(transport, loop), transport, loop  # type: ignore[arg-type]


def test_pause_and_resume_reading_are_idempotent() -> None:
    flow, transport, loop = _flow()
    with contextlib.closing(loop):
        flow.resume_reading()  # not paused: nothing
        flow.pause_reading()
        flow.pause_reading()
        assert flow.read_paused
        flow.resume_reading()
        flow.resume_reading()
        assert not flow.read_paused
        assert transport.calls == ["pause", "resume"]


def test_reading_calls_stop_once_closed() -> None:
    flow, transport, loop = _flow()
    with contextlib.closing(loop):
        flow.pause_reading()
        flow.close()
        flow.resume_reading()
        flow.pause_reading()
        assert transport.calls == ["pause"]
        assert flow.closed and not flow.read_paused


def test_drain_returns_at_once_when_writing_is_not_paused() -> None:
    flow, _, loop = _flow()
    with contextlib.closing(loop):
        assert loop.run_until_complete(flow.drain()) is True
        assert loop.run_until_complete(flow.drain(0.0)) is True


@pytest.mark.parametrize("wake", ["resume_writing", "close", "wake_drain"])
def test_a_waiting_drain_wakes_on_resume_close_or_wake(wake: str) -> None:
    flow, _, loop = _flow()
    with contextlib.closing(loop):

        async def run() -> bool:
            flow.pause_writing()
            flow.pause_writing()  # idempotent
            loop.call_later(0.01, getattr(flow, wake))
            return await flow.drain(5.0)

        assert loop.run_until_complete(run()) is True
        assert not flow._waiter  # no waiter left behind


def test_drain_gives_up_after_its_limit() -> None:
    flow, _, loop = _flow()
    with contextlib.closing(loop):
        flow.pause_writing()
        assert loop.run_until_complete(flow.drain(0.01)) is False
        assert flow.write_paused  # still paused: the caller decides what giving up means


def test_drain_on_a_closed_transport_returns_at_once() -> None:
    flow, _, loop = _flow()
    with contextlib.closing(loop):
        flow.pause_writing()
        flow.close()
        assert loop.run_until_complete(flow.drain()) is True
        flow.pause_writing()  # a late callback after close: still no wait
        assert loop.run_until_complete(flow.drain()) is True


def test_resume_writing_twice_and_without_a_waiter_is_harmless() -> None:
    flow, _, loop = _flow()
    with contextlib.closing(loop):
        flow.resume_writing()
        flow.pause_writing()
        flow.resume_writing()
        flow.resume_writing()
        flow.wake_drain()
        assert not flow.write_paused
        assert loop.run_until_complete(flow.drain()) is True


# -- a request body to a slow upstream ------------------------------------------------

BIG = 4 * 1024 * 1024


class _SlowUpstream:
    """Reads a request head, then its body ``piece`` bytes at a time (or not at all), then answers.

    ``answer_early``: answer 413 after the head without reading the body.
    """

    def __init__(self, piece: int, pause: float, answer_early: bool = False, read_body: bool = True) -> None:
        self.piece = piece
        self.pause = pause
        self.answer_early = answer_early
        self.read_body = read_body
        self.received = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before listen: accepted sockets inherit it
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock, limit=1 << 20)
        return int(sock.getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if self.answer_early:
                writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\nno")
                await writer.drain()
                await asyncio.sleep(5)
                return
            if not self.read_body:
                await asyncio.sleep(5)
                return
            while self.received < length:
                data = await reader.read(min(self.piece, length - self.received))
                if not data:
                    return
                self.received += len(data)
                await asyncio.sleep(self.pause)
            body = b'{"received":%d}' % self.received
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _target(port: int, headers: float = 10.0) -> UpstreamTarget:
    return UpstreamTarget.from_url("slow", f"http://127.0.0.1:{port}", timeouts=Timeouts(headers=headers))


async def _post(pool: UpstreamPool, target: UpstreamTarget, body: bytes) -> tuple[int, bytes]:
    fields = [(b"host", target.host_header), (b"content-length", b"%d" % len(body))]
    response = await pool.send(target, b"POST", b"/v1/chat/completions", fields, body)
    data = b""
    while chunk := await response.read():
        data += chunk
    response.release()
    return response.status, data


def _largest_write_buffer(pool: UpstreamPool, samples: list[int]) -> asyncio.Task[None]:
    async def sample() -> None:
        while True:
            for origin in pool._pools.values():
                for conn in origin.active:
                    if conn.transport is not None:
                        samples.append(conn.transport.get_write_buffer_size())
            await asyncio.sleep(0.002)

    return asyncio.get_running_loop().create_task(sample())


def test_a_big_request_body_to_a_slow_upstream_respects_pause_writing(loop_thread: LoopThread) -> None:
    """The body goes out as the upstream reads it: never buffered whole in the transport."""

    async def run() -> tuple[int, bytes, int, int]:
        upstream = _SlowUpstream(piece=64 * 1024, pause=0.005)
        port = await upstream.start()
        pool = UpstreamPool()
        samples: list[int] = []
        sampler = _largest_write_buffer(pool, samples)
        try:
            status, body = await _post(pool, _target(port), b"x" * BIG)
        finally:
            sampler.cancel()
            await pool.close()
            await upstream.close()
        return status, body, max(samples, default=0), upstream.received

    status, body, largest, received = loop_thread.call(run())
    assert (status, body) == (200, b'{"received":%d}' % BIG)
    assert received == BIG
    assert largest <= 256 * 1024, f"{largest} bytes of the request body buffered in the transport"


def test_an_upstream_that_never_reads_the_body_times_out_in_the_headers_phase(loop_thread: LoopThread) -> None:
    async def run() -> Any:
        upstream = _SlowUpstream(piece=0, pause=0, read_body=False)
        port = await upstream.start()
        pool = UpstreamPool()
        try:
            with pytest.raises(UpstreamTimeout) as caught:
                await _post(pool, _target(port, headers=0.3), b"x" * BIG)
            return caught.value
        finally:
            await pool.close()
            await upstream.close()

    error = loop_thread.call(run())
    assert error.phase == "headers"


def test_an_upstream_answering_before_reading_the_body_is_heard_and_not_reused(loop_thread: LoopThread) -> None:
    async def run() -> tuple[int, bytes, int]:
        upstream = _SlowUpstream(piece=0, pause=0, answer_early=True)
        port = await upstream.start()
        pool = UpstreamPool()
        try:
            status, body = await _post(pool, _target(port, headers=5.0), b"x" * BIG)
            (origin,) = pool._pools.values()
            return status, body, len(origin.idle)
        finally:
            await pool.close()
            await upstream.close()

    status, body, idle = loop_thread.call(run())
    assert (status, body) == (413, b"no")
    assert idle == 0  # the request was cut short: its connection is closed, not pooled


# -- Nagle ---------------------------------------------------------------------------


def test_nagle_is_off_on_both_sides_without_a_call_of_ours(loop_thread: LoopThread) -> None:
    """uvloop sets TCP_NODELAY on accepted and connected sockets: the proxy relies on it (flow.py)."""
    upstream = _SlowUpstream(piece=1 << 16, pause=0)
    port = loop_thread.call(upstream.start())
    pool = UpstreamPool()
    proxy = start_proxy(loop_thread, {"upstream": {"url": f"http://127.0.0.1:{port}"}})
    try:

        async def upstream_nodelay() -> int:
            target = _target(port)
            fields = [(b"host", target.host_header), (b"content-length", b"2")]
            response = await pool.send(target, b"POST", b"/v1/x", fields, b"{}")
            conn = next(iter(next(iter(pool._pools.values())).active))
            assert conn.transport is not None
            value = int(conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            response.close()
            return value

        assert loop_thread.call(upstream_nodelay()) == 1
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200")

            async def downstream_nodelay() -> list[int]:
                return [
                    int(c._transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                    for c in proxy.runtime.connections
                ]

            assert loop_thread.call(downstream_nodelay()) == [1]
    finally:
        proxy.stop()
        loop_thread.call(pool.close())
        loop_thread.call(upstream.close())
