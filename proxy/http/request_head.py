"""Request heads on the downstream connection: parsing one, request ids, error shapes and messages."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import h11

from llmproxy.errors import BadRequest, ClientProtocol, HttpVersionNotSupported, protocol_of_path
from llmproxy.http.framing import HeadInfo, check_head, find_head_end

if TYPE_CHECKING:
    from llmproxy.limits import Limits

__all__ = [
    "REQUEST_IDS",
    "h11_message",
    "incomplete",
    "parse_head",
    "protocol_of",
    "request_id",
    "valid_request_id",
]

#: Longest client-supplied X-Request-Id kept (longer ones are replaced by our own).
_REQUEST_ID_MAX = 128

#: h11's error messages quote the offending bytes: each known one becomes a fixed message.
_H11_MESSAGES = (
    ("illegal request line", "invalid request line"),
    ("illegal header line", "invalid header field"),
    ("Missing mandatory Host", "missing Host header"),
    ("Found multiple Host", "more than one Host header field"),
)


def h11_message(exc: h11.RemoteProtocolError) -> str:
    """A fixed message for an h11 parse error (h11's own quote the client's bytes)."""
    text = str(exc)
    for prefix, message in _H11_MESSAGES:
        if text.startswith(prefix):
            return message
    return "malformed request head"


def incomplete() -> BadRequest:
    """The error for a client that half-closed with a head or body unfinished."""
    return BadRequest("client closed the connection mid-request", code="incomplete_request")


def parse_head(buf: bytearray, limits: Limits, eof: bool) -> tuple[h11.Request, HeadInfo, bytes] | None:
    """The complete head at the start of ``buf``, checked and parsed; None while it is incomplete.

    The proxy's strict checks (:func:`~llmproxy.http.framing.check_head`) see the head
    before h11 does; h11 is given the head alone, a fresh state machine per
    head. On success ``buf`` is cleared and the bytes after the head are
    returned. ``eof``: no more bytes will come (an incomplete head is an
    error). Raises :class:`~llmproxy.errors.ProxyError`; h11's messages, which
    quote the client's bytes, become fixed ones.
    """
    try:
        end = find_head_end(buf, limits.max_header_bytes)
        if end < 0:
            if eof:
                raise incomplete()
            return None
        head = bytes(buf[:end])
        info = check_head(head, limits.max_header_count)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        conn.receive_data(head)
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadRequest(h11_message(exc), code="invalid_framing") from None
    if type(event) is not h11.Request:  # pragma: no cover - a complete head always parses to one
        raise BadRequest("malformed request", code="invalid_framing")
    rest = bytes(buf[end:])
    buf.clear()
    if event.http_version not in (b"1.1", b"1.0"):
        raise HttpVersionNotSupported(f"HTTP/{event.http_version.decode()} is not supported; use HTTP/1.1")
    return event, info, rest


_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/ ]*")


def protocol_of(head: bytes | bytearray) -> ClientProtocol:
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


class _RequestIds:
    """Cheap unique request ids: a random per-process prefix plus a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n:08x}"


REQUEST_IDS = _RequestIds()


def valid_request_id(value: bytes) -> bool:
    """A client's X-Request-Id is adopted when it is visible ASCII of a sane length."""
    return 0 < len(value) <= _REQUEST_ID_MAX and all(0x21 <= b <= 0x7E for b in value)


def request_id(value: bytes | None) -> str:
    """The client's X-Request-Id when :func:`valid_request_id`, else a fresh one."""
    if value is not None and valid_request_id(value):
        return value.decode("ascii")
    return REQUEST_IDS.next()
