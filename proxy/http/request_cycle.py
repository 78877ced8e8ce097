"""Per-request state of a client connection, and the connection's transition table.

A :class:`Cycle` is created when a request head is parsed and dropped when
the exchange ends (as uvicorn's ``RequestResponseCycle``): the request body
being read, whether a ``100 Continue`` is owed, and the response's framing
and queued output. The connection (:class:`~llmproxy.http.server.HttpConnection`)
keeps only per-socket state.

Every change of the connection's :class:`State` is checked against
:data:`TRANSITIONS` (as h11's ``_state.py``): a move not in the table is a
bug, and raises :class:`IllegalTransition` at once::

    HEAD ──> BODY ──> RESPONDING ──> HEAD     (and any state ──> CLOSED)
"""

from __future__ import annotations

import asyncio
import enum

from llmproxy.errors import ClientProtocol, ProxyError
from llmproxy.http.request_body import RequestBody
from llmproxy.http.response_head import CHUNKED_END, chunk_prefix, response_head

__all__ = ["TRANSITIONS", "Cycle", "IllegalTransition", "State", "check_transition"]


class State(enum.Enum):
    """Where a client connection is in its request/response loop."""

    HEAD = "head"  # reading a request head (or idle between requests)
    BODY = "body"  # reading the request body
    RESPONDING = "responding"  # the body is read (or failed); the response is being written
    CLOSED = "closed"

    # Members are singletons compared by identity: hash them by identity too (C speed;
    # Enum's own __hash__ is a Python call, paid on every transition check).
    __hash__ = object.__hash__


#: The moves a connection may make; CLOSED -> CLOSED keeps close/abort/connection_lost idempotent.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.HEAD: frozenset({State.BODY, State.CLOSED}),
    State.BODY: frozenset({State.RESPONDING, State.CLOSED}),
    State.RESPONDING: frozenset({State.HEAD, State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}


class IllegalTransition(RuntimeError):
    """A connection tried a move that :data:`TRANSITIONS` does not allow (a bug in the core)."""


def check_transition(old: State, new: State) -> State:
    """Return ``new`` if ``old -> new`` is allowed, else raise :class:`IllegalTransition`."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"connection state {old.value} -> {new.value} is not allowed")
    return new


class Cycle:
    """One request/response cycle of a connection: request body, framing, queued output.

    ``transport`` is the connection's; output is collected and written with
    one send per :meth:`flush`: a non-streamed response (head, body, end)
    costs one syscall, and the body written between two flushes (the events
    of one upstream read) one chunk.
    """

    __slots__ = (
        "_out",
        "_pending",
        "_pending_size",
        "_transport",
        "bodiless",
        "body",
        "body_error",
        "body_waiter",
        "chunked",
        "continue_pending",
        "head_request",
        "http11",
        "keep_alive",
        "protocol",
        "response_done",
        "stalled",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        body: RequestBody,
        *,
        head_request: bool,
        http11: bool,
        keep_alive: bool,
        continue_pending: bool,
        protocol: ClientProtocol,
    ) -> None:
        self._transport = transport
        self.body = body
        #: Why the body cannot be read (the exchange answers it, then the connection closes).
        self.body_error: ProxyError | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        #: The client sent ``Expect: 100-continue`` and was not answered yet.
        self.continue_pending = continue_pending
        self.head_request = head_request
        self.http11 = http11
        #: The request allows keep-alive (HTTP/1.1, no Connection: close), and the response too.
        self.keep_alive = keep_alive
        #: The protocol of the request's API (errors are rendered in it).
        self.protocol: ClientProtocol = protocol
        self.chunked = False  # the response body is chunk-framed
        self.bodiless = False  # HEAD, 1xx, 204, 304: body writes are dropped
        self.response_done = False
        self.stalled = False  # the client stopped reading: write nothing more, abort at the end
        self._out: list[bytes] = []  # serialised bytes ready to send
        self._pending: list[bytes] = []  # body bytes not framed yet (one chunk per flush)
        self._pending_size = 0

    def wake_body(self) -> None:
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def request_read(self) -> bool:
        """The whole request body was read without error (the connection may carry another)."""
        return self.body.done and self.body_error is None

    # -- response writing --------------------------------------------------------
    def start(
        self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None, draining: bool
    ) -> None:
        """Queue the response head (see :meth:`llmproxy.http.server.HttpConnection.start_response`)."""
        no_body_status = status < 200 or status in (204, 304)  # no body and no framing field
        bodiless = self.head_request or no_body_status
        if bodiless or content_length is not None:
            chunked = False
        elif self.http11:
            chunked = True
        else:
            chunked = False
            self.keep_alive = False  # HTTP/1.0: the body ends when the connection closes
        if draining:
            self.keep_alive = False
        self.chunked = chunked
        self.bodiless = bodiless
        length = None if no_body_status else content_length
        self._out.append(response_head(status, headers, length, chunked, self.keep_alive))

    def write(self, data: bytes) -> None:
        if self.bodiless or not data:
            return
        self._pending.append(data)
        self._pending_size += len(data)

    def _frame_pending(self) -> None:
        pending = self._pending
        if self.chunked:
            self._out.append(chunk_prefix(self._pending_size))
            self._out += pending
            self._out.append(b"\r\n")
        else:
            self._out += pending
        self._pending = []
        self._pending_size = 0

    def flush(self) -> None:
        if self._pending:
            self._frame_pending()
        out = self._out
        if out:
            self._out = []
            transport = self._transport
            if not transport.is_closing() and not self.stalled:
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def end(self) -> None:
        if self._pending:
            self._frame_pending()
        if self.chunked:
            self._out.append(CHUNKED_END)
        self.response_done = True
        self.flush()
