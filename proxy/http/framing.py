"""Strict checks on a request head, run before h11 sees it, and on a chunked request body.

h11 is lenient where a proxy must not be (it joins obs-fold lines, accepts
bare LF line endings, accepts both Content-Length and Transfer-Encoding,
lets control characters other than NUL through in field values, accepts any
request-target and has no bound on the header count). Requests that two
parsers could frame or route differently are request-smuggling vectors, so
the proxy refuses them with 400 and closes the connection. The rules, from
RFC 9112 and RFC 9110:

* lines end in CRLF; a bare CR or bare LF anywhere in the head is refused
  (section 2.2 allows a recipient to refuse them);
* no control character other than HTAB anywhere in the head: NUL, 0x01-0x08,
  0x0B-0x1F (CR and LF only as a line's CRLF) and DEL, in the request line
  and in field names and values (RFC 9110 5.5: CR, LF and NUL are invalid in
  field values; the other CTLs are refused too, as no client needs them);
* no obs-fold: a header line may not start with SP or HTAB (5.2);
* no whitespace between a field name and its colon (5.1; h11's field grammar
  refuses it, like any field name that is not a token);
* Content-Length and Transfer-Encoding together are refused (6.1: "ought
  to be handled as an error");
* several Content-Length values must be identical digits (6.3);
* Transfer-Encoding must be exactly ``chunked``: anything else cannot be
  framed by this proxy (6.3); and an HTTP/1.0 request carrying
  Transfer-Encoding is refused (6.1: 1.0 has no chunked framing, so the
  message is faulty);
* at most one Host field, and its value is an RFC 3986 authority without
  userinfo: a reg-name, an IPv4 address or an ``[IP-literal]``, then an
  optional ``:port`` of 1-5 digits (RFC 9110 7.2; 9112 3.2). An empty Host is
  accepted only with an absolute-form target, whose authority replaces it;
* the request-target (:func:`request_target`) is origin-form (``/path?query``,
  not ``//``) or absolute-form (``http://`` or ``https://``, an authority as
  above, then the path); authority-form (``CONNECT host:443``), asterisk-form
  (``OPTIONS *``), relative paths and fragments are refused (3.2);
* at most ``max_count`` header fields (431 past it; nginx and Apache cap at
  100).

The head size limit (431) is enforced while the head is being received, in
:func:`find_head_end`.

Chunked request bodies (7.1): every chunk-size line is checked by
:func:`chunk_size`: 1-16 hex digits (no sign, no ``0x``, no overflow), then
chunk extensions that follow the grammar ``*( BWS ";" BWS token [ BWS "="
BWS ( token / quoted-string ) ] )`` and nothing else, at most
``MAX_CHUNK_LINE`` bytes; chunk data must end in CRLF (no bare LF). The
trailer section is bounded, each line must be a field line, and it is
dropped (the proxy forwards no trailers). A chunk larger than what is left of
the body limit is 413 as soon as its size line arrives.

Error messages name the rule that was broken and never quote request bytes
(they are logged and sent back; a head can carry an API key).
"""

from __future__ import annotations

import re

from llmproxy.errors import BadRequest, HeadersTooLarge
from llmproxy.headers import comma_tokens

__all__ = ["MAX_CHUNK_LINE", "HeadInfo", "check_head", "chunk_size", "find_head_end", "request_target"]

#: A framing field line: its name (any case) and raw value. Lines are CRLF-terminated, so the
#: value runs to the next CR. Whitespace before the colon is matched here so such a line is
#: still seen as framing, and then refused by h11's field grammar.
_FRAMING_FIELD = re.compile(
    rb"\r\n(content-length|transfer-encoding|expect|connection|host)[ \t]*:([^\r]*)", re.IGNORECASE
)
_DIGITS = re.compile(rb"[0-9]{1,18}")
#: Control characters other than HTAB; CR and LF are in the head only as CRLF (find_head_end).
#: Found by deleting them (bytes.translate: a C loop, several times faster than a regex search).
_CTL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_CTL = re.compile(b"[" + re.escape(_CTL_BYTES) + b"]")
#: RFC 3986 host (IP-literal, or reg-name, which covers IPv4address) with an optional port.
_AUTHORITY = re.compile(
    rb"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"
    rb"(?::[0-9]{1,5})?"
)
_ABSOLUTE = re.compile(rb"https?://([^/?#]*)", re.IGNORECASE)

