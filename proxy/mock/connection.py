"""One client socket of the mock: an :class:`asyncio.Protocol` that answers requests in order.

Pipelined requests are parsed ahead and answered strictly in order: the next
request starts only when the previous reply is fully written. At most
``_QUEUE_HIGH`` parsed requests wait; past that the socket stops being read,
and no new reply starts while the transport's write buffer is full
(:class:`_FlowControl`, wired to ``pause_writing``/``resume_writing``). An
unpaced delivery is written synchronously inside ``data_received``; a paced
one runs in one task per exchange, cancelled when the client goes away or
the server closes. The connection registers itself and its pacing tasks in
its server's sets, so :meth:`~.server.MockServer.close` can abort them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from llmproxy.mock.delivery import Delivery, End
from llmproxy.mock.replies import Flavour, error_reply
from llmproxy.mock.wire import HttpError, RawRequest, RequestParser

if TYPE_CHECKING:
    from llmproxy.mock.server import MockServer

__all__ = ["Connection"]

# Pipelining back-pressure: stop reading past _QUEUE_HIGH parsed requests
# waiting, resume at _QUEUE_LOW.
_QUEUE_HIGH: Final = 64
_QUEUE_LOW: Final = 16


class _State(enum.Enum):
    """Connection state: which exchange, if any, owns the socket."""

    IDLE = enum.auto()  # ready to start the next queued request
    BUSY = enum.auto()  # a pacing task is writing a reply
    STALLED = enum.auto()  # a stall fault: nothing more is ever written
    CLOSED = enum.auto()


class _FlowControl:
    """Write-side flow control wired to the transport's pause/resume_writing (idempotent)."""

    __slots__ = ("_can_write", "paused")

    def __init__(self) -> None:
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True
        self._can_write.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._can_write.set()

    async def drain(self) -> None:
        """Return once the transport accepts writes again (at once if it does)."""
        if self.paused:
            await self._can_write.wait()


class Connection(asyncio.Protocol):
    """One client socket: parses requests, answers them in order, one at a time.

    Per-request state lives in the ``Delivery`` and the pacing task; the
    connection keeps only the parser, the queue of parsed requests, the
    flow control and its :class:`_State`.
    """

    def __init__(self, server: MockServer) -> None:
        self._server = server
        self._parser = RequestParser(server._head_cache)
        self._queue: deque[RawRequest | HttpError] = deque()
        self._transport: asyncio.Transport | None = None
        self._state = _State.IDLE
        self._task: asyncio.Task[None] | None = None
        self._flow = _FlowControl()
        self._reading_paused = False
        self._eof = False

    def __repr__(self) -> str:
        return f"<Connection {self._state.name} queued={len(self._queue)}>"

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.CLOSED:
            return
        self._queue.extend(self._parser.feed(data))
        if self._parser.take_continue() and self._state is _State.IDLE and not self._queue:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(self._queue) > _QUEUE_HIGH and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        self._pump()

    def eof_received(self) -> bool:
        """Half-close: keep answering queued requests; with none queued the client is gone."""
        self._eof = True
        return bool(self._queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _State.CLOSED
        self._queue.clear()
        self._server._connections.discard(self)
        if self._task is not None:
            self._task.cancel()
        self._flow.resume_writing()

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()
        self._pump()

    # -- exchanges ------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now (server shutdown)."""
        if self._transport is not None:
            self._transport.abort()
        if self._task is not None:
            self._task.cancel()
        self._state = _State.CLOSED

    def _pump(self) -> None:
        """Start queued requests while the connection is idle and writable."""
        queue = self._queue
        while queue and self._state is _State.IDLE and not self._flow.paused:
            item = queue.popleft()
            if isinstance(item, HttpError):
                delivery = self._server.framer.whole(False, error_reply(Flavour.OPENAI, item.status, item.message))
            else:
                delivery = self._server.respond(item)
            self._start(delivery)
        if self._reading_paused and len(queue) <= _QUEUE_LOW and self._state is not _State.CLOSED:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        if self._eof and not queue and self._state is _State.IDLE:
            self._close()

    def _start(self, delivery: Delivery) -> None:
        writes = delivery.writes
        if not writes or (len(writes) == 1 and writes[0][0] <= 0):
            if writes:
                self._write(writes[0][1])
            self._end(delivery)
            return
        self._state = _State.BUSY
        task = asyncio.get_running_loop().create_task(self._paced(delivery))
        self._task = task
        self._server._tasks.add(task)
        task.add_done_callback(self._paced_done)

    async def _paced(self, delivery: Delivery) -> None:
        for delay, data in delivery.writes:
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flow.drain()
            if self._state is _State.CLOSED:
                return
            self._write(data)
        self._end(delivery)

    def _paced_done(self, task: asyncio.Task[None]) -> None:
        self._server._tasks.discard(task)
        if self._task is task:
            self._task = None
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # a bug in the mock: report it, do not leave the client waiting
            self.abort()
            task.get_loop().call_exception_handler({"message": "mock upstream pacing task failed", "exception": exc})
            return
        if self._state is _State.IDLE:
            self._pump()

    def _end(self, delivery: Delivery) -> None:
        end = delivery.end
        if end is End.COMPLETE:
            if delivery.keep_alive:
                self._state = _State.IDLE
            else:
                self._close()
        elif end is End.STALL:
            self._state = _State.STALLED
        elif end is End.DROP:
            self._close()
        else:
            self._reset()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._queue.clear()
        if self._transport is not None:
            self._transport.close()

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), discarding anything unsent."""
        self._state = _State.CLOSED
        self._queue.clear()
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
