"""The relay of one attempt's response: head, pump, finish (:class:`Relay`).

The attempt loop around it is :mod:`llmproxy.engine.attempts`. The relay
passes body reads through the SSE framer and the mutating body stage,
writes (or holds) what they release, shows it to the observers, and ends
with the stage's tail, the held bytes with their exact length and the
upstream connection back to the pool. An upstream failure while nothing of
the response went downstream raises :class:`FailedBeforeHead`, which the
attempt loop presents to the response hooks again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from llmproxy.attempt import Attempt
from llmproxy.engine.chain import ResponseBodyStage
from llmproxy.engine.forwarded import head_for_client
from llmproxy.engine.secrets import redact, target_secrets
from llmproxy.errors import FilterFailed, ProxyError, UpstreamError, render_error
from llmproxy.exchange import Exchange, Response
from llmproxy.http.sse import SseFramer
from llmproxy.runtime.metrics import OVERHEAD_HEADER, overhead_ms
from llmproxy.upstream import UpstreamResponse, UpstreamTarget

if TYPE_CHECKING:
    from llmproxy.engine.cycle import Runtime
    from llmproxy.http.server import HttpConnection
    from llmproxy.signing import StreamDecoder

__all__ = ["FailedBeforeHead", "Relay"]

_JSON_TYPE = b"application/json"


class FailedBeforeHead(Exception):
    """An upstream failure while nothing of the response had gone downstream (it can still be retried)."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


def _auth_failure(ex: Exchange, target: UpstreamTarget) -> ProxyError | None:
    """The proxy's own error for a provider that refused the proxy's credential, else None.

    The provider's text is never relayed for it: it names (or quotes part of)
    a key that is the operator's, not the client's.
    """
    assert ex.response is not None
    status = ex.response.status
    if status not in (401, 403) or ex.upstream_error is not None or not target_secrets(target):
        return None
    which = f" (key id {target.key_id})" if target.key_id else ""
    return ProxyError(
        f"the provider '{target.name}' refused the credential the proxy holds for it{which}; "
        "this is a proxy configuration problem, not a problem with your request",
        code="provider_auth_failed",
        status=status,
    )


