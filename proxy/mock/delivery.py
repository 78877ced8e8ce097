"""Writing replies: a reply plus its plan becomes a :class:`Delivery` of timed writes and an ending.

Timing: stream headers and preamble go out at once; the first content event
after ``ttft``, each next one ``itl`` later; the tail with the last content
event. A non-streaming reply is sent whole when the last token would have
been streamed: after ``ttft + itl * (tokens - 1)``. An unpaced delivery is a
single write (one chunk per event inside it, as a provider that flushes each
event frames it; with ``x-mock-sse-framing: whole``, one chunk holding them all).
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from llmproxy.mock.config import MockConfig
from llmproxy.mock.plans import Plan
from llmproxy.mock.replies import Flavour, Stream, Whole
from llmproxy.mock.wire import RawRequest

__all__ = ["Delivery", "End", "Framer"]


class End(enum.Enum):
    """How a delivery ends once its writes are done."""

    COMPLETE = enum.auto()  # reply finished; keep-alive or close per request
    STALL = enum.auto()  # send nothing more, keep the connection open
    DROP = enum.auto()  # close the connection (FIN) mid-reply
    RESET = enum.auto()  # abort with SO_LINGER 0 (RST)


@dataclass(slots=True)
class Delivery:
    """What a connection writes for one exchange: ``(delay, bytes)`` writes in order, then ``end``."""

    writes: list[tuple[float, bytes]]
    end: End
    keep_alive: bool


_BROKEN_JSON: Final = b'{"id": "mock-malformed", "object": "chat.completion", "choices": [{"mess'
_BROKEN_EVENT: Final[dict[Flavour, bytes]] = {
    Flavour.OPENAI: b'data: {"id":"mock-malformed","object":"chat.completion.chunk","choices":[{"delta":{"cont\n\n',
    Flavour.GEMINI: b'data: {"candidates":[{"content":{"parts":[{"text":"lor\r\n\r\n',
    Flavour.ANTHROPIC: (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_de\n\n'
    ),
    # a frame whose message CRC is wrong
    Flavour.BEDROCK: b"\x00\x00\x00\x10\x00\x00\x00\x00\xc5\x8f\xe2\xa3\x00\x00\x00\x00",
}


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


class Framer:
    """Turns a reply and its plan into a :class:`Delivery`: the head, the framing, the fault and the pacing.

    One per server; it caches the ``date`` field (one per second) and reads
    ``config.provider_headers`` on each reply, so a test may change it live.
    """

    __slots__ = ("_date", "_date_at", "config")

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self._date_at = 0
        self._date = b""

    def _date_header(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = b"date: %b\r\n" % formatdate(now, usegmt=True).encode()
        return self._date

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

    def whole(self, keep_alive: bool, reply: Whole, plan: Plan | None = None) -> Delivery:
        """Deliver a whole reply; ``plan`` (provider replies only) adds pacing and faults."""
        body = reply.body
        fault = plan.fault if plan is not None else None
        if fault == "stall":
            return Delivery([], End.STALL, keep_alive)
        if fault == "malformed":
            body = _BROKEN_JSON
        framing = b"content-length: %d\r\n" % len(body)
        head = self._head(reply.status, reply.content_type, framing, reply.extra_headers, keep_alive)
        delay = 0.0
        if plan is not None and reply.steps:
            delay = plan.ttft + plan.itl * (reply.steps - 1)
        if fault == "drop":
            return Delivery([(delay, head + body[: len(body) // 2])], End.DROP, keep_alive=False)
        return Delivery([(delay, head + body)], End.COMPLETE, keep_alive)

    def stream(self, raw: RawRequest, reply: Stream, plan: Plan, flavour: Flavour) -> Delivery:
        """Deliver a stream: preamble now, content paced by ttft/itl, tail with the last content event."""
        chunked = raw.version == 11  # HTTP/1.0 gets a close-delimited body
        keep_alive = raw.keep_alive and chunked
        head = self._head(
            200,
            b"application/vnd.amazon.eventstream"
            if flavour is Flavour.BEDROCK
            else b"text/event-stream; charset=utf-8",
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n" if chunked else b"cache-control: no-cache\r\n",
            b"",
            keep_alive,
        )
        frame = _chunk if chunked else bytes
        content = reply.content
        if plan.fault == "malformed":
            content = [_BROKEN_EVENT[flavour], *content[1:]]
        end = End.COMPLETE
        if plan.fault in ("stall", "drop"):
            end = End.STALL if plan.fault == "stall" else End.DROP
            content = content[: plan.stall_after]
        tail = b"".join(reply.tail) if end is End.COMPLETE else b""
        closing = b"0\r\n\r\n" if end is End.COMPLETE and chunked else b""
        if plan.ttft == 0 and plan.itl == 0:
            # one write, but one chunk per event, as a provider that flushes each event frames it
            events = [*reply.preamble, *content, *(reply.tail if end is End.COMPLETE else ())]
            if plan.sse_whole:  # x-mock-sse-framing: whole: the body in one piece (one chunk)
                events = [b"".join(events)]
            return Delivery([(0.0, head + b"".join([frame(event) for event in events]) + closing)], end, keep_alive)
        writes: list[tuple[float, bytes]] = [(0.0, head + frame(b"".join(reply.preamble)))]
        for i, event in enumerate(content):
            writes.append((plan.ttft if i == 0 else plan.itl, frame(event)))
        if content:
            delay, data = writes[-1]
            writes[-1] = (delay, data + frame(tail) + closing)
        else:
            writes.append((plan.ttft, frame(tail) + closing))
        return Delivery(writes, end, keep_alive)
