"""Strict checks on a request head, run before h11 sees it.

h11 is lenient where a proxy must not be (it joins obs-fold lines, accepts
bare LF line endings, accepts both Content-Length and Transfer-Encoding and
has no bound on the header count). Requests that two parsers could frame
differently are request-smuggling vectors, so the proxy refuses them with
400 and closes the connection. The rules, from RFC 9112:

* lines end in CRLF; a bare CR or bare LF anywhere in the head is refused
  (section 2.2 allows a recipient to refuse them);
* no obs-fold: a header line may not start with SP or HTAB (5.2);
* no whitespace between a field name and its colon (5.1; h11's field grammar
  refuses it, like any field name that is not a token);
* Content-Length and Transfer-Encoding together are refused (6.1: "ought
  to be handled as an error");
* several Content-Length values must be identical digits (6.3);
* Transfer-Encoding must be exactly ``chunked``: anything else cannot be
  framed by this proxy (6.3);
* at most ``max_count`` header fields (431 past it; nginx and Apache cap at
  100).

The head size limit (431) is enforced while the head is being received, in
:func:`find_head_end`.
"""

from __future__ import annotations

import re

from .errors import BadRequest, HeadersTooLarge
from .headers import comma_tokens

__all__ = ["HeadInfo", "check_head", "find_head_end"]

#: A framing field line: its name (any case) and raw value. Lines are CRLF-terminated, so the
#: value runs to the next CR. Whitespace before the colon is matched here so such a line is
#: still seen as framing, and then refused by h11's field grammar.
_FRAMING_FIELD = re.compile(rb"\r\n(content-length|transfer-encoding|expect|connection)[ \t]*:([^\r]*)", re.IGNORECASE)
_DIGITS = re.compile(rb"[0-9]{1,18}")


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
    (``Expect: 100-continue``) and ``connection_close`` (a ``close`` token in
    ``Connection``).
    """

    __slots__ = ("chunked", "connection_close", "content_length", "expect_continue")

    def __init__(
        self, content_length: int | None, chunked: bool, expect_continue: bool, connection_close: bool = False
    ) -> None:
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.connection_close = connection_close


def check_head(head: bytes | bytearray, max_count: int) -> HeadInfo:
    """Apply the module's rules to a complete head (request line + fields + CRLFCRLF).

    The head was already found free of bare CR and LF (:func:`find_head_end`),
    so every line ends in CRLF. One regex pass picks out the framing fields;
    the grammar of every field line (a token name, no whitespace before the
    colon, no control characters in values) is h11's to check when it parses
    the head right after.
    """
    # the request line and the final empty line end in CRLF too
    if head.count(b"\r\n") - 2 > max_count:
        raise HeadersTooLarge(f"more than {max_count} header fields")
    if b"\r\n " in head or b"\r\n\t" in head:
        raise BadRequest("obsolete line folding in request head", code="invalid_framing")
    content_length: bytes | None = None
    transfer_encoding: list[bytes] = []
    expect_continue = False
    connection_close = False
    for match in _FRAMING_FIELD.finditer(head):
        name = match.group(1).lower()
        value = match.group(2).strip(b" \t").lower()
        if name == b"content-length":
            for part in value.split(b","):
                part = part.strip(b" \t")
                if _DIGITS.fullmatch(part) is None:
                    raise BadRequest("invalid Content-Length", code="invalid_framing")
                if content_length is not None and int(part) != int(content_length):
                    raise BadRequest("conflicting Content-Length values", code="invalid_framing")
                content_length = part
        elif name == b"transfer-encoding":
            transfer_encoding.append(value)
        elif name == b"expect":
            expect_continue = value == b"100-continue"
        else:  # connection
            connection_close = connection_close or b"close" in comma_tokens(value)
    chunked = False
    if transfer_encoding:
        if content_length is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding in request", code="invalid_framing")
        if transfer_encoding != [b"chunked"]:
            raise BadRequest(
                "unsupported Transfer-Encoding (only a single 'chunked' is accepted)",
                code="invalid_framing",
            )
        chunked = True
    length = int(content_length) if content_length is not None else None
    return HeadInfo(length, chunked, expect_continue, connection_close)
