"""Running one exchange: request hooks, upstream attempts, response relay.

:func:`run_exchange` is the task behind every request (``/healthz`` aside).
Its guarantees:

* ``on_exchange_complete`` runs exactly once, whatever happens (success,
  local reply, error, timeout, client disconnect: the task is cancelled by
  the connection, and the ``finally`` still runs);
* an upstream response is always either read to its end and released to the
  pool, or closed (never reused) - a client disconnect closes it at once;
* before the response has started, an error becomes its envelope with its
  status; after a ``text/event-stream`` response started, it becomes a final
  SSE ``data: {"error": ...}`` event and the stream ends; after any other
  response started, the connection is closed (HTTP cannot say more);
* nothing but a :class:`~proxy.errors.ProxyError`'s message reaches the
  client: unexpected exceptions become a 500 with the request id.

Retries: a response hook (or a response-body hook, while nothing has gone
downstream) may call :meth:`~proxy.exchange.Exchange.retry`; the current
upstream response is closed and the request is sent again to
``exchange.upstream``, up to ``limits.max_attempts``. An upstream failure
before any response byte is presented to the response hooks as a
synthesized response with the error's status and envelope
(``exchange.upstream_error`` set), so a failover filter decides with one
mechanism whether to retry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .accesslog import AccessLog
from .admin import AdminPages
from .chain import Chain, ResponseBodyStage
from .errors import (
    ClientDisconnected,
    FilterFailed,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    UpstreamError,
    render_error,
    render_sse_error,
)
from .exchange import Exchange, LocalReply, Response
from .headers import HOP_BY_HOP, Headers, comma_tokens
from .limits import Limits
from .secrets import redact, strip_query_credentials, target_secrets
from .sse import SseFramer
from .upstream import UpstreamPool, UpstreamResponse, UpstreamTarget

if TYPE_CHECKING:
    from .server import HttpConnection

__all__ = ["DEFAULT_ROUTES", "Runtime", "run_exchange"]

log = logging.getLogger("llmproxy.cycle")

#: Paths the proxy serves by default and the methods each accepts.
DEFAULT_ROUTES: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    "/v1/embeddings": frozenset({"POST"}),
    "/v1/responses": frozenset({"POST"}),
    "/v1/messages": frozenset({"POST"}),
    "/v1/messages/count_tokens": frozenset({"POST"}),
    "/v1/models": frozenset({"GET", "HEAD"}),
}

# Request headers never forwarded: hop-by-hop ones, the ones the proxy
# rebuilds itself, and the client's own credentials (they are for the proxy,
# not the provider; provider credentials come from the UpstreamTarget).
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-request-id",
    b"authorization",
    b"x-api-key",
    b"api-key",
}
_DROP_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-request-id"}
_EVENT_STREAM = b"text/event-stream"
_JSON_TYPE = b"application/json"


@dataclass(eq=False)
class Runtime:
    """What every exchange of one worker shares (built once by :mod:`proxy.app`)."""

    chain: Chain
    pool: UpstreamPool
    limits: Limits = field(default_factory=Limits)
    default_upstream: UpstreamTarget | None = None
    routes: dict[str, frozenset[str]] = field(default_factory=lambda: dict(DEFAULT_ROUTES))
    validate_json: bool = True
    access_log: AccessLog = field(default_factory=AccessLog)
    admin: AdminPages = field(default_factory=AdminPages)
    connections: set[HttpConnection] = field(default_factory=set)
    #: The tasks of the exchanges in flight (shutdown waits for their end hooks).
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False


def _connection_tokens(headers: Headers) -> set[bytes]:
    value = headers.get_raw(b"connection")
    return set() if value is None else comma_tokens(value)


def _upstream_headers(ex: Exchange, target: UpstreamTarget, body: bytes) -> list[tuple[bytes, bytes]]:
    req_headers = ex.request.headers
    extra_drop = _connection_tokens(req_headers)
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
    out.extend(target.headers)
    return out


def _response_headers(ex: Exchange, raw: list[tuple[bytes, bytes]]) -> Headers:
    extra_drop = _connection_tokens(Headers(raw))
    kept = [(k, v) for k, v in raw if k not in _DROP_RESPONSE and k not in extra_drop]
    return Headers(kept)


# Fields the connection writes itself when it serialises the head (framing and keep-alive).
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


def _head_for_client(ex: Exchange, headers: Headers) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers.raw() if k not in _FRAMING]
    out.append((b"x-request-id", ex.id.encode("ascii")))
    return out


class _FailedBeforeHead(Exception):
    """An upstream failure while nothing of the response had gone downstream (it can still be retried)."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


