"""Small helpers of the downstream connection for request heads: ids, error shapes, messages."""

from __future__ import annotations

import os
import re

import h11

from .errors import ClientProtocol, protocol_of_path

__all__ = ["REQUEST_IDS", "h11_message", "protocol_of", "request_id"]

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


def request_id(value: bytes | None) -> str:
    """The client's X-Request-Id when it is visible ASCII of a sane length, else a fresh one."""
    if value is not None and 0 < len(value) <= _REQUEST_ID_MAX and all(0x21 <= b <= 0x7E for b in value):
        return value.decode("ascii")
    return REQUEST_IDS.next()
