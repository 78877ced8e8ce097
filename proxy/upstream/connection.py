"""One upstream connection: an asyncio Protocol carrying one request at a time.

The connection owns the socket's state only: its transport and
:class:`~llmproxy.io.flow.FlowControl`, the timer, its pool state; everything
about the response in flight is on a
:class:`~llmproxy.upstream.reader.ResponseReader`, replaced when the connection
is reused.

Flow control: the connection pauses reading from its socket while more than
``READ_HIGH_WATER`` bytes of body wait to be consumed, so a slow client
throttles the upstream instead of making the proxy buffer without bound;
and :meth:`UpstreamConnection.send_request` waits (bounded by the deadline
it is given) while the transport has paused writing, so a big request body
to an upstream that reads it slowly is not buffered past the transport's
high-water mark.
"""

from __future__ import annotations

import asyncio
import enum
import re
from typing import TYPE_CHECKING, Any

import h11

from llmproxy.errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from llmproxy.io.flow import FlowControl
from llmproxy.io.timers import LazyTimer
from llmproxy.upstream.reader import MAX_RESPONSE_FIELDS, MAX_RESPONSE_HEAD, ResponseReader

if TYPE_CHECKING:
    from llmproxy.upstream.pool import OriginPool

__all__ = ["READ_HIGH_WATER", "ConnState", "UpstreamConnection"]

#: Body bytes buffered per upstream connection before reading is paused.
READ_HIGH_WATER = 256 * 1024
#: A request body larger than this is written in pieces of this size, each
#: after the transport accepts writes again: asyncio's and uvloop's default
#: write high-water mark is 64 KiB, and a chat request is far smaller (one write).
_BODY_PIECE = 64 * 1024

_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")  # RFC 9110 token, as h11 checks it
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII, as h11 checks it
_BODILESS = frozenset({b"GET", b"HEAD"})


