"""Running one exchange: request hooks, then the attempt loop (:mod:`llmproxy.engine.attempts`).

:func:`run_exchange` is the task behind every request (``/healthz`` aside).
Its guarantees:

* ``on_exchange_complete`` runs exactly once, whatever happens (success,
  local reply, error, timeout, client disconnect: the task is cancelled by
  the connection, and the ``finally`` still runs);
* an upstream response is always either read to its end and released to the
  pool, or closed (never reused) - a client disconnect closes it at once;
* before the response has started, an error becomes its envelope with its
  status, in the client's protocol; after a ``text/event-stream`` response
  started, it becomes a final SSE error event of that protocol and the
  stream ends; after any other response started, the connection is closed
  (HTTP cannot say more);
* nothing but a :class:`~llmproxy.errors.ProxyError`'s message reaches the
  client: unexpected exceptions become a 500 with the request id.

Retries: a response hook (or a response-body hook, while nothing has gone
downstream) may call :meth:`~llmproxy.exchange.Exchange.retry`; the current
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

from llmproxy.engine.attempts import forward
from llmproxy.engine.chain import Chain
from llmproxy.engine.replies import send_error, send_local
from llmproxy.engine.secrets import strip_query_credentials
from llmproxy.errors import (
    BadRequest,
    ClientDisconnected,
    FilterFailed,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    ServiceUnavailable,
)
from llmproxy.exchange import Exchange
from llmproxy.limits import Limits
from llmproxy.runtime.accesslog import AccessLog
from llmproxy.runtime.admin import AdminPages
from llmproxy.upstream import UpstreamPool, UpstreamTarget

if TYPE_CHECKING:
    from llmproxy.http.server import HttpConnection

__all__ = ["DEFAULT_ROUTES", "Runtime", "run_exchange", "shutdown_error"]

log = logging.getLogger("llmproxy.cycle")

#: Paths the proxy serves by default and the methods each accepts.
DEFAULT_ROUTES: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    "/v1/embeddings": frozenset({"POST"}),
    "/v1/responses": frozenset({"POST"}),
    "/v1/messages": frozenset({"POST"}),
    "/v1/messages/count_tokens": frozenset({"POST"}),
    # token counts: answered by the metering filter (404 from the upstream without it)
    "/v1/responses/input_tokens": frozenset({"POST"}),
    "/v1/chat/completions/count_tokens": frozenset({"POST"}),
    "/v1/models": frozenset({"GET", "HEAD"}),
}

#: Paths with an id after a fixed prefix (``GET /v1/models/{id}``: the SDKs' ``models.retrieve``;
#: ``GET``/``DELETE /v1/responses/{id}``: stored responses, answered by the routing filter for
#: bridged ones), checked only when the exact lookup in the routes misses.
PREFIX_ROUTES: tuple[tuple[str, frozenset[str]], ...] = (
    ("/v1/models/", frozenset({"GET", "HEAD"})),
    ("/v1/responses/", frozenset({"GET", "DELETE"})),
)


@dataclass(eq=False)
class Runtime:
    """What every exchange of one config generation of a worker shares (built by :mod:`llmproxy.runtime.app`).

    A reload builds a new generation with :meth:`successor`: it shares the
    upstream pool, the connections and the core counters with this one, and
    this one's ``successor`` then points at it. An exchange runs to its end on
    the generation it started on; a connection moves to the newest generation
    when its next request cycle starts (:meth:`newest`).
    """

    chain: Chain
    pool: UpstreamPool
    limits: Limits = field(default_factory=Limits)
    default_upstream: UpstreamTarget | None = None
    routes: dict[str, frozenset[str]] = field(default_factory=lambda: dict(DEFAULT_ROUTES))
    validate_json: bool = True
    access_log: AccessLog = field(default_factory=AccessLog)
    admin: AdminPages = field(default_factory=AdminPages)
    #: ``server.overhead_header``: relayed responses carry ``x-llmproxy-overhead-ms``.
    overhead_header: bool = False
    connections: set[HttpConnection] = field(default_factory=set)
    #: The tasks of this generation's exchanges before their end hooks (shutdown may cut these).
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: The tasks running their end hooks (``on_exchange_complete``): never cancelled.
    finishing: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False
    #: Set by shutdown before it cancels the tasks left at the end of the grace: a cancelled
    #: exchange then answers :data:`SHUTDOWN_ERROR` (503, or a final SSE error event) instead of
    #: counting as a client disconnect.
    cut: bool = False
    #: The generation a reload replaced this one with (None while this one is the newest).
    successor: Runtime | None = None

    def __post_init__(self) -> None:
        self.admin.metrics.set_routes(self.routes, (prefix for prefix, _ in PREFIX_ROUTES))

    def newest(self) -> Runtime:
        """The newest generation (this one unless a reload replaced it)."""
        rt = self
        while rt.successor is not None:
            rt = rt.successor
        return rt

    def busy(self) -> bool:
        """Whether an exchange of this generation is still running (end hooks included)."""
        return bool(self.tasks or self.finishing)


def shutdown_error() -> ServiceUnavailable:
    """What an exchange cut at the end of the shutdown grace answers (code ``server_shutdown``)."""
    return ServiceUnavailable("the server is shutting down; retry the request", code="server_shutdown")


async def run_exchange(rt: Runtime, conn: HttpConnection, ex: Exchange) -> None:
    """Drive ``ex`` from parsed head to finished response (see the module docstring)."""
    chain = rt.chain
    metrics = rt.admin.metrics
    metrics.exchange_started()
    task = asyncio.current_task()
    if task is not None:
        rt.tasks.add(task)
    try:
        try:
            if "?" in ex.request.path:
                ex.request.path = ex.client_path = strip_query_credentials(ex.request.path)
            if chain.factories:
                chain.start(ex)
            _check_route(rt, ex)
            if chain.request_headers_plan:
                await chain.request_headers(ex)
            control = ex.control
            if ex.request.method == "OPTIONS" and control.local_reply is None:
                raise _not_allowed(rt, ex)  # no filter (cors) answered the preflight
            if control.local_reply is None:
                ex.request.body = await conn.read_body()
                ex.bytes_received = len(ex.request.body)
                if rt.validate_json and ex.request.method == "POST":
                    _check_json_object(ex)
                if chain.request_body_plan:
                    await chain.request_body(ex)
            if control.local_reply is not None:
                send_local(conn, ex, control.local_reply)
            else:
                await forward(rt, conn, ex)
        except ProxyError as err:
            ex.error = err
            send_error(conn, ex, err)
        except asyncio.CancelledError:
            if not rt.cut:
                ex.error = ClientDisconnected("client disconnected")
                raise
            # cut by shutdown: answer through the normal error path, then finish normally
            ex.error = shutdown_error()
            send_error(conn, ex, ex.error)
        except Exception as exc:
            log.error("exchange %s failed", ex.id, exc_info=exc)
            internal = FilterFailed(f"internal error (request id {ex.id})", code="internal_error")
            ex.error = internal
            send_error(conn, ex, internal)
    finally:
        if task is not None:
            rt.tasks.discard(task)
            rt.finishing.add(task)
        try:
            try:
                if chain.complete_plan:
                    await chain.complete(ex)
            finally:
                metrics.exchange_done(ex)  # once, on every path, after the end hooks (usage is set)
            rt.access_log.record(ex)
            conn.exchange_finished()
        finally:
            if task is not None:
                rt.finishing.discard(task)


def _check_json_object(ex: Exchange) -> None:
    """Every POST API served takes a JSON object: refuse anything else before any filter sees it."""
    if not ex.request.body:
        raise BadRequest("the request body is empty; a JSON object is required", code="invalid_json")
    if not isinstance(ex.request_json(), dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_request")


def _check_route(rt: Runtime, ex: Exchange) -> None:
    path = ex.request.path
    query = path.find("?")
    if query >= 0:
        path = path[:query]
    methods = rt.routes.get(path)
    if methods is None:
        methods = next((allowed for prefix, allowed in PREFIX_ROUTES if path.startswith(prefix)), None)
    if methods is None:
        raise NotFound(f"unknown path: {path}", code="unknown_url")
    if ex.request.method not in methods and ex.request.method != "OPTIONS":
        raise MethodNotAllowed(
            f"{ex.request.method} is not allowed on {path}", headers=[("allow", ", ".join(sorted(methods)))]
        )


def _not_allowed(rt: Runtime, ex: Exchange) -> MethodNotAllowed:
    """OPTIONS on a served path reaches the filters (a CORS preflight); unanswered, it is a 405."""
    path = ex.request.path.partition("?")[0]
    methods = rt.routes.get(path) or next(
        (allowed for prefix, allowed in PREFIX_ROUTES if path.startswith(prefix)), frozenset()
    )
    return MethodNotAllowed(f"OPTIONS is not allowed on {path}", headers=[("allow", ", ".join(sorted(methods)))])
