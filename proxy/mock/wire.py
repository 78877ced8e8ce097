"""The mock's own strict HTTP/1.1 request parser (bytes in, :class:`RawRequest` objects out).

It deliberately shares no code with the proxy's HTTP layer (h11), so the two
cannot hide the same framing bug. Readers are chosen from ``_READERS`` by
parser state; a framing error is an :class:`HttpError` carrying the status
it is answered with (400/413/431/501/505) before the connection closes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_BODY", "MAX_HEAD", "HttpError", "RawRequest", "RequestParser"]

# Limits. Request head: h11 16 KiB, node.js 16 KiB, tomcat 8 KiB; SDK requests
# carry about 1 KiB, so 64 KiB only refuses garbage. Body: Anthropic's
# Messages API accepts 32 MB, the largest of the providers mocked here.
MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 32 * 1024 * 1024
_MAX_CHUNK_LINE: Final = 1024

# Parsed request heads are cached by their text (benchmarks and SDKs repeat
# the same head); the cache is cleared when it reaches this many entries.
_HEAD_CACHE: Final = 512


class HttpError(Exception):
    """A framing error: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class RawRequest:
    """One complete HTTP request off the wire; ``path`` has no query string."""

    method: str
    path: str
    version: int  # 10 or 11
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    mocked: bool = False  # some x-mock-* header is present


class _P(enum.Enum):
    """Parser states; each has a reader in ``_READERS``."""

    HEAD = enum.auto()
    BODY = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_CRLF = enum.auto()
    TRAILERS = enum.auto()
    DEAD = enum.auto()


_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE: Final = re.compile(_TOKEN)
# The field section, each line CRLF-terminated. A whole-section fullmatch
# rejects obs-fold, bare CR/LF and "name :" in one C-level pass; findall then
# extracts (name, value) with optional whitespace stripped.
_FIELDS_RE: Final = re.compile(rf"(?:{_TOKEN}:[^\r\n]*\r\n)*")
_FIELD_RE: Final = re.compile(rf"({_TOKEN}):[ \t]*([^\r\n]*?)[ \t]*\r\n")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


