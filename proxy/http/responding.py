"""The exchange task's side of a client connection: writing the response.

:class:`ResponseWriting` is a part of :class:`~llmproxy.http.server.HttpConnection`
(a base class of it, kept in its own module for size): the calls the
exchange task makes to answer (``start_response``, ``write``, ``flush``,
``end_response``, ``drain``, ``write_paused``), each going to the current
:class:`~llmproxy.http.request_cycle.Cycle`.

h11 parses the request; the response is serialised by the
:class:`~llmproxy.http.request_cycle.Cycle` (:mod:`llmproxy.http.response_head`): the proxy
knows its framing (a length, or chunked) and every field it writes was
validated when parsed or added, so h11's send-side state machine would only
repeat that work on the hot path.
Keep-alive follows RFC 9112 9.3, as h11 would decide it: HTTP/1.1 without
``Connection: close``; a close-delimited body or an unread request body
closes the connection after the response.

Flow control (one :class:`~llmproxy.io.flow.FlowControl`): the transport's
``pause_writing``/``resume_writing`` drive :meth:`ResponseWriting.drain`,
which the exchange task awaits after writing, so a slow client stops the task
reading from the upstream (whose connection then stops reading its socket). ``drain(stall_timeout)`` bounds that wait:
a client that has not read enough within ``stall_timeout`` seconds makes it
raise :class:`~llmproxy.errors.ClientDisconnected` (code ``client_stalled``),
nothing more is written, and the connection is aborted when the exchange
ends, so the upstream connection it held is closed and its pool slot freed.
While a response is being written, reading from the client is paused once a
pipelined request's bytes exceed the head limit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from llmproxy.errors import ClientDisconnected

if TYPE_CHECKING:
    from llmproxy.engine.cycle import Runtime
    from llmproxy.http.request_cycle import Cycle
    from llmproxy.io.flow import FlowControl

__all__ = ["ResponseWriting"]

log = logging.getLogger("llmproxy.server")


class ResponseWriting:
    """The response-writing methods of :class:`~llmproxy.http.server.HttpConnection` (see the module docstring)."""

    # set by HttpConnection
    _rt: Runtime
    _client: str
    _flow: FlowControl | None
    _cycle: Cycle | None

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None) -> None:
        """Queue the response head.

        ``headers`` must hold no framing or hop-by-hop field (Content-Length,
        Transfer-Encoding, Connection ...): the framing is chosen here from
        ``content_length`` (None: chunked for an HTTP/1.1 client, else
        delimited by closing the connection).
        """
        assert self._cycle is not None
        self._cycle.start(status, headers, content_length, self._rt.draining)

    def write(self, data: bytes) -> None:
        """Queue body bytes; everything queued between two flushes goes out as one chunk."""
        cycle = self._cycle
        assert cycle is not None
        cycle.write(data)

    def flush(self) -> None:
        """Send what was queued (call before waiting for more upstream data)."""
        cycle = self._cycle
        assert cycle is not None
        cycle.flush()

    def end_response(self) -> None:
        """Finish the response body and send everything queued."""
        assert self._cycle is not None
        self._cycle.end()

    @property
    def write_paused(self) -> bool:
        return self._flow is not None and self._flow.write_paused

    async def drain(self, stall_timeout: float | None = None) -> None:
        """Wait until the client has read enough of what was written.

        With a ``stall_timeout`` (seconds), a client that has not read enough by then
        is given up on: :class:`~llmproxy.errors.ClientDisconnected` (code
        ``client_stalled``) is raised, nothing more is written to it, and the
        connection is aborted when the exchange finishes. One timer per wait,
        and a wait happens only when the transport paused writing.
        """
        cycle = self._cycle
        assert cycle is not None and self._flow is not None
        cycle.flush()
        if await self._flow.drain(stall_timeout):
            return
        cycle.stalled = True
        cycle.keep_alive = False
        log.info("client %s stopped reading the response; giving up on it", self._client)
        raise ClientDisconnected("client stopped reading the response", code="client_stalled")