class _Relay:
    """How one attempt's response goes downstream: its head, held bytes and writes.

    Small JSON replies and error bodies are *held* (``hold_limit`` bytes at
    most) until their end, so that an upstream that stalls or resets in the
    middle of one still turns into a clean error envelope (or a retry)
    instead of a half-written 200. Past the bound the head goes out and the
    rest streams. Observers see held bytes only once they were written.
    """

    __slots__ = ("conn", "ex", "head_sent", "held", "held_pieces", "held_size", "hold_limit", "observers")

    def __init__(self, conn: HttpConnection, ex: Exchange, hold_limit: int, observers: bool) -> None:
        self.conn = conn
        self.ex = ex
        self.head_sent = False
        #: -1 when nothing is held; else the byte bound of what may be.
        self.hold_limit = hold_limit
        self.held: list[bytes] = []
        self.held_size = 0
        #: The upstream pieces behind ``held``, for the observers once it is written.
        self.held_pieces: list[bytes] = []
        self.observers = observers

    @property
    def holding(self) -> bool:
        return self.hold_limit >= 0

    def send_head(self, content_length: int | None) -> None:
        """Write the head; ``content_length`` None means chunked (or close-delimited)."""
        ex = self.ex
        assert ex.response is not None
        self.head_sent = True
        ex.response_started = True
        self.conn.start_response(ex.response.status, _head_for_client(ex, ex.response.headers), content_length)

    def write(self, data: bytes) -> None:
        self.ex.bytes_sent += len(data)
        self.conn.write(data)

    def hold(self, data: bytes, piece: bytes) -> bool:
        """Keep ``data`` back; True when the bound is now exceeded (the caller releases)."""
        self.held.append(data)
        self.held_size += len(data)
        if self.observers:
            self.held_pieces.append(piece)
        return self.held_size > self.hold_limit

    def take_held(self) -> tuple[bytes, list[bytes]]:
        """Stop holding; return what was held (joined) and its pieces for the observers."""
        held, pieces = b"".join(self.held), self.held_pieces
        self.hold_limit = -1
        self.held, self.held_pieces, self.held_size = [], [], 0
        return held, pieces


async def run_exchange(rt: Runtime, conn: HttpConnection, ex: Exchange) -> None:
    """Drive ``ex`` from parsed head to finished response (see the module docstring)."""
    chain = rt.chain
    stats = rt.admin.stats
    stats.in_flight += 1
    task = asyncio.current_task()
    if task is not None:
        rt.tasks.add(task)
    try:
        try:
            if "?" in ex.request.path:
                ex.request.path = ex.client_path = strip_query_credentials(ex.request.path)
            chain.start(ex)
            _check_route(rt, ex)
            if chain.request_headers_plan:
                await chain.request_headers(ex)
            if ex._local_reply is None:
                ex.request.body = await conn.read_body()
                ex.bytes_received = len(ex.request.body)
                if rt.validate_json and ex.request.body and ex.request.method == "POST":
                    ex.request_json()
                if chain.request_body_plan:
                    await chain.request_body(ex)
            if ex._local_reply is not None:
                _send_local(conn, ex, ex._local_reply)
            else:
                await _forward(rt, conn, ex)
        except ProxyError as err:
            ex.error = err
            _send_error(conn, ex, err)
        except asyncio.CancelledError:
            ex.error = ClientDisconnected("client disconnected")
            raise
        except Exception as exc:
            log.error("exchange %s failed", ex.id, exc_info=exc)
            internal = FilterFailed(f"internal error (request id {ex.id})", code="internal_error")
            ex.error = internal
            _send_error(conn, ex, internal)
    finally:
        stats.in_flight -= 1
        stats.responses[ex.response.status if ex.response is not None and ex.response_started else 499] += 1
        if ex.error is not None:
            stats.errors[ex.error.code or "error"] += 1
        stats.attempts += ex.attempts
        stats.bytes_in += ex.bytes_received
        stats.bytes_out += ex.bytes_sent
        stats.seconds += ex.elapsed
        try:
            if chain.complete_plan:
                await chain.complete(ex)
            rt.access_log.record(ex)
            conn.exchange_finished()
        finally:
            if task is not None:
                rt.tasks.discard(task)


