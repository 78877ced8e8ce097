"""The reader of one upstream response: its h11 state machine, head checks and body framing.

One :class:`ResponseReader` per request sent on an upstream connection; the
connection makes a fresh one when it is reused, so nothing of one response
(head, body counter, decoder, buffered chunks, end, error) can leak into the
next. The reader does no I/O: the connection feeds it the socket's bytes and
acts on what it says (wake the reader task, pause the socket, fail).

Bodies are read off the socket here, not by h11 (which parses every head):
a Content-Length body is a byte count, for which h11 would spend two
state-machine events (Data, EndOfMessage); a chunked body goes through
:mod:`llmproxy.upstream.chunked`, as h11 spends about fifty Python calls per chunk, and a
provider sends one chunk per SSE event. Close-delimited bodies (HTTP/1.0
upstreams) stay with h11.

A head is refused (:class:`~llmproxy.errors.UpstreamProtocolError`, the
connection closed) when its framing could be read two ways - the one way
request smuggling and response injection work. h11 already refuses
differing Content-Length values, one that is not 1-20 digits, a
Transfer-Encoding other than a single "chunked" and several
Transfer-Encoding fields; this adds both Transfer-Encoding and
Content-Length (RFC 9112 section 6.3 lets a proxy pick chunked, but the two
readings differ: refused, as Go and HAProxy do), Transfer-Encoding in an
HTTP/1.0 response (section 6.1: faulty framing), a Content-Length past
2**63 - 1, a status past 599, and the head limits, which h11 only applies to
a head still incomplete after a read.
"""

from __future__ import annotations

import contextlib
from collections import deque

import h11

from llmproxy.errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError
from llmproxy.headers import comma_tokens, fields_of
from llmproxy.upstream.chunked import ChunkedDecoder, ChunkedError

__all__ = ["MAX_CONTENT_LENGTH", "MAX_RESPONSE_FIELDS", "MAX_RESPONSE_HEAD", "ResponseReader"]

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


#: h11's messages quote the upstream's bytes (which may hold our key, echoed back): fixed ones instead.
_H11_MESSAGES = (
    ("illegal status line", "upstream sent an invalid status line"),
    ("illegal header line", "upstream sent an invalid header field"),
    ("Response status_code", "upstream sent an invalid status code"),
    ("InformationalResponse status_code", "upstream sent an invalid status code"),
    ("status code must be integer", "upstream sent an invalid status code"),
    ("Only Transfer-Encoding: chunked", "upstream sent an unsupported Transfer-Encoding"),
    ("multiple Transfer-Encoding", "upstream sent more than one Transfer-Encoding field"),
    ("bad Content-Length", "upstream sent an invalid Content-Length"),
    ("conflicting Content-Length", "upstream sent conflicting Content-Length values"),
    ("peer closed connection", "upstream closed the connection mid-response"),
    ("continuation line", "upstream sent an obsolete line folding"),
    ("no response line", "upstream sent no status line"),
    ("Receive buffer too long", "upstream response head too large"),
)


def _h11_message(exc: h11.RemoteProtocolError) -> str:
    text = str(exc)
    for prefix, message in _H11_MESSAGES:
        if text.startswith(prefix):
            return message
    return "upstream sent invalid HTTP"


