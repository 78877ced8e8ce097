"""The downstream side: one :class:`HttpConnection` (an asyncio Protocol) per socket.

Theory of operation. A connection loops over request/response cycles::

    HEAD ──head complete──> BODY ──body complete──> RESPONDING ──response done──> HEAD
      │  (strict checks,        (counted to its         (bytes of a pipelined
      │   then h11 parses)       Content-Length, or      next request wait here)
      │                          chunks h11 decodes)
      └── error / timeout / Connection: close ──> CLOSED

Each cycle gets a fresh h11 server connection, so the proxy's own strict
head checks (:mod:`proxy.framing`) see every request head before h11 does,
pipelined ones included: h11 is given the head alone, and the bytes past a
request's end (counted off a Content-Length body, or taken back from h11's
``trailing_data`` after a chunked one) are checked as the next head.

h11 parses the request; the response is serialised here
(:mod:`proxy.response_head`): the proxy knows its framing (a length, or
chunked) and every field it writes was validated when parsed or added, so
h11's send-side state machine would only repeat that work on the hot path.
Keep-alive follows RFC 9112 9.3, as h11 would decide it: HTTP/1.1 without
``Connection: close``; a close-delimited body or an unread request body
closes the connection after the response.

The exchange itself runs in a task (:func:`proxy.cycle.run_exchange`); the
connection only parses, buffers the request body (bounded) and writes what
the task gives it. Per-request state lives on the :class:`~proxy.exchange.Exchange`,
never here.

Flow control: the transport's ``pause_writing``/``resume_writing`` drive
:meth:`HttpConnection.drain`, which the exchange task awaits after writing,
so a slow client stops the task reading from the upstream (whose connection
then stops reading its socket). While a response is being written, reading
from the client is paused once a pipelined request's bytes exceed the head
limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11

from .cycle import run_exchange
from .errors import (
    BadRequest,
    BodyTooLarge,
    HeaderTimeout,
    HttpVersionNotSupported,
    ProxyError,
    ServiceUnavailable,
    render_error,
)
from .exchange import Exchange, Request
from .framing import HeadInfo, check_head, find_head_end
from .headers import Headers, fields_of
from .response_head import CHUNKED_END, CONTINUE_100, chunk_prefix, response_head
from .timers import LazyTimer

if TYPE_CHECKING:
    from .cycle import Runtime

__all__ = ["HttpConnection"]

log = logging.getLogger("llmproxy.server")

_REQUEST_ID_MAX = 128
_HEALTHZ_BODY = b'{"status":"ok"}'


class _State(enum.Enum):
    HEAD = "head"
    BODY = "body"
    RESPONDING = "responding"
    CLOSED = "closed"


def _nodelay(transport: asyncio.BaseTransport) -> None:
    """Disable Nagle: responses are written whole, so coalescing only adds latency."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= _REQUEST_ID_MAX and all(0x21 <= b <= 0x7E for b in value)


