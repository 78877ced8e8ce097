"""A request body as it arrives on the client socket: counted, or chunked and decoded.

A Content-Length body is counted off the socket here: its framing is a byte
count already checked by :func:`~llmproxy.http.framing.check_head`, and h11 would
spend two of its state-machine events (Data, EndOfMessage) to say the same.
A chunked body is checked by :class:`ChunkLines` and decoded by
:class:`~llmproxy.upstream.chunked.ChunkedDecoder` (strict, bounded).
"""

from __future__ import annotations

from llmproxy.errors import BadRequest, BodyTooLarge, ProxyError
from llmproxy.http.framing import MAX_CHUNK_LINE, chunk_size
from llmproxy.upstream.chunked import ChunkedDecoder, ChunkedError

__all__ = ["ChunkLines", "RequestBody"]

#: ChunkedDecoder's messages that quote nothing (the others do, and become a generic one).
_CHUNKED_MESSAGES = frozenset(
    {
        "chunk-size line too long",
        "chunk data not followed by CRLF",
        "trailer section too large",
        "invalid trailer field line",
    }
)


class RequestBody:
    """One request's body, fed the socket's bytes until :attr:`done`.

    :meth:`feed` returns the bytes past the body's end (the next request's)
    and raises :class:`~llmproxy.errors.ProxyError` (:class:`BadRequest` for bad
    framing, :class:`BodyTooLarge` past ``limit``); nothing a client sent is
    quoted in its message.
    """

    __slots__ = ("_decoder", "_left", "_lines", "data", "done", "seen")

    def __init__(self, chunked: bool, length: int, limit: int, max_trailers: int) -> None:
        #: The body bytes so far (decoded when chunked).
        self.data = bytearray()
        #: The whole body was read.
        self.done = False
        #: A body byte was received (no 100 Continue then).
        self.seen = False
        #: Body bytes still to come (Content-Length), or -1 while a chunked body is decoded.
        self._left = -1 if chunked else length
        self._lines = ChunkLines(limit) if chunked else None
        self._decoder = ChunkedDecoder(max_trailers=max_trailers) if chunked else None

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the socket; return those past the body's end."""
        if self._left >= 0:
            return self._counted(data)
        return self._chunked(data)

    def _counted(self, data: bytes) -> bytes:
        left = self._left
        if data:
            self.seen = True
        rest = b""
        if len(data) <= left:
            self.data += data
            left -= len(data)
        else:
            self.data += data[:left]
            rest = data[left:]
            left = 0
        self._left = left
        if left == 0:
            self.done = True
        return rest

    def _chunked(self, data: bytes) -> bytes:
        lines = self._lines
        decoder = self._decoder
        assert lines is not None and decoder is not None
        self.seen = True
        try:
            if not lines.done:
                lines.feed(data)
            self.data += decoder.feed(data)
        except ChunkedError as exc:
            self._lines = self._decoder = None
            message = str(exc)
            if message not in _CHUNKED_MESSAGES:
                message = "invalid chunked request body"
            raise BadRequest(message, code="invalid_framing") from None
        except ProxyError:
            self._lines = self._decoder = None
            raise
        if not decoder.done:
            return b""
        self._lines = self._decoder = None
        self.done = True
        return decoder.trailing


class ChunkLines:
    """Follows a chunked request body as it arrives, to check what the decoder does not.

    Fed the same bytes as the :class:`~llmproxy.upstream.chunked.ChunkedDecoder`, before
    it, it finds each chunk-size line and checks it with
    :func:`~llmproxy.http.framing.chunk_size` (extension grammar, digit bound), checks
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
