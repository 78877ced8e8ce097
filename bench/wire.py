"""HTTP/1.1 on the wire for the bench clients: request bytes and a response framer.

The benchmark requests are built once as raw bytes (so wrk and the Python
generator send exactly the same thing) and the replies are framed by
:class:`ResponseParser`, a small incremental parser that knows just enough
HTTP/1.1 for a keep-alive client: the status line, ``content-length``,
``transfer-encoding: chunked`` (with optional trailers) and close-delimited
bodies. It deliberately shares no code with the proxy or the mock.

The chat request body is about 300 bytes, the size of a short real chat
completion request (system prompt, one user turn, a few parameters).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from urllib.parse import urlsplit

import orjson

__all__ = [
    "MAX_HEAD",
    "Endpoint",
    "ProtocolError",
    "ResponseParser",
    "build_request",
    "chat_body",
    "parse_url",
]

# A response head larger than this is garbage for a bench client (h11: 16 KiB).
MAX_HEAD = 64 * 1024

_SYSTEM = "You are a concise assistant. Answer in plain English and keep it short."
_USER = "Summarise the plot of Hamlet in two sentences for a reader who has never seen or read the play."


def chat_body(model: str, stream: bool) -> bytes:
    """The bench's chat completion request body (~300 bytes)."""
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}],
        "temperature": 0.2,
        "max_tokens": 256,
        "user": "bench-user-0001",
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


class Endpoint:
    """Where requests go: host, port and path of an ``http://`` URL."""

    __slots__ = ("host", "path", "port")

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = host
        self.port = port
        self.path = path

    def __repr__(self) -> str:
        return f"Endpoint(http://{self.host}:{self.port}{self.path})"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


def parse_url(url: str, default_path: str = "/v1/chat/completions") -> Endpoint:
    """Parse an ``http://host:port[/path]`` URL; an empty path becomes ``default_path``."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: only http://host:port[/path] URLs are supported")
    path = parts.path if parts.path not in ("", "/") else default_path
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.hostname, parts.port or 80, path)


#: The API key every bench request carries (``authorization: Bearer``), as real clients do; the
#: ``limits`` config declares it as a virtual key. A ``--header authorization: ...`` replaces it.
CLIENT_KEY = "sk-bench-client-key-0123456789abcdef"

#: The fields the official openai Python SDK sends with a chat completion (besides host,
#: content-type, content-length and its API key), for ``--sdk-headers`` traffic.
SDK_HEADERS: tuple[tuple[str, str], ...] = (
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("user-agent", "OpenAI/Python 1.54.0"),
    ("x-stainless-lang", "python"),
    ("x-stainless-package-version", "1.54.0"),
    ("x-stainless-os", "Linux"),
    ("x-stainless-arch", "x64"),
    ("x-stainless-runtime", "CPython"),
    ("x-stainless-runtime-version", "3.11.7"),
    ("authorization", f"Bearer {CLIENT_KEY}"),
    ("x-stainless-async", "false"),
    ("x-stainless-retry-count", "0"),
    ("x-stainless-read-timeout", "600"),
)


def build_request(endpoint: Endpoint, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete keep-alive ``POST`` with a JSON body and the bench's client key (unless
    ``headers`` carry an ``authorization`` of their own)."""
    lines = [
        f"POST {endpoint.path} HTTP/1.1",
        f"host: {endpoint.host}:{endpoint.port}",
        "content-type: application/json",
        "accept: application/json, text/event-stream",
        f"content-length: {len(body)}",
    ]
    if not any(name.lower() == "authorization" for name, _ in headers):
        lines.append(f"authorization: Bearer {CLIENT_KEY}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ProtocolError(Exception):
    """The server sent something this client cannot frame."""


class _S(enum.Enum):
    HEAD = enum.auto()
    LENGTH = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_CRLF = enum.auto()
    TRAILERS = enum.auto()
    UNTIL_CLOSE = enum.auto()
    DONE = enum.auto()


class ResponseParser:
    """Incremental framer for one response at a time on a keep-alive connection.

    :meth:`feed` returns True once the response is complete; then
    ``status``, ``keep_alive`` and (with ``keep_body``) ``body`` are set and
    :meth:`reset` prepares for the next response. Raises
    :class:`ProtocolError` on framing it does not understand.
    """

    __slots__ = ("_buf", "_remaining", "_state", "body", "body_bytes", "keep_alive", "keep_body", "status")

    def __init__(self, keep_body: bool = False) -> None:
        self.keep_body = keep_body
        self._buf = bytearray()
        self.reset()

    def reset(self) -> None:
        """Forget the last response (bytes already buffered are kept)."""
        self._state = _S.HEAD
        self._remaining = 0
        self.status = 0
        self.keep_alive = True
        self.body = bytearray()
        self.body_bytes = 0

    @property
    def done(self) -> bool:
        return self._state is _S.DONE

    def _take_body(self, n: int) -> None:
        if self.keep_body:
            self.body += self._buf[:n]
        self.body_bytes += n
        del self._buf[:n]

    def eof(self) -> bool:
        """The peer closed: True if that completes a close-delimited body."""
        if self._state is _S.UNTIL_CLOSE:
            self._take_body(len(self._buf))
            self._state = _S.DONE
            self.keep_alive = False
            return True
        return self._state is _S.DONE

    def feed(self, data: bytes) -> bool:
        """Add received bytes; True once the current response is complete."""
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state is _S.HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ProtocolError("response head too large")
                    return False
                self._head(bytes(buf[:end]))
                del buf[: end + 4]
            elif state is _S.LENGTH:
                n = min(self._remaining, len(buf))
                self._take_body(n)
                self._remaining -= n
                if self._remaining:
                    return False
                self._state = _S.DONE
            elif state is _S.CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    return False
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line {bytes(buf[:end])[:40]!r}") from None
                del buf[: end + 2]
                self._remaining = size
                self._state = _S.CHUNK_DATA if size else _S.TRAILERS
            elif state is _S.CHUNK_DATA:
                n = min(self._remaining, len(buf))
                self._take_body(n)
                self._remaining -= n
                if self._remaining:
                    return False
                self._state = _S.CHUNK_CRLF
            elif state is _S.CHUNK_CRLF:
                if len(buf) < 2:
                    return False
                if buf[:2] != b"\r\n":
                    raise ProtocolError("missing CRLF after chunk data")
                del buf[:2]
                self._state = _S.CHUNK_SIZE
            elif state is _S.TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                del buf[: end + 2]
                if end == 0:
                    self._state = _S.DONE
            elif state is _S.UNTIL_CLOSE:
                self._take_body(len(buf))
                return False
            else:  # DONE
                return True

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
            raise ProtocolError(f"bad status line {status_line[:60]!r}")
        status = int(status_line[9:12])
        http10 = status_line.startswith(b"HTTP/1.0")
        length: int | None = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                connection = value.strip().lower()
        if 100 <= status < 200:  # interim response: the real one follows
            return
        self.status = status
        self.keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
        if status in (204, 304):
            self._state = _S.DONE
        elif chunked:
            self._state = _S.CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _S.LENGTH if length else _S.DONE
        else:
            self.keep_alive = False
            self._state = _S.UNTIL_CLOSE