class _RequestIds:
    """Cheap unique request ids: a random per-process prefix plus a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n:08x}"


REQUEST_IDS = _RequestIds()


class HttpConnection(asyncio.Protocol):
    """One client socket: parsing, body buffering, response writing, timers."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._limits = runtime.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._state = _State.HEAD
        self._buf = bytearray()
        self._h11: h11.Connection | None = None
        self._client = "-"
        #: The head-read and keep-alive timeouts (one at a time).
        self._timer = LazyTimer(self._loop)
        #: True while the timer is the keep-alive idle timer (no byte of a next request yet).
        self._keepalive_wait = False
        self._task: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None
        # request body of the current cycle
        self._body = bytearray()
        self._body_done = False
        #: Body bytes still to come (Content-Length), or -1 while h11 decodes a chunked body.
        self._body_left = 0
        self._body_error: ProxyError | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._continue_pending = False
        # response of the current cycle
        self._head_request = False
        self._keep_alive = True  # the request allows keep-alive (HTTP/1.1, no Connection: close)
        self._http11 = True
        self._chunked = False  # the response body is chunk-framed
        self._bodiless = False  # HEAD, 1xx, 204, 304: body writes are dropped
        self._response_done = False
        self._write_paused = False
        self._read_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._out: list[bytes] = []  # serialised bytes ready to send
        self._pending: list[bytes] = []  # body bytes not framed yet (one chunk per flush)
        self._pending_size = 0
        self._served = 0

    def __repr__(self) -> str:
        return f"<HttpConnection {self._client} {self._state.value} served={self._served}>"

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client = str(peer[0])
        self._transport.set_write_buffer_limits(high=self._limits.write_high_water)  # type: ignore[union-attr]
        connections = self._rt.connections
        connections.add(self)
        if len(connections) > self._limits.max_connections or self._rt.draining:
            self._reject(
                ServiceUnavailable("too many connections" if not self._rt.draining else "server is shutting down")
            )
            return
        self._arm(self._limits.header_timeout, self._on_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _State.CLOSED
        self._rt.connections.discard(self)
        self._timer.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for waiter in (self._drain_waiter, self._body_waiter):
            if waiter is not None and not waiter.done():
                waiter.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _State.BODY:
            if self._body_left >= 0:
                self._take_body(data)
            else:
                assert self._h11 is not None
                self._h11.receive_data(data)
                self._pump_body()
        elif state is _State.HEAD:
            self._buf += data
            self._parse_head()
        elif state is _State.RESPONDING:
            self._buf += data
            if len(self._buf) > self._limits.max_header_bytes and not self._read_paused:
                self._read_paused = True
                assert self._transport is not None
                self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        # A half-closed client still gets its response (keep the write side open).
        if self._state is _State.HEAD and not self._buf and self._task is None:
            return False
        if self._state is _State.BODY:
            if self._body_left >= 0:
                self._fail_body(BadRequest("client closed the connection mid-request"))
            elif self._h11 is not None:
                self._h11.receive_data(b"")
                self._pump_body()
        return True

    # -- timers --------------------------------------------------------------
    def _arm(self, delay: float, on_expiry: Callable[[], None]) -> None:
        self._timer.arm(self._loop.time() + delay, on_expiry)

    def _on_head_timeout(self) -> None:
        if self._state is not _State.HEAD:
            return
        if self._buf:
            self._reject(HeaderTimeout("request head not received in time"))
        else:
            self._close()

    def _on_keepalive_timeout(self) -> None:
        if self._state is _State.HEAD and not self._buf:
            self._close()

    # -- request head ----------------------------------------------------------
    def _parse_head(self) -> None:
        limits = self._limits
        buf = self._buf
        if self._keepalive_wait:
            # first bytes of a new request on a kept-alive connection
            self._keepalive_wait = False
            self._arm(limits.header_timeout, self._on_head_timeout)
        try:
            end = find_head_end(buf, limits.max_header_bytes)
            if end < 0:
                return
            head = bytes(buf[:end])
            info = check_head(head, limits.max_header_count)
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
            conn.receive_data(head)
            event = conn.next_event()
        except ProxyError as exc:
            self._reject(exc)
            return
        except h11.RemoteProtocolError as exc:
            self._reject(BadRequest(f"malformed request: {exc}", code="invalid_framing"))
            return
        if type(event) is not h11.Request:  # pragma: no cover - a complete head always parses to one
            self._reject(BadRequest("malformed request", code="invalid_framing"))
            return
        rest = bytes(buf[end:])
        buf.clear()
        self._timer.disarm()
        if event.http_version not in (b"1.1", b"1.0"):
            self._reject(HttpVersionNotSupported(f"HTTP/{event.http_version.decode()} is not supported; use HTTP/1.1"))
            return
        self._h11 = conn
        self._body_done = False
        self._response_done = False
        method = event.method
        self._head_request = method == b"HEAD"
        self._http11 = event.http_version == b"1.1"
        self._keep_alive = self._http11 and not info.connection_close
        if info.content_length is not None and info.content_length > limits.max_body_bytes:
            self._reject(BodyTooLarge(f"request body larger than {limits.max_body_bytes} bytes"))
            return
        target = event.target
        if method == b"GET" and target in self._rt.admin.paths and self._admin(target, info, rest):
            return
        if target == b"/healthz" and method == b"GET":
            self._begin_body(info, rest)
            self._healthz()
            return
        headers = Headers(fields_of(event.headers))
        request_id = headers.get_raw(b"x-request-id")
        rid = (
            request_id.decode("ascii")
            if request_id is not None and _valid_request_id(request_id)
            else REQUEST_IDS.next()
        )
        ex = Exchange(
            rid,
            Request(method.decode("ascii"), target.decode("latin-1"), headers, b"", event.http_version.decode("ascii")),
            self._client,
        )
        self._exchange = ex
        self._continue_pending = info.expect_continue
        self._begin_body(info, rest)
        self._task = self._loop.create_task(run_exchange(self._rt, self, ex))

    # -- request body ------------------------------------------------------------
    # A Content-Length body is counted off the socket here: its framing is a
    # byte count already checked by check_head, and h11 would spend two of its
    # state-machine events (Data, EndOfMessage) to say the same. A chunked body
    # is decoded by h11.
    def _begin_body(self, info: HeadInfo, rest: bytes) -> None:
        """Start receiving the body; ``rest`` is what followed the head in the buffer."""
        self._body = bytearray()
        self._body_done = False
        self._body_error = None
        self._state = _State.BODY
        if info.chunked:
            self._body_left = -1
            assert self._h11 is not None
            if rest:
                self._h11.receive_data(rest)
            self._pump_body()
        else:
            self._body_left = info.content_length or 0
            self._take_body(rest)

    def _take_body(self, data: bytes) -> None:
        """Counted (Content-Length) body bytes; what follows the body is the next request's."""
        left = self._body_left
        if len(data) <= left:
            self._body += data
            left -= len(data)
        else:
            self._body += data[:left]
            self._buf += data[left:]
            left = 0
        self._body_left = left
        if left == 0:
            self._body_done = True
            self._state = _State.RESPONDING
            self._wake_body()

    def _pump_body(self) -> None:
        conn = self._h11
        assert conn is not None
        while not self._body_done:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail_body(BadRequest(f"malformed request body: {exc}", code="invalid_framing"))
                return
            kind = type(event)
            if kind is h11.Data:
                self._body += event.data  # type: ignore[union-attr]
                if len(self._body) > self._limits.max_body_bytes:
                    self._fail_body(BodyTooLarge(f"request body larger than {self._limits.max_body_bytes} bytes"))
                    return
            elif kind is h11.EndOfMessage:
                self._body_done = True
                trailing, _ = conn.trailing_data
                if trailing:
                    self._buf += trailing
                self._state = _State.RESPONDING
                self._wake_body()
            elif event is h11.NEED_DATA:
                return
            elif kind is h11.ConnectionClosed:
                self._fail_body(BadRequest("client closed the connection mid-request"))
                return
            else:  # pragma: no cover - h11 yields nothing else on a server mid-request
                return

    def _fail_body(self, error: ProxyError) -> None:
        self._body_error = error
        self._body_done = True
        self._state = _State.RESPONDING
        self._wake_body()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_body(self) -> bytes:
        """Wait for the whole request body (bounded); raise its framing or size error."""
        if not self._body_done:
            if self._continue_pending:
                self._continue_pending = False
                assert self._h11 is not None and self._transport is not None
                # the client waits for it until it has sent a body byte
                counted = self._body_left >= 0
                if (counted and not self._body) or (not counted and self._h11.they_are_waiting_for_100_continue):
                    self._transport.write(CONTINUE_100)
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        if self._body_error is not None:
            raise self._body_error
        return bytes(self._body)

    # -- response writing (used by the exchange task) ------------------------------
    # Output is collected and written with one send per flush: a non-streamed
    # response (head, body, end) costs one syscall, and the body written
    # between two flushes (the events of one upstream read) one chunk.
    def start_response(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None) -> None:
        """Queue the response head.

        ``headers`` must hold no framing or hop-by-hop field (Content-Length,
        Transfer-Encoding, Connection ...): the framing is chosen here from
        ``content_length`` (None: chunked for an HTTP/1.1 client, else
        delimited by closing the connection).
        """
        no_body_status = status < 200 or status in (204, 304)  # no body and no framing field
        bodiless = self._head_request or no_body_status
        if bodiless or content_length is not None:
            chunked = False
        elif self._http11:
            chunked = True
        else:
            chunked = False
            self._keep_alive = False  # HTTP/1.0: the body ends when the connection closes
        if self._rt.draining:
            self._keep_alive = False
        self._chunked = chunked
        self._bodiless = bodiless
        length = None if no_body_status else content_length
        self._out.append(response_head(status, headers, length, chunked, self._keep_alive))

    def write(self, data: bytes) -> None:
        """Queue body bytes; everything queued between two flushes goes out as one chunk."""
        if self._bodiless or not data:
            return
        self._pending.append(data)
        self._pending_size += len(data)

    def _frame_pending(self) -> None:
        pending = self._pending
        if self._chunked:
            self._out.append(chunk_prefix(self._pending_size))
            self._out += pending
            self._out.append(b"\r\n")
        else:
            self._out += pending
        self._pending = []
        self._pending_size = 0

    def flush(self) -> None:
        """Send what was queued (call before waiting for more upstream data)."""
        if self._pending:
            self._frame_pending()
        out = self._out
        if out:
            self._out = []
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def end_response(self) -> None:
        """Finish the response body and send everything queued."""
        if self._pending:
            self._frame_pending()
        if self._chunked:
            self._out.append(CHUNKED_END)
        self._response_done = True
        self.flush()

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    async def drain(self) -> None:
        """Wait until the client has read enough of what was written."""
        self.flush()
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def abort(self) -> None:
        """Close the connection at once (a response that cannot be finished)."""
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.abort()

    def exchange_finished(self) -> None:
        """Called by the exchange task when its cycle ends: next cycle or close."""
        self._task = None
        self._exchange = None
        self._served += 1
        if self._state is _State.CLOSED or self._h11 is None or self._transport is None or self._transport.is_closing():
            return
        request_read = self._body_done and self._body_error is None
        if not (self._response_done and self._keep_alive and request_read) or self._rt.draining:
            self._close()
            return
        self._h11 = None
        self._body = bytearray()
        self._state = _State.HEAD
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        if self._buf:
            self._arm(self._limits.header_timeout, self._on_head_timeout)
            self._parse_head()
        else:
            self._keepalive_wait = True
            self._arm(self._limits.keepalive_timeout, self._on_keepalive_timeout)

    # -- replies the connection makes itself ---------------------------------------
    def _healthz(self) -> None:
        self.start_response(200, [(b"content-type", b"application/json")], len(_HEALTHZ_BODY))
        self.write(_HEALTHZ_BODY)
        self.end_response()
        self.exchange_finished()

    def _admin(self, target: bytes, info: HeadInfo, rest: bytes) -> bool:
        """Answer an admin path for an allowed client; False to handle it as any other path."""
        answer = self._rt.admin.answer(target, self._client)
        if answer is None:
            return False
        status, ctype, body = answer
        self._begin_body(info, rest)
        self.start_response(status, [(b"content-type", ctype)], len(body))
        self.write(body)
        self.end_response()
        self.exchange_finished()
        return True

    def _reject(self, error: ProxyError) -> None:
        """Answer a request the connection cannot parse or accept, then close."""
        self._timer.disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        body = render_error(error)
        transport.writelines([response_head(error.status, error.head_fields(), len(body), False, False), body])
        log.info("rejected %s from %s: %s", error.status, self._client, error.message)
        self._close()

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._timer.close()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def close_if_idle(self) -> bool:
        """For shutdown: close now if no exchange is running; True if closed."""
        if self._task is None:
            self._close()
            return True
        return False
