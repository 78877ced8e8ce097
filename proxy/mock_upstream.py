"""A fast, offline, fake LLM provider speaking the OpenAI and Anthropic wire formats.

Used by the quickstart, the tests and the benchmarks, so it must never be the
bottleneck of a benchmark: it is a raw :class:`asyncio.Protocol` (run on uvloop
by :func:`serve_mock`) with a small hand-rolled HTTP/1.1 request parser, and
it caches the response bytes it can. It deliberately shares no code with the
proxy's own HTTP layer, so the two cannot hide the same framing bug.

Theory of operation
-------------------
::

    MockServer      1 per listening socket: MockConfig, request log,
     │              per-key fault counters, id counter, route tables
     └─ _Connection N, one per socket: _RequestParser, FIFO of parsed
         │          requests, flow control, a _State
         └─ one exchange at a time: _Plan -> handler -> _Delivery,
                    written at once or by one pacing task

* :class:`_RequestParser` turns bytes into ``_RawRequest`` objects. Its
  readers are chosen from ``_READERS`` by parser state. A framing error is
  queued after the requests that preceded it, answered with 400/413/431/501
  and the connection is closed.
* Pipelined requests are parsed ahead and answered strictly in order: the
  next request starts only when the previous reply is fully written. At most
  ``_QUEUE_HIGH`` parsed requests wait; past that the socket stops being
  read, and no new reply starts while the transport's write buffer is full.
* A provider request is recorded in :attr:`MockServer.requests` first, then a
  :class:`_Plan` decides its pacing and its fault, then the handler from
  ``_ROUTES`` builds a ``_Whole`` reply or a ``_Stream`` of SSE events split
  into *preamble* (role chunk / ``message_start`` ...), *content* (one event
  per token or tool-call fragment) and *tail* (finish, usage, ``[DONE]``).
* :meth:`MockServer.respond` (through ``_whole``/``_stream``) turns reply,
  plan and fault into a ``_Delivery``: a list of ``(delay, bytes)`` writes
  and an ending. Unpaced deliveries are written synchronously inside
  ``data_received`` with one ``transport.write``; paced ones run in one task
  per exchange, cancelled when the client goes away or the server closes.

Timing: stream headers and preamble go out at once; the first content event
after ``ttft``, each next one ``itl`` later; the tail with the last content
event. A non-streaming reply is sent whole when the last token would have
been streamed: after ``ttft + itl * (tokens - 1)``.

Faults
------
Chosen per request. Precedence: ``x-mock-status``/``x-mock-fault`` request
headers, then ``require_key`` (401), then the :class:`KeyBehaviour` of the
request's API key. A fault wins over a status when both are given.

=============  ===============================================================
``status``     that status with an error envelope (OpenAI form, or Anthropic
               form on ``/v1/messages``) and ``retry-after`` when given.
``reset``      no response byte: the socket is closed with SO_LINGER 0, so
               the client sees a TCP reset.
``stall``      stream: headers, preamble and ``stall_after`` content events,
               then silence with the connection left open. Non-stream:
               nothing at all is sent.
``drop``       stream: headers, preamble and ``stall_after`` content events,
               then the connection is closed mid-body (0 dies before the first
               content delta). Non-stream: headers and half the body, then
               closed.
``malformed``  200 with a body that is not JSON; in a stream the first
               content event is replaced by a ``data:`` line of broken JSON
               and the stream then ends normally.
=============  ===============================================================

Request headers (all optional): ``x-mock-status``, ``x-mock-retry-after``
(seconds), ``x-mock-fault``, ``x-mock-stall-after`` (content events, default
2), ``x-mock-tokens``, ``x-mock-ttft-ms``, ``x-mock-itl-ms`` and
``x-mock-tool-calls`` (N parallel tool calls when the request has ``tools``).
A bad value is answered with 400 naming the header.

Control endpoints, neither recorded nor faulted: ``GET /_mock/requests``
(the log as JSON), ``DELETE /_mock/requests`` (clear it), ``GET
/_mock/health``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import functools
import itertools
import re
import secrets
import signal
import socket
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final, cast

import orjson

__all__ = [
    "FAULTS",
    "KeyBehaviour",
    "MockConfig",
    "MockServer",
    "ReceivedRequest",
    "mock_config_from_dict",
    "serve_mock",
    "start_mock",
]

FAULTS: Final = frozenset({"reset", "stall", "malformed", "drop"})

# Limits. Request head: h11 16 KiB, node.js 16 KiB, tomcat 8 KiB; SDK requests
# carry about 1 KiB, so 64 KiB only refuses garbage. Body: Anthropic's
# Messages API accepts 32 MB, the largest of the providers mocked here.
MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 32 * 1024 * 1024
_MAX_CHUNK_LINE: Final = 1024
# The request log keeps at most MAX_LOG entries; it is trimmed to
# _LOG_TRIM_TO in one go so that appending stays O(1) amortised.
MAX_LOG: Final = 10_000
_LOG_TRIM_TO: Final = 9_000
# Pipelining back-pressure: stop reading past _QUEUE_HIGH parsed requests
# waiting, resume at _QUEUE_LOW.
_QUEUE_HIGH: Final = 64
_QUEUE_LOW: Final = 16
# Parsed request heads are cached by their text (benchmarks and SDKs repeat
# the same head); the cache is cleared when it reaches this many entries.
_HEAD_CACHE: Final = 512
# Caps on the per-request overrides, so a typo cannot exhaust memory.
_MAX_TOKENS: Final = 100_000
_MAX_TOOL_CALLS: Final = 128
_DEFAULT_STALL_AFTER: Final = 2

_MODELS: Final = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "text-embedding-3-small")
_VOCAB: Final = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
)  # fmt: skip
_WORD_JSON: Final = tuple(orjson.dumps(w + " ") for w in _VOCAB)
_JSON_DELTA: Final = b'{"type":"content_block_delta","index":%d,"delta":{"type":"input_json_delta","partial_json":%b}}'
_EMBEDDING_DIM: Final = 8


# --------------------------------------------------------------------------
# Public configuration and records
# --------------------------------------------------------------------------


@dataclass
class KeyBehaviour:
    """Fault behaviour bound to one API key.

    ``status`` answers that status (400-599) with an error envelope, plus a
    ``retry-after`` header when ``retry_after`` is set. ``fault`` is one of
    :data:`FAULTS` and wins over ``status``. ``times`` limits the fault to the
    first N requests carrying the key; later ones are served normally
    ("fails 500 N times then recovers"). A behaviour with neither ``status``
    nor ``fault`` only makes the key known (it passes ``require_key``).
    Raises ``ValueError`` on out-of-range values.
    """

    status: int | None = None
    retry_after: float | None = None
    times: int | None = None
    fault: str | None = None

    def __post_init__(self) -> None:
        _check_behaviour("KeyBehaviour", self.status, self.retry_after, self.times, self.fault)


@dataclass
class MockConfig:
    """Server-wide behaviour of the mock.

    ``tokens`` content words per reply, ``ttft``/``itl`` pacing in seconds
    (see the module docstring, "Timing"). ``keys`` binds faults to API keys.
    ``provider_headers`` makes reply heads as long as a hosted provider's.
    With ``require_key`` a request whose credential is in neither ``keys`` nor
    ``valid_keys`` gets 401. Replies echo the requested model, prefixed by
    ``model_prefix`` (empty by default: a plain echo); no model is required.
    Raises ``ValueError`` on negative numbers.
    """

    tokens: int = 16
    ttft: float = 0.0
    itl: float = 0.0
    keys: dict[str, KeyBehaviour] = field(default_factory=dict)
    require_key: bool = False
    valid_keys: set[str] = field(default_factory=set)
    model_prefix: str = ""
    #: Add the informational fields a hosted provider sends (request id, rate
    #: limits, CDN fields: ~20 in all) to every reply head, so that a proxy in
    #: front pays for reading them as it does in production.
    provider_headers: bool = False

    def __post_init__(self) -> None:
        _want_int("tokens", self.tokens, 0, _MAX_TOKENS)
        _want_number("ttft", self.ttft)
        _want_number("itl", self.itl)


@dataclass(slots=True)
class ReceivedRequest:
    """One provider request as the mock received it (control endpoints excluded).

    ``headers`` maps lowercased names to values (repeated fields joined by
    ``", "``). ``credential`` is ``authorization`` without its ``Bearer``
    scheme, else ``x-api-key``, else ``api-key``. ``body`` is the parsed JSON
    object, or ``None`` when absent, invalid or not an object.
    """

    method: str
    path: str
    headers: dict[str, str]
    model: str | None
    credential: str | None
    stream: bool
    body: dict[str, Any] | None


def mock_config_from_dict(d: Mapping[str, Any]) -> MockConfig:
    """Build a :class:`MockConfig` from a YAML mapping.

    Accepted fields: ``tokens``, ``ttft``, ``itl``, ``require_key``,
    ``provider_headers``, ``valid_keys`` (list of strings), ``model_prefix`` and ``keys`` (mapping
    of API key to ``{status, retry_after, times, fault}``). Every field is
    optional. Raises ``ValueError`` naming the bad field (``keys.<key>.times``
    for a nested one) on an unknown field, a wrong type or a bad value.
    """
    if not isinstance(d, Mapping):
        raise ValueError("mock config: expected a mapping")
    known = {"tokens", "ttft", "itl", "keys", "require_key", "provider_headers", "valid_keys", "model_prefix"}
    for name in d:
        if name not in known:
            raise ValueError(f"{name}: unknown mock config field (expected one of {sorted(known)})")
    cfg = MockConfig()
    if "tokens" in d:
        cfg.tokens = _want_int("tokens", d["tokens"], 0, _MAX_TOKENS)
    if "ttft" in d:
        cfg.ttft = _want_number("ttft", d["ttft"])
    if "itl" in d:
        cfg.itl = _want_number("itl", d["itl"])
    if "require_key" in d:
        if not isinstance(d["require_key"], bool):
            raise ValueError("require_key: expected true or false")
        cfg.require_key = d["require_key"]
    if "provider_headers" in d:
        if not isinstance(d["provider_headers"], bool):
            raise ValueError("provider_headers: expected true or false")
        cfg.provider_headers = d["provider_headers"]
    if "model_prefix" in d:
        if not isinstance(d["model_prefix"], str):
            raise ValueError("model_prefix: expected a string")
        cfg.model_prefix = d["model_prefix"]
    if "valid_keys" in d:
        keys = d["valid_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("valid_keys: expected a list of non-empty strings")
        cfg.valid_keys = set(keys)
    if "keys" in d:
        cfg.keys = _behaviours_from_dict(d["keys"])
    return cfg


def _behaviours_from_dict(raw: object) -> dict[str, KeyBehaviour]:
    """Parse the ``keys`` mapping of a mock config; raise ``ValueError`` naming the field."""
    if not isinstance(raw, Mapping):
        raise ValueError("keys: expected a mapping of API key to behaviour")
    fields = {"status", "retry_after", "times", "fault"}
    out: dict[str, KeyBehaviour] = {}
    for key, spec in raw.items():
        where = f"keys.{key}"
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: API keys must be non-empty strings")
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with {sorted(fields)}")
        for name in spec:
            if name not in fields:
                raise ValueError(f"{where}.{name}: unknown field (expected one of {sorted(fields)})")
        status, retry_after, times, fault = (spec.get(name) for name in ("status", "retry_after", "times", "fault"))
        _check_behaviour(where, status, retry_after, times, fault)
        out[key] = KeyBehaviour(status, None if retry_after is None else float(retry_after), times, fault)
    return out


def _check_behaviour(where: str, status: object, retry_after: object, times: object, fault: object) -> None:
    """Raise ``ValueError`` naming ``where.<field>`` if a key behaviour field holds a bad value."""
    if status is not None:
        _want_int(f"{where}.status", status, 400, 599)
    if retry_after is not None:
        _want_number(f"{where}.retry_after", retry_after)
    if times is not None:
        _want_int(f"{where}.times", times, 0)
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"{where}.fault: expected one of {sorted(FAULTS)}, got {fault!r}")


def _want_int(where: str, value: object, lo: int, hi: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[lo, hi]``; else raise ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{where}: expected an integer {bound}, got {value!r}")
    return value


def _want_number(where: str, value: object) -> float:
    """Return ``value`` as a float if it is a number >= 0; else raise ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------