def _check_route(rt: Runtime, ex: Exchange) -> None:
    path = ex.request.path
    query = path.find("?")
    if query >= 0:
        path = path[:query]
    methods = rt.routes.get(path)
    if methods is None:
        raise NotFound(f"unknown path: {path}", code="unknown_url")
    if ex.request.method not in methods:
        raise MethodNotAllowed(
            f"{ex.request.method} is not allowed on {path}", headers=[("allow", ", ".join(sorted(methods)))]
        )


def _send_local(conn: HttpConnection, ex: Exchange, reply: LocalReply) -> None:
    ex.response = Response(reply.status, Headers(reply.headers))
    ex.response_started = True
    conn.start_response(reply.status, _head_for_client(ex, ex.response.headers), len(reply.body))
    ex.bytes_sent += len(reply.body)
    conn.write(reply.body)
    conn.end_response()


#: Fields of a held response head that describe its body: an error envelope replacing that body drops them.
_BODY_FIELDS = frozenset({b"content-type", b"content-encoding", b"content-length", b"etag", b"last-modified"})


def _send_error(conn: HttpConnection, ex: Exchange, err: ProxyError) -> None:
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
        conn.start_response(err.status, _head_for_client(ex, ex.response.headers), len(body))
        ex.bytes_sent += len(body)
        conn.write(body)
        conn.end_response()
    elif ex.is_sse:
        conn.write(render_sse_error(err, protocol))
        conn.end_response()
    else:
        conn.abort()


def _synthesize(ex: Exchange, err: UpstreamError) -> None:
    """Present a failed attempt to the response hooks as a response with the error's status."""
    ex.upstream_error = err
    ex.response = Response(err.status, Headers(err.head_fields()))


async def _forward(rt: Runtime, conn: HttpConnection, ex: Exchange) -> None:
    request = ex.request
    while True:
        ex.attempts += 1
        ex._retry = False
        target = ex.upstream or rt.default_upstream
        if target is None:
            raise NotFound("no upstream is configured for this request", code="no_upstream")
        body = ex.final_request_body()
        path = (
            (target.base_path + request.path).encode("latin-1") if target.base_path else request.path.encode("latin-1")
        )
        resp: UpstreamResponse | None = None
        ex.upstream_error = None
        try:
            resp = await rt.pool.send(
                target, request.method.encode("ascii"), path, _upstream_headers(ex, target, body), body
            )
            ex.response = Response(resp.status, _response_headers(ex, resp.headers))
        except UpstreamError as err:
            _synthesize(ex, err)
        try:
            if not await _respond(rt, conn, ex, resp, target):
                return
        finally:
            if resp is not None:
                resp.close()  # no-op when the relay already released it


