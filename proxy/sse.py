"""Server-sent events framing.

The core frames ``text/event-stream`` responses so that response-body hooks
see whole events, never TCP fragments. :class:`SseFramer` splits a byte
stream at event boundaries (a blank line: ``\\n\\n``, ``\\r\\n\\r\\n`` or
``\\r\\r`` per the WHATWG spec) and returns each event's raw bytes,
terminator included, so an unmodified event is forwarded byte for byte.

:func:`parse_event` reads the ``event:`` and ``data:`` fields of one raw
event, for filters that need them. It is not called by the core.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["SseEvent", "SseFramer", "format_event", "parse_event"]

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SseFramer:
    """Incremental event splitter with a bounded buffer for the partial event.

    ``feed(data)`` returns the complete events found so far (possibly none);
    the bytes of an unfinished event are kept until more arrive. ``max_event``
    bounds that buffer: an event larger than it raises ``ValueError``.
    """

    __slots__ = ("_buf", "_crlf", "_max")

    def __init__(self, max_event: int = 4 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._crlf = False
        self._max = max_event

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the complete raw events it finished, in order."""
        if not self._crlf and b"\r" in data:
            self._crlf = True
        buf = self._buf
        # Fast path: most chunks hold exactly one whole event ending in \n\n.
        if not buf and not self._crlf and data.endswith(b"\n\n") and data.count(b"\n\n") == 1:
            return [data]
        events: list[bytes]
        if self._crlf:
            buf += data
            events = []
            start = 0
            for match in _BOUNDARY.finditer(buf):
                end = match.end()
                events.append(bytes(buf[start:end]))
                start = end
            if start:
                del buf[:start]
        else:
            if buf:
                buf += data
                data = bytes(buf)
                buf.clear()
            events = data.split(b"\n\n")
            rest = events.pop()
            events = [event + b"\n\n" for event in events]
            if rest:
                buf += rest
        if len(buf) > self._max:
            raise ValueError(f"server-sent event larger than {self._max} bytes")
        return events

    def flush(self) -> bytes:
        """Return (and forget) the bytes of an unterminated last event."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class SseEvent(NamedTuple):
    """The fields of one event: ``event`` name (None when absent) and joined ``data``."""

    event: bytes | None
    data: bytes


def parse_event(raw: bytes) -> SseEvent:
    """Parse one raw event; multiple ``data:`` lines are joined with ``\\n``."""
    event: bytes | None = None
    data_lines: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data_lines.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            value = line[6:]
            event = value[1:] if value.startswith(b" ") else value
    return SseEvent(event, b"\n".join(data_lines))


def format_event(data: bytes, event: bytes | None = None) -> bytes:
    """Serialise one event (``data`` must not contain newlines; JSON from orjson never does)."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event + b"\ndata: " + data + b"\n\n"
