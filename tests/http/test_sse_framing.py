"""SSE framing and strict head checks, at the unit level."""

from __future__ import annotations

import random
import re
import time

import pytest

from llmproxy.errors import BadRequest, HeadersTooLarge, UpstreamEventTooLarge
from llmproxy.http import sse
from llmproxy.http.framing import check_head, find_head_end
from llmproxy.http.sse import _BOUNDARY, SseFramer, _parse_lines, format_event, parse_event

EVENTS = [b'data: {"a":1}\n\n', b"event: x\ndata: two\n\n", b"data: [DONE]\n\n"]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 13, 1000])
def test_framer_returns_whole_events_for_any_split(step: int) -> None:
    raw = b"".join(EVENTS)
    framer = SseFramer()
    out: list[bytes] = []
    for i in range(0, len(raw), step):
        out += framer.feed(raw[i : i + step])
    assert out == EVENTS
    assert framer.flush() == b""


def test_framer_crlf_and_partial_tail() -> None:
    framer = SseFramer()
    assert framer.feed(b"data: a\r\n\r\ndata: b\r\n") == [b"data: a\r\n\r\n"]
    assert framer.feed(b"\r\n") == [b"data: b\r\n\r\n"]
    assert framer.feed(b"data: unterminated") == []
    assert framer.flush() == b"data: unterminated"


def test_framer_bounds_event_size() -> None:
    framer = SseFramer(max_event=100)
    with pytest.raises(ValueError):
        framer.feed(b"data: " + b"x" * 200)


def test_parse_and_format_event() -> None:
    event = parse_event(b'event: message_start\ndata: {"x":1}\n\n')
    assert event.event == b"message_start" and event.data == b'{"x":1}'
    assert parse_event(b"data: a\ndata: b\n\n").data == b"a\nb"
    assert format_event(b"{}", b"ping") == b"event: ping\ndata: {}\n\n"


@pytest.mark.parametrize(
    "raw",
    [
        b'data: {"x":1}\n\n',
        b"data: \n\n",
        b"data:\n\n",
        b"data:x\n\n",
        b"data:  two spaces\n\n",
        b"data: a\ndata: b\n\n",
        b"event: ping\ndata: {}\n\n",
        b"event: \ndata: x\n\n",
        b"event:x\ndata: y\n\n",
        b"event: a\ndata: b\ndata: c\n\n",
        b"event: a\nid: 1\ndata: b\n\n",
        b"event: a\n\n",
        b"event: a\nevent: b\ndata: c\n\n",
        b": comment\ndata: x\n\n",
        b"data: x\n: comment\n\n",
        b"data: x\r\n\r\n",
        b"data: \r\n\r\n",
        b"data: a\r\ndata: b\r\n\r\n",
        b"data: a\rb\r\n\r\n",
        b"data: a\nb\r\n\r\n",
        b"event: a\r\ndata: b\r\n\r\n",
        b"data: x\r\r",
        b"data: x\n",
        b"data: x",
        b"data: x\n\n\n",
        b"",
    ],
)
def test_parse_event_fast_shapes_agree_with_the_line_parser(raw: bytes) -> None:
    assert parse_event(raw) == _parse_lines(raw)


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 1000) == -1
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r", 1000) == -1  # CR may still be followed by LF
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody", 1000) == 27
    with pytest.raises(BadRequest):
        find_head_end(b"GET / HTTP/1.1\nHost: x\n\n", 1000)
    with pytest.raises(HeadersTooLarge):
        find_head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000, 1000)


