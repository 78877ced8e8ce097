"""The filter API, modelled on proxy-wasm.

Two lifetimes, as in proxy-wasm's root context and HTTP context::

    FilterFactory (one per configured filter, built once from config at startup)
        |  owns route tables, buckets, tokenizers, store handles, background ticks
        |
        +-- create(exchange) -> Filter   (one per exchange per filter, cheap)
                holds per-exchange state; never shared between exchanges,
                so it never races

Hooks and their order (the rule the chain runner in :mod:`llmproxy.engine.chain`
follows): request hooks run in chain order, response hooks in reverse
chain order, like Envoy's decoder and encoder filters::

    on_request_headers   f1 -> f2 -> f3
    on_request_body      f1 -> f2 -> f3        (request bodies arrive whole)
                 ... upstream ...
    on_response_headers  f3 -> f2 -> f1        (once per attempt)
    on_response_body     f3 -> f2 -> f1        (per chunk, or per SSE event; per attempt)
    on_attempt_complete  f1 -> f2 -> f3        (exactly once per attempt, every path)
    on_exchange_complete f1 -> f2 -> f3        (exactly once, every path)

Every upstream try is an :class:`~llmproxy.attempt.Attempt`: the response hooks
run once per attempt (a retry runs them again on the next attempt's
response), and ``on_attempt_complete`` tells how each one ended.

Every hook has a no-op default and returns :class:`Action`. Hooks may be
plain methods or coroutines; the runner checks which once, when the chain is
built, and only calls filters that override a hook, so an empty hook costs
nothing.

A hook can:

* read and change ``exchange.request`` (method, path, headers, body) or
  ``exchange.response`` (status, headers);
* raise a :class:`llmproxy.errors.ProxyError` subclass, which becomes that
  error's status and envelope;
* call :meth:`llmproxy.exchange.Exchange.send_local_reply` (before the response
  has started) to answer without the upstream;
* call :meth:`llmproxy.exchange.Exchange.retry` (in a response hook, before any
  response byte went downstream) to send the request again, typically after
  changing ``exchange.upstream``;
* call :meth:`llmproxy.exchange.Exchange.end_response_body` (in
  ``on_response_body``) to make the data it passes on the body's last and
  stop reading the upstream (a cap reached mid-stream).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from llmproxy.attempt import Attempt
    from llmproxy.context import FactoryContext
    from llmproxy.exchange import Exchange

__all__ = ["Action", "Filter", "FilterFactory"]


class Action(enum.Enum):
    """What the chain does after a hook returns."""

    #: Go on to the next filter (and, after the last, on to the upstream or client).
    CONTINUE = "continue"
    #: Body hooks: hold the data; the core buffers it (bounded) and calls this
    #: hook again with everything held so far when more arrives. Header hooks
    #: on the response: hold the response head until the body is released, so
    #: the core can still retry or set an exact Content-Length.
    PAUSE = "pause"


class Filter:
    """Per-exchange filter. Subclass it and override only the hooks you need.

    ``factory`` is the :class:`FilterFactory` that created this filter; its
    config and shared resources are reached through it.

    A hook is either a coroutine function (always awaited) or a plain
    function; a plain ``on_request_headers``, ``on_request_body``,
    ``on_response_headers`` or mutating ``on_response_body`` may also return a
    coroutine for a rare slow path (a shared-store read on some requests
    only), which the core awaits for its :class:`Action`: the common path
    then creates no coroutine.
    """

    #: Whether ``on_response_body`` may change, drop, hold or inject data.
    #: A filter that only observes sets this to False: the core then writes
    #: each chunk downstream *before* calling it, so it can never delay a
    #: chunk (its return value is ignored).
    mutates_response_body: ClassVar[bool] = True

    #: Whether ``on_response_body`` takes several whole SSE events in one call.
    #: When every mutating filter of a stream says so, the core hands each
    #: upstream read's whole events over in one call instead of one call per
    #: event (cheaper: look at the batch with a byte check, split it only when
    #: it matters). Otherwise a filter sees one event per call. Observers
    #: always get batches.
    sse_batches: ClassVar[bool] = False

    __slots__ = ("factory",)

    def __init__(self, factory: FilterFactory) -> None:
        self.factory = factory

    def on_request_headers(self, exchange: Exchange) -> Action | Awaitable[Action]:
        """Called once the request head is parsed, before the body is read.

        May change method, path and headers, reply locally, or raise.
        ``PAUSE`` has the same effect as ``CONTINUE`` here: request bodies are
        always read whole before the upstream is contacted.
        """
        return Action.CONTINUE

    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        """Called with the whole request body (``end_of_stream`` is True).

        Request bodies are buffered whole by the core (bounded by
        ``limits.max_body_bytes``, 413 past it) because every request must be
        replayable for retries and its JSON is parsed at most once for all
        filters: use :meth:`Exchange.request_json`. To change the body, call
        :meth:`Exchange.set_request_body` or :meth:`Exchange.set_request_json`;
        the core rewrites Content-Length.
        """
        return Action.CONTINUE

    def on_response_headers(self, exchange: Exchange) -> Action | Awaitable[Action]:
        """Called when the response head is known (from the upstream, or a
        synthesized 502/504 when the upstream failed: ``exchange.upstream_error``
        is then set). Runs once per attempt (``exchange.attempt``): again for
        each retry's response.

        May change status and headers, call :meth:`Exchange.retry`, or raise.
        ``PAUSE`` holds the head back until the body stage releases its first
        bytes (needed to retry after looking at the body, or when the body
        will be replaced and Content-Length must be exact).
        """
        return Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        """Called for each response chunk; for ``text/event-stream`` responses
        once per whole SSE event (raw bytes, terminator included), or with one
        or more whole events for a filter that sets ``sse_batches``.

        ``CONTINUE`` passes ``data`` on (or its replacement, set with
        :meth:`Exchange.set_response_data`: empty bytes drop it, several events
        inject). ``PAUSE`` before end of stream holds it: the core buffers
        (bounded by ``limits.max_response_buffer_bytes``) and calls again with
        all held data when more arrives. At end of stream ``data`` may be
        empty; ``PAUSE`` then counts as ``CONTINUE``.

        Not called for a response whose ``on_response_headers`` called
        :meth:`Exchange.skip_response_body` for this filter. Runs for the
        current attempt's body only; a held body of an attempt that is then
        retried never reaches the client.

        An observer (``mutates_response_body = False``) is called with exactly
        the bytes the client received, after they were written: released by
        every mutating filter (translated, rewritten, stripped), in order, one
        or more whole SSE events per call, and never with data of an
        abandoned attempt.
        """
        return Action.CONTINUE

    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> Awaitable[None] | None:
        """Called exactly once per upstream attempt when it ends, on every path:
        completed, failed, retried or abandoned (``attempt.outcome``), in chain
        order. Release what the attempt held (a reservation, a span) here.
        Exceptions are logged and swallowed.
        """
        return None

    def on_exchange_complete(self, exchange: Exchange) -> Awaitable[None] | None:
        """Called exactly once when the exchange ends, on every path: success,
        local reply, error, timeout and client disconnect (then
        ``exchange.error`` says what happened). Finish accounting here.
        Exceptions are logged and swallowed.
        """
        return None


class FilterFactory:
    """Long-lived side of a filter, built once from its config section.

    Subclasses set ``filter_class`` (the per-exchange :class:`Filter` type the
    default :meth:`create` instantiates; the chain inspects it to learn which
    hooks are implemented), may validate ``config`` in ``__init__`` (raise
    ``ValueError`` with the field name: it becomes a startup error naming the
    config file and field), and may override :meth:`start` and :meth:`close`.
    """

    #: The per-exchange filter type.
    filter_class: ClassVar[type[Filter]] = Filter
    #: When True, an unexpected exception in this filter is logged and the
    #: exchange goes on without it (tracing, metrics). When False the exchange
    #: fails with 500 (routing, ratelimit, budgets).
    fail_open: ClassVar[bool] = False
    #: True for a filter that authenticates callers (refuses requests without a valid
    #: credential), such as the builtin ``auth``. ``llmproxy serve`` warns when it binds a
    #: non-loopback address and no factory of the chain says so: the proxy would then be an
    #: open relay spending its provider keys for anyone who can reach it.
    authenticates: ClassVar[bool] = False

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        self.name = name
        self.config = config
        self.context = context

    def create(self, exchange: Exchange) -> Filter:
        """Return the per-exchange filter (must be an instance of ``filter_class``)."""
        return self.filter_class(self)

    def preload(self) -> None:
        """Load read-only data that every worker uses (tokenizer tables, price data), once.

        Called with several workers, in the process that forks them (the
        supervisor), after the config was checked and before any fork: what it
        loads is shared copy-on-write by every worker (a restarted one too)
        instead of being loaded again in each. It runs on no event loop and must
        not start threads, tasks or connections (they would not survive the
        fork). Whatever :meth:`start` then finds already loaded it should reuse.
        The default does nothing.
        """

    async def start(self) -> None:
        """Called once on the event loop before the first exchange; start ticks here."""

    async def close(self) -> None:
        """Called once when this factory's exchanges are over: at shutdown after in-flight
        exchanges finished, or after a reload replaced the chain, once the last exchange
        that started on the old chain ended (its ticks are stopped first). Release what the
        factory holds here (connections, files, tasks): a reload must not leak it."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
