"""The upstream client: h11 connections in a pool per origin.

This module is the one boundary where socket, TLS and h11 exceptions are
mapped into the project's own :class:`~proxy.errors.UpstreamError` types;
nothing above it ever sees an ``OSError``, ``ssl.SSLError`` or h11 error.

Timeouts (each a typed :class:`~proxy.errors.UpstreamTimeout` with its
``phase``):

* ``connect``: TCP connect plus TLS handshake, and waiting for a free pool slot;
* ``headers``: from the request sent to the response head (a non-streaming
  completion only answers once generated, so this is generous by default);
* ``idle``: between two body chunks (a stalled stream is cut, not hung);
* ``total``: the whole attempt, body included.

Pool policy (:class:`_OriginPool`): idle connections are reused newest
first; a connection idle longer than ``keepalive_expiry``, closed by the
peer, or whose last exchange saw an error or did not finish its body is
never reused; at most ``max_per_origin`` connections per origin exist, and
callers beyond that wait in line: a released connection or a freed slot goes
to the oldest waiter, and a new caller takes nothing while older ones wait.

Response heads are strict: a head whose framing could be read two ways
(both Content-Length and Transfer-Encoding, differing lengths, a coding other
than a single ``chunked``, an invalid length), a status outside 100-599, or a
head over ``max_head_bytes`` or ``max_head_fields`` (whatever the read
boundaries) is an :class:`~proxy.errors.UpstreamProtocolError`, and the
connection is closed. Bytes an upstream sends while no request is
outstanding close the connection too: they could only be a response planted
for the next request.

Flow control: each connection pauses reading from its socket while more
than ``READ_HIGH_WATER`` bytes of body wait to be consumed, so a slow client
throttles the upstream instead of making the proxy buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

from .chunked import ChunkedDecoder, ChunkedError
from .errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .headers import comma_tokens, fields_of
from .timers import LazyTimer

__all__ = [
    "MAX_RESPONSE_FIELDS",
    "MAX_RESPONSE_HEAD",
    "READ_HIGH_WATER",
    "Timeouts",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTarget",
]

#: Body bytes buffered per upstream connection before reading is paused.
READ_HIGH_WATER = 256 * 1024
#: Default upper bound of a response head from an upstream, informational (1xx)
#: heads included, whatever the read boundaries (``UpstreamPool(max_head_bytes=)``).
#: h11: 16 KiB; nginx proxy_buffer_size: 4-8 KiB; Go net/http
#: MaxResponseHeaderBytes: 10 MiB. Provider heads are 1-2 KiB; CDNs in front of
#: them add cookies, so 64 KiB leaves room without letting a head hold the client.
MAX_RESPONSE_HEAD = 64 * 1024
#: Default upper bound of the field count of a response head
#: (``UpstreamPool(max_head_fields=)``). HAProxy tune.http.maxhdr: 101; node.js
#: maxHeadersCount: 2000; provider heads carry about 40 (OpenAI behind Cloudflare).
MAX_RESPONSE_FIELDS = 256
#: Largest Content-Length accepted from an upstream: nginx and Go parse it as a
#: signed 64-bit length and refuse an overflow (h11 only bounds it to 20 digits).
MAX_CONTENT_LENGTH = 2**63 - 1

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


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds (see the module docstring for each phase)."""

    connect: float = 5.0
    headers: float = 300.0
    idle: float = 60.0
    total: float = 900.0


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where an attempt goes: origin, path prefix, extra headers, timeouts and TLS.

    ``headers`` are added to the upstream request after the client's
    credentials were removed: provider credentials go here.
    """

    name: str
    scheme: str
    host: str
    port: int
    base_path: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    verify: bool = True
    ca_file: str | None = None
    host_header: bytes = b""
    #: A short, non-reversible id of the credential in ``headers`` (logs, metrics,
    #: :class:`~proxy.attempt.Attempt`); "" when the target carries none.
    key_id: str = ""

    @classmethod
    def from_url(cls, name: str, url: str, **kwargs: Any) -> UpstreamTarget:
        """Build a target from ``http(s)://host[:port][/base/path]``; raises ValueError."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http:// or https:// with a host: {url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host_header = parts.hostname if port == default_port else f"{parts.hostname}:{port}"
        if ":" in parts.hostname and port == default_port:
            host_header = f"[{parts.hostname}]"
        return cls(
            name=name,
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            base_path=parts.path.rstrip("/"),
            host_header=host_header.encode("ascii"),
            **kwargs,
        )

    @property
    def pool_key(self) -> tuple[str, str, int, bool, str | None]:
        """Connections are shared between targets with equal keys."""
        return (self.scheme, self.host, self.port, self.verify, self.ca_file)

    def __repr__(self) -> str:
        # headers may hold credentials: never show them
        return f"<UpstreamTarget {self.name} {self.scheme}://{self.host}:{self.port}{self.base_path}>"