async def _respond(
    rt: Runtime, conn: HttpConnection, ex: Exchange, resp: UpstreamResponse | None, target: UpstreamTarget
) -> bool:
    """Run the response hooks on this attempt's response and relay it; True to retry.

    An upstream failure before any byte went downstream (a held JSON reply
    cut short, a stream failing while a filter held it) is presented to the
    hooks again as a synthesized response, exactly like a failure before the
    head: they may retry it, and its envelope carries their headers.
    """
    chain = rt.chain
    assert ex.response is not None
    ctype = ex.response.headers.get_raw(b"content-type")
    ex.is_sse = ctype is not None and ctype.startswith(_EVENT_STREAM)
    ex._skip_body = None  # each attempt's response hooks decide again
    hold = await chain.response_headers(ex) if chain.response_headers_plan else False
    if ex._local_reply is not None:
        _send_local(conn, ex, ex._local_reply)
        return False
    if ex._retry and ex.attempts < rt.limits.max_attempts:
        return True
    ex._retry = False
    try:
        return await _relay(rt, conn, ex, resp, hold, target)
    except _FailedBeforeHead as failed:
        if resp is None:  # a synthesized body cannot fail twice
            raise failed.error from None
        resp.close()
        _synthesize(ex, failed.error)
        return await _respond(rt, conn, ex, None, target)


def _hold_limit(rt: Runtime, ex: Exchange, resp: UpstreamResponse | None, ctype: bytes | None) -> int:
    """How many body bytes to hold before the head goes out (-1: none), see :class:`_Relay`."""
    if resp is None or ex.is_sse or ex.request.method == "HEAD":
        return -1
    assert ex.response is not None
    if ex.response.status >= 400 or (ctype is not None and ctype.startswith(_JSON_TYPE)):
        return rt.limits.json_hold_bytes
    return -1


def _auth_failure(ex: Exchange, target: UpstreamTarget) -> ProxyError | None:
    """The proxy's own error for a provider that refused the proxy's credential, else None.

    The provider's text is never relayed for it: it names (or quotes part of)
    a key that is the operator's, not the client's.
    """
    assert ex.response is not None
    status = ex.response.status
    if status not in (401, 403) or ex.upstream_error is not None or not target_secrets(target):
        return None
    key_id = ex.vars.get("key_id")
    which = f" (key id {key_id})" if isinstance(key_id, str) else ""
    return ProxyError(
        f"the provider '{target.name}' refused the credential the proxy holds for it{which}; "
        "this is a proxy configuration problem, not a problem with your request",
        code="provider_auth_failed",
        status=status,
    )


