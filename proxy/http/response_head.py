"""Serialising the downstream response head and its body framing.

The proxy writes responses itself rather than through h11's send side: it
already knows the framing (a length, or chunked) and every field was
validated when it was parsed (by h11) or added (:func:`llmproxy.headers.check_field`),
so h11's per-event state machine and field checks would repeat work on the
hottest path for nothing. Request parsing stays with h11.

Contract of :func:`response_head`: ``headers`` hold no framing or
connection-management field (``content-length``, ``transfer-encoding``,
``connection``); the caller passes the framing explicitly and this module
writes exactly one of ``content-length`` or ``transfer-encoding: chunked``
(or neither, for a bodiless or close-delimited response).
"""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["CHUNKED_END", "CONTINUE_100", "chunk_prefix", "response_head", "status_line"]

#: The last chunk of a chunked body, with no trailers.
CHUNKED_END = b"0\r\n\r\n"
#: The interim response to ``Expect: 100-continue``.
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

_STATUS_LINES: dict[int, bytes] = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode("ascii")) for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n`` (an empty reason for unregistered codes)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d \r\n" % status
    return line


def response_head(
    status: int, headers: list[tuple[bytes, bytes]], content_length: int | None, chunked: bool, keep_alive: bool
) -> bytes:
    """The serialised head: status line, ``headers`` in order, framing, then CRLF."""
    parts = [status_line(status)]
    parts += [b"%s: %s\r\n" % field for field in headers]
    if content_length is not None:
        parts.append(b"content-length: %d\r\n" % content_length)
    elif chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
    return b"".join(parts)


def chunk_prefix(size: int) -> bytes:
    """The size line that starts a chunk of ``size`` bytes."""
    return b"%x\r\n" % size
