"""The filter chain runner.

Order rule (as Envoy's HTTP filter chain): request hooks run in chain order,
response hooks in reverse chain order, ``on_attempt_complete`` and
``on_exchange_complete`` in chain order. The chain order is the order of ``filters:`` in the config, never
discovery order.

When the chain is built, the runner looks at each factory's
``filter_class`` once and keeps, per hook, only the filters that override it
(with a flag saying whether the hook is a coroutine function). A plain
hook may still return a coroutine for a rare slow path (a store read on
some requests only, a networked store): it is awaited like an async hook's
result (in every hook but the observing response-body one), so the common
path pays no coroutine. Running a
hook nobody implements is an empty loop; the exchange driver skips it
altogether by checking the plan first.

Failures: a :class:`~llmproxy.errors.ProxyError` raised by a hook propagates
(it is the filter's answer). Any other exception is a bug in the filter: a
fail-open filter is logged and skipped, a fail-closed one fails the exchange
with :class:`~llmproxy.errors.FilterFailed` (500, request id in the message).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from types import CoroutineType
from typing import Any, NamedTuple

from llmproxy.attempt import Attempt
from llmproxy.errors import FilterFailed, ProxyError, UpstreamResponseTooLarge
from llmproxy.exchange import Exchange
from llmproxy.filter import Action, Filter, FilterFactory
from llmproxy.http.sse import split_events

__all__ = ["Chain", "ResponseBodyStage"]

log = logging.getLogger("llmproxy.chain")


class _Step(NamedTuple):
    slot: int  # the filter's position in the chain
    hook: Any  # the unbound function from the filter class
    is_async: bool
    fail_open: bool
    name: str
    batches: bool  # the hook takes several whole SSE events per call (Filter.sse_batches)


def _plan(factories: Sequence[FilterFactory], hook: str, reverse: bool, **where: bool) -> tuple[_Step, ...]:
    steps: list[_Step] = []
    for index, factory in enumerate(factories):
        cls = factory.filter_class
        fn = getattr(cls, hook)
        if fn is getattr(Filter, hook):
            continue
        if any(getattr(cls, attr) != value for attr, value in where.items()):
            continue
        steps.append(
            _Step(
                index,
                fn,
                inspect.iscoroutinefunction(fn),
                factory.fail_open,
                factory.name,
                bool(getattr(cls, "sse_batches", False)),
            )
        )
    if reverse:
        steps.reverse()
    return tuple(steps)


def _failure(step: _Step, ex: Exchange, exc: BaseException) -> FilterFailed:
    log.error("filter %s failed in exchange %s", step.name, ex.id, exc_info=exc)
    return FilterFailed(f"internal error in filter '{step.name}' (request id {ex.id})")


class Chain:
    """An ordered list of filter factories with precomputed per-hook plans."""

    def __init__(self, factories: Sequence[FilterFactory]) -> None:
        self.factories = tuple(factories)
        self.request_headers_plan = _plan(self.factories, "on_request_headers", False)
        self.request_body_plan = _plan(self.factories, "on_request_body", False)
        self.response_headers_plan = _plan(self.factories, "on_response_headers", True)
        self.response_body_plan = _plan(self.factories, "on_response_body", True, mutates_response_body=True)
        self.response_observer_plan = _plan(self.factories, "on_response_body", True, mutates_response_body=False)
        self.attempt_plan = _plan(self.factories, "on_attempt_complete", False)
        self.complete_plan = _plan(self.factories, "on_exchange_complete", False)

    def __repr__(self) -> str:
        return f"<Chain {[f.name for f in self.factories]}>"

    def start(self, ex: Exchange) -> None:
        """Create the per-exchange filters."""
        if self.factories:
            ex.filters = [factory.create(ex) for factory in self.factories]

    async def _headers(self, plan: tuple[_Step, ...], ex: Exchange) -> bool:
        """Run a header plan; return True if a hook asked to PAUSE. Stops on a local reply."""
        paused = False
        filters = ex.filters
        for step in plan:
            try:
                action = step.hook(filters[step.slot], ex)
                if step.is_async or type(action) is CoroutineType:
                    action = await action
            except ProxyError:
                raise
            except Exception as exc:
                if step.fail_open:
                    log.exception("fail-open filter %s failed; skipped", step.name)
                    continue
                raise _failure(step, ex, exc) from exc
            control = ex.control
            if control.local_reply is not None or control.retry:
                return paused
            if action is Action.PAUSE:
                paused = True
        return paused

    async def request_headers(self, ex: Exchange) -> None:
        """Run ``on_request_headers`` in chain order."""
        await self._headers(self.request_headers_plan, ex)

    async def response_headers(self, ex: Exchange) -> bool:
        """Run ``on_response_headers`` in reverse order; True if the head must be held."""
        return await self._headers(self.response_headers_plan, ex)

    async def request_body(self, ex: Exchange) -> None:
        """Run ``on_request_body`` once per filter with the whole body, in chain order."""
        filters = ex.filters
        for step in self.request_body_plan:
            try:
                result = step.hook(filters[step.slot], ex, ex.request.body, True)
                if step.is_async or type(result) is CoroutineType:
                    await result
            except ProxyError:
                raise
            except Exception as exc:
                if step.fail_open:
                    log.exception("fail-open filter %s failed; skipped", step.name)
                    continue
                raise _failure(step, ex, exc) from exc
            if ex.control.local_reply is not None:
                return

    async def observe_response(self, ex: Exchange, data: bytes, end_of_stream: bool) -> None:
        """Call observing (non-mutating) response-body hooks with ``data``, which was just written
        to the client: the bytes it received, after every mutating filter, in order."""
        filters = ex.filters
        control = ex.control
        for step in self.response_observer_plan:
            skipped = control.skipped
            if skipped is not None and id(filters[step.slot]) in skipped:
                continue
            try:
                result = step.hook(filters[step.slot], ex, data, end_of_stream)
                if step.is_async:
                    await result
            except Exception:
                log.exception("observer %s failed in exchange %s; ignored", step.name, ex.id)

    async def attempt_complete(self, ex: Exchange, attempt: Attempt) -> None:
        """Run ``on_attempt_complete`` for every filter, in chain order; exceptions are logged, never raised."""
        filters = ex.filters
        for step in self.attempt_plan:
            try:
                result = step.hook(filters[step.slot], ex, attempt)
                if step.is_async or type(result) is CoroutineType:
                    await result
            except Exception:
                log.exception("on_attempt_complete of %s failed in %s", step.name, ex.id)

    async def complete(self, ex: Exchange) -> None:
        """Run ``on_exchange_complete`` for every filter; exceptions are logged, never raised."""
        filters = ex.filters
        for step in self.complete_plan:
            try:
                result = step.hook(filters[step.slot], ex)
                if step.is_async or type(result) is CoroutineType:
                    await result
            except Exception:
                log.exception("on_exchange_complete of %s failed in %s", step.name, ex.id)


class ResponseBodyStage:
    """Runs mutating response-body hooks with proxy-wasm pause semantics.

    Data (a chunk; for SSE one whole event, or several when the first hook
    takes batches) enters at the first step. A step that returns
    PAUSE before end of stream holds it: the data is appended to a bounded
    buffer and the same step is called again with everything held when more
    arrives. What passes the last step is released downstream.

    For SSE (``sse=True``) a hook that does not declare ``sse_batches`` sees
    one whole event per call, after a release or an injection too: when the
    data reaching it holds several events, it (and the steps after it) get
    them one by one. ``batches`` is True when the first hook takes batches:
    the relay then feeds each upstream read's whole events in one call, and
    they are split only before a hook that does not take batches.
    """

    __slots__ = ("_buffer", "_cap", "_last", "_paused_at", "_plan", "_sse", "batches")

    def __init__(self, plan: tuple[_Step, ...], cap: int, sse: bool = False) -> None:
        self._plan = plan
        self._last = len(plan) - 1
        self._cap = cap
        self._sse = sse
        self._paused_at = -1
        self._buffer = bytearray()
        self.batches = sse and bool(plan) and plan[0].batches

    async def push(self, ex: Exchange, data: bytes, end_of_stream: bool) -> bytes | None:
        """Feed ``data``; return the bytes released downstream, or None when held.

        New data passes the steps before a paused one first, exactly as it
        would if nothing were paused; only one step can be paused at a time
        because nothing passes beyond it.
        """
        return await self._run(ex, data, end_of_stream, 0, not self.batches)

    async def push_all(self, ex: Exchange, pieces: list[bytes], end_of_stream: bool = False) -> bytes | None:
        """:meth:`push` each of ``pieces``, the last with ``end_of_stream``; the released bytes joined.

        Stops early when a hook asked for a retry (``ex.control.retry``). One call
        per upstream read instead of one per SSE event.
        """
        if len(pieces) == 1:
            released = await self._run(ex, pieces[0], end_of_stream, 0, not self.batches)
            return None if ex.control.retry else released
        out: list[bytes] = []
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            released = await self._run(ex, piece, end_of_stream and i == last, 0, not self.batches)
            if ex.control.retry:
                return None
            if released:
                out.append(released)
        return b"".join(out) if out else None

    async def _run(self, ex: Exchange, data: bytes, end_of_stream: bool, start: int, one_event: bool) -> bytes | None:
        """Run the steps from ``start``; ``one_event``: ``data`` is known to be one SSE event (what
        the relay pushes is, unless the stage takes batches; after a step released what it held or
        replaced the data, maybe not)."""
        filters = ex.filters
        control = ex.control
        plan = self._plan
        for position in range(start, self._last + 1):
            step = plan[position]
            # a hook may have opted out of the rest of the body (read each time: a hook may opt out now)
            skipped = control.skipped
            if skipped is not None and id(filters[step.slot]) in skipped and position != self._paused_at:
                continue
            if position == self._paused_at:
                self._buffer += data
                if len(self._buffer) > self._cap:
                    raise UpstreamResponseTooLarge(f"response held by a filter exceeds {self._cap} bytes")
                data = bytes(self._buffer)
                one_event = False
            elif not one_event and not step.batches and self._sse:
                if _several_events(data):
                    return await self._fan_out(ex, data, end_of_stream, position)
                one_event = True
            control.response_data = None
            try:
                action = step.hook(filters[step.slot], ex, data, end_of_stream)
                if step.is_async or type(action) is CoroutineType:
                    action = await action
            except ProxyError:
                raise
            except Exception as exc:
                if step.fail_open:
                    log.exception("fail-open filter %s failed; skipped", step.name)
                    continue
                raise _failure(step, ex, exc) from exc
            if control.response_data is not None:
                data = control.response_data
                control.response_data = None
                one_event = False
            if control.retry:
                return None
            if action is Action.PAUSE and not end_of_stream:
                if position != self._paused_at:
                    self._paused_at = position
                    self._buffer = bytearray(data)
                return None
            if position == self._paused_at:
                self._paused_at = -1
                self._buffer = bytearray()
        return data

    async def _fan_out(self, ex: Exchange, data: bytes, end_of_stream: bool, start: int) -> bytes | None:
        events = split_events(data, self._cap)
        out = bytearray()
        for i, event in enumerate(events):
            released = await self._run(ex, event, end_of_stream and i == len(events) - 1, start, True)
            if ex.control.retry:
                return None
            if released:
                out += released
        return bytes(out) if out or not events else None


def _several_events(data: bytes) -> bool:
    return data.count(b"\n\n") + data.count(b"\r\n\r\n") > 1
