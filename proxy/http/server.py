"""The downstream side: one :class:`HttpConnection` (an asyncio Protocol) per socket.

Theory of operation. A connection loops over request/response cycles::

    HEAD ──head complete──> BODY ──body complete──> RESPONDING ──response done──> HEAD
      │  (strict checks,        (counted to its         (bytes of a pipelined
      │   then h11 parses)       Content-Length, or      next request wait here)
      │                          chunks decoded here)
      └── error / timeout / EOF mid-request / Connection: close ──> CLOSED

Timeouts (one :class:`~llmproxy.io.timers.LazyTimer`): ``header_timeout`` for a
whole head, ``body_timeout`` between two bytes of a request body (re-armed
per read, which costs no timer operation), ``keepalive_timeout`` between
requests; each of the first two is a 408, then close. A client that half-closes
(FIN) with a head or body unfinished is answered 400 and closed at once.

Heads are parsed by :func:`llmproxy.http.request_head.parse_head` (strict checks,
then a fresh h11 state machine per head, pipelined ones included), bodies by
:class:`~llmproxy.http.request_body.RequestBody`; the bytes past a request's end are
checked as the next head. Nothing a client sent is ever quoted in a
rejection's message or log line: messages name the rule.

The exchange itself runs in a task (:func:`llmproxy.engine.cycle.run_exchange`); the
connection only parses, buffers the request body (bounded) and writes what
the task gives it. The exchange's state lives on the :class:`~llmproxy.exchange.Exchange`,
the cycle's (request body, response framing, queued output) on a
:class:`~llmproxy.http.request_cycle.Cycle` made per head and dropped when the cycle
ends; the connection keeps only per-socket state, and every change of its
state is checked against :data:`~llmproxy.http.request_cycle.TRANSITIONS`.
Responses are written through :class:`~llmproxy.http.responding.ResponseWriting`
(serialisation, keep-alive, flow control towards the client).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11

from llmproxy.engine.cycle import run_exchange
from llmproxy.errors import (
    BodyTooLarge,
    HeaderTimeout,
    ProxyError,
    ServiceUnavailable,
    protocol_of_path,
    render_error,
)
from llmproxy.exchange import Exchange, Request
from llmproxy.headers import Headers, fields_of
from llmproxy.http.framing import HeadInfo, request_target
from llmproxy.http.request_body import RequestBody
from llmproxy.http.request_cycle import TRANSITIONS, Cycle, State, check_transition
from llmproxy.http.request_head import incomplete, parse_head, protocol_of, request_id
from llmproxy.http.responding import ResponseWriting
from llmproxy.http.response_head import CONTINUE_100, response_head
from llmproxy.io.flow import FlowControl
from llmproxy.io.timers import LazyTimer

if TYPE_CHECKING:
    from llmproxy.engine.cycle import Runtime

__all__ = ["HttpConnection"]

log = logging.getLogger("llmproxy.server")

_HEALTHZ_BODY = b'{"status":"ok"}'


class HttpConnection(ResponseWriting, asyncio.Protocol):
    """One client socket: parsing, timers, flow control; the current :class:`Cycle` does the rest."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._limits = runtime.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._flow: FlowControl | None = None
        self._state = State.HEAD
        self._buf = bytearray()  # bytes of a request head not parsed yet
        self._client = "-"
        #: The head-read, body-read and keep-alive timeouts (one at a time).
        self._timer = LazyTimer(self._loop)
        #: True while the timer is the keep-alive idle timer (no byte of a next request yet).
        self._keepalive_wait = False
        self._task: asyncio.Task[None] | None = None
        #: The current request/response cycle; None between cycles.
        self._cycle: Cycle | None = None
        self._eof = False  # the client half-closed: no more request bytes will come
        self._served = 0

    def __repr__(self) -> str:
        return f"<HttpConnection {self._client} {self._state.value} served={self._served}>"

    def _set_state(self, new: State) -> None:
        """The one place the state changes: checked against :data:`~llmproxy.http.request_cycle.TRANSITIONS`."""
        if new not in TRANSITIONS[self._state]:
            check_transition(self._state, new)  # raises IllegalTransition
        self._state = new

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._flow = FlowControl(self._transport, self._loop)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client = str(peer[0])
        self._transport.set_write_buffer_limits(high=self._limits.write_high_water)  # type: ignore[union-attr]
        connections = self._rt.connections
        connections.add(self)
        self._rt.admin.metrics.connection_opened()
        if len(connections) > self._limits.max_connections or self._rt.draining:
            self._reject(
                ServiceUnavailable("too many connections" if not self._rt.draining else "server is shutting down")
            )
            return
        self._arm(self._limits.header_timeout, self._on_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is not State.CLOSED:  # (closed already when the proxy closed it)
            self._set_state(State.CLOSED)
        connections = self._rt.connections
        if self in connections:
            connections.discard(self)
            self._rt.admin.metrics.connection_closed()
        self._timer.close()
        task = self._task
        if task is not None and not task.done() and task not in self._rt.finishing:
            task.cancel()  # (never while its end hooks run: accounting finishes)
        if self._flow is not None:
            self._flow.close()
        cycle = self._cycle
        if cycle is not None and cycle.body_waiter is not None and not cycle.body_waiter.done():
            cycle.body_waiter.cancel()

    def pause_writing(self) -> None:
        assert self._flow is not None
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        assert self._flow is not None
        self._flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is State.BODY:
            # moves the deadline only: no timer operation per read
            self._timer.arm(self._loop.time() + self._limits.body_timeout, self._on_body_timeout)
            self._take_body(data)
        elif state is State.HEAD:
            self._buf += data
            self._parse_head()
        elif state is State.RESPONDING:
            self._buf += data
            if len(self._buf) > self._limits.max_header_bytes:
                assert self._flow is not None
                self._flow.pause_reading()  # idempotent

    def eof_received(self) -> bool | None:
        # A half-closed client still gets its response (keep the write side open),
        # but an unfinished head or body will never be finished: answer it now.
        self._eof = True
        state = self._state
        if state is State.HEAD:
            if not self._buf and self._task is None:
                return False
            self._reject(incomplete())
        elif state is State.BODY:
            self._fail_body(incomplete())
        return True

    # -- timers --------------------------------------------------------------
    def _arm(self, delay: float, on_expiry: Callable[[], None]) -> None:
        self._timer.arm(self._loop.time() + delay, on_expiry)

    def _on_head_timeout(self) -> None:
        if self._state is not State.HEAD:
            return
        if self._buf:
            self._reject(HeaderTimeout("request head not received in time"))
        else:
            self._close()

    def _on_body_timeout(self) -> None:
        if self._state is State.BODY:
            self._fail_body(HeaderTimeout("request body not received in time"))

    def _on_keepalive_timeout(self) -> None:
        if self._state is State.HEAD and not self._buf:
            self._close()

    # -- request head ----------------------------------------------------------
    def _parse_head(self) -> None:
        if self._keepalive_wait:
            # first bytes of a new request on a kept-alive connection
            self._keepalive_wait = False
            if self._rt.successor is not None:
                self._follow_reload()
            self._arm(self._limits.header_timeout, self._on_head_timeout)
        try:
            parsed = parse_head(self._buf, self._limits, self._eof)
            if parsed is None:
                return
            self._timer.disarm()
            event, info, rest = parsed
            target, authority = request_target(event.target, info.host)
        except ProxyError as exc:
            self._reject(exc)
            return
        self._start_cycle(event, info, target, authority, rest)

    def _start_cycle(
        self, event: h11.Request, info: HeadInfo, target: bytes, authority: bytes | None, rest: bytes
    ) -> None:
        """A new cycle for a parsed head: local answers here, the others to an exchange task."""
        limits = self._limits
        method = event.method
        http11 = event.http_version == b"1.1"
        assert self._transport is not None
        self._cycle = Cycle(
            self._transport,
            RequestBody(info.chunked, info.content_length or 0, limits.max_body_bytes, limits.max_header_bytes),
            head_request=method == b"HEAD",
            http11=http11,
            keep_alive=http11 and not info.connection_close,
            continue_pending=info.expect_continue,
            protocol=protocol_of_path(target[:13].decode("latin-1")),
        )
        if info.content_length is not None and info.content_length > limits.max_body_bytes:
            self._reject(BodyTooLarge(f"request body larger than {limits.max_body_bytes} bytes"))
            return
        if target in self._rt.admin.paths and (method == b"GET" or method == b"HEAD") and self._admin(target, rest):
            return
        if target == b"/healthz" and method == b"GET":
            self._begin_body(rest)
            self._local_reply(200, b"application/json", _HEALTHZ_BODY)
            return
        headers = Headers(fields_of(event.headers))
        if authority is not None:
            headers.set_raw(b"host", authority.lower())
        ex = Exchange(
            request_id(headers.get_raw(b"x-request-id")),
            Request(method.decode("ascii"), target.decode("latin-1"), headers, b"", event.http_version.decode("ascii")),
            self._client,
        )
        # the task first: a body error found in ``rest`` is then its to answer
        self._task = self._loop.create_task(run_exchange(self._rt, self, ex))
        self._begin_body(rest)

    # -- request body ------------------------------------------------------------
    def _begin_body(self, rest: bytes) -> None:
        """Start receiving the body; ``rest`` is what followed the head in the buffer."""
        self._set_state(State.BODY)
        self._take_body(rest)
        cycle = self._cycle
        if self._state is State.BODY and cycle is not None:
            if self._eof:
                self._fail_body(incomplete())
            elif not (cycle.continue_pending and not cycle.body.seen):
                # a client waiting for 100 Continue is timed from when it gets it (read_body)
                self._arm(self._limits.body_timeout, self._on_body_timeout)

    def _take_body(self, data: bytes) -> None:
        """Body bytes; what follows the body is the next request's."""
        cycle = self._cycle
        assert cycle is not None
        body = cycle.body
        try:
            rest = body.feed(data)
        except ProxyError as exc:
            self._fail_body(exc)
            return
        if body.done:
            if rest:
                self._buf += rest
            self._set_state(State.RESPONDING)
            self._timer.disarm()
            cycle.wake_body()

    def _fail_body(self, error: ProxyError) -> None:
        """The body cannot be read: the exchange task answers ``error``, then the connection closes."""
        cycle = self._cycle
        if self._task is None or cycle is None:  # nobody will read the body: answer here
            self._reject(error)
            return
        cycle.body_error = error
        cycle.body.done = True
        self._set_state(State.RESPONDING)
        self._timer.disarm()
        cycle.wake_body()

    async def read_body(self) -> bytes:
        """Wait for the whole request body (bounded); raise its framing or size error."""
        cycle = self._cycle
        assert cycle is not None
        if not cycle.body.done:
            if cycle.continue_pending:
                cycle.continue_pending = False
                assert self._transport is not None
                # the client waits for it until it has sent a body byte
                if not cycle.body.seen:
                    self._transport.write(CONTINUE_100)
                    self._arm(self._limits.body_timeout, self._on_body_timeout)
            cycle.body_waiter = self._loop.create_future()
            try:
                await cycle.body_waiter
            finally:
                cycle.body_waiter = None
        if cycle.body_error is not None:
            raise cycle.body_error
        return bytes(cycle.body.data)

    def abort(self) -> None:
        """Close the connection at once (a response that cannot be finished)."""
        self._set_state(State.CLOSED)
        if self._transport is not None:
            self._transport.abort()

    def exchange_finished(self) -> None:
        """Called by the exchange task when its cycle ends: next cycle or close."""
        cycle = self._cycle
        self._task = None
        self._cycle = None
        self._served += 1
        if self._state is State.CLOSED or cycle is None or self._transport is None or self._transport.is_closing():
            return
        if cycle.stalled:  # close() would wait for the client to read what is queued
            self.abort()
            return
        if not (cycle.response_done and cycle.keep_alive and cycle.request_read) or self._rt.draining:
            self._close()
            return
        if self._rt.successor is not None:
            self._follow_reload()
        self._set_state(State.HEAD)
        flow = self._flow
        assert flow is not None
        if flow.read_paused:  # (resume_reading is idempotent; the check saves a call per request)
            flow.resume_reading()
        if self._buf:
            self._arm(self._limits.header_timeout, self._on_head_timeout)
            self._parse_head()
        elif self._eof:
            self._close()
        else:
            self._keepalive_wait = True
            self._arm(self._limits.keepalive_timeout, self._on_keepalive_timeout)

    def _follow_reload(self) -> None:
        """Between two cycles: serve the next request on the newest config generation."""
        self._rt = self._rt.newest()
        self._limits = self._rt.limits

    # -- replies the connection makes itself ---------------------------------------
    def _local_reply(self, status: int, ctype: bytes, body: bytes) -> None:
        self.start_response(status, [(b"content-type", ctype)], len(body))
        self.write(body)
        self.end_response()
        self.exchange_finished()

    def _admin(self, target: bytes, rest: bytes) -> bool:
        """Answer an admin path for an allowed client; False to handle it as any other path."""
        answer = self._rt.admin.answer(target, self._client)
        if answer is None:
            return False
        status, ctype, body = answer
        self._begin_body(rest)
        self._local_reply(status, ctype, body)
        return True

    def _reject(self, error: ProxyError) -> None:
        """Answer a request the connection cannot parse or accept, then close."""
        self._timer.disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        cycle = self._cycle
        body = render_error(error, cycle.protocol if cycle is not None else protocol_of(self._buf))
        transport.writelines([response_head(error.status, error.head_fields(), len(body), False, False), body])
        log.info("rejected %s from %s: %s", error.status, self._client, error.message)
        self._close()

    def _close(self) -> None:
        self._set_state(State.CLOSED)
        self._timer.close()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def close_if_idle(self) -> bool:
        """For shutdown: close now if no exchange is running; True if closed."""
        if self._task is None:
            self._close()
            return True
        return False
