"""Header rewriting between the two sides of the proxy.

Towards the upstream (:func:`upstream_headers`): hop-by-hop fields and the
fields the proxy rebuilds itself go; the client's own credentials never go
(they are for the proxy, not the provider: provider credentials come from
the :class:`~llmproxy.upstream.UpstreamTarget`); ``x-forwarded-for`` is
appended, ``x-request-id`` set, ``Content-Length`` recomputed, and
``accept-encoding: identity`` replaces the client's: the proxy reads what it
relays (usage, translation, failover's first content, key redaction in error
bodies), which a gzipped body would hide from it.

Towards the client (:func:`upstream_response_headers`, then
:func:`head_for_client`): hop-by-hop and framing fields go (the connection
writes its own framing from what it sends), ``x-request-id`` is the proxy's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmproxy.headers import HOP_BY_HOP, Headers, comma_tokens

if TYPE_CHECKING:
    from llmproxy.exchange import Exchange
    from llmproxy.upstream import UpstreamTarget

__all__ = ["head_for_client", "upstream_headers", "upstream_response_headers"]

_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-request-id",
    b"authorization",
    b"x-api-key",
    b"api-key",
    b"accept-encoding",
}
_DROP_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-request-id"}
_NONE: frozenset[bytes] = frozenset()
# Fields the connection writes itself when it serialises the head (framing and keep-alive).
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


def upstream_headers(ex: Exchange, target: UpstreamTarget, body: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of the request to ``target`` (exactly one Host; a Content-Length matching ``body``)."""
    req_headers = ex.request.headers
    connection = req_headers.get_raw(b"connection")
    extra_drop = comma_tokens(connection) if connection is not None else _NONE
    out = [(b"host", target.host_header)]
    forwarded_for: bytes | None = None
    for name, value in req_headers.raw():
        if name in _DROP_REQUEST or name in extra_drop or name.startswith(b"proxy-"):
            if name == b"x-forwarded-for":
                forwarded_for = value
            continue
        out.append((name, value))
    if body or ex.request.method not in ("GET", "HEAD"):
        out.append((b"content-length", b"%d" % len(body)))
    client = ex.client_addr.encode("latin-1")
    out.append((b"x-forwarded-for", forwarded_for + b", " + client if forwarded_for else client))
    out.append((b"x-request-id", ex.id.encode("ascii")))
    out.append((b"accept-encoding", b"identity"))
    out.extend(target.headers)
    return out


def upstream_response_headers(raw: list[tuple[bytes, bytes]]) -> Headers:
    """The upstream response's fields as the response hooks see them (no hop-by-hop, no framing length)."""
    kept: list[tuple[bytes, bytes]] = []
    connection: bytes | None = None
    for field in raw:
        name = field[0]
        if name in _DROP_RESPONSE:
            if name == b"connection" and connection is None:
                connection = field[1]
            continue
        kept.append(field)
    if connection is not None:
        extra_drop = comma_tokens(connection)  # the fields the Connection header names go too
        kept = [field for field in kept if field[0] not in extra_drop]
    return Headers(kept)


def head_for_client(ex: Exchange, headers: Headers) -> list[tuple[bytes, bytes]]:
    """The fields written downstream: ``headers`` without framing, then the
    exchange's :meth:`~llmproxy.Exchange.set_response_header` fields (replacing
    same-named ones), plus the request id."""
    out = [(k, v) for k, v in headers.raw() if k not in _FRAMING]
    extra = ex.extra_response_headers
    if extra is not None:
        names = {k for k, _ in extra}
        out = [kv for kv in out if kv[0] not in names]
        out += extra
    out.append((b"x-request-id", ex.id.encode("ascii")))
    return out