#: Longest chunk-size line (extensions included, CRLF excluded); like proxy.chunked.MAX_LINE.
MAX_CHUNK_LINE = 4096
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x20-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)


def find_head_end(buf: bytes | bytearray, max_bytes: int) -> int:
    """Return the index just past the head's final CRLFCRLF, or -1 if incomplete.

    Raises :class:`BadRequest` on a bare CR or LF and :class:`HeadersTooLarge`
    when the head is (or must become) larger than ``max_bytes``.
    """
    end = buf.find(b"\r\n\r\n")
    region = buf if end < 0 else buf[: end + 4]
    lf = region.count(b"\n")
    cr = region.count(b"\r")
    crlf = region.count(b"\r\n")
    if lf != crlf or (cr != crlf and not (end < 0 and cr == crlf + 1 and region.endswith(b"\r"))):
        raise BadRequest("bare CR or LF in request head", code="invalid_framing")
    if end < 0:
        if len(buf) > max_bytes:
            raise HeadersTooLarge(f"request head larger than {max_bytes} bytes")
        return -1
    if end + 4 > max_bytes:
        raise HeadersTooLarge(f"request head larger than {max_bytes} bytes")
    return end + 4


class HeadInfo:
    """Framing facts of a checked head.

    ``content_length`` (None if absent), ``chunked``, ``expect_continue``
    (``Expect: 100-continue``), ``connection_close`` (a ``close`` token in
    ``Connection``) and ``host`` (the Host value, None if absent; its syntax
    was checked, but it may be empty: see :func:`request_target`).
    """

    __slots__ = ("chunked", "connection_close", "content_length", "expect_continue", "host")

    def __init__(
        self,
        content_length: int | None,
        chunked: bool,
        expect_continue: bool,
        connection_close: bool = False,
        host: bytes | None = None,
    ) -> None:
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.connection_close = connection_close
        self.host = host


def check_head(head: bytes | bytearray, max_count: int) -> HeadInfo:
    """Apply the module's rules to a complete head (request line + fields + CRLFCRLF).

    The head was already found free of bare CR and LF (:func:`find_head_end`),
    so every line ends in CRLF. One ``translate`` finds any control character,
    one regex pass picks out the framing fields and Host; the rest of the
    grammar of every field line (a token name, no whitespace before the
    colon) is h11's to check when it parses the head right after. The
    request-target is checked by :func:`request_target`.
    """
    # the request line and the final empty line end in CRLF too
    if head.count(b"\r\n") - 2 > max_count:
        raise HeadersTooLarge(f"more than {max_count} header fields")
    if len(head.translate(None, _CTL_BYTES)) != len(head):
        ctl = _CTL.search(head)
        assert ctl is not None
        if ctl.start() < head.find(b"\r\n"):
            raise BadRequest("control character in request line", code="invalid_request_line")
        raise BadRequest("control character in header field", code="invalid_header")
    if head.find(b"\r\n ") >= 0 or head.find(b"\r\n\t") >= 0:
        raise BadRequest("obsolete line folding in request head", code="invalid_framing")
    content_length: bytes | None = None
    transfer_encoding: list[bytes] = []
    expect_continue = False
    connection_close = False
    host: bytes | None = None
    for match in _FRAMING_FIELD.finditer(head):
        name = match.group(1).lower()
        value = match.group(2).strip(b" \t")
        if name == b"content-length":
            for part in value.split(b","):
                part = part.strip(b" \t")
                if _DIGITS.fullmatch(part) is None:
                    raise BadRequest("invalid Content-Length", code="invalid_framing")
                if content_length is not None and int(part) != int(content_length):
                    raise BadRequest("conflicting Content-Length values", code="invalid_framing")
                content_length = part
        elif name == b"transfer-encoding":
            transfer_encoding.append(value.lower())
        elif name == b"expect":
            expect_continue = value.lower() == b"100-continue"
        elif name == b"host":
            if host is not None:
                raise BadRequest("more than one Host header field", code="invalid_host")
            if value and _AUTHORITY.fullmatch(value) is None:
                raise BadRequest("invalid Host header value", code="invalid_host")
            host = value
        else:  # connection
            connection_close = connection_close or b"close" in comma_tokens(value.lower())
    chunked = bool(transfer_encoding) and _check_chunked(head, transfer_encoding, content_length)
    length = int(content_length) if content_length is not None else None
    return HeadInfo(length, chunked, expect_continue, connection_close, host)