class _ConnState(enum.Enum):
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"


class _UpstreamConnection(asyncio.Protocol):
    """One h11 client connection; owned by its pool, used by one exchange at a time."""

    def __init__(
        self, pool: _OriginPool, max_head_bytes: int = MAX_RESPONSE_HEAD, max_head_fields: int = MAX_RESPONSE_FIELDS
    ) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._max_head_bytes = max_head_bytes
        self._max_head_fields = max_head_fields
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        #: Bytes received for this exchange before its final response head was complete.
        self._head_bytes = 0
        self.transport: asyncio.Transport | None = None
        self.state = _ConnState.ACTIVE
        self.idle_since = 0.0
        self.reused = False
        self._head: h11.Response | None = None
        #: the response head's fields, lowercase names (copied once, for UpstreamResponse)
        self.head_fields: list[tuple[bytes, bytes]] = []
        self._method = b""
        #: Body bytes still to come when the body is counted (Content-Length), else -1.
        self._body_left = -1
        #: The length of the body as counted off the socket (see UpstreamResponse.content_length).
        self.body_length: int | None = None
        #: The decoder of a chunked body (None for other bodies, read as counted or by h11).
        self._dechunk: ChunkedDecoder | None = None
        #: The whole request (head and body) was handed to the transport.
        self._request_sent = False
        #: The response allows the connection to be reused (HTTP/1.1, no Connection: close).
        self._keep_alive = True
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eom = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer = LazyTimer(self._loop)  # the headers, idle and total timeouts
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.state.value} reused={self.reused}>"

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._body_left >= 0:
            self._take_body(data)
            return
        if self._dechunk is not None:
            self._take_chunked(data)
            return
        if self._head is None:
            if not self._request_sent:
                # bytes before any request (idle, or not yet sent) can only be a
                # response planted for the next request: never use this connection
                self._fail(UpstreamProtocolError("upstream sent bytes before a request"))
                return
            self._head_bytes += len(data)
        try:
            self._h11.receive_data(data)
        except h11.RemoteProtocolError as exc:  # receive after close
            self._fail(UpstreamProtocolError(f"upstream sent invalid HTTP: {exc}"))
            return
        self._pump()
        if self._head is None and self._head_bytes > self._max_head_bytes and self._error is None:
            self._fail(self._head_too_large())

    def _head_too_large(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"upstream response head larger than {self._max_head_bytes} bytes")

    def eof_received(self) -> bool | None:
        if self._body_left >= 0 or self._dechunk is not None:  # a body cut short (connection_lost reports it)
            self._keep_alive = False
            return None
        with contextlib.suppress(h11.RemoteProtocolError):
            self._h11.receive_data(b"")
        self._pump()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _ConnState.CLOSED
        self._timer.close()
        if not self._eom and self._error is None:
            if self._head is None:
                self._error = UpstreamConnectError("upstream closed the connection before responding")
            else:
                self._error = UpstreamProtocolError("upstream closed the connection mid-response")
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._pool.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- parsing ---------------------------------------------------------
    def _pump(self) -> None:
        conn = self._h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._head is None and self._head_bytes > self._max_head_bytes:  # h11's own bound
                    self._fail(self._head_too_large())
                else:
                    self._fail(UpstreamProtocolError(f"upstream sent invalid HTTP: {exc}"))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            kind = type(event)
            if kind is h11.Data:
                chunk = event.data  # type: ignore[union-attr]
                self._buffer_chunk(bytes(chunk) if type(chunk) is not bytes else chunk)
            elif kind is h11.Response:
                try:
                    reads_body = self._begin_body(event)  # type: ignore[arg-type]
                except UpstreamProtocolError as exc:
                    self._fail(exc)
                    return
                self._head = event  # type: ignore[assignment]
                if reads_body:
                    rest, _ = conn.trailing_data
                    if self._dechunk is not None:
                        self._take_chunked(rest)
                    else:
                        self._take_body(rest)
                    return
            elif kind is h11.EndOfMessage:
                self._eom = True
                break
            elif kind is h11.ConnectionClosed:
                if not self._eom and self._error is None:
                    self._error = UpstreamProtocolError("upstream closed the connection mid-response")
                break
            # InformationalResponse (100 Continue) is ignored.
        self._wake()

    # Bodies are read off the socket here, not by h11 (which parses every head):
    # a Content-Length body is a byte count, for which h11 would spend two
    # state-machine events (Data, EndOfMessage); a chunked body goes through
    # proxy.chunked, as h11 spends about fifty Python calls per chunk, and a
    # provider sends one chunk per SSE event. Close-delimited bodies (HTTP/1.0
    # upstreams) stay with h11.
    #
    # A head is refused (UpstreamProtocolError, the connection closed) when its
    # framing could be read two ways - the one way request smuggling and
    # response injection work. h11 already refuses differing Content-Length
    # values, one that is not 1-20 digits, a Transfer-Encoding other than a
    # single "chunked" and several Transfer-Encoding fields; this adds both
    # Transfer-Encoding and Content-Length (RFC 9112 section 6.3 lets a proxy
    # pick chunked, but the two readings differ: refused, as Go and HAProxy do),
    # Transfer-Encoding in an HTTP/1.0 response (section 6.1: faulty framing),
    # a Content-Length past 2**63 - 1, a status past 599, and the head limits,
    # which h11 only applies to a head still incomplete after a read.
    def _begin_body(self, head: h11.Response) -> bool:
        """Check and record the head; True when its body is to be read here rather than by h11.

        Raises :class:`UpstreamProtocolError` for a head that breaks the rules above.
        """
        if head.status_code > 599:  # h11 allows 200-999 (and parses 1xx itself)
            raise UpstreamProtocolError(f"upstream sent status {head.status_code}, outside 100-599")
        if self._head_bytes > self._max_head_bytes:  # maybe with body bytes: count the head alone
            rest, _ = self._h11.trailing_data
            if self._head_bytes - len(rest) > self._max_head_bytes:
                raise self._head_too_large()
        fields = fields_of(head.headers)
        if len(fields) > self._max_head_fields:
            raise UpstreamProtocolError(f"upstream response head with more than {self._max_head_fields} fields")
        length: bytes | None = None
        chunked = False
        for name, value in fields:
            if name == b"content-length":
                length = value  # h11 merged equal duplicates into one field
            elif name == b"transfer-encoding":
                chunked = True  # h11 accepts no coding but a single "chunked"
            elif name == b"connection" and b"close" in comma_tokens(value):
                self._keep_alive = False
        if chunked and length is not None:
            raise UpstreamProtocolError("upstream response with both Transfer-Encoding and Content-Length")
        if chunked and head.http_version != b"1.1":
            raise UpstreamProtocolError("upstream HTTP/1.0 response with a Transfer-Encoding")
        count = int(length) if length is not None else None  # h11 validated the digits
        if count is not None and count > MAX_CONTENT_LENGTH:
            raise UpstreamProtocolError("upstream response with an invalid Content-Length")
        self.head_fields = fields
        if head.http_version != b"1.1":
            self._keep_alive = False
        if self._method == b"HEAD" or head.status_code in (204, 304):
            # no body follows: a HEAD response's Content-Length describes the GET
            # response and frames nothing (the client's HEAD response has no body either)
            self.body_length = count if self._method == b"HEAD" else None
            return False
        if chunked:
            self._dechunk = ChunkedDecoder(self._max_head_bytes)
            return True
        if count is None:
            return False  # close-delimited: read by h11
        self._body_left = self.body_length = count
        return True

    def _take_body(self, data: bytes) -> None:
        left = self._body_left
        if len(data) > left:
            # more than the Content-Length said: keep what it framed, never reuse the connection
            data = data[:left]
            self._keep_alive = False
        if data:
            self._buffer_chunk(data)
        left -= len(data)
        self._body_left = left
        if left == 0:
            self._eom = True
        self._wake()

    def _take_chunked(self, data: bytes) -> None:
        decoder = self._dechunk
        assert decoder is not None
        try:
            body = decoder.feed(data)
        except ChunkedError as exc:
            self._fail(UpstreamProtocolError(f"upstream sent an invalid chunked body: {exc}"))
            return
        if body:
            self._buffer_chunk(body)
        if decoder.done:
            self._eom = True
            if decoder.trailing:  # bytes after the body: never reuse the connection
                self._keep_alive = False
        self._wake()

    def _buffer_chunk(self, chunk: bytes) -> None:
        """Queue body bytes for the reader; pause the socket past ``READ_HIGH_WATER``."""
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float, phase: str) -> None:
        """Wait for any progress; raise UpstreamTimeout(phase) at ``deadline`` (loop time).

        The timer is lazy (:class:`~proxy.timers.LazyTimer`), so a stream of
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
    async def send_request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write one request: the head serialised here, then the body as is.

        Contract: ``headers`` hold exactly one ``host`` and, unless the request
        is a bodiless GET or HEAD, a ``content-length`` equal to ``len(body)``;
        every field was validated when it was parsed (h11) or added
        (:func:`proxy.headers.check_field`). ``method`` and ``target`` are
        checked here against h11's grammar. A request that breaks the contract
        raises :class:`UpstreamProtocolError` before a byte is written.

        h11 parses the response. All it needs to know of the request is its
        method (a HEAD response has no body), so it is sent a header-less
        stand-in with that method, and its output is dropped; serialising the
        real fields through h11 again would repeat, on the hottest path, the
        checks already made.
        """
        assert self.transport is not None
        _check_request(method, target, headers, body)
        try:
            self._h11.send(_stand_in(method))
        except h11.LocalProtocolError as exc:  # pragma: no cover - a fresh connection takes any request
            raise UpstreamProtocolError(f"cannot send request upstream: {exc}") from None
        self._method = method
        if self.state is _ConnState.CLOSED or self.transport.is_closing():
            raise UpstreamConnectError("upstream connection closed before the request was sent")
        parts = [b"%s %s HTTP/1.1\r\n" % (method, target)]
        parts += [b"%s: %s\r\n" % field for field in headers]
        parts.append(b"\r\n")
        if body:
            parts.append(body)
        self.transport.write(b"".join(parts))
        self._request_sent = True

    async def read_head(self, deadline: float) -> h11.Response:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait(deadline, "headers")
        return self._head

    async def read_chunk(self, idle: float, deadline: float) -> bytes:
        """Return the body bytes received so far (all buffered chunks, joined), or b"" at the end.

        Chunks that arrived together are handed over together: one read, one
        pass through the relay, instead of one per HTTP chunk (a provider
        writes one chunk per SSE event; the core re-frames events anyway).
        """
        chunks = self._chunks
        while not chunks:
            if self._eom:
                return b""
            if self._error is not None:
                raise self._error
            idle_deadline = self._loop.time() + idle
            if deadline <= idle_deadline:
                await self._wait(deadline, "total")
            else:
                await self._wait(idle_deadline, "idle")
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return chunk

    @property
    def has_data(self) -> bool:
        """:meth:`read_chunk` would return without waiting (body bytes, or the end, are here)."""
        return bool(self._chunks) or self._eom

    def reusable(self) -> bool:
        """The exchange finished cleanly on both sides and the connection may carry another."""
        if self.state is _ConnState.CLOSED or self.transport is None or self.transport.is_closing():
            return False
        if not self._request_sent:
            return False
        if self._body_left >= 0 or self._dechunk is not None:
            return self._eom and self._keep_alive
        # bodiless (HEAD, 204, 304): bytes after the head would be read as the next response
        return self._h11.their_state is h11.DONE and self._keep_alive and not self._h11.trailing_data[0]

    def idle_usable(self) -> bool:
        """An idle (reset) connection that the peer has not closed."""
        return (
            self.state is not _ConnState.CLOSED
            and self._h11.our_state is h11.IDLE
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def reset_for_reuse(self) -> None:
        self._timer.close()
        # h11 saw the request head only (and maybe only the response head): a
        # fresh state machine for the next request
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head_bytes)
        self._head_bytes = 0
        self._body_left = -1
        self.body_length = None
        self._dechunk = None
        self._request_sent = False
        self._keep_alive = True
        self._head = None
        self._eom = False
        self._chunks.clear()
        self._buffered = 0
        self.reused = True

    def abort(self) -> None:
        self.state = _ConnState.CLOSED
        self._timer.close()
        if self.transport is not None:
            self.transport.abort()


