"""Answers the core writes itself: local replies and errors, in the client's protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmproxy.engine.forwarded import head_for_client
from llmproxy.errors import ProxyError, render_error, render_sse_error
from llmproxy.exchange import Exchange, LocalReply, Response
from llmproxy.headers import Headers

if TYPE_CHECKING:
    from llmproxy.http.server import HttpConnection

__all__ = ["send_error", "send_local"]

#: Fields of a held response head that describe its body: an error envelope replacing that body drops them.
_BODY_FIELDS = frozenset({b"content-type", b"content-encoding", b"content-length", b"etag", b"last-modified"})


def send_local(conn: HttpConnection, ex: Exchange, reply: LocalReply) -> None:
    """Write a filter's (or the core's) local reply as the whole response."""
    ex.response = Response(reply.status, Headers(reply.headers))
    ex.response_started = True
    conn.start_response(reply.status, head_for_client(ex, ex.response.headers), len(reply.body))
    ex.bytes_sent += len(reply.body)
    conn.write(reply.body)
    conn.end_response()


def send_error(conn: HttpConnection, ex: Exchange, err: ProxyError) -> None:
    """Answer ``err`` in the client's protocol: its envelope, a final SSE error event, or a closed connection.

    Before the response started, the headers that filters set on a held
    response head (``x-llmproxy-attempts``, header edits) stay on the error
    response; only the fields that described the replaced body go.
    """
    protocol = ex.client_protocol
    if not ex.response_started:
        body = render_error(err, protocol)
        fields = err.head_fields()
        if ex.response is not None:
            names = {name for name, _ in fields}
            fields += [kv for kv in ex.response.headers.raw() if kv[0] not in _BODY_FIELDS and kv[0] not in names]
        ex.response = Response(err.status, Headers(fields))
        ex.response_started = True
        conn.start_response(err.status, head_for_client(ex, ex.response.headers), len(body))
        ex.bytes_sent += len(body)
        conn.write(body)
        conn.end_response()
    elif ex.is_sse:
        responses = ex.client_path.startswith("/v1/responses")
        conn.write(render_sse_error(err, protocol, responses=responses))
        conn.end_response()
    else:
        conn.abort()