# HTTP/1.1 request parsing
# --------------------------------------------------------------------------


class _HttpError(Exception):
    """A framing error: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _RawRequest:
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


class _RequestParser:
    """Incremental server-side HTTP/1.1 request parser.

    :meth:`feed` returns the requests its bytes completed, in order. A framing
    error is returned as an :class:`_HttpError` after the requests that came
    before it, and the parser then ignores all input (the connection answers
    the error and closes). Supported: request line, headers (names
    lowercased, repeats joined by ``", "``), ``Content-Length`` and chunked
    bodies (extensions and trailers ignored). Refused: obs-fold, whitespace
    before a colon, ``Content-Length`` together with ``Transfer-Encoding``
    (400), codings other than ``chunked`` (501), versions other than 1.0 and
    1.1 (505), heads over ``MAX_HEAD`` (431), bodies over ``MAX_BODY`` (413).
    """

    __slots__ = ("_body", "_buf", "_continue", "_head", "_heads", "_left", "_pos", "_state")

    def __init__(self, head_cache: dict[str, _RawRequest] | None = None) -> None:
        self._heads = head_cache if head_cache is not None else {}  # head text -> parsed template
        self._buf = bytearray()
        self._pos = 0  # consumed prefix of _buf, compacted at the end of feed()
        self._state = _P.HEAD
        self._head: _RawRequest | None = None  # the request whose body is being read
        self._body = bytearray()  # chunked body so far
        self._left = 0  # bytes still expected in BODY or CHUNK_DATA
        self._continue = False

    def feed(self, data: bytes) -> list[_RawRequest | _HttpError]:
        """Add ``data``; return the requests (or the error) it completed."""
        out: list[_RawRequest | _HttpError] = []
        if self._state is _P.DEAD:
            return out
        self._buf += data
        try:
            while _READERS[self._state](self, out):
                pass
        except _HttpError as exc:
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

    def _read_head(self, out: list[_RawRequest | _HttpError]) -> bool:
        buf = self._buf
        while buf.startswith(b"\r\n", self._pos):  # RFC 9112 2.2: ignore leading empty lines
            self._pos += 2
        end = buf.find(b"\r\n\r\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > MAX_HEAD:
                raise _HttpError(431, "request head too large")
            return False
        if end - self._pos > MAX_HEAD:
            raise _HttpError(431, "request head too large")
        text = buf[self._pos : end + 2].decode("latin-1")
        parsed = self._heads.get(text)
        if parsed is None:
            parsed = _parse_head(text)
            if len(self._heads) >= _HEAD_CACHE:
                self._heads.clear()
            self._heads[text] = parsed
        req = _RawRequest(
            parsed.method, parsed.path, parsed.version, dict(parsed.headers), b"", parsed.keep_alive, parsed.mocked
        )
        self._pos = end + 4
        headers = req.headers
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise _HttpError(400, "both Content-Length and Transfer-Encoding")
            if te.strip().lower() != "chunked":
                raise _HttpError(501, f"unsupported Transfer-Encoding {te!r}")
            self._state = _P.CHUNK_SIZE
        elif cl is not None and cl != "0":
            if not (cl.isascii() and cl.isdigit()):
                raise _HttpError(400, "invalid Content-Length")
            size = int(cl)
            if size > MAX_BODY:
                raise _HttpError(413, "request body too large")
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

    def _read_body(self, out: list[_RawRequest | _HttpError]) -> bool:
        start = self._pos
        if len(self._buf) - start < self._left:
            return False
        self._pos = start + self._left
        self._finish(out, bytes(self._buf[start : self._pos]))
        return True

    def _read_chunk_size(self, out: list[_RawRequest | _HttpError]) -> bool:
        buf = self._buf
        idx = buf.find(b"\r\n", self._pos)
        if idx < 0:
            if len(buf) - self._pos > _MAX_CHUNK_LINE:
                raise _HttpError(400, "chunk size line too long")
            return False
        digits = bytes(buf[self._pos : idx]).split(b";", 1)[0].strip(b" \t")
        if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
            raise _HttpError(400, "invalid chunk size")
        size = int(digits, 16)
        self._pos = idx + 2
        if size == 0:
            self._state = _P.TRAILERS
        elif len(self._body) + size > MAX_BODY:
            raise _HttpError(413, "request body too large")
        else:
            self._left = size
            self._state = _P.CHUNK_DATA
        return True

    def _read_chunk_data(self, out: list[_RawRequest | _HttpError]) -> bool:
        take = min(len(self._buf) - self._pos, self._left)
        self._body += self._buf[self._pos : self._pos + take]
        self._pos += take
        self._left -= take
        if self._left:
            return False
        self._state = _P.CHUNK_CRLF
        return True

    def _read_chunk_crlf(self, out: list[_RawRequest | _HttpError]) -> bool:
        if len(self._buf) - self._pos < 2:
            return False
        if not self._buf.startswith(b"\r\n", self._pos):
            raise _HttpError(400, "chunk data not followed by CRLF")
        self._pos += 2
        self._state = _P.CHUNK_SIZE
        return True

    def _read_trailers(self, out: list[_RawRequest | _HttpError]) -> bool:
        idx = self._buf.find(b"\r\n", self._pos)
        if idx < 0:
            if len(self._buf) - self._pos > MAX_HEAD:
                raise _HttpError(431, "trailer section too large")
            return False
        blank = idx == self._pos
        self._pos = idx + 2  # trailer fields are read and ignored
        if blank:
            body = bytes(self._body)
            self._body.clear()
            self._finish(out, body)
        return True

    def _read_dead(self, out: list[_RawRequest | _HttpError]) -> bool:
        return False

    def _finish(self, out: list[_RawRequest | _HttpError], body: bytes) -> None:
        req = self._head
        assert req is not None
        req.body = body
        out.append(req)
        self._head = None
        self._continue = False
        self._state = _P.HEAD


_READERS: Final[dict[_P, Callable[[_RequestParser, list[_RawRequest | _HttpError]], bool]]] = {
    _P.HEAD: _RequestParser._read_head,
    _P.BODY: _RequestParser._read_body,
    _P.CHUNK_SIZE: _RequestParser._read_chunk_size,
    _P.CHUNK_DATA: _RequestParser._read_chunk_data,
    _P.CHUNK_CRLF: _RequestParser._read_chunk_crlf,
    _P.TRAILERS: _RequestParser._read_trailers,
    _P.DEAD: _RequestParser._read_dead,
}


def _parse_head(text: str) -> _RawRequest:
    """Parse a request head: request line and header fields, each ending in CRLF."""
    eol = text.find("\r\n")
    fields = text[eol + 2 :]
    parts = text[:eol].split(" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
        raise _HttpError(400, "malformed request line")
    method, target, proto = parts
    if proto == "HTTP/1.1":
        version = 11
    elif proto == "HTTP/1.0":
        version = 10
    elif proto.startswith("HTTP/"):
        raise _HttpError(505, f"unsupported HTTP version {proto!r}")
    else:
        raise _HttpError(400, "malformed request line")
    if not _FIELDS_RE.fullmatch(fields):
        raise _HttpError(400, "malformed header field")
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
    return _RawRequest(method, target.partition("?")[0], version, headers, b"", keep_alive, mocked)


# --------------------------------------------------------------------------
# Replies, plans and error envelopes
# --------------------------------------------------------------------------


class _Flavour(enum.Enum):
    """Which provider's error envelope a route answers with."""

    OPENAI = enum.auto()
    ANTHROPIC = enum.auto()