async def _relay(
    rt: Runtime,
    conn: HttpConnection,
    ex: Exchange,
    resp: UpstreamResponse | None,
    hold: bool,
    target: UpstreamTarget,
) -> bool:
    """Relay the response body; True when a filter asked for a retry in time.

    Raises :class:`_FailedBeforeHead` for an upstream failure while nothing
    had gone downstream.
    """
    chain = rt.chain
    response = ex.response
    assert response is not None
    ctype = response.headers.get_raw(b"content-type")
    is_sse = ex.is_sse
    auth_failure = _auth_failure(ex, target) if resp is not None else None
    if auth_failure is not None:
        assert resp is not None
        await _discard_body(resp, rt.limits.json_hold_bytes)
        raise auth_failure
    body_plan = chain.response_body_plan
    observers = bool(chain.response_observer_plan)
    skip = ex._skip_body
    if skip and (body_plan or observers):
        body_plan = tuple(step for step in body_plan if id(ex.filters[step.slot]) not in skip)
        observers = any(id(ex.filters[step.slot]) not in skip for step in chain.response_observer_plan)
    stage = ResponseBodyStage(body_plan, rt.limits.max_response_buffer_bytes, is_sse) if body_plan else None
    framer = SseFramer(rt.limits.max_sse_event_bytes) if is_sse and (stage is not None or observers) else None
    pending_error = ex.upstream_error
    synthesized = render_error(pending_error, ex.client_protocol) if pending_error is not None else None
    # The length the client may be told up front: only when no filter can change the body.
    known_length: int | None = None
    if stage is None:
        if synthesized is not None:
            known_length = len(synthesized)
        elif resp is not None:
            known_length = resp.content_length  # counted off the socket, never the upstream's header
    relay = _Relay(conn, ex, _hold_limit(rt, ex, resp, ctype), observers)
    secrets = target_secrets(target) if resp is not None and response.status >= 400 else None
    if not hold and not relay.holding:
        relay.send_head(known_length)
    while True:
        if synthesized is not None:
            chunk, synthesized = synthesized, None
        elif resp is None:
            chunk = b""
        else:
            try:
                chunk = await resp.read()
            except UpstreamError as err:
                if not relay.head_sent:
                    raise _FailedBeforeHead(err) from None
                raise
        end = not chunk
        try:
            pieces = framer.feed(chunk) if framer is not None else ([chunk] if chunk else [])
            if end and framer is not None:
                rest = framer.flush()
                if rest:
                    pieces.append(rest)
            # Without observers, every piece of this read goes through the stage in one
            # call and out in one write; observers see each piece after it was written.
            batches = [pieces] if not observers else [[piece] for piece in pieces]
            for batch in batches:
                if stage is not None:
                    out = await stage.push_all(ex, batch)
                    if ex._retry:
                        if relay.head_sent:
                            raise FilterFailed(f"retry requested after the response started (request id {ex.id})")
                        if ex.attempts < rt.limits.max_attempts:
                            return True
                        ex._retry = False
                else:
                    out = b"".join(batch)  # a one-piece join returns the piece itself, uncopied
                if out and relay.holding:
                    if not relay.hold(out, batch[0]):
                        continue
                    # past the bound: the head goes out and the rest streams
                    out, held_pieces = relay.take_held()
                    if secrets is not None:
                        out = redact(out, secrets)
                    relay.send_head(known_length if stage is None and secrets is None else None)
                    relay.write(out)
                    for piece in held_pieces:
                        conn.flush()
                        await chain.observe_response(ex, piece, False)
                    continue
                if out:
                    if not relay.head_sent:
                        relay.send_head(known_length if secrets is None else None)
                    relay.write(out if secrets is None else redact(out, secrets))
                if observers:
                    conn.flush()  # observers never delay a chunk: it is on the wire before they run
                    await chain.observe_response(ex, batch[0], False)
        except UpstreamError as err:
            if not relay.head_sent:
                raise _FailedBeforeHead(err) from None
            raise
        if end:
            break
        if conn.write_paused:
            # a client that stops reading holds the upstream connection: wait for it as
            # long as for the upstream (its idle timeout, within the total deadline)
            await conn.drain(None if resp is None else resp.stall_timeout())
        elif resp is None or not resp.buffered:
            # about to wait for the upstream: send what is queued now. Chunks that
            # arrived together go out together (one write), never held back.
            conn.flush()
    tail: bytes | None = None
    if stage is not None:
        try:
            tail = await stage.push(ex, b"", True)
        except UpstreamError as err:
            if not relay.head_sent:
                raise _FailedBeforeHead(err) from None
            raise
        if ex._retry and not relay.head_sent and ex.attempts < rt.limits.max_attempts:
            return True
        ex._retry = False
    if relay.holding:
        held, held_pieces = relay.take_held()
        body = held + tail if tail else held
        if secrets is not None:
            body = redact(body, secrets)
        relay.send_head(len(body))
        if body:
            relay.write(body)
        for piece in held_pieces:
            conn.flush()
            await chain.observe_response(ex, piece, False)
    elif stage is not None:
        if not relay.head_sent:
            relay.send_head(len(tail) if tail is not None else 0)
        if tail:
            relay.write(tail)
    elif not relay.head_sent:
        relay.send_head(known_length if known_length is not None else 0)
    if observers:
        await chain.observe_response(ex, b"", True)
    if resp is not None:
        resp.release()
    if ex.upstream_error is not None:
        ex.error = ex.upstream_error
    conn.end_response()
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