def _check_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Refuse a request head that could not be framed unambiguously (see ``send_request``)."""
    if _METHOD.fullmatch(method) is None:
        raise UpstreamProtocolError(f"invalid method for the upstream request: {method!r}")
    if _TARGET.fullmatch(target) is None:
        raise UpstreamProtocolError("invalid target for the upstream request (whitespace or control characters)")
    hosts = 0
    length: bytes | None = None
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None:
                raise UpstreamProtocolError("upstream request with more than one Content-Length")
            length = value
        elif name == b"transfer-encoding":
            raise UpstreamProtocolError(
                "upstream request with a Transfer-Encoding (bodies are sent with Content-Length)"
            )
    if hosts != 1:
        raise UpstreamProtocolError("upstream request without exactly one Host header")
    if length is None:
        if body or method not in _BODILESS:
            raise UpstreamProtocolError("upstream request without a Content-Length matching its body")
    elif length != b"%d" % len(body):
        raise UpstreamProtocolError("upstream request without a Content-Length matching its body")


#: h11's view of requests sent upstream, one per method (see ``send_request``).
_STAND_INS: dict[bytes, h11.Request] = {}


def _stand_in(method: bytes) -> h11.Request:
    event = _STAND_INS.get(method)
    if event is None:
        event = h11.Request(method=method, target=b"/", headers=[(b"host", b"upstream")])
        if len(_STAND_INS) < 32:  # the methods in use; an odd one is not kept
            _STAND_INS[method] = event
    return event


class ConnState(enum.Enum):
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"


_TIMED_OUT: Any = object()


class UpstreamConnection(asyncio.Protocol):
    """One h11 client connection; owned by its pool, used by one exchange at a time."""

    def __init__(
        self, pool: OriginPool, max_head_bytes: int = MAX_RESPONSE_HEAD, max_head_fields: int = MAX_RESPONSE_FIELDS
    ) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._max_head_bytes = max_head_bytes
        self._max_head_fields = max_head_fields
        self.transport: asyncio.Transport | None = None
        self._flow: FlowControl | None = None
        self.state = ConnState.ACTIVE
        self.idle_since = 0.0
        self.reused = False
        #: The response in flight (a fresh one per request).
        self.reader = ResponseReader(max_head_bytes, max_head_fields)
        self._waiter: asyncio.Future[None] | None = None
        self._timer = LazyTimer(self._loop)  # the headers, idle and total timeouts
        #: send_request is waiting for the request body to drain.
        self._sending = False

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.state.value} reused={self.reused} flow={self._flow!r}>"

    # read by tests/test_proxy_http.py (a slow client throttles the upstream)
    @property
    def _reading_paused(self) -> bool:
        return self._flow is not None and self._flow.read_paused

    @property
    def _buffered(self) -> int:
        return self.reader.buffered

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._flow = FlowControl(self.transport, self._loop)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        try:
            reader.feed(data)
        except UpstreamError as exc:
            self._fail(exc)
            return
        if reader.buffered > READ_HIGH_WATER:
            assert self._flow is not None
            self._flow.pause_reading()  # idempotent
        if self._sending and reader.head is not None:
            # answered before reading the whole body (a 413, say): stop waiting to send it
            assert self._flow is not None
            self._flow.wake_drain()
        self._wake()

    def eof_received(self) -> bool | None:
        try:
            self.reader.end_of_input()
        except UpstreamError as exc:
            self._fail(exc)
            return None
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = ConnState.CLOSED
        self._timer.close()
        self.reader.lost()
        self._wake()
        if self._flow is not None:
            self._flow.close()
        self._pool.forget(self)

    def pause_writing(self) -> None:
        assert self._flow is not None
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        assert self._flow is not None
        self._flow.resume_writing()

    # -- waiting -----------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        if self.reader.error is None:
            self.reader.error = error
        self.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float, phase: str) -> None:
        """Wait for any progress; raise UpstreamTimeout(phase) at ``deadline`` (loop time).

        The timer is lazy (:class:`~llmproxy.io.timers.LazyTimer`), so a stream of
        many chunks costs no timer operation per chunk.
        """
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._timer.arm(deadline, self._time_out)
        try:
            await waiter
        finally:
            self._waiter = None
            self._timer.disarm()
        if waiter.result() is _TIMED_OUT:
            raise UpstreamTimeout(f"upstream timed out ({phase})", phase=phase)

    def _time_out(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(_TIMED_OUT)

    # -- used by UpstreamResponse / the pool ---------------------------------
    async def send_request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, deadline: float
    ) -> None:
        """Write one request: the head serialised here, then the body as is.

        Contract: ``headers`` hold exactly one ``host`` and, unless the request
        is a bodiless GET or HEAD, a ``content-length`` equal to ``len(body)``;
        every field was validated when it was parsed (h11) or added
        (:func:`llmproxy.headers.check_field`). ``method`` and ``target`` are
        checked here against h11's grammar. A request that breaks the contract
        raises :class:`UpstreamProtocolError` before a byte is written.

        A body over ``_BODY_PIECE`` bytes is written in pieces; while the
        transport has paused writing (an upstream reading slowly), this waits
        until it resumes, the upstream answers or closes (the rest of the body
        is then not sent, and the connection is not reused), or ``deadline``
        (loop time; the headers deadline): :class:`UpstreamTimeout` (phase
        ``headers``) then.

        h11 parses the response. All it needs to know of the request is its
        method (a HEAD response has no body), so it is sent a header-less
        stand-in with that method, and its output is dropped; serialising the
        real fields through h11 again would repeat, on the hottest path, the
        checks already made.
        """
        assert self.transport is not None and self._flow is not None
        _check_request(method, target, headers, body)
        reader = self.reader
        try:
            reader.h11.send(_stand_in(method))
        except h11.LocalProtocolError as exc:  # pragma: no cover - a fresh connection takes any request
            raise UpstreamProtocolError(f"cannot send request upstream: {exc}") from None
        reader.method = method
        if self.state is ConnState.CLOSED or self.transport.is_closing():
            raise UpstreamConnectError("upstream connection closed before the request was sent")
        parts = [b"%s %s HTTP/1.1\r\n" % (method, target)]
        parts += [b"%s: %s\r\n" % field for field in headers]
        parts.append(b"\r\n")
        small = len(body) <= _BODY_PIECE
        if body and small:
            parts.append(body)
        self.transport.write(b"".join(parts))
        reader.request_sent = True
        if small:
            reader.request_complete = True
            if self._flow.write_paused:
                await self._drain_request(deadline)
            return
        await self._send_body(body, deadline)

    async def _send_body(self, body: bytes, deadline: float) -> None:
        """Write a large body piece by piece, waiting while the transport has paused writing.

        Stops early (the request left incomplete, so the connection is not
        reused) when the upstream answers or closes first.
        """
        transport = self.transport
        assert transport is not None and self._flow is not None
        flow = self._flow
        view = memoryview(body)
        for start in range(0, len(body), _BODY_PIECE):
            if flow.write_paused and not await self._drain_request(deadline):
                return
            if transport.is_closing():
                return
            transport.write(view[start : start + _BODY_PIECE])
        self.reader.request_complete = True
        if flow.write_paused:
            await self._drain_request(deadline)

    async def _drain_request(self, deadline: float) -> bool:
        """Wait while writing is paused; False when the upstream answered or closed meanwhile.

        Raises :class:`UpstreamTimeout` (phase ``headers``) at ``deadline``.
        """
        assert self._flow is not None and self.transport is not None
        if self.reader.head is None:
            self._sending = True
            try:
                drained = await self._flow.drain(deadline - self._loop.time())
            finally:
                self._sending = False
            if not drained:
                raise UpstreamTimeout("upstream timed out (headers): it did not read the request", phase="headers")
        return self.reader.head is None and not self.transport.is_closing()

    async def read_head(self, deadline: float) -> h11.Response:
        reader = self.reader
        while reader.head is None:
            if reader.error is not None:
                raise reader.error
            await self._wait(deadline, "headers")
        return reader.head

    async def read_chunk(self, idle: float, deadline: float) -> bytes:
        """Return the body bytes received so far (all buffered chunks, joined), or b"" at the end.

        Chunks that arrived together are handed over together: one read, one
        pass through the relay, instead of one per HTTP chunk (a provider
        writes one chunk per SSE event; the core re-frames events anyway).
        """
        reader = self.reader
        while not reader.chunks:
            if reader.eom:
                return b""
            if reader.error is not None:
                raise reader.error
            idle_deadline = self._loop.time() + idle
            if deadline <= idle_deadline:
                await self._wait(deadline, "total")
            else:
                await self._wait(idle_deadline, "idle")
        chunk = reader.take()
        flow = self._flow
        assert flow is not None
        if flow.read_paused:  # (resume_reading is idempotent; the check saves a call per read)
            flow.resume_reading()
        return chunk

    @property
    def at_end(self) -> bool:
        """Everything of the body was handed over: the next :meth:`read_chunk` returns b"" at once."""
        reader = self.reader
        return reader.eom and not reader.chunks

    @property
    def has_data(self) -> bool:
        """:meth:`read_chunk` would return without waiting (body bytes, or the end, are here)."""
        return bool(self.reader.chunks) or self.reader.eom

    def reusable(self) -> bool:
        """The exchange finished cleanly on both sides and the connection may carry another."""
        if self.state is ConnState.CLOSED or self.transport is None or self.transport.is_closing():
            return False
        return self.reader.reusable()

    def idle_usable(self) -> bool:
        """An idle (reset) connection that the peer has not closed."""
        return (
            self.state is not ConnState.CLOSED
            and self.reader.h11.our_state is h11.IDLE
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def reset_for_reuse(self) -> None:
        """A fresh reader (and h11 state machine: h11 saw the request head only) for the next request."""
        self._timer.close()
        self.reader = ResponseReader(self._max_head_bytes, self._max_head_fields)
        self.reused = True
        flow = self._flow
        if flow is not None and flow.read_paused:  # the next response must be read
            flow.resume_reading()

    def abort(self) -> None:
        self.state = ConnState.CLOSED
        self._timer.close()
        if self.transport is not None:
            self.transport.abort()