class _End(enum.Enum):
    """How a delivery ends once its writes are done."""

    COMPLETE = enum.auto()  # reply finished; keep-alive or close per request
    STALL = enum.auto()  # send nothing more, keep the connection open
    DROP = enum.auto()  # close the connection (FIN) mid-reply
    RESET = enum.auto()  # abort with SO_LINGER 0 (RST)


@dataclass(slots=True)
class _Whole:
    """A complete non-streaming reply. ``steps`` is the number of generation
    steps it stands for (tokens), used for pacing."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    extra_headers: bytes = b""  # preformatted "name: value\r\n" lines
    steps: int = 0


@dataclass(slots=True)
class _Stream:
    """A streaming reply as whole SSE events (each ending in a blank line)."""

    preamble: list[bytes]
    content: list[bytes]
    tail: list[bytes]


@dataclass(slots=True)
class _Delivery:
    """What a connection writes for one exchange: ``(delay, bytes)`` writes in order, then ``end``."""

    writes: list[tuple[float, bytes]]
    end: _End
    keep_alive: bool


@dataclass(slots=True)
class _Plan:
    """Per-request pacing and fault, resolved from headers, auth and key behaviours."""

    tokens: int
    ttft: float
    itl: float
    tool_calls: int = 0
    stall_after: int = _DEFAULT_STALL_AFTER
    status: int | None = None
    retry_after: float | None = None
    fault: str | None = None
    reason: str = ""


@dataclass(slots=True)
class _Call:
    """What a provider handler needs: the parsed body and the plan's content knobs."""

    server: MockServer
    body: dict[str, Any]
    model: str  # echoed model name (model_prefix applied)
    model_json: bytes
    stream: bool
    tokens: int
    tool_calls: int