class ResponseReader:
    """State of one response on an upstream connection (see the module docstring).

    :meth:`feed` and :meth:`end_of_input` raise :class:`UpstreamProtocolError`
    for input that must close the connection; :attr:`error` records an error
    the reader of the body is to see without the connection being aborted
    first (closed mid-response).
    """

    __slots__ = (
        "_dechunk",
        "_max_fields",
        "_max_head",
        "body_left",
        "body_length",
        "buffered",
        "chunks",
        "eom",
        "error",
        "h11",
        "head",
        "head_bytes",
        "head_fields",
        "keep_alive",
        "method",
        "request_complete",
        "request_sent",
    )

    def __init__(self, max_head_bytes: int, max_head_fields: int) -> None:
        self._max_head = max_head_bytes
        self._max_fields = max_head_fields
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self.method = b""
        #: The request head was handed to the transport (a response may come from now on).
        self.request_sent = False
        #: The whole request, body included, was handed to the transport.
        self.request_complete = False
        self.head: h11.Response | None = None
        #: Bytes received before the final response head was complete.
        self.head_bytes = 0
        #: The response head's fields, lowercase names (copied once, for UpstreamResponse).
        self.head_fields: list[tuple[bytes, bytes]] = []
        #: Body bytes still to come when the body is counted (Content-Length), else -1.
        self.body_left = -1
        #: The length of the body as counted off the socket (see UpstreamResponse.content_length).
        self.body_length: int | None = None
        #: The decoder of a chunked body (None for other bodies, read as counted or by h11).
        self._dechunk: ChunkedDecoder | None = None
        #: The response allows the connection to be reused (HTTP/1.1, no Connection: close).
        self.keep_alive = True
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes in ``chunks``
        self.eom = False
        self.error: UpstreamError | None = None

    @property
    def in_body(self) -> bool:
        """The body is being read here (counted or chunked), not by h11."""
        return self.body_left >= 0 or self._dechunk is not None

    def feed(self, data: bytes) -> None:
        """Bytes from the socket."""
        if self.body_left >= 0:
            self._take_body(data)
            return
        if self._dechunk is not None:
            self._take_chunked(data)
            return
        if self.head is None:
            if not self.request_sent:
                # bytes before any request (idle, or not yet sent) can only be a
                # response planted for the next request: never use this connection
                raise UpstreamProtocolError("upstream sent bytes before a request")
            self.head_bytes += len(data)
        try:
            self.h11.receive_data(data)
        except h11.RemoteProtocolError as exc:  # receive after close
            raise UpstreamProtocolError(_h11_message(exc)) from None
        self._pump()
        if self.head is None and self.head_bytes > self._max_head and self.error is None:
            raise self._head_too_large()

    def end_of_input(self) -> None:
        """The peer half-closed its side."""
        if self.in_body:  # a body cut short (connection_lost reports it)
            self.keep_alive = False
            return
        with contextlib.suppress(h11.RemoteProtocolError):
            self.h11.receive_data(b"")
        self._pump()

    def lost(self) -> None:
        """The connection is gone: an unfinished response becomes :attr:`error`."""
        if not self.eom and self.error is None:
            if self.head is None:
                self.error = UpstreamConnectError("upstream closed the connection before responding")
            else:
                self.error = UpstreamProtocolError("upstream closed the connection mid-response")

    def _head_too_large(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"upstream response head larger than {self._max_head} bytes")

    def _pump(self) -> None:
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.head is None and self.head_bytes > self._max_head:  # h11's own bound
                    raise self._head_too_large() from None
                raise UpstreamProtocolError(_h11_message(exc)) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            kind = type(event)
            if kind is h11.Data:
                chunk = event.data  # type: ignore[union-attr]
                self._buffer(bytes(chunk) if type(chunk) is not bytes else chunk)
            elif kind is h11.Response:
                reads_body = self._begin_body(event)  # type: ignore[arg-type]
                self.head = event  # type: ignore[assignment]
                if reads_body:
                    rest, _ = conn.trailing_data
                    if self._dechunk is not None:
                        self._take_chunked(rest)
                    else:
                        self._take_body(rest)
                    return
            elif kind is h11.EndOfMessage:
                self.eom = True
                return
            elif kind is h11.ConnectionClosed:
                if not self.eom and self.error is None:
                    self.error = UpstreamProtocolError("upstream closed the connection mid-response")
                return
            # InformationalResponse (100 Continue) is ignored.

    def _framing(self, head: h11.Response) -> tuple[int | None, bool]:
        """Check the head (see the module docstring); its Content-Length and whether it is chunked."""
        if head.status_code > 599:  # h11 allows 200-999 (and parses 1xx itself)
            raise UpstreamProtocolError(f"upstream sent status {head.status_code}, outside 100-599")
        if self.head_bytes > self._max_head:  # maybe with body bytes: count the head alone
            rest, _ = self.h11.trailing_data
            if self.head_bytes - len(rest) > self._max_head:
                raise self._head_too_large()
        fields = fields_of(head.headers)
        if len(fields) > self._max_fields:
            raise UpstreamProtocolError(f"upstream response head with more than {self._max_fields} fields")
        length: bytes | None = None
        chunked = False
        for name, value in fields:
            if name == b"content-length":
                length = value  # h11 merged equal duplicates into one field
            elif name == b"transfer-encoding":
                chunked = True  # h11 accepts no coding but a single "chunked"
            elif name == b"connection" and b"close" in comma_tokens(value):
                self.keep_alive = False
        if chunked and length is not None:
            raise UpstreamProtocolError("upstream response with both Transfer-Encoding and Content-Length")
        if chunked and head.http_version != b"1.1":
            raise UpstreamProtocolError("upstream HTTP/1.0 response with a Transfer-Encoding")
        count = int(length) if length is not None else None  # h11 validated the digits
        if count is not None and count > MAX_CONTENT_LENGTH:
            raise UpstreamProtocolError("upstream response with an invalid Content-Length")
        self.head_fields = fields
        return count, chunked

    def _begin_body(self, head: h11.Response) -> bool:
        """Check and record the head; True when its body is to be read here rather than by h11."""
        count, chunked = self._framing(head)
        if head.http_version != b"1.1":
            self.keep_alive = False
        if self.method == b"HEAD" or head.status_code in (204, 304):
            # no body follows: a HEAD response's Content-Length describes the GET
            # response and frames nothing (the client's HEAD response has no body either)
            self.body_length = count if self.method == b"HEAD" else None
            return False
        if chunked:
            self._dechunk = ChunkedDecoder(self._max_head)
            return True
        if count is None:
            return False  # close-delimited: read by h11
        self.body_left = self.body_length = count
        return True

    def _take_body(self, data: bytes) -> None:
        left = self.body_left
        if len(data) > left:
            # more than the Content-Length said: keep what it framed, never reuse the connection
            data = data[:left]
            self.keep_alive = False
        if data:
            self._buffer(data)
        left -= len(data)
        self.body_left = left
        if left == 0:
            self.eom = True

    def _take_chunked(self, data: bytes) -> None:
        decoder = self._dechunk
        assert decoder is not None
        try:
            body = decoder.feed(data)
        except ChunkedError as exc:
            raise UpstreamProtocolError(f"upstream sent an invalid chunked body: {exc}") from None
        if body:
            self._buffer(body)
        if decoder.done:
            self.eom = True
            if decoder.trailing:  # bytes after the body: never reuse the connection
                self.keep_alive = False

    def _buffer(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.buffered += len(chunk)

    def take(self) -> bytes:
        """All buffered body bytes, joined (there must be some)."""
        chunks = self.chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        return chunk

    def reusable(self) -> bool:
        """This response finished cleanly and lets its connection carry another request."""
        if not self.request_complete:
            return False
        if self.in_body:
            return self.eom and self.keep_alive
        # bodiless (HEAD, 204, 304): bytes after the head would be read as the next response
        return self.h11.their_state is h11.DONE and self.keep_alive and not self.h11.trailing_data[0]
