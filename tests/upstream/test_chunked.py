"""The upstream chunked-body decoder: valid framing split anywhere, and what it refuses."""

from __future__ import annotations

import h11
import pytest

from llmproxy.upstream.chunked import MAX_LINE, ChunkedDecoder, ChunkedError

SSE = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'


def _chunk(payload: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(payload), ext, payload)


VALID = {
    "one chunk per event": b"".join(_chunk(SSE) for _ in range(5)) + b"0\r\n\r\n",
    "upper-case hex and leading zeros": b"000A\r\n0123456789\r\n0\r\n\r\n",
    "extensions": b"5;name=value;x\r\nhello\r\n0;last\r\n\r\n",
    "quoted extension values": b'5;a="q \\"x\\" ;=";b=""\r\nhello\r\n0\r\n\r\n',
    "sixteen hex digits": b"0000000000000005\r\nhello\r\n0\r\n\r\n",
    "trailers": b"5\r\nhello\r\n0\r\nx-checksum: abc\r\nx-other:\r\n\r\n",
    "empty body": b"0\r\n\r\n",
    "binary data with CRLF inside": _chunk(b"a\r\n\r\nb\x00\xff") + b"0\r\n\r\n",
}


def _h11_decode(body: bytes) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body)
    out = b""
    while True:
        event = conn.next_event()
        if type(event) is h11.Data:
            out += event.data
        elif type(event) is h11.EndOfMessage:
            return out
        elif event is h11.NEED_DATA:  # pragma: no cover - the bodies above are complete
            raise AssertionError("incomplete")


def _decode_in_pieces(body: bytes, cuts: list[int]) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder()
    out = b""
    start = 0
    for cut in [*cuts, len(body)]:
        out += decoder.feed(body[start:cut])
        start = cut
    return out, decoder


@pytest.mark.parametrize("body", VALID.values(), ids=VALID.keys())
def test_valid_bodies_decode_as_h11_decodes_them_wherever_the_reads_split(body: bytes) -> None:
    expected = _h11_decode(body)
    for cut in range(len(body) + 1):
        out, decoder = _decode_in_pieces(body, [cut])
        assert out == expected, cut
        assert decoder.done and decoder.trailing == b""
    out, decoder = _decode_in_pieces(body, list(range(1, len(body))))  # one byte at a time
    assert out == expected and decoder.done


@pytest.mark.parametrize("line", [b"5 ;name=value", b"5\t; name = value", b"5 ; a ; b=c", b"5 "])
def test_whitespace_around_extensions_is_accepted_as_rfc_9112_allows(line: bytes) -> None:
    # h11 refuses some; RFC 9112's chunk-ext allows BWS around ";" and "="
    decoder = ChunkedDecoder()
    assert decoder.feed(line + b"\r\nhello\r\n0\r\n\r\n") == b"hello"
    assert decoder.done


def test_a_read_of_many_events_comes_out_as_one_piece_and_not_done_until_the_last_chunk() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(_chunk(SSE) * 3) == SSE * 3
    assert not decoder.done
    assert decoder.feed(b"0\r\n") == b""
    assert not decoder.done  # the trailer section's empty line is still to come
    assert decoder.feed(b"\r\nHTTP/1.1 200 OK\r\n") == b""
    assert decoder.done and decoder.trailing == b"HTTP/1.1 200 OK\r\n"
    decoder.feed(b"more")
    assert decoder.trailing == b"HTTP/1.1 200 OK\r\nmore"


INVALID = {
    "not hex": (b"zz\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "signed size": (b"+5\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "0x prefix": (b"0x5\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "empty size line": (b"\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "more than 16 hex digits": (b"00000000000000005\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "bare LF ends the size line": (b"5\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "control character in an extension": (b"5;a\x01\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "negative size": (b"-5\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "whitespace before the size": (b" 5\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "two sizes": (b"5 5\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "bare CR in the size line": (b"5\r;a\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "empty extension": (b"5;\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "extension without a name": (b"5;=v\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "extension with an empty value": (b"5;a=\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "space inside an extension name": (b"5;a b\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "space inside a token value": (b"5;a=b c\r\nhello\r\n0\r\n\r\n", "invalid chunk-size"),
    "unterminated quoted value": (b'5;a="x\r\nhello\r\n0\r\n\r\n', "invalid chunk-size"),
    "bytes after a quoted value": (b'5;a="x"y\r\nhello\r\n0\r\n\r\n', "invalid chunk-size"),
    "control character in a quoted value": (b'5;a="\x01"\r\nhello\r\n0\r\n\r\n', "invalid chunk-size"),
    "bare LF in the last chunk's line": (b"0\n\r\n", "invalid chunk-size"),
    "data longer than its size": (b"3\r\nhello\r\n0\r\n\r\n", "not followed by CRLF"),
    "data shorter than its size": (b"7\r\nhello\r\n0\r\n\r\n", "not followed by CRLF"),
    "bare LF after data": (b"5\r\nhello\n0\r\n\r\n", "not followed by CRLF"),
    "malformed trailer": (b"0\r\nnot a field\r\n\r\n", "invalid trailer"),
    "obs-fold trailer": (b"0\r\nx-a: 1\r\n continued\r\n\r\n", "invalid trailer"),
    "trailer without a colon": (b"0\r\nx-a\r\n\r\n", "invalid trailer"),
    "space before a trailer's colon": (b"0\r\nx-a : 1\r\n\r\n", "invalid trailer"),
    "control character in a trailer": (b"0\r\nx-a: \x01\r\n\r\n", "invalid trailer"),
    "bare LF ends the trailers": (b"0\r\nx-a: 1\n\r\n", "invalid trailer"),
}


@pytest.mark.parametrize(("body", "reason"), INVALID.values(), ids=INVALID.keys())
def test_malformed_framing_is_refused_wherever_the_reads_split(body: bytes, reason: str) -> None:
    for cut in range(len(body) + 1):
        with pytest.raises(ChunkedError, match=reason):
            _decode_in_pieces(body, [cut])


def test_an_endless_size_line_is_refused_once_it_passes_the_bound() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"5;" + b"x" * (MAX_LINE - 2))  # at the bound: still waiting for CRLF
    with pytest.raises(ChunkedError, match="too long"):
        decoder.feed(b"x")
    with pytest.raises(ChunkedError, match="too long"):
        ChunkedDecoder().feed(b"5;" + b"x" * MAX_LINE + b"\r\nhello\r\n")


def test_the_trailer_section_is_bounded() -> None:
    decoder = ChunkedDecoder(max_trailers=64)
    decoder.feed(b"0\r\n" + b"x-a: " + b"1" * 40 + b"\r\n")
    with pytest.raises(ChunkedError, match="trailer section too large"):
        decoder.feed(b"x-b: " + b"2" * 40 + b"\r\n\r\n")
    with pytest.raises(ChunkedError, match="trailer section too large"):
        ChunkedDecoder(max_trailers=64).feed(b"0\r\nx-a: " + b"1" * 100)


def test_a_trailer_line_is_bounded_like_a_size_line() -> None:
    decoder = ChunkedDecoder(max_trailers=64 * 1024)
    decoder.feed(b"0\r\nx-a: " + b"1" * (MAX_LINE - 5))  # at the bound: still waiting for CRLF
    with pytest.raises(ChunkedError, match="trailer line too long"):
        decoder.feed(b"1")
    with pytest.raises(ChunkedError, match="trailer line too long"):
        ChunkedDecoder(max_trailers=64 * 1024).feed(b"0\r\nx-a: " + b"1" * MAX_LINE + b"\r\n\r\n")