# status -> (OpenAI type, OpenAI code); others fall back by class (4xx/5xx).
_OPENAI_KINDS: Final[dict[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}
_ANTHROPIC_KINDS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_BROKEN_JSON: Final = b'{"id": "mock-malformed", "object": "chat.completion", "choices": [{"mess'
_BROKEN_EVENT: Final[dict[_Flavour, bytes]] = {
    _Flavour.OPENAI: b'data: {"id":"mock-malformed","object":"chat.completion.chunk","choices":[{"delta":{"cont\n\n',
    _Flavour.ANTHROPIC: (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_de\n\n'
    ),
}


def _error_body(flavour: _Flavour, status: int, message: str) -> bytes:
    """The error envelope for ``status`` in the provider form ``flavour``."""
    if flavour is _Flavour.ANTHROPIC:
        kind = _ANTHROPIC_KINDS.get(status, "invalid_request_error" if status < 500 else "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    etype, code = _OPENAI_KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


def _error(flavour: _Flavour, status: int, message: str, retry_after: float | None = None) -> _Whole:
    """An error reply, with ``retry-after`` (integral seconds printed without a fraction) if given."""
    extra = b""
    if retry_after is not None:
        text = str(int(retry_after)) if retry_after == int(retry_after) else repr(retry_after)
        extra = b"retry-after: %b\r\n" % text.encode()
    return _Whole(status, _error_body(flavour, status, message), extra_headers=extra)


class _BadHeader(Exception):
    """An ``x-mock-*`` header with a bad value; answered with 400."""


def _header_int(headers: dict[str, str], name: str, lo: int, hi: int) -> int | None:
    """The integer value of header ``name`` in ``[lo, hi]``, None if absent; raise ``_BadHeader``."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise _BadHeader(f"{name} must be an integer in {lo}..{hi}, got {raw!r}")
    return value


def _header_float(headers: dict[str, str], name: str) -> float | None:
    """The non-negative number in header ``name``, None if absent; raise ``_BadHeader``."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise _BadHeader(f"{name} must be a non-negative number, got {raw!r}")
    return value


def _credential(headers: dict[str, str]) -> str | None:
    """The API key a request carries (``authorization`` Bearer, ``x-api-key``, ``api-key``)."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, rest = auth.partition(" ")
        return rest.strip() if scheme.lower() == "bearer" else auth
    key = headers.get("x-api-key")
    return key if key is not None else headers.get("api-key")


# --------------------------------------------------------------------------
# Content helpers (pure, cached)
# --------------------------------------------------------------------------

_TEXT_KEYS: Final = frozenset({"messages", "content", "text", "system", "prompt", "input", "instructions"})


def _chars(node: object) -> int:
    """Characters of prompt text under ``node`` (integers in token arrays count as 4)."""
    kind = type(node)
    if kind is str:
        return len(node)  # type: ignore[arg-type]
    total = 0
    if kind is list:
        for item in node:  # type: ignore[attr-defined]
            total += len(item) if type(item) is str else _chars(item)
    elif kind is dict:
        for key, value in node.items():  # type: ignore[attr-defined]
            if key in _TEXT_KEYS:
                total += len(value) if type(value) is str else _chars(value)
    elif kind is int:
        total = 4
    return total


def _prompt_tokens(node: object) -> int:
    """Deterministic, cheap prompt token count: characters // 4, at least 1."""
    return max(1, _chars(node) // 4)


@functools.lru_cache(maxsize=128)
def _text(n: int) -> str:
    """The reply text of ``n`` tokens: vocabulary words, each followed by a space."""
    return "".join(f"{_VOCAB[i % len(_VOCAB)]} " for i in range(n))


@functools.lru_cache(maxsize=256)
def _chat_choices(n: int, finish: str) -> bytes:
    """The cached ``choices`` array of a non-streaming text chat completion."""
    message: dict[str, object] = {"role": "assistant", "content": _text(n), "refusal": None, "annotations": []}
    return orjson.dumps([{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}])


def _tool_args(i: int) -> str:
    """The JSON arguments of tool call ``i`` (0-based)."""
    return orjson.dumps({"q": f"call {i}", "n": i}).decode()


def _split3(text: str) -> list[str]:
    """``text`` in (up to) three consecutive fragments, as a model streams arguments."""
    step = max(1, -(-len(text) // 3))
    return [text[i : i + step] for i in range(0, len(text), step)]


def _tool_names(body: dict[str, Any]) -> list[str]:
    """Names of the request's tools, OpenAI (``function.name``) or Anthropic (``name``) form."""
    names: list[str] = []
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                fn = tool.get("function")
                name = fn.get("name") if isinstance(fn, dict) else tool.get("name")
                if isinstance(name, str):
                    names.append(name)
    return names


def _tool_plan(call: _Call) -> list[tuple[str, str]]:
    """``(name, arguments)`` of the tool calls to make: empty unless asked and tools exist."""
    if not call.tool_calls:
        return []
    names = _tool_names(call.body)
    if not names:
        return []
    return [(names[i % len(names)], _tool_args(i)) for i in range(call.tool_calls)]


def _budget(call: _Call, *limit_fields: str) -> tuple[int, bool]:
    """Tokens to produce and whether the request's max-tokens limit cut them short."""
    for name in limit_fields:
        limit = call.body.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            return (limit, True) if limit < call.tokens else (call.tokens, False)
    return call.tokens, False


def _include_usage(body: dict[str, Any]) -> bool:
    """True when ``stream_options.include_usage`` is true."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(prompt: int, completion: int) -> bytes:
    """An OpenAI ``usage`` object."""
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (prompt, completion, prompt + completion)


def _tool_tokens(calls: list[tuple[str, str]]) -> int:
    """Deterministic completion tokens of tool calls."""
    return sum(max(1, (len(name) + len(args)) // 4) for name, args in calls)


def _sse(event: bytes, data: bytes) -> bytes:
    """One Anthropic-style SSE event with an ``event:`` line."""
    return b"event: %b\ndata: %b\n\n" % (event, data)


# --------------------------------------------------------------------------
# Provider handlers: _Call -> _Whole | _Stream
# --------------------------------------------------------------------------


def _chat(call: _Call) -> _Whole | _Stream:
    """``POST /v1/chat/completions``: text or tool calls, whole or streamed."""
    s = call.server
    body = call.body
    calls = _tool_plan(call)
    n, cut = _budget(call, "max_completion_tokens", "max_tokens")
    finish = "tool_calls" if calls else ("length" if cut else "stop")
    prompt = _prompt_tokens(body)
    completion = _tool_tokens(calls) if calls else n
    cid = s.next_id(b"chatcmpl-")
    created = int(time.time())
    if not call.stream:
        if calls:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "tool_calls": [
                    {"id": s.next_id(b"call_").decode(), "type": "function", "function": {"name": nm, "arguments": a}}
                    for nm, a in calls
                ],
            }
            choices = orjson.dumps([{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}])
        else:
            choices = _chat_choices(n, finish)
        return _Whole(
            200,
            b'{"id":"%b","object":"chat.completion","created":%d,"model":%b,"choices":%b,"usage":%b,'
            b'"service_tier":"default","system_fingerprint":"fp_mock"}'
            % (cid, created, call.model_json, choices, _usage(prompt, completion)),
            steps=len(calls) * 4 if calls else n,
        )
    include_usage = _include_usage(body)
    usage_null = b',"usage":null' if include_usage else b""
    pre = (
        b'data: {"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,'
        b'"system_fingerprint":"fp_mock","choices":[{"index":0,"delta":' % (cid, created, call.model_json)
    )
    post = b',"logprobs":null,"finish_reason":null}]%b}\n\n' % usage_null
    content: list[bytes] = []
    if calls:
        heads = [
            b'{"index":%d,"id":"%b","type":"function","function":{"name":%b,"arguments":""}}'
            % (i, s.next_id(b"call_"), orjson.dumps(name))
            for i, (name, _) in enumerate(calls)
        ]
        preamble = [pre + b'{"role":"assistant","content":null,"tool_calls":[%b],"refusal":null}' % heads[0] + post]
        for i, (_, args) in enumerate(calls):
            if i:
                content.append(pre + b'{"tool_calls":[%b]}' % heads[i] + post)
            for frag in _split3(args):
                content.append(
                    pre + b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}' % (i, orjson.dumps(frag)) + post
                )
    else:
        preamble = [pre + b'{"role":"assistant","content":"","refusal":null}' + post]
        words = _WORD_JSON
        content = [pre + b'{"content":%b}' % words[i % len(words)] + post for i in range(n)]
    tail = [pre + b'{},"logprobs":null,"finish_reason":"%b"}]%b}\n\n' % (finish.encode(), usage_null)]
    if include_usage:
        tail.append(
            b'data: {"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,'
            b'"system_fingerprint":"fp_mock","choices":[],"usage":%b}\n\n'
            % (cid, created, call.model_json, _usage(prompt, completion))
        )
    tail.append(b"data: [DONE]\n\n")
    return _Stream(preamble, content, tail)


def _completions(call: _Call) -> _Whole | _Stream:
    """``POST /v1/completions`` (legacy text completion), whole or streamed."""
    n, cut = _budget(call, "max_tokens")
    finish = b'"length"' if cut else b'"stop"'
    prompt = _prompt_tokens(call.body.get("prompt"))
    cid = call.server.next_id(b"cmpl-")
    created = int(time.time())
    if not call.stream:
        choice = b'[{"text":%b,"index":0,"logprobs":null,"finish_reason":%b}]' % (orjson.dumps(_text(n)), finish)
        return _Whole(
            200,
            b'{"id":"%b","object":"text_completion","created":%d,"model":%b,"choices":%b,"usage":%b}'
            % (cid, created, call.model_json, choice, _usage(prompt, n)),
            steps=n,
        )
    pre = b'data: {"id":"%b","object":"text_completion","created":%d,"model":%b,"choices":[{"text":' % (
        cid,
        created,
        call.model_json,
    )
    words = _WORD_JSON
    post = b',"index":0,"logprobs":null,"finish_reason":null}]}\n\n'
    content = [pre + words[i % len(words)] + post for i in range(n)]
    tail = [pre + b'"","index":0,"logprobs":null,"finish_reason":%b}]}\n\n' % finish]
    if _include_usage(call.body):
        tail.append(
            b'data: {"id":"%b","object":"text_completion","created":%d,"model":%b,"choices":[],"usage":%b}\n\n'
            % (cid, created, call.model_json, _usage(prompt, n))
        )
    tail.append(b"data: [DONE]\n\n")
    return _Stream([], content, tail)


def _embedding(item: object) -> list[float]:
    """A deterministic 8-float vector for one input item; values are exact in float32."""
    seed = zlib.crc32(orjson.dumps(item))
    out: list[float] = []
    for _ in range(_EMBEDDING_DIM):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(((seed >> 16) % 256 - 128) / 256)
    return out


def _embeddings(call: _Call) -> _Whole | _Stream:
    """``POST /v1/embeddings``: one vector per input item, ``float`` or ``base64`` encoded."""
    raw = call.body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        items: list[object] = [raw]
    elif isinstance(raw, list) and raw:
        items = list(raw)
    else:
        return _error(_Flavour.OPENAI, 400, "'input' must be a non-empty string or array")
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vector = _embedding(item)
        encoded: object = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    prompt = _prompt_tokens(items)
    body = {
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
    return _Whole(200, orjson.dumps(body), steps=1)


def _models(call: _Call) -> _Whole | _Stream:
    """``GET /v1/models``: a fixed list of model ids."""
    return _Whole(200, call.server.models_body)


def _messages(call: _Call) -> _Whole | _Stream:
    """``POST /v1/messages`` (Anthropic): text or tool_use blocks, whole or streamed."""
    s = call.server
    calls = _tool_plan(call)
    n, cut = _budget(call, "max_tokens")
    stop = "tool_use" if calls else ("max_tokens" if cut else "end_turn")
    prompt = _prompt_tokens({"system": call.body.get("system"), "messages": call.body.get("messages")})
    completion = _tool_tokens(calls) if calls else n
    mid = s.next_id(b"msg_").decode()
    tool_ids = [s.next_id(b"toolu_").decode() for _ in calls]
    if not call.stream:
        blocks: list[dict[str, Any]]
        if calls:
            blocks = [
                {"type": "tool_use", "id": tid, "name": name, "input": orjson.loads(args)}
                for tid, (name, args) in zip(tool_ids, calls, strict=True)
            ]
        else:
            blocks = [{"type": "text", "text": _text(n)}]
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        }
        return _Whole(200, orjson.dumps(message), steps=len(calls) * 4 if calls else n)
    start = {
        "type": "message_start",
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 1},
        },
    }
    ping = _sse(b"ping", b'{"type":"ping"}')
    content: list[bytes] = []
    if calls:
        starts = [
            _sse(
                b"content_block_start",
                orjson.dumps(
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "tool_use", "id": tid, "name": name, "input": {}},
                    }
                ),
            )
            for i, (tid, (name, _)) in enumerate(zip(tool_ids, calls, strict=True))
        ]
        preamble = [_sse(b"message_start", orjson.dumps(start)), starts[0], ping]
        for i, (_, args) in enumerate(calls):
            if i:
                content.append(_sse(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % (i - 1)))
                content.append(starts[i])
            for frag in _split3(args):
                data = _JSON_DELTA
                content.append(_sse(b"content_block_delta", data % (i, orjson.dumps(frag))))
        last = len(calls) - 1
    else:
        block = b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
        preamble = [_sse(b"message_start", orjson.dumps(start)), _sse(b"content_block_start", block), ping]
        words = _WORD_JSON
        content = [
            _sse(
                b"content_block_delta",
                b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%b}}'
                % words[i % len(words)],
            )
            for i in range(n)
        ]
        last = 0
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": completion},
    }
    tail = [
        _sse(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % last),
        _sse(b"message_delta", orjson.dumps(delta)),
        _sse(b"message_stop", b'{"type":"message_stop"}'),
    ]
    return _Stream(preamble, content, tail)


def _count_tokens(call: _Call) -> _Whole | _Stream:
    """``POST /v1/messages/count_tokens`` (Anthropic)."""
    prompt = _prompt_tokens({"system": call.body.get("system"), "messages": call.body.get("messages")})
    return _Whole(200, b'{"input_tokens":%d}' % prompt)


def _responses(call: _Call) -> _Whole | _Stream:
    """``POST /v1/responses``: a minimal non-streaming OpenAI Responses object."""
    if call.stream:
        return _error(_Flavour.OPENAI, 400, "the mock does not stream /v1/responses")
    n, cut = _budget(call, "max_output_tokens")
    prompt = _prompt_tokens({"input": call.body.get("input"), "instructions": call.body.get("instructions")})
    s = call.server
    reply = {
        "id": s.next_id(b"resp_").decode(),
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if cut else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": call.body.get("instructions"),
        "max_output_tokens": call.body.get("max_output_tokens"),
        "model": call.model,
        "output": [
            {
                "type": "message",
                "id": s.next_id(b"msg_").decode(),
                "status": "incomplete" if cut else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": _text(n), "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + n,
        },
    }
    return _Whole(200, orjson.dumps(reply), steps=n)


@dataclass(frozen=True, slots=True)
class _Route:
    """A provider endpoint: its handler, error flavour, and whether it can stream."""

    handler: Callable[[_Call], _Whole | _Stream]
    flavour: _Flavour
    streams: bool = False
    needs_body: bool = True


# path -> method -> route. Every provider route is recorded and can be faulted.
_ROUTES: Final[dict[str, dict[str, _Route]]] = {
    "/v1/chat/completions": {"POST": _Route(_chat, _Flavour.OPENAI, streams=True)},
    "/v1/completions": {"POST": _Route(_completions, _Flavour.OPENAI, streams=True)},
    "/v1/embeddings": {"POST": _Route(_embeddings, _Flavour.OPENAI)},
    "/v1/models": {"GET": _Route(_models, _Flavour.OPENAI, needs_body=False)},
    "/v1/responses": {"POST": _Route(_responses, _Flavour.OPENAI)},
    "/v1/messages": {"POST": _Route(_messages, _Flavour.ANTHROPIC, streams=True)},
    "/v1/messages/count_tokens": {"POST": _Route(_count_tokens, _Flavour.ANTHROPIC)},
}


def _list_requests(server: MockServer) -> _Whole:
    return _Whole(200, orjson.dumps(server.requests))


def _clear_requests(server: MockServer) -> _Whole:
    count = len(server.requests)
    server.requests.clear()
    return _Whole(200, b'{"deleted":%d}' % count)


def _health(server: MockServer) -> _Whole:
    return _Whole(200, b'{"status":"ok"}')


# Control endpoints: never recorded, never faulted.
_CONTROL: Final[dict[str, dict[str, Callable[[MockServer], _Whole]]]] = {
    "/_mock/requests": {"GET": _list_requests, "DELETE": _clear_requests},
    "/_mock/health": {"GET": _health},
}


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return b"HTTP/1.1 %d %b\r\n" % (status, phrase.encode())


#: What a hosted provider adds to a reply head besides framing (values made up, sizes
#: typical): see ``MockConfig.provider_headers``.
_PROVIDER_FIELDS: Final = (
    b"access-control-expose-headers: X-Request-ID\r\n"
    b"openai-organization: user-mockorganization0001\r\n"
    b"openai-processing-ms: 412\r\n"
    b"openai-version: 2020-10-01\r\n"
    b"x-ratelimit-limit-requests: 10000\r\n"
    b"x-ratelimit-limit-tokens: 2000000\r\n"
    b"x-ratelimit-remaining-requests: 9999\r\n"
    b"x-ratelimit-remaining-tokens: 1999950\r\n"
    b"x-ratelimit-reset-requests: 6ms\r\n"
    b"x-ratelimit-reset-tokens: 1ms\r\n"
    b"x-request-id: req_0123456789abcdef0123456789abcdef\r\n"
    b"strict-transport-security: max-age=31536000; includeSubDomains; preload\r\n"
    b"cf-cache-status: DYNAMIC\r\n"
    b"set-cookie: __cf_bm=mock0123456789abcdefghijklmnopqrstuvwxyz; path=/; domain=.mock.invalid; HttpOnly;"
    b" Secure; SameSite=None\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"cf-ray: 8e7f6a5b4c3d2e1f-FRA\r\n"
    b'alt-svc: h3=":443"; ma=86400\r\n'
)


def _chunk(payload: bytes) -> bytes:
    """``payload`` as one chunk of a chunked body; empty payloads are elided."""
    return b"%x\r\n%b\r\n" % (len(payload), payload) if payload else b""


class MockServer:
    """A running mock provider: one listening socket, its config and its request log.

    ``requests`` holds the last (at most ``MAX_LOG``) provider requests in
    arrival order; tests may read and clear it. Per-key fault counters live
    here, so two servers never share state. Create with :func:`start_mock`;
    :meth:`close` stops listening, aborts every connection (stalled ones
    too) and awaits every pacing task.
    """

    host: str
    port: int

    def __init__(self, config: MockConfig, host: str = "127.0.0.1") -> None:
        self.config = config
        self.host = host
        self.port = 0
        self.requests: list[ReceivedRequest] = []
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"} for m in _MODELS],
            }
        )
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_hits: dict[str, int] = {}
        self._head_cache: dict[str, _RawRequest] = {}
        self._ids = itertools.count(1)
        self._id_tag = secrets.token_hex(4).encode()
        self._date_at = 0
        self._date = b""

    def __repr__(self) -> str:
        return (
            f"<MockServer {self.host}:{self.port} connections={len(self._connections)} "
            f"active_tasks={len(self._tasks)} requests={len(self.requests)}>"
        )

    @property
    def active_tasks(self) -> int:
        """Pacing tasks in flight (one per paced exchange); 0 when every stream has ended."""
        return len(self._tasks)

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._connections)

    async def close(self) -> None:
        """Stop listening, abort every connection and await every pacing task. Idempotent."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def next_id(self, prefix: bytes) -> bytes:
        """A unique id such as ``chatcmpl-1a2b3c4d00002a`` (random per server, then a counter)."""
        return b"%b%b%06x" % (prefix, self._id_tag, next(self._ids))

    def record(self, req: ReceivedRequest) -> None:
        """Append ``req`` to the log, trimming it to stay within ``MAX_LOG``."""
        log = self.requests
        log.append(req)
        if len(log) > MAX_LOG:
            del log[: len(log) - _LOG_TRIM_TO]

    def _date_header(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = b"date: %b\r\n" % formatdate(now, usegmt=True).encode()
        return self._date

    # -- one exchange -------------------------------------------------------

    def respond(self, raw: _RawRequest) -> _Delivery:
        """Decide the whole reply to ``raw``: route, record, plan, fault and pacing."""
        keep = raw.keep_alive
        control = _CONTROL.get(raw.path)
        if control is not None:
            action = control.get(raw.method)
            if action is None:
                return self._whole(keep, _error(_Flavour.OPENAI, 405, f"{raw.method} not allowed on {raw.path}"))
            return self._whole(keep, action(self))
        methods = _ROUTES.get(raw.path)
        if methods is None:
            flavour = _Flavour.ANTHROPIC if raw.path.startswith("/v1/messages") else _Flavour.OPENAI
            return self._whole(keep, _error(flavour, 404, f"Invalid URL ({raw.method} {raw.path})"))
        route = methods.get(raw.method)
        if route is None:
            return self._whole(keep, _error(_route_flavour(methods), 405, f"{raw.method} not allowed on {raw.path}"))
        body: dict[str, Any] | None = None
        invalid = False
        if raw.body:
            try:
                parsed = orjson.loads(raw.body)
            except orjson.JSONDecodeError:
                invalid = True
            else:
                if isinstance(parsed, dict):
                    body = parsed
                else:
                    invalid = True
        headers = raw.headers
        credential = _credential(headers)
        model = body.get("model") if body is not None else None
        stream = route.streams and body is not None and body.get("stream") is True
        self.record(
            ReceivedRequest(
                raw.method,
                raw.path,
                headers,
                model if isinstance(model, str) else None,
                credential,
                stream,
                body,
            )
        )
        flavour = route.flavour
        if invalid:
            return self._whole(keep, _error(flavour, 400, "We could not parse the JSON body of your request."))
        if body is None and route.needs_body:
            return self._whole(keep, _error(flavour, 400, "the request body must be a JSON object"))
        try:
            plan = self._plan(headers, credential, raw.mocked)
        except _BadHeader as exc:
            return self._whole(keep, _error(flavour, 400, str(exc)))
        if plan.fault == "reset":
            return _Delivery([], _End.RESET, keep_alive=False)
        if plan.fault is None and plan.status is not None:
            return self._whole(keep, _error(flavour, plan.status, plan.reason, plan.retry_after))
        name = model if isinstance(model, str) else "mock-model"
        if self.config.model_prefix:
            name = self.config.model_prefix + name
        call = _Call(self, body or {}, name, orjson.dumps(name), stream, plan.tokens, plan.tool_calls)
        reply = route.handler(call)
        if isinstance(reply, _Stream):
            return self._stream(raw, reply, plan, flavour)
        return self._whole(keep, reply, plan)

    def _plan(self, headers: dict[str, str], credential: str | None, mocked: bool) -> _Plan:
        """Resolve pacing and fault: headers win over auth, auth over key behaviours.

        ``mocked`` is False when no ``x-mock-*`` header is present (the fast path).
        """
        cfg = self.config
        if not mocked:
            return self._key_plan(_Plan(cfg.tokens, cfg.ttft, cfg.itl), credential)
        tokens = _header_int(headers, "x-mock-tokens", 0, _MAX_TOKENS)
        ttft = _header_float(headers, "x-mock-ttft-ms")
        itl = _header_float(headers, "x-mock-itl-ms")
        plan = _Plan(
            tokens=cfg.tokens if tokens is None else tokens,
            ttft=cfg.ttft if ttft is None else ttft / 1000,
            itl=cfg.itl if itl is None else itl / 1000,
        )
        plan.tool_calls = _header_int(headers, "x-mock-tool-calls", 0, _MAX_TOOL_CALLS) or 0
        stall_after = _header_int(headers, "x-mock-stall-after", 0, _MAX_TOKENS)
        if stall_after is not None:
            plan.stall_after = stall_after
        status = _header_int(headers, "x-mock-status", 400, 599)
        fault = headers.get("x-mock-fault")
        if fault is not None and fault not in FAULTS:
            raise _BadHeader(f"x-mock-fault must be one of {sorted(FAULTS)}, got {fault!r}")
        if status is not None or fault is not None:
            plan.status, plan.fault = status, fault
            plan.retry_after = _header_float(headers, "x-mock-retry-after")
            plan.reason = f"mock: injected {status} (x-mock-status)"
            return plan
        return self._key_plan(plan, credential)

    def _key_plan(self, plan: _Plan, credential: str | None) -> _Plan:
        """Apply ``require_key`` and the credential's :class:`KeyBehaviour` to ``plan``."""
        cfg = self.config
        behaviour = cfg.keys.get(credential) if credential is not None else None
        if cfg.require_key and behaviour is None and credential not in cfg.valid_keys:
            plan.status = 401
            plan.reason = "Incorrect API key provided." if credential else "Missing API key."
            return plan
        if behaviour is not None and (behaviour.status is not None or behaviour.fault is not None):
            assert credential is not None
            hits = self._key_hits.get(credential, 0)
            if behaviour.times is None or hits < behaviour.times:
                self._key_hits[credential] = hits + 1
                plan.status, plan.fault, plan.retry_after = behaviour.status, behaviour.fault, behaviour.retry_after
                plan.reason = f"mock: injected {behaviour.status} for this API key"
        return plan

    def _head(self, status: int, content_type: bytes, framing: bytes, extra: bytes, keep_alive: bool) -> bytes:
        """The response head: status line, date, server, type, framing, extra, (provider fields), connection."""
        return b"%bserver: llmproxy-mock\r\n%bcontent-type: %b\r\n%b%b%b%b\r\n" % (
            _status_line(status),
            self._date_header(),
            content_type,
            framing,
            extra,
            _PROVIDER_FIELDS if self.config.provider_headers else b"",
            b"" if keep_alive else b"connection: close\r\n",
        )

    def _whole(self, keep_alive: bool, reply: _Whole, plan: _Plan | None = None) -> _Delivery:
        """Deliver a whole reply; ``plan`` (provider replies only) adds pacing and faults."""
        body = reply.body
        fault = plan.fault if plan is not None else None
        if fault == "stall":
            return _Delivery([], _End.STALL, keep_alive)
        if fault == "malformed":
            body = _BROKEN_JSON
        framing = b"content-length: %d\r\n" % len(body)
        head = self._head(reply.status, reply.content_type, framing, reply.extra_headers, keep_alive)
        delay = 0.0
        if plan is not None and reply.steps:
            delay = plan.ttft + plan.itl * (reply.steps - 1)
        if fault == "drop":
            return _Delivery([(delay, head + body[: len(body) // 2])], _End.DROP, keep_alive=False)
        return _Delivery([(delay, head + body)], _End.COMPLETE, keep_alive)

    def _stream(self, raw: _RawRequest, reply: _Stream, plan: _Plan, flavour: _Flavour) -> _Delivery:
        """Deliver a stream: preamble now, content paced by ttft/itl, tail with the last content event."""
        chunked = raw.version == 11  # HTTP/1.0 gets a close-delimited body
        keep_alive = raw.keep_alive and chunked
        head = self._head(
            200,
            b"text/event-stream; charset=utf-8",
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n" if chunked else b"cache-control: no-cache\r\n",
            b"",
            keep_alive,
        )
        frame = _chunk if chunked else bytes
        content = reply.content
        if plan.fault == "malformed":
            content = [_BROKEN_EVENT[flavour], *content[1:]]
        end = _End.COMPLETE
        if plan.fault in ("stall", "drop"):
            end = _End.STALL if plan.fault == "stall" else _End.DROP
            content = content[: plan.stall_after]
        tail = b"".join(reply.tail) if end is _End.COMPLETE else b""
        closing = b"0\r\n\r\n" if end is _End.COMPLETE and chunked else b""
        if plan.ttft == 0 and plan.itl == 0:
            # one write, but one chunk per event, as a provider that flushes each event frames it
            events = [*reply.preamble, *content, *(reply.tail if end is _End.COMPLETE else ())]
            return _Delivery([(0.0, head + b"".join([frame(event) for event in events]) + closing)], end, keep_alive)
        writes: list[tuple[float, bytes]] = [(0.0, head + frame(b"".join(reply.preamble)))]
        for i, event in enumerate(content):
            writes.append((plan.ttft if i == 0 else plan.itl, frame(event)))
        if content:
            delay, data = writes[-1]
            writes[-1] = (delay, data + frame(tail) + closing)
        else:
            writes.append((plan.ttft, frame(tail) + closing))
        return _Delivery(writes, end, keep_alive)

    # -- bookkeeping used by _Connection ----------------------------------------

    def _attach(self, server: asyncio.AbstractServer) -> None:
        self._server = server
        sockets = getattr(server, "sockets", ())
        if sockets:
            self.port = int(sockets[0].getsockname()[1])


def _route_flavour(methods: dict[str, _Route]) -> _Flavour:
    """The error flavour of a path (from any of its routes)."""
    return next(iter(methods.values())).flavour


class _State(enum.Enum):
    """Connection state: which exchange, if any, owns the socket."""

    IDLE = enum.auto()  # ready to start the next queued request
    BUSY = enum.auto()  # a pacing task is writing a reply
    STALLED = enum.auto()  # a stall fault: nothing more is ever written
    CLOSED = enum.auto()


class _FlowControl:
    """Write-side flow control wired to the transport's pause/resume_writing (idempotent)."""

    __slots__ = ("_can_write", "paused")

    def __init__(self) -> None:
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True
        self._can_write.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._can_write.set()

    async def drain(self) -> None:
        """Return once the transport accepts writes again (at once if it does)."""
        if self.paused:
            await self._can_write.wait()


class _Connection(asyncio.Protocol):
    """One client socket: parses requests, answers them in order, one at a time.

    Per-request state lives in the ``_Delivery`` and the pacing task; the
    connection keeps only the parser, the queue of parsed requests, the
    flow control and its :class:`_State`.
    """

    def __init__(self, server: MockServer) -> None:
        self._server = server
        self._parser = _RequestParser(server._head_cache)
        self._queue: deque[_RawRequest | _HttpError] = deque()
        self._transport: asyncio.Transport | None = None
        self._state = _State.IDLE
        self._task: asyncio.Task[None] | None = None
        self._flow = _FlowControl()
        self._reading_paused = False
        self._eof = False

    def __repr__(self) -> str:
        return f"<_Connection {self._state.name} queued={len(self._queue)}>"

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.CLOSED:
            return
        self._queue.extend(self._parser.feed(data))
        if self._parser.take_continue() and self._state is _State.IDLE and not self._queue:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(self._queue) > _QUEUE_HIGH and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        self._pump()

    def eof_received(self) -> bool:
        """Half-close: keep answering queued requests; with none queued the client is gone."""
        self._eof = True
        return bool(self._queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _State.CLOSED
        self._queue.clear()
        self._server._connections.discard(self)
        if self._task is not None:
            self._task.cancel()
        self._flow.resume_writing()

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()
        self._pump()

    # -- exchanges ------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now (server shutdown)."""
        if self._transport is not None:
            self._transport.abort()
        if self._task is not None:
            self._task.cancel()
        self._state = _State.CLOSED

    def _pump(self) -> None:
        """Start queued requests while the connection is idle and writable."""
        queue = self._queue
        while queue and self._state is _State.IDLE and not self._flow.paused:
            item = queue.popleft()
            if isinstance(item, _HttpError):
                delivery = self._server._whole(False, _error(_Flavour.OPENAI, item.status, item.message))
            else:
                delivery = self._server.respond(item)
            self._start(delivery)
        if self._reading_paused and len(queue) <= _QUEUE_LOW and self._state is not _State.CLOSED:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        if self._eof and not queue and self._state is _State.IDLE:
            self._close()

    def _start(self, delivery: _Delivery) -> None:
        writes = delivery.writes
        if not writes or (len(writes) == 1 and writes[0][0] <= 0):
            if writes:
                self._write(writes[0][1])
            self._end(delivery)
            return
        self._state = _State.BUSY
        task = asyncio.get_running_loop().create_task(self._paced(delivery))
        self._task = task
        self._server._tasks.add(task)
        task.add_done_callback(self._paced_done)

    async def _paced(self, delivery: _Delivery) -> None:
        for delay, data in delivery.writes:
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flow.drain()
            if self._state is _State.CLOSED:
                return
            self._write(data)
        self._end(delivery)

    def _paced_done(self, task: asyncio.Task[None]) -> None:
        self._server._tasks.discard(task)
        if self._task is task:
            self._task = None
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # a bug in the mock: report it, do not leave the client waiting
            self.abort()
            task.get_loop().call_exception_handler({"message": "mock upstream pacing task failed", "exception": exc})
            return
        if self._state is _State.IDLE:
            self._pump()

    def _end(self, delivery: _Delivery) -> None:
        end = delivery.end
        if end is _End.COMPLETE:
            if delivery.keep_alive:
                self._state = _State.IDLE
            else:
                self._close()
        elif end is _End.STALL:
            self._state = _State.STALLED
        elif end is _End.DROP:
            self._close()
        else:
            self._reset()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._queue.clear()
        if self._transport is not None:
            self._transport.close()

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), discarding anything unsent."""
        self._state = _State.CLOSED
        self._queue.clear()
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


async def start_mock(host: str = "127.0.0.1", port: int = 0, config: MockConfig | None = None) -> MockServer:
    """Start a mock provider on the running loop; ``port=0`` picks a free port (see ``.port``)."""
    server = MockServer(config if config is not None else MockConfig(), host)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: _Connection(server), host, port, backlog=2048, reuse_address=True)
    server._attach(listener)
    return server


async def _serve_until_signal(host: str, port: int, config: MockConfig | None) -> None:
    server = await start_mock(host, port, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    print(f"llmproxy mock upstream listening on http://{host}:{server.port}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.close()


def serve_mock(host: str, port: int, config: MockConfig | None = None) -> None:
    """Run a mock provider on uvloop until SIGINT or SIGTERM (blocking).

    Prints ``llmproxy mock upstream listening on http://HOST:PORT`` once
    listening (the real port when ``port`` is 0), and returns after a clean
    shutdown.
    """
    import uvloop

    uvloop.run(_serve_until_signal(host, port, config))