def test_check_head_accepts_identical_duplicate_content_length() -> None:
    info = check_head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 100)
    assert info.content_length == 5 and not info.chunked
    info = check_head(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue\r\n\r\n", 100)
    assert info.chunked and info.expect_continue and info.content_length is None


def _reference_events(stream: bytes) -> tuple[list[bytes], bytes]:
    """The events of a whole stream, split in one pass (what any split of the reads must give)."""
    if b"\r" not in stream:
        *events, rest = stream.split(b"\n\n")
        return [event + b"\n\n" for event in events], rest
    out, start = [], 0
    for match in re.finditer(rb"\r\n\r\n|\n\n|\r\r", stream):
        out.append(stream[start : match.end()])
        start = match.end()
    return out, stream[start:]


STREAMS = {
    "lf": b"".join(EVENTS) + b"data: tail",
    "crlf": b'data: {"a":1}\r\n\r\nevent: x\r\ndata: two\r\n\r\ndata: [DONE]\r\n\r\n',
    "cr": b"data: a\r\rdata: b\r\r",
    "mixed, crlf late": b"data: a\n\ndata: b\r\n\r\ndata: c\n\ndata: d\r\r",
    "blank lines and binary": b"data: \x00\xff\n\ndata: x\r\n\r\n\r\ndata: y\r\n\r\n",
}


@pytest.mark.parametrize("stream", STREAMS.values(), ids=STREAMS.keys())
def test_framer_gives_the_one_pass_events_for_every_split_including_straddled_boundaries(stream: bytes) -> None:
    expected = _reference_events(stream)
    splits = [[cut] for cut in range(len(stream) + 1)] + [[a, b] for a in range(len(stream)) for b in (a + 1, a + 3)]
    splits.append(list(range(1, len(stream))))  # byte by byte: every boundary straddles reads
    for cuts in splits:
        framer = SseFramer()
        out: list[bytes] = []
        start = 0
        for cut in [*cuts, len(stream)]:
            out += framer.feed(stream[start:cut])
            start = max(start, cut)
        assert (out, framer.flush()) == expected, cuts


class _CountingBoundary:
    """Wraps the framer's boundary regex and counts the bytes each search may scan."""

    def __init__(self) -> None:
        self.scanned = 0
        self.searches = 0

    def search(self, buf: bytes | bytearray, pos: int = 0) -> re.Match[bytes] | None:
        self.searches += 1
        self.scanned += len(buf) - pos
        return _BOUNDARY.search(buf, pos)


def test_framer_scans_a_large_event_fed_in_small_reads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16 MiB event in 16 KiB reads: each byte is searched a bounded number of times (the old
    framer rescanned the whole buffer per read: quadratic, 6.7 s at 16 MiB)."""
    counter = _CountingBoundary()
    monkeypatch.setattr(sse, "_BOUNDARY", counter)
    piece = b"x" * (16 * 1024 - 2) + b"\r\n"  # CRLF lines, no blank line: one event
    framer = SseFramer(max_event=32 * 1024 * 1024)
    reads = 1024
    for _ in range(reads):
        assert framer.feed(piece) == []
    (event,) = framer.feed(b"\r\n")
    assert len(event) == reads * len(piece) + 2
    assert counter.scanned <= reads * len(piece) + 4 * (reads + 1)


def test_framer_lf_event_fed_in_small_reads_resumes_its_search_near_the_end() -> None:
    piece = b"y" * (16 * 1024 - 1) + b"\n"
    framer = SseFramer(max_event=32 * 1024 * 1024)
    started = time.monotonic()
    for _ in range(1024):
        assert framer.feed(piece) == []
        assert framer._scan == len(framer._buf) - 3  # nothing before it is searched again
    (event,) = framer.feed(b"\n")
    assert len(event) == 1024 * len(piece) + 1
    assert time.monotonic() - started < 2.0  # generous: linear takes ~20 ms


@pytest.mark.parametrize(
    "reads",
    [
        [b"data: " + b"x" * 200],  # unfinished
        [b"data: " + b"x" * 200 + b"\n\n"],  # whole, fast path
        [b"data: a\n\ndata: " + b"x" * 200 + b"\n\n"],  # whole, after a small one
        [b"data: " + b"x" * 50, b"x" * 50, b"x" * 100 + b"\r\n\r\n"],  # grown over reads
    ],
    ids=["partial", "whole", "after a small one", "grown"],
)
def test_framer_refuses_an_event_over_its_cap_with_a_typed_error(reads: list[bytes]) -> None:
    framer = SseFramer(max_event=100)
    out: list[bytes] = []
    with pytest.raises(UpstreamEventTooLarge, match="larger than 100 bytes"):
        for data in reads:
            out += framer.feed(data)
        framer.feed(b"")
    assert all(len(event) <= 100 for event in out)
    assert out == ([b"data: a\n\n"] if reads[0].startswith(b"data: a\n\n") else [])
    with pytest.raises(UpstreamEventTooLarge):
        framer.flush()
    assert UpstreamEventTooLarge("x").status == 502 and isinstance(UpstreamEventTooLarge("x"), ValueError)


@pytest.mark.parametrize("seed", range(40))
def test_iter_events_yields_exactly_what_split_events_returns(seed: int) -> None:
    """Random batches (LF, CRLF and CR line ends, an unterminated end, empty events): the lazy
    splitter that failover stops early with gives the framer's events, in order."""
    rng = random.Random(seed)
    ends = rng.choice([b"\n", b"\r\n", b"\r", b"\n"])
    events = []
    for _ in range(rng.randint(0, 12)):
        lines = [b"data: " + bytes(rng.choice(b'ab{}:" ') for _ in range(rng.randint(0, 20)))]
        if rng.random() < 0.3:
            lines.insert(0, b"event: x")
        events.append(ends.join(lines) + ends + ends)
    data = b"".join(events) + (b"data: unterminated" if rng.random() < 0.3 else b"")
    assert list(sse.iter_events(data)) == sse.split_events(data)
    assert list(sse.iter_events(b"")) == sse.split_events(b"") == []
