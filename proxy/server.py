"""The downstream side: one :class:`HttpConnection` (an asyncio Protocol) per socket.

Theory of operation. A connection loops over request/response cycles::

    HEAD ──head complete──> BODY ──body complete──> RESPONDING ──response done──> HEAD
      │  (strict checks,        (counted to its         (bytes of a pipelined
      │   then h11 parses)       Content-Length, or      next request wait here)
      │                          chunks decoded here)
      └── error / timeout / EOF mid-request / Connection: close ──> CLOSED

Timeouts (one :class:`~proxy.timers.LazyTimer`): ``header_timeout`` for a
whole head, ``body_timeout`` between two bytes of a request body (re-armed
per read, which costs no timer operation), ``keepalive_timeout`` between
requests; each of the first two is a 408, then close. A client that half-closes
(FIN) with a head or body unfinished is answered 400 and closed at once.

Each cycle gets a fresh h11 server connection, so the proxy's own strict
head checks (:mod:`proxy.framing`) see every request head before h11 does,
pipelined ones included: h11 is given the head alone, and the bytes past a
request's end (counted off a Content-Length body, or left over by the
chunked decoder) are checked as the next head. A chunked request body is
decoded by :class:`~proxy.chunked.ChunkedDecoder`, after :class:`_ChunkLines`
checked its size lines (:func:`proxy.framing.chunk_size`: extension grammar,
and each chunk against the body limit as its size line arrives).

Nothing a client sent is ever quoted in a rejection's message or log line:
messages name the rule (h11's messages quote the bytes, so they are mapped
to fixed ones here).

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
then stops reading its socket). ``drain(stall_timeout)`` bounds that wait:
a client that has not read enough within ``stall_timeout`` seconds makes it
raise :class:`~proxy.errors.ClientDisconnected` (code ``client_stalled``),
nothing more is written, and the connection is aborted when the exchange
ends, so the upstream connection it held is closed and its pool slot freed.
While a response is being written, reading from the client is paused once a
pipelined request's bytes exceed the head limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11

from .chunked import ChunkedDecoder, ChunkedError
from .cycle import run_exchange
from .errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    ClientProtocol,
    HeaderTimeout,
    HttpVersionNotSupported,
    ProxyError,
    ServiceUnavailable,
    protocol_of_path,
    render_error,
)
from .exchange import Exchange, Request
from .framing import MAX_CHUNK_LINE, HeadInfo, check_head, chunk_size, find_head_end, request_target
from .headers import Headers, fields_of
from .response_head import CHUNKED_END, CONTINUE_100, chunk_prefix, response_head
from .timers import LazyTimer

if TYPE_CHECKING:
    from .cycle import Runtime

__all__ = ["HttpConnection"]

log = logging.getLogger("llmproxy.server")

_REQUEST_ID_MAX = 128
_HEALTHZ_BODY = b'{"status":"ok"}'

#: h11's error messages quote the offending bytes: each known one becomes a fixed message.
_H11_MESSAGES = (
    ("illegal request line", "invalid request line"),
    ("illegal header line", "invalid header field"),
    ("Missing mandatory Host", "missing Host header"),
    ("Found multiple Host", "more than one Host header field"),
)
#: ChunkedDecoder's messages that quote nothing (the others do, and become a generic one).
_CHUNKED_MESSAGES = frozenset(
    {
        "chunk-size line too long",
        "chunk data not followed by CRLF",
        "trailer section too large",
        "invalid trailer field line",
    }
)


def _h11_message(exc: h11.RemoteProtocolError) -> str:
    text = str(exc)
    for prefix, message in _H11_MESSAGES:
        if text.startswith(prefix):
            return message
    return "malformed request head"


_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/ ]*")


def _protocol_of(head: bytes | bytearray) -> ClientProtocol:
    """The API protocol a (possibly malformed, partial) request line names; ``openai`` when unsure.

    Only for choosing an error's shape: nothing of the bytes is kept or echoed.
    """
    start = head.find(b" ", 0, 32) + 1
    if start <= 0:
        return "openai"
    absolute = _ABSOLUTE_FORM.match(head, start)
    if absolute is not None:
        start = absolute.end()
    return protocol_of_path(head[start : start + 13].decode("latin-1"))


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


class _ChunkLines:
    """Follows a chunked request body as it arrives, to check what the decoder does not.

    Fed the same bytes as the :class:`~proxy.chunked.ChunkedDecoder`, before
    it, it finds each chunk-size line and checks it with
    :func:`~proxy.framing.chunk_size` (extension grammar, digit bound), checks
    the CRLF after each chunk's data, and refuses a chunk larger than what is
    left of ``budget`` (413) as soon as its size line is complete. It stops at
    the last chunk: the trailer section is the decoder's to check and bound.
    Raises :class:`BadRequest` or :class:`BodyTooLarge`.
    """

    __slots__ = ("_budget", "_crlf", "_left", "_limit", "_line", "done")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._budget = limit  # body bytes still allowed
        self._left = 0  # data bytes of the current chunk still to come
        self._crlf = 0  # bytes of the CRLF after the chunk's data still to come
        self._line = b""  # an unfinished size line
        #: The last chunk's size line was read.
        self.done = False

    def feed(self, data: bytes) -> None:
        if self._line:
            data = self._line + data
            self._line = b""
        pos = 0
        size = len(data)
        while pos < size:
            left = self._left
            if left:
                if left > size - pos:
                    self._left = left - (size - pos)
                    return
                pos += left
                self._left = 0
                self._crlf = 2
            if self._crlf:
                take = min(self._crlf, size - pos)
                if data[pos : pos + take] != b"\r\n"[2 - self._crlf : 2 - self._crlf + take]:
                    raise BadRequest("chunk data not followed by CRLF", code="invalid_framing")
                pos += take
                self._crlf -= take
                continue
            end = data.find(b"\r\n", pos)
            if end < 0:
                if size - pos > MAX_CHUNK_LINE:
                    raise BadRequest("chunk-size line too long", code="invalid_framing")
                self._line = data[pos:]
                return
            length = chunk_size(data, pos, end)
            if length > self._budget:
                raise BodyTooLarge(f"request body larger than {self._limit} bytes")
            self._budget -= length
            pos = end + 2
            if not length:
                self.done = True
                return
            self._left = length


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
        #: The head-read, body-read and keep-alive timeouts (one at a time).
        self._timer = LazyTimer(self._loop)
        #: True while the timer is the keep-alive idle timer (no byte of a next request yet).
        self._keepalive_wait = False
        self._task: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None
        # request body of the current cycle
        self._body = bytearray()
        self._body_done = False
        #: Body bytes still to come (Content-Length), or -1 while a chunked body is decoded.
        self._body_left = 0
        self._body_seen = False  # a body byte was received (no 100 Continue then)
        self._chunks: _ChunkLines | None = None
        self._decoder: ChunkedDecoder | None = None
        self._eof = False  # the client half-closed: no more request bytes will come
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
        self._stalled = False  # the client stopped reading: write nothing more, abort at the end
        self._out: list[bytes] = []  # serialised bytes ready to send
        self._pending: list[bytes] = []  # body bytes not framed yet (one chunk per flush)
        self._pending_size = 0
        self._served = 0
        #: The protocol of the current request's API, once its target is known (errors are rendered in it).
        self._protocol: ClientProtocol | None = None

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
            # moves the deadline only: no timer operation per read
            self._timer.arm(self._loop.time() + self._limits.body_timeout, self._on_body_timeout)
            if self._body_left >= 0:
                self._take_body(data)
            else:
                self._take_chunked(data)
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
        # A half-closed client still gets its response (keep the write side open),
        # but an unfinished head or body will never be finished: answer it now.
        self._eof = True
        state = self._state
        if state is _State.HEAD:
            if not self._buf and self._task is None:
                return False
            self._reject(BadRequest("client closed the connection mid-request", code="incomplete_request"))
        elif state is _State.BODY:
            self._fail_body(BadRequest("client closed the connection mid-request", code="incomplete_request"))
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

    def _on_body_timeout(self) -> None:
        if self._state is _State.BODY:
            self._fail_body(HeaderTimeout("request body not received in time"))

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
                if self._eof:
                    raise BadRequest("client closed the connection mid-request", code="incomplete_request")
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
            self._reject(BadRequest(_h11_message(exc), code="invalid_framing"))
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
        try:
            target, authority = request_target(event.target, info.host)
        except ProxyError as exc:
            self._reject(exc)
            return
        self._protocol = protocol_of_path(target[:13].decode("latin-1"))
        self._h11 = conn
        self._body_done = False
        self._response_done = False
        method = event.method
        self._head_request = method == b"HEAD"
        self._http11 = event.http_version == b"1.1"
        self._keep_alive = self._http11 and not info.connection_close
        self._continue_pending = info.expect_continue
        if info.content_length is not None and info.content_length > limits.max_body_bytes:
            self._reject(BodyTooLarge(f"request body larger than {limits.max_body_bytes} bytes"))
            return
        if method == b"GET" and target in self._rt.admin.paths and self._admin(target, info, rest):
            return
        if target == b"/healthz" and method == b"GET":
            self._begin_body(info, rest)
            self._healthz()
            return
        headers = Headers(fields_of(event.headers))
        if authority is not None:
            headers.set_raw(b"host", authority.lower())
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
        # the task first: a body error found in ``rest`` is then its to answer
        self._task = self._loop.create_task(run_exchange(self._rt, self, ex))
        self._begin_body(info, rest)

    # -- request body ------------------------------------------------------------
    # A Content-Length body is counted off the socket here: its framing is a
    # byte count already checked by check_head, and h11 would spend two of its
    # state-machine events (Data, EndOfMessage) to say the same. A chunked body
    # is checked by _ChunkLines and decoded by ChunkedDecoder (strict, bounded).
    def _begin_body(self, info: HeadInfo, rest: bytes) -> None:
        """Start receiving the body; ``rest`` is what followed the head in the buffer."""
        self._body = bytearray()
        self._body_done = False
        self._body_error = None
        self._body_seen = False
        self._state = _State.BODY
        if info.chunked:
            self._body_left = -1
            self._chunks = _ChunkLines(self._limits.max_body_bytes)
            self._decoder = ChunkedDecoder(max_trailers=self._limits.max_header_bytes)
            if rest:
                self._take_chunked(rest)
        else:
            self._body_left = info.content_length or 0
            self._take_body(rest)
        if not self._body_done:
            if self._eof:
                self._fail_body(BadRequest("client closed the connection mid-request", code="incomplete_request"))
            elif not (self._continue_pending and not self._body_seen):
                # a client waiting for 100 Continue is timed from when it gets it (read_body)
                self._arm(self._limits.body_timeout, self._on_body_timeout)

    def _take_body(self, data: bytes) -> None:
        """Counted (Content-Length) body bytes; what follows the body is the next request's."""
        left = self._body_left
        if data:
            self._body_seen = True
        if len(data) <= left:
            self._body += data
            left -= len(data)
        else:
            self._body += data[:left]
            self._buf += data[left:]
            left = 0
        self._body_left = left
        if left == 0:
            self._end_body()

    def _take_chunked(self, data: bytes) -> None:
        """Chunked body bytes: checked, decoded; what follows the body is the next request's."""
        chunks = self._chunks
        decoder = self._decoder
        assert chunks is not None and decoder is not None
        self._body_seen = True
        try:
            if not chunks.done:
                chunks.feed(data)
            self._body += decoder.feed(data)
        except ProxyError as exc:
            self._fail_body(exc)
            return
        except ChunkedError as exc:
            message = str(exc)
            if message not in _CHUNKED_MESSAGES:
                message = "invalid chunked request body"
            self._fail_body(BadRequest(message, code="invalid_framing"))
            return
        if decoder.done:
            if decoder.trailing:
                self._buf += decoder.trailing
            self._chunks = self._decoder = None
            self._end_body()

    def _end_body(self) -> None:
        self._body_done = True
        self._state = _State.RESPONDING
        self._timer.disarm()
        self._wake_body()

    def _fail_body(self, error: ProxyError) -> None:
        """The body cannot be read: the exchange task answers ``error``, then the connection closes."""
        self._chunks = self._decoder = None
        if self._task is None:  # nobody will read the body: answer here
            self._reject(error)
            return
        self._body_error = error
        self._body_done = True
        self._state = _State.RESPONDING
        self._timer.disarm()
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
                assert self._transport is not None
                # the client waits for it until it has sent a body byte
                if not self._body_seen:
                    self._transport.write(CONTINUE_100)
                    self._arm(self._limits.body_timeout, self._on_body_timeout)
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
            if transport is not None and not transport.is_closing() and not self._stalled:
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

    async def drain(self, stall_timeout: float | None = None) -> None:
        """Wait until the client has read enough of what was written.

        With a ``stall_timeout`` (seconds), a client that has not read enough by then
        is given up on: :class:`~proxy.errors.ClientDisconnected` (code
        ``client_stalled``) is raised, nothing more is written to it, and the
        connection is aborted when the exchange finishes. One timer per wait,
        and a wait happens only when the transport paused writing.
        """
        self.flush()
        if not self._write_paused:
            return
        waiter = self._drain_waiter = self._loop.create_future()
        expiry = None
        if stall_timeout is not None:
            expiry = self._loop.call_later(max(stall_timeout, 0.0), self._drain_expired, waiter)
        try:
            await waiter
        finally:
            self._drain_waiter = None
            if expiry is not None:
                expiry.cancel()

    def _drain_expired(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self._stalled = True
        self._keep_alive = False
        log.info("client %s stopped reading the response; giving up on it", self._client)
        waiter.set_exception(ClientDisconnected("client stopped reading the response", code="client_stalled"))

    def abort(self) -> None:
        """Close the connection at once (a response that cannot be finished)."""
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.abort()

    def exchange_finished(self) -> None:
        """Called by the exchange task when its cycle ends: next cycle or close."""
        self._task = None
        self._exchange = None
        self._protocol = None
        self._served += 1
        if self._state is _State.CLOSED or self._h11 is None or self._transport is None or self._transport.is_closing():
            return
        if self._stalled:  # close() would wait for the client to read what is queued
            self.abort()
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
        elif self._eof:
            self._close()
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
        body = render_error(error, self._protocol or _protocol_of(self._buf))
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
