"""Decoding a chunked response body from an upstream (RFC 9112 section 7.1).

h11 parses every response head. A provider streams its SSE as a chunked body,
one chunk per event, and h11 spends two state-machine events and about fifty
Python calls on each chunk: more than the whole per-event budget of the
proxy. :class:`ChunkedDecoder` does the same job with a ``find`` and a regex
match per chunk.

It is strict where framing could be read two ways, and bounded:

* a chunk-size line is 1-16 hex digits, then chunk extensions (ignored) as
  RFC 9112 section 7.1.1 spells them - ``;`` name, optionally ``=`` and a
  token or quoted-string value, with optional whitespace around ``;`` and
  ``=`` - and optional whitespace, then CRLF; anything else (a sign, ``0x``,
  a bare LF or CR, a control character, an empty or malformed extension) is
  refused, and so is a line over ``MAX_LINE`` bytes;
* chunk data must be followed by CRLF;
* the trailer section after the last chunk is read and dropped (the proxy
  forwards no trailers); each line must be a field line of at most
  ``MAX_LINE`` bytes, and the section is bounded by ``max_trailers`` bytes.

Contract of :meth:`ChunkedDecoder.feed`: bytes go in as they arrive, split
anywhere; the body bytes decoded from them come out, in order, joined into
one ``bytes`` per call (empty when the call completed no data). ``done``
turns true once the last chunk and the trailer section were read; bytes
after the body are kept in ``trailing`` (a well-behaved upstream sends none
before the next request). After ``done``, further input only adds to
``trailing``. Malformed input raises :class:`ChunkedError`, and the decoder
must not be fed again.
"""

from __future__ import annotations

import re

__all__ = ["MAX_LINE", "ChunkedDecoder", "ChunkedError"]

#: Longest chunk-size line (with extensions) or trailer line, CRLF excluded.
#: h11 bounds a whole chunk header or trailer section by its 16 KiB event size;
#: a per-line bound also keeps an unfinished line's re-joining cheap.
MAX_LINE = 4096

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_EXTENSION = rb"[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:" + _EXTENSION + rb")*[ \t]*")
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\x20-\x7e\t\x80-\xff]*")

# states
_SIZE = 0
_DATA = 1
_DATA_END = 2
_TRAILER = 3
_DONE = 4


class ChunkedError(ValueError):
    """The body is not valid chunked framing (the message says how)."""


class ChunkedDecoder:
    """Incremental, strict decoder of one chunked body (see the module docstring)."""

    __slots__ = ("_left", "_max_trailers", "_partial", "_state", "_trailer_bytes", "trailing")

    def __init__(self, max_trailers: int = 64 * 1024) -> None:
        self._state = _SIZE
        self._left = 0  # data bytes still to come in the current chunk
        self._partial = b""  # an unfinished size line, chunk-ending CRLF or trailer line
        self._trailer_bytes = 0
        self._max_trailers = max_trailers
        #: Bytes received after the end of the body.
        self.trailing = b""

    @property
    def done(self) -> bool:
        """The last chunk and the trailer section were read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """Decode ``data``; return the body bytes it completed (b"" if none)."""
        # One loop over the states, longer than ~60 lines on purpose: a method
        # per state would add a Python call per chunk on the hottest path (a
        # provider sends one chunk per SSE event).
        if self._state == _DONE:
            self.trailing += data
            return b""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        out: list[bytes] = []
        pos = 0
        size = len(data)
        state = self._state
        while pos < size:
            if state == _DATA:
                take = self._left if self._left < size - pos else size - pos
                out.append(data[pos : pos + take] if take < size else data)
                pos += take
                self._left -= take
                if self._left == 0:
                    state = _DATA_END
            elif state == _SIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > MAX_LINE:
                        raise ChunkedError("chunk-size line too long")
                    self._partial = data[pos:]
                    break
                if end - pos > MAX_LINE:
                    raise ChunkedError("chunk-size line too long")
                match = _SIZE_LINE.fullmatch(data, pos, end)
                if match is None:
                    raise ChunkedError("invalid chunk-size line")  # never quote peer bytes: they may hold secrets
                pos = end + 2
                length = int(match.group(1), 16)
                if not length:
                    state = _TRAILER
                    continue
                stop = pos + length
                if stop + 2 <= size and data[stop] == 13 and data[stop + 1] == 10:
                    # the common case, a whole chunk in this read: no state change
                    out.append(data[pos:stop])
                    pos = stop + 2
                    continue
                self._left = length
                state = _DATA
            elif state == _DATA_END:
                if size - pos < 2:
                    if data[pos:] != b"\r":
                        raise ChunkedError("chunk data not followed by CRLF")
                    self._partial = b"\r"
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise ChunkedError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _TRAILER:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if self._trailer_bytes + size - pos > self._max_trailers:
                        raise ChunkedError("trailer section too large")
                    if size - pos > MAX_LINE:
                        raise ChunkedError("trailer line too long")
                    self._partial = data[pos:]
                    break
                if end == pos:
                    pos += 2
                    state = _DONE
                    self.trailing = data[pos:]
                    break
                self._trailer_bytes += end - pos + 2
                if self._trailer_bytes > self._max_trailers:
                    raise ChunkedError("trailer section too large")
                if end - pos > MAX_LINE:
                    raise ChunkedError("trailer line too long")
                if _FIELD_LINE.fullmatch(data, pos, end) is None:
                    raise ChunkedError("invalid trailer field line")
                pos = end + 2
        self._state = state
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)