class Relay:
    """One attempt's response on its way downstream: head, pump, finish.

    Small JSON replies and error bodies are *held* (``limits.json_hold_bytes``
    at most) until their end, so that an upstream that stalls or resets in
    the middle of one still turns into a clean error envelope (or a retry)
    instead of a half-written 200. Past the bound the head goes out and the
    rest streams. Observers see held bytes only once they were written.

    The head's framing comes from what the proxy writes: the upstream's
    counted length when the body passes untouched, the exact length of a
    held body, else chunked.
    """

    __slots__ = (
        "attempt",
        "conn",
        "decoder",
        "ex",
        "framer",
        "held",
        "held_size",
        "hold_head",
        "hold_limit",
        "known_length",
        "observers",
        "resp",
        "rt",
        "secrets",
        "stage",
        "stage_ended",
        "synthesized",
    )

    def __init__(
        self,
        rt: Runtime,
        conn: HttpConnection,
        ex: Exchange,
        attempt: Attempt,
        resp: UpstreamResponse | None,
        hold_head: bool,
        decoder: StreamDecoder | None = None,
    ) -> None:
        self.rt = rt
        self.conn = conn
        self.ex = ex
        self.attempt = attempt
        self.resp = resp
        #: A response hook asked to hold the head until the body stage releases bytes.
        self.hold_head = hold_head
        #: Turns a non-SSE stream's raw reads into SSE events (:mod:`llmproxy.signing`).
        self.decoder = decoder
        chain = rt.chain
        body_plan = chain.response_body_plan
        observers = bool(chain.response_observer_plan)
        skipped = ex.control.skipped
        if skipped and (body_plan or observers):
            body_plan = tuple(step for step in body_plan if id(ex.filters[step.slot]) not in skipped)
            observers = any(id(ex.filters[step.slot]) not in skipped for step in chain.response_observer_plan)
        self.observers = observers
        limits = rt.limits
        is_sse = ex.is_sse
        self.stage = ResponseBodyStage(body_plan, limits.max_response_buffer_bytes, is_sse) if body_plan else None
        want_events = is_sse and (self.stage is not None or observers)
        self.framer = SseFramer(limits.max_sse_event_bytes) if want_events else None
        error = ex.upstream_error
        self.synthesized = render_error(error, ex.client_protocol) if error is not None else None
        # The length the client may be told up front: only when no filter can change the body.
        self.known_length: int | None = None
        if self.stage is None:
            if self.synthesized is not None:
                self.known_length = len(self.synthesized)
            elif resp is not None and decoder is None:
                self.known_length = resp.content_length  # counted off the socket, never the upstream's header
        response = ex.response
        assert response is not None
        #: The target's credentials, when this body must be checked for them (an error body);
        #: a stream's error events are checked on their own, see _emit.
        self.secrets = target_secrets(attempt.target) if resp is not None and response.status >= 400 else None
        self.hold_limit = self._hold_limit(response)
        self.held: list[bytes] = []
        self.held_size = 0
        #: The stage already saw end_of_stream (with the last data, see _pump).
        self.stage_ended = False

    def _hold_limit(self, response: Response) -> int:
        """How many body bytes to hold before the head goes out (-1: none)."""
        if self.resp is None or self.ex.is_sse or self.ex.request.method == "HEAD":
            return -1
        ctype = response.headers.get_raw(b"content-type")
        if response.status >= 400 or (ctype is not None and ctype.startswith(_JSON_TYPE)):
            return self.rt.limits.json_hold_bytes
        return -1

    # -- head ---------------------------------------------------------------------
    def send_head(self, content_length: int | None) -> None:
        """Write the head; ``content_length`` None means chunked (or close-delimited)."""
        ex = self.ex
        assert ex.response is not None
        attempt = self.attempt
        attempt.head_sent = True
        ex.response_started = True
        rt = self.rt
        if attempt.is_sse:
            rt.admin.metrics.stream_started()
        if rt.overhead_header:
            ex.response.headers.set(OVERHEAD_HEADER, f"{overhead_ms(ex):.3f}")
        self.conn.start_response(ex.response.status, head_for_client(ex, ex.response.headers), content_length)

    def _write(self, data: bytes) -> None:
        ex = self.ex
        if not ex.first_byte_at:
            ex.first_byte_at = time.perf_counter()
        ex.bytes_sent += len(data)
        self.conn.write(data)

    # -- the whole relay ----------------------------------------------------------
    async def run(self) -> bool:
        """Relay the response body; True when a filter asked for a retry in time.

        Raises :class:`FailedBeforeHead` for an upstream failure while nothing
        had gone downstream.
        """
        resp = self.resp
        response = self.ex.response
        if resp is not None and response is not None and response.status in (401, 403):
            auth_failure = _auth_failure(self.ex, self.attempt.target)
            if auth_failure is not None:
                await _discard_body(resp, self.rt.limits.json_hold_bytes)
                raise auth_failure
        if not self.hold_head and self.hold_limit < 0:
            self.send_head(self.known_length)
        try:
            if await self._pump():
                return True
            return await self._finish()
        except UpstreamError as err:
            if not self.attempt.head_sent:
                raise FailedBeforeHead(err) from None
            raise

    # -- pump -----------------------------------------------------------------------
    async def _pump(self) -> bool:
        """Read and relay until the body's end; True when a retry was asked for in time.

        One loop with the read, the framing and the no-stage, no-observer write
        inline: each helper call here is paid once per upstream read.
        """
        conn = self.conn
        resp = self.resp
        framer = self.framer
        stage = self.stage
        observers = self.observers
        # the first consumer takes batches of whole events: one piece per read (the stage
        # splits it only before a hook that wants one event per call)
        batches = stage is None or stage.batches
        ex_control = self.ex.control
        decoder = self.decoder
        while True:
            if self.synthesized is not None:
                chunk, self.synthesized = self.synthesized, None
                end = True  # a synthesized body is one piece
            elif resp is None:
                chunk = b""
                end = True
            else:
                chunk = await resp.read()
                # the end is known with the last data (a counted body read whole, the
                # last chunk and its terminator in one read): no further read, and the
                # stage gets the data and end_of_stream in one call
                end = not chunk or resp.at_end
                if decoder is not None:
                    # whole SSE events from the frames completed so far; an incomplete frame
                    # waits for the next read (nothing to pass on before it)
                    chunk = decoder.feed(chunk, end)
                    while not chunk and not end:
                        chunk = await resp.read()
                        end = not chunk or resp.at_end
                        chunk = decoder.feed(chunk, end)
            if framer is None:
                pieces = [chunk] if chunk else []
            else:
                if batches:
                    whole = framer.feed_whole(chunk)
                    pieces = [whole] if whole else []
                else:
                    pieces = framer.feed(chunk)
                if not chunk:
                    rest = framer.flush()
                    if rest:
                        pieces.append(rest)
                elif end and framer.pending:
                    # an unfinished (or oversized) rest: the events before it go first,
                    # its end (or error) with the next read, as for any stream
                    end = False
            if not observers:
                # every piece of this read through the stage in one call and out in one write
                if stage is None:
                    if pieces:
                        self._send(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                elif await self._relay_pieces(stage, pieces, end):
                    return True
            else:
                # observers see what each piece released
                last = len(pieces) - 1
                for i, piece in enumerate(pieces):
                    if stage is None:
                        await self._emit(piece)
                    elif await self._relay_pieces(stage, [piece], end and i == last):
                        return True
            if end:
                return False
            if ex_control.end_body:  # a body hook ended the body early (Exchange.end_response_body)
                if resp is not None:
                    resp.close()
                return False
            if conn.write_paused:
                # a client that stops reading holds the upstream connection: wait for it as
                # long as for the upstream (its idle timeout, within the total deadline)
                await conn.drain(None if resp is None else resp.stall_timeout())
            elif resp is None or not resp.buffered:
                # about to wait for the upstream: send what is queued now. Chunks that
                # arrived together go out together (one write), never held back.
                conn.flush()

    async def _relay_pieces(self, stage: ResponseBodyStage, pieces: list[bytes], end: bool) -> bool:
        """Pass ``pieces`` through the stage and emit what it releases; True to retry.

        ``end``: the body ends with these pieces; the last one goes with
        end_of_stream (none: the end goes alone, in :meth:`_finish`).
        """
        if end and pieces:
            self.stage_ended = True
        released = await stage.push_all(self.ex, pieces, end)
        if self._retry_asked():
            return True
        if released:
            await self._emit(released)
        return False

    def _retry_asked(self) -> bool:
        """A body hook asked for a retry: True when it may happen (nothing went downstream)."""
        ex = self.ex
        control = ex.control
        if not control.retry:
            return False
        if self.attempt.head_sent:
            raise FilterFailed(f"retry requested after the response started (request id {ex.id})")
        if ex.attempts < self.rt.limits.max_attempts:
            return True
        control.retry = False
        return False

    async def _emit(self, out: bytes) -> None:
        """Write (or hold) released bytes, then show what was written to the observers."""
        written = self._send(out)
        if written and self.observers:
            if self.ex.is_sse:
                self.conn.flush()  # observers never delay an event: it is on the wire before they run
            # (a JSON body goes out with its end, in one send, right after the observers)
            await self.rt.chain.observe_response(self.ex, written, False)

    def _send(self, out: bytes) -> bytes:
        """Write (or hold) released bytes; return what was written (b"" while held)."""
        if self.hold_limit >= 0:
            self.held.append(out)
            self.held_size += len(out)
            if self.held_size <= self.hold_limit:
                return b""
            # past the bound: the head goes out and the rest streams
            out = self._take_held()
            exact = self.stage is None and self.secrets is None
            self.send_head(self.known_length if exact else None)
        elif not self.attempt.head_sent:
            self.send_head(self.known_length if self.secrets is None else None)
        if self.secrets is not None:
            out = redact(out, self.secrets)
        elif self.ex.is_sse and out.find(b"error") >= 0 and self.resp is not None:
            # a provider's error event may quote the key it got (a byte check first: rare)
            out = redact(out, target_secrets(self.attempt.target))
        self._write(out)
        return out

    def _take_held(self) -> bytes:
        held = b"".join(self.held)
        self.hold_limit = -1
        self.held, self.held_size = [], 0
        return held

    # -- finish -----------------------------------------------------------------------
    async def _finish(self) -> bool:
        """End the body: the stage's tail, held bytes, the connection back to the pool."""
        ex = self.ex
        stage = self.stage
        tail = b""
        if stage is not None and not self.stage_ended:
            tail = await stage.push(ex, b"", True) or b""
            if self._retry_asked():
                return True
        if self.hold_limit >= 0:
            body = self._take_held() + tail
            if self.secrets is not None:
                body = redact(body, self.secrets)
            self.send_head(len(body))
            tail = body
        elif not self.attempt.head_sent:
            self.send_head(len(tail) if stage is not None else (self.known_length or 0))
        elif self.secrets is not None and tail:
            tail = redact(tail, self.secrets)
        if tail:
            self._write(tail)
        if self.observers:
            if tail:
                if ex.is_sse:
                    self.conn.flush()
                await self.rt.chain.observe_response(ex, tail, False)
            await self.rt.chain.observe_response(ex, b"", True)
        if self.resp is not None:
            self.resp.release()
        if ex.upstream_error is not None:
            ex.error = ex.upstream_error
        self.conn.end_response()
        return False


async def _discard_body(resp: UpstreamResponse, limit: int) -> None:
    """Read a body nobody will see to its end (up to ``limit`` bytes) so the connection can be reused."""
    seen = 0
    try:
        while seen <= limit:
            chunk = await resp.read()
            if not chunk:
                resp.release()
                return
            seen += len(chunk)
    except UpstreamError:
        pass
    resp.close()
