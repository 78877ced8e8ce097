"""SSE framing and strict head checks, at the unit level."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest, HeadersTooLarge
from proxy.framing import check_head, find_head_end
from proxy.sse import SseFramer, format_event, parse_event

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