_TIMED_OUT: Any = object()


class UpstreamResponse:
    """A response being received. Read the body with :meth:`read`; always
    finish with :meth:`release` (connection back to the pool when the body was
    read to the end) or :meth:`close` (connection discarded)."""

    __slots__ = ("_conn", "_deadline", "_done", "_idle", "_pool", "headers", "http_version", "status")

    def __init__(
        self, pool: _OriginPool, conn: _UpstreamConnection, head: h11.Response, idle: float, deadline: float
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._idle = idle
        self._deadline = deadline
        self._done = False
        self.status: int = head.status_code
        self.headers: list[tuple[bytes, bytes]] = conn.head_fields
        self.http_version = head.http_version

    async def read(self) -> bytes:
        """The next body chunk; b"" at the end. Raises UpstreamError subclasses."""
        return await self._conn.read_chunk(self._idle, self._deadline)

    @property
    def content_length(self) -> int | None:
        """The length of this body as the connection counts it off the socket, or None.

        None when the body is chunked or delimited by the close. The length is
        the validated Content-Length that frames the bytes :meth:`read` returns
        (an upstream sending more is cut there and its connection closed), so a
        client told it gets exactly that many bytes. For a response that has no
        body by its request method (HEAD) it is the declared length, which
        frames nothing; for a 204 or 304 it is None.
        """
        return self._conn.body_length

    def stall_timeout(self) -> float:
        """Seconds a reader may wait now: the idle timeout, within what is left of the total deadline.

        For waits on the other side of the relay (a client that does not read)
        that must not hold this response's connection longer than the upstream could.
        """
        return min(self._idle, self._deadline - self._conn._loop.time())

    @property
    def buffered(self) -> bool:
        """A next chunk (or the end) is already here: :meth:`read` returns without waiting."""
        return self._conn.has_data

    def release(self) -> None:
        """Return the connection to the pool if reusable, else close it. Idempotent."""
        if self._done:
            return
        self._done = True
        self._pool.release(self._conn)

    def close(self) -> None:
        """Discard the connection (unfinished body, error, client gone). Idempotent."""
        if self._done:
            return
        self._done = True
        self._conn.abort()
        self._pool.release(self._conn)


class _Grant(enum.Enum):
    """What a caller of the pool is granted besides an idle connection."""

    SLOT = "slot"  # room for one new connection, reserved for this caller: connect it


class _OriginPool:
    """Connections to one origin; the policy is synchronous and does no I/O.

    Invariants: ``len(active) + len(idle) + reserved <= max_connections``
    (``reserved`` counts slots granted to callers that have not started their
    connection yet); a connection or slot that becomes free goes at once to
    the oldest waiter, so ``waiters`` is non-empty only while nothing is free,
    and a new caller never takes an idle connection or a slot while older
    callers wait (FIFO). A waiter that gives up (:meth:`withdraw`) hands a
    grant it received but did not use to the next one, so nothing is lost to
    a timeout or a cancellation.
    """

    def __init__(
        self,
        key: tuple[str, str, int, bool, str | None],
        max_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.key = key
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self.idle: list[_UpstreamConnection] = []
        self.active: set[_UpstreamConnection] = set()
        self.reserved = 0
        self.waiters: deque[asyncio.Future[_UpstreamConnection | _Grant]] = deque()

    def __repr__(self) -> str:
        return (
            f"<OriginPool {self.key[0]}://{self.key[1]}:{self.key[2]} active={len(self.active)}"
            f" idle={len(self.idle)} reserved={self.reserved} waiting={len(self.waiters)}>"
        )

    def acquire(self, now: float) -> _UpstreamConnection | _Grant | None:
        """Serve a new caller at once: an idle connection, a reserved slot, or None (then :meth:`queue`)."""
        if self.waiters:
            return None  # older callers first
        conn = self.take_idle(now)
        if conn is not None:
            return conn
        if self.has_room():
            self.reserved += 1
            return _Grant.SLOT
        return None

    def queue(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[_UpstreamConnection | _Grant]:
        """Wait in line; the future's result is the caller's grant (see :meth:`acquire`)."""
        waiter: asyncio.Future[_UpstreamConnection | _Grant] = loop.create_future()
        self.waiters.append(waiter)
        return waiter

    def withdraw(self, waiter: asyncio.Future[_UpstreamConnection | _Grant]) -> None:
        """``waiter`` gave up (timeout, cancellation): leave the line, pass on what it was granted."""
        if not waiter.done() or waiter.cancelled():
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            return
        grant = waiter.result()
        if grant is _Grant.SLOT:
            self.reserved -= 1
            self._grant_slot()
        else:
            self.active.discard(grant)
            self._offer(grant)

    def take_idle(self, now: float) -> _UpstreamConnection | None:
        """Pop the newest usable idle connection, dropping expired or closed ones."""
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since > self.keepalive_expiry or not conn.idle_usable():
                conn.abort()
                continue
            conn.state = _ConnState.ACTIVE
            self.active.add(conn)
            return conn
        return None

    def has_room(self) -> bool:
        return len(self.active) + len(self.idle) + self.reserved < self.max_connections

    def start_connection(self, conn: _UpstreamConnection) -> None:
        """A reserved slot becomes ``conn``, being connected."""
        self.reserved -= 1
        self.active.add(conn)

    def release(self, conn: _UpstreamConnection) -> None:
        """The exchange on ``conn`` ended: reuse it (oldest waiter first, else idle) or close it."""
        self.active.discard(conn)
        if conn.state is not _ConnState.CLOSED and conn.reusable():
            conn.reset_for_reuse()
            self._offer(conn)
        else:
            conn.abort()
            self._grant_slot()

    def forget(self, conn: _UpstreamConnection) -> None:
        """Called when the peer closed ``conn``."""
        if conn in self.active:
            return  # its user will release it and see the error
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._grant_slot()

    def _next_waiter(self) -> asyncio.Future[_UpstreamConnection | _Grant] | None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled one is skipped (its withdraw finds nothing to pass on)
                return waiter
        return None

    def _offer(self, conn: _UpstreamConnection) -> None:
        """A reset connection is free: to the oldest waiter, else idle."""
        if not conn.idle_usable():
            conn.abort()
            self._grant_slot()
            return
        waiter = self._next_waiter()
        if waiter is None:
            conn.state = _ConnState.IDLE
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
            return
        conn.state = _ConnState.ACTIVE
        self.active.add(conn)
        waiter.set_result(conn)

    def _grant_slot(self) -> None:
        """A slot may be free: reserve it for the oldest waiter."""
        if self.waiters and self.has_room():
            waiter = self._next_waiter()
            if waiter is not None:
                self.reserved += 1
                waiter.set_result(_Grant.SLOT)

    def expire_idle(self, now: float) -> None:
        keep = []
        for conn in self.idle:
            if now - conn.idle_since > self.keepalive_expiry or not conn.idle_usable():
                conn.abort()
            else:
                keep.append(conn)
        freed = len(self.idle) - len(keep)
        self.idle = keep
        for _ in range(freed):
            self._grant_slot()


class UpstreamPool:
    """Pools of upstream connections keyed by origin (and TLS settings).

    ``max_head_bytes`` and ``max_head_fields`` bound every response head (see
    :data:`MAX_RESPONSE_HEAD` and :data:`MAX_RESPONSE_FIELDS`); a head past
    either is an :class:`UpstreamProtocolError` and its connection is closed.
    """

    def __init__(
        self,
        max_per_origin: int = 256,
        keepalive_expiry: float = 30.0,
        *,
        max_head_bytes: int = MAX_RESPONSE_HEAD,
        max_head_fields: int = MAX_RESPONSE_FIELDS,
    ) -> None:
        self.max_per_origin = max_per_origin
        self.keepalive_expiry = keepalive_expiry
        self.max_head_bytes = max_head_bytes
        self.max_head_fields = max_head_fields
        self._pools: dict[tuple[str, str, int, bool, str | None], _OriginPool] = {}
        self._ssl_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop its connections live on

    def __repr__(self) -> str:
        return f"<UpstreamPool {list(self._pools.values())}>"

    def _ssl_context(self, verify: bool, ca_file: str | None) -> ssl.SSLContext:
        key = (verify, ca_file)
        ctx = self._ssl_contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=ca_file)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl_contexts[key] = ctx
        return ctx

    def _origin(self, target: UpstreamTarget) -> _OriginPool:
        key = target.pool_key
        pool = self._pools.get(key)
        if pool is None:
            ctx = self._ssl_context(target.verify, target.ca_file) if target.scheme == "https" else None
            pool = _OriginPool(key, self.max_per_origin, self.keepalive_expiry, ctx)
            self._pools[key] = pool
        return pool

    async def _connect(self, pool: _OriginPool, target: UpstreamTarget, deadline: float) -> _UpstreamConnection:
        """Connect in a slot reserved for the caller; the slot is freed (and passed on) on failure."""
        loop = asyncio.get_running_loop()
        conn = _UpstreamConnection(pool, self.max_head_bytes, self.max_head_fields)
        pool.start_connection(conn)
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(
                    lambda: conn,
                    target.host,
                    target.port,
                    ssl=pool.ssl_context,
                    server_hostname=target.host if pool.ssl_context is not None else None,
                )
        except TimeoutError:
            conn.abort()
            pool.release(conn)
            raise UpstreamTimeout(f"connecting to upstream '{target.name}' timed out", phase="connect") from None
        except ssl.SSLError as exc:
            conn.abort()
            pool.release(conn)
            raise UpstreamConnectError(
                f"TLS handshake with upstream '{target.name}' failed: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            conn.abort()
            pool.release(conn)
            reason = exc.strerror or type(exc).__name__
            raise UpstreamConnectError(f"cannot connect to upstream '{target.name}': {reason}") from None
        except BaseException:
            conn.abort()
            pool.release(conn)
            raise
        return conn

    async def _acquire(self, target: UpstreamTarget, deadline: float) -> tuple[_OriginPool, _UpstreamConnection]:
        """A connection for one exchange, in arrival order (see :class:`_OriginPool`)."""
        pool = self._origin(target)
        grant = pool.acquire(time.monotonic())
        if grant is None:
            waiter = pool.queue(asyncio.get_running_loop())
            try:
                async with asyncio.timeout_at(deadline):
                    grant = await waiter
            except TimeoutError:
                pool.withdraw(waiter)
                raise UpstreamTimeout(
                    f"no free connection to upstream '{target.name}' in time", phase="connect"
                ) from None
            except BaseException:
                pool.withdraw(waiter)
                raise
        if grant is _Grant.SLOT:
            return pool, await self._connect(pool, target, deadline)
        return pool, grant

    async def send(
        self,
        target: UpstreamTarget,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> UpstreamResponse:
        """Send one request and wait for the response head.

        A request that fails on a reused keep-alive connection before any
        response byte (the peer closed it while idle) is sent once more on a
        fresh connection, as it never reached the upstream's application; the
        fresh connection takes the dead one's slot, so the caller keeps its
        turn.
        """
        loop = self._loop
        if loop is None:
            # cached: asyncio.get_running_loop() costs a getpid() system call each time
            loop = self._loop = asyncio.get_running_loop()
        timeouts = target.timeouts
        now = loop.time()
        total_deadline = now + timeouts.total
        connect_deadline = min(now + timeouts.connect, total_deadline)
        pool, conn = await self._acquire(target, connect_deadline)
        for attempt in range(2):
            try:
                await conn.send_request(method, path, headers, body)
                head = await conn.read_head(min(loop.time() + timeouts.headers, total_deadline))
            except UpstreamError as exc:
                conn.abort()
                if attempt == 0 and conn.reused and isinstance(exc, UpstreamConnectError):
                    pool.active.discard(conn)
                    pool.reserved += 1  # its slot, kept for the fresh connection
                    conn = await self._connect(pool, target, connect_deadline)
                    continue
                pool.release(conn)
                raise
            except BaseException:
                conn.abort()
                pool.release(conn)
                raise
            return UpstreamResponse(pool, conn, head, timeouts.idle, total_deadline)
        raise UpstreamConnectError(f"upstream '{target.name}' closed the connection")  # pragma: no cover

    def expire_idle(self) -> None:
        """Close idle connections past their keep-alive expiry (called periodically)."""
        now = time.monotonic()
        for pool in self._pools.values():
            pool.expire_idle(now)

    async def close(self) -> None:
        """Close every connection."""
        for pool in self._pools.values():
            for conn in pool.idle + list(pool.active):
                conn.abort()
            pool.idle.clear()
        self._pools.clear()