def _check_chunked(head: bytes | bytearray, transfer_encoding: list[bytes], content_length: bytes | None) -> bool:
    """True for a request framed by a single ``chunked`` coding; raise BadRequest for any other framing."""
    if content_length is not None:
        raise BadRequest("both Content-Length and Transfer-Encoding in request", code="invalid_framing")
    if head[: head.find(b"\r\n")].endswith(b" HTTP/1.0"):
        raise BadRequest("Transfer-Encoding in an HTTP/1.0 request", code="invalid_framing")
    if transfer_encoding != [b"chunked"]:
        raise BadRequest(
            "unsupported Transfer-Encoding (only a single 'chunked' is accepted)",
            code="invalid_framing",
        )
    return True


def request_target(target: bytes, host: bytes | None) -> tuple[bytes, bytes | None]:
    """Check a request-target (RFC 9112 3.2); return its origin-form and the authority.

    An origin-form target is returned as is, with None. An absolute-form
    target (``http[s]://authority/path?query``) is returned as its path and
    query (``/`` when the path is empty) with its authority, which replaces
    the Host field (3.2.2: a server "MUST ignore the received Host header
    field"); there the Host may be empty. Raises :class:`BadRequest` for any
    other form, a fragment, a path starting with ``//``, or an empty Host
    with an origin-form target.
    """
    if target.startswith(b"/"):
        if target.startswith(b"//") or 35 in target:  # 35: "#"
            raise BadRequest("invalid request target", code="invalid_request_target")
        if host == b"":
            raise BadRequest("empty Host header value", code="invalid_host")
        return target, None
    match = _ABSOLUTE.match(target)
    if match is None:
        raise BadRequest("invalid request target", code="invalid_request_target")
    authority = match.group(1)
    if _AUTHORITY.fullmatch(authority) is None:
        raise BadRequest("invalid authority in request target", code="invalid_request_target")
    path = target[match.end() :]
    if not path.startswith(b"/"):
        path = b"/" + path  # empty, or a query alone
    if path.startswith(b"//") or 35 in path:  # 35: "#"
        raise BadRequest("invalid request target", code="invalid_request_target")
    return path, authority


def chunk_size(data: bytes, start: int, end: int) -> int:
    """Check the chunk-size line ``data[start:end]`` (CRLF excluded); return the size.

    Raises :class:`BadRequest` for a line over ``MAX_CHUNK_LINE`` bytes, or one
    that is not 1-16 hex digits followed by well-formed chunk extensions.
    """
    if end - start > MAX_CHUNK_LINE:
        raise BadRequest("chunk-size line too long", code="invalid_framing")
    match = _CHUNK_LINE.fullmatch(data, start, end)
    if match is None:
        raise BadRequest("invalid chunk-size line", code="invalid_framing")
    return int(match.group(1), 16)
