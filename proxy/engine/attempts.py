"""The attempt loop of one exchange: one :class:`~llmproxy.attempt.Attempt` per upstream try.

:func:`forward` sends the request upstream and relays the chosen response
downstream. Per attempt:

1. **send**: the pool sends the request; an upstream failure before the
   response head is *synthesized* into a response with the error's status and
   envelope (``exchange.upstream_error`` set), so one mechanism (the response
   hooks) decides whether to retry;
2. **head**: the response hooks run (reverse chain order); they may retry,
   reply locally, or hold the head (PAUSE);
3. **relay**: :class:`~llmproxy.engine.relay.Relay` pumps the body downstream.

An upstream failure while nothing of the response went downstream (a held
JSON reply cut short, a stream failing while a filter held it) goes back to
step 2 as a synthesized response. Every attempt is finished exactly once
(completed, failed, retried or abandoned) and then ``on_attempt_complete``
runs for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from llmproxy.attempt import Attempt, Outcome
from llmproxy.engine.forwarded import upstream_headers, upstream_response_headers
from llmproxy.engine.relay import FailedBeforeHead, Relay
from llmproxy.engine.replies import send_local
from llmproxy.engine.secrets import redact_fields
from llmproxy.errors import NotFound, ProxyError, UpstreamError
from llmproxy.exchange import Exchange, Response
from llmproxy.headers import Headers
from llmproxy.upstream import UpstreamResponse
from llmproxy.upstream.client import signed_fields

if TYPE_CHECKING:
    from llmproxy.engine.cycle import Runtime
    from llmproxy.http.server import HttpConnection
    from llmproxy.signing import StreamDecoder

__all__ = ["forward"]

_EVENT_STREAM = b"text/event-stream"


def _synthesize(ex: Exchange, err: UpstreamError) -> None:
    """Present a failed attempt to the response hooks as a response with the error's status."""
    ex.upstream_error = err
    ex.response = Response(err.status, Headers(err.head_fields()))


async def forward(rt: Runtime, conn: HttpConnection, ex: Exchange) -> None:
    """Send ``ex`` upstream until an attempt's response was relayed (see the module docstring)."""
    chain = rt.chain
    request = ex.request
    while True:
        target = ex.upstream or rt.default_upstream
        if target is None:
            raise NotFound("no upstream is configured for this request", code="no_upstream")
        ex.attempts += 1
        attempt = Attempt(ex.attempts, target)
        ex.attempt = attempt
        ex.attempt_history.append(attempt)
        if ex.attempts > 1:  # the first attempt's control is fresh
            ex.control.new_attempt()
        ex.upstream_error = None
        resp: UpstreamResponse | None = None
        retry = False
        try:
            body = ex.final_request_body()
            path = request.path.encode("latin-1")
            if target.base_path:
                path = target.base_path.encode("latin-1") + path
            try:
                method = request.method.encode("ascii")
                fields = upstream_headers(ex, target, body)
                if target.signer is not None:
                    fields = signed_fields(target, method, path, fields, body)
                resp = await rt.pool.send(target, method, path, fields, body)
                attempt.responded_at = time.perf_counter()
                fields = resp.headers
                if target.secrets:
                    fields = redact_fields(fields, target.secrets)  # a provider echoing our key
                ex.response = Response(resp.status, upstream_response_headers(fields))
            except UpstreamError as err:
                attempt.responded_at = time.perf_counter()
                _synthesize(ex, err)
            retry = await _respond(rt, conn, ex, attempt, resp)
        except asyncio.CancelledError:
            attempt.finish(Outcome.ABANDONED)
            raise
        except ProxyError as err:
            attempt.finish(Outcome.FAILED, err)
            raise
        except BaseException:
            attempt.finish(Outcome.FAILED)
            raise
        finally:
            if resp is not None:
                resp.close()  # no-op when the relay already released it
            if attempt.outcome is Outcome.PENDING:
                attempt.finish(Outcome.ABANDONED)
            if chain.attempt_plan:
                await chain.attempt_complete(ex, attempt)
        if not retry:
            return


async def _respond(
    rt: Runtime,
    conn: HttpConnection,
    ex: Exchange,
    attempt: Attempt,
    resp: UpstreamResponse | None,
) -> bool:
    """Run the response hooks on this attempt's response and relay it; True to retry."""
    chain = rt.chain
    control = ex.control
    assert ex.response is not None
    attempt.response = ex.response
    ctype = ex.response.headers.get_raw(b"content-type")
    decoder = attempt.target.stream_decoder
    if decoder is not None and resp is not None and ctype is not None and ctype.startswith(decoder.content_type):
        # a non-SSE stream (AWS event stream): decoded into SSE events before anything reads it
        ex.response.headers.set_raw(b"content-type", _EVENT_STREAM)
        ctype = _EVENT_STREAM
        stream: StreamDecoder | None = decoder()
    else:
        stream = None
    ex.is_sse = attempt.is_sse = ctype is not None and ctype.startswith(_EVENT_STREAM)
    control.skipped = None  # each response's hooks decide again
    hold = await chain.response_headers(ex) if chain.response_headers_plan else False
    if control.local_reply is not None:
        attempt.finish(Outcome.ABANDONED)
        send_local(conn, ex, control.local_reply)
        return False
    if control.retry and ex.attempts < rt.limits.max_attempts:
        attempt.finish(Outcome.RETRIED, ex.upstream_error)
        return True
    control.retry = False
    try:
        retry = await Relay(rt, conn, ex, attempt, resp, hold, stream).run()
    except FailedBeforeHead as failed:
        if resp is None:  # a synthesized body cannot fail twice
            raise failed.error from None
        resp.close()
        _synthesize(ex, failed.error)
        return await _respond(rt, conn, ex, attempt, None)
    if retry:
        attempt.finish(Outcome.RETRIED, ex.upstream_error)
    elif ex.upstream_error is not None:
        attempt.finish(Outcome.FAILED, ex.upstream_error)
    else:
        attempt.finish(Outcome.COMPLETED)
    return retry