class RequestParser:
    """Incremental server-side HTTP/1.1 request parser.

    :meth:`feed` returns the requests its bytes completed, in order. A framing
    error is returned as an :class:`HttpError` after the requests that came
    before it, and the parser then ignores all input (the connection answers
    the error and closes). Supported: request line, headers (names
    lowercased, repeats joined by ``", "``), ``Content-Length`` and chunked
    bodies (extensions and trailers ignored). Refused: obs-fold, whitespace
    before a colon, ``Content-Length`` together with ``Transfer-Encoding``
    (400), codings other than ``chunked`` (501), versions other than 1.0 and
    1.1 (505), heads over ``MAX_HEAD`` (431), bodies over ``MAX_BODY`` (413).
    """

    __slots__ = ("_body", "_buf", "_continue", "_head", "_heads", "_left", "_pos", "_state")

    def __init__(self, head_cache: dict[str, RawRequest] | None = None) -> None:
        self._heads = head_cache if head_cache is not None else {}  # head text -> parsed template
        self._buf = bytearray()
        self._pos = 0  # consumed prefix of _buf, compacted at the end of feed()
        self._state = _P.HEAD
        self._head: RawRequest | None = None  # the request whose body is being read
        self._body = bytearray()  # chunked body so far
        self._left = 0  # bytes still expected in BODY or CHUNK_DATA
        self._continue = False

    def feed(self, data: bytes) -> list[RawRequest | HttpError]:
        """Add ``data``; return the requests (or the error) it completed."""
        out: list[RawRequest | HttpError] = []
        if self._state is _P.DEAD:
            return out
        self._buf += data
        try:
            while _READERS[self._state](self, out):
                pass
        except HttpError as exc:
            self._state = _P.DEAD
            self._buf.clear()
            self._pos = 0
            out.append(exc)
            return out
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def take_continue(self) -> bool:
        """True once if the current request sent ``Expect: 100-continue`` and its body is awaited."""
        wanted = self._continue
        self._continue = False
        return wanted

    # Readers: consume from _buf at _pos; return True to run the next reader,
    # False when more bytes are needed.

    def _read_head(self, out: list[RawRequest | HttpError]) -> bool:
        buf = self._buf
        while buf.startswith(b"\r\n", self._pos):  # RFC 9112 2.2: ignore leading empty lines
            self._pos += 2
        end = buf.find(b"\r\n\r\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > MAX_HEAD:
                raise HttpError(431, "request head too large")
            return False
        if end - self._pos > MAX_HEAD:
            raise HttpError(431, "request head too large")
        text = buf[self._pos : end + 2].decode("latin-1")
        parsed = self._heads.get(text)
        if parsed is None:
            parsed = _parse_head(text)
            if len(self._heads) >= _HEAD_CACHE:
                self._heads.clear()
            self._heads[text] = parsed
        req = RawRequest(
            parsed.method, parsed.path, parsed.version, dict(parsed.headers), b"", parsed.keep_alive, parsed.mocked
        )
        self._pos = end + 4
        headers = req.headers
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise HttpError(400, "both Content-Length and Transfer-Encoding")
            if te.strip().lower() != "chunked":
                raise HttpError(501, f"unsupported Transfer-Encoding {te!r}")
            self._state = _P.CHUNK_SIZE
        elif cl is not None and cl != "0":
            if not (cl.isascii() and cl.isdigit()):
                raise HttpError(400, "invalid Content-Length")
            size = int(cl)
            if size > MAX_BODY:
                raise HttpError(413, "request body too large")
            if len(buf) - self._pos >= size:  # common case: the body came with the head
                start = self._pos
                self._pos += size
                req.body = bytes(buf[start : self._pos])
            else:
                self._left = size
                self._state = _P.BODY
        if self._state is _P.HEAD:
            out.append(req)
            return True
        self._head = req
        self._continue = headers.get("expect", "").lower() == "100-continue"
        return True

    def _read_body(self, out: list[RawRequest | HttpError]) -> bool:
        start = self._pos
        if len(self._buf) - start < self._left:
            return False
        self._pos = start + self._left
        self._finish(out, bytes(self._buf[start : self._pos]))
        return True

    def _read_chunk_size(self, out: list[RawRequest | HttpError]) -> bool:
        buf = self._buf
        idx = buf.find(b"\r\n", self._pos)
        if idx < 0:
            if len(buf) - self._pos > _MAX_CHUNK_LINE:
                raise HttpError(400, "chunk size line too long")
            return False
        digits = bytes(buf[self._pos : idx]).split(b";", 1)[0].strip(b" \t")
        if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
            raise HttpError(400, "invalid chunk size")
        size = int(digits, 16)
        self._pos = idx + 2
        if size == 0:
            self._state = _P.TRAILERS
        elif len(self._body) + size > MAX_BODY:
            raise HttpError(413, "request body too large")
        else:
            self._left = size
            self._state = _P.CHUNK_DATA
        return True

    def _read_chunk_data(self, out: list[RawRequest | HttpError]) -> bool:
        take = min(len(self._buf) - self._pos, self._left)
        self._body += self._buf[self._pos : self._pos + take]
        self._pos += take
        self._left -= take
        if self._left:
            return False
        self._state = _P.CHUNK_CRLF
        return True

    def _read_chunk_crlf(self, out: list[RawRequest | HttpError]) -> bool:
        if len(self._buf) - self._pos < 2:
            return False
        if not self._buf.startswith(b"\r\n", self._pos):
            raise HttpError(400, "chunk data not followed by CRLF")
        self._pos += 2
        self._state = _P.CHUNK_SIZE
        return True

    def _read_trailers(self, out: list[RawRequest | HttpError]) -> bool:
        idx = self._buf.find(b"\r\n", self._pos)
        if idx < 0:
            if len(self._buf) - self._pos > MAX_HEAD:
                raise HttpError(431, "trailer section too large")
            return False
        blank = idx == self._pos
        self._pos = idx + 2  # trailer fields are read and ignored
        if blank:
            body = bytes(self._body)
            self._body.clear()
            self._finish(out, body)
        return True

    def _read_dead(self, out: list[RawRequest | HttpError]) -> bool:
        return False

    def _finish(self, out: list[RawRequest | HttpError], body: bytes) -> None:
        req = self._head
        assert req is not None
        req.body = body
        out.append(req)
        self._head = None
        self._continue = False
        self._state = _P.HEAD


_READERS: Final[dict[_P, Callable[[RequestParser, list[RawRequest | HttpError]], bool]]] = {
    _P.HEAD: RequestParser._read_head,
    _P.BODY: RequestParser._read_body,
    _P.CHUNK_SIZE: RequestParser._read_chunk_size,
    _P.CHUNK_DATA: RequestParser._read_chunk_data,
    _P.CHUNK_CRLF: RequestParser._read_chunk_crlf,
    _P.TRAILERS: RequestParser._read_trailers,
    _P.DEAD: RequestParser._read_dead,
}


def _parse_head(text: str) -> RawRequest:
    """Parse a request head: request line and header fields, each ending in CRLF."""
    eol = text.find("\r\n")
    fields = text[eol + 2 :]
    parts = text[:eol].split(" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, proto = parts
    if proto == "HTTP/1.1":
        version = 11
    elif proto == "HTTP/1.0":
        version = 10
    elif proto.startswith("HTTP/"):
        raise HttpError(505, f"unsupported HTTP version {proto!r}")
    else:
        raise HttpError(400, "malformed request line")
    if not _FIELDS_RE.fullmatch(fields):
        raise HttpError(400, "malformed header field")
    pairs = _FIELD_RE.findall(fields)
    headers = {name.lower(): value for name, value in pairs}
    if len(headers) != len(pairs):  # repeated fields: join their values in order
        headers = {}
        for name, value in pairs:
            name = name.lower()
            old = headers.get(name)
            headers[name] = value if old is None else f"{old}, {value}"
    conn = headers.get("connection")
    if conn is None:
        keep_alive = version == 11
    else:
        tokens = {t.strip().lower() for t in conn.split(",")}
        keep_alive = "close" not in tokens and (version == 11 or "keep-alive" in tokens)
    if target.startswith(("http://", "https://")):  # absolute-form
        slash = target.find("/", target.index("//") + 2)
        target = target[slash:] if slash >= 0 else "/"
    mocked = "x-mock-" in fields.lower()
    return RawRequest(method, target.partition("?")[0], version, headers, b"", keep_alive, mocked)
