"""A harness for filter authors: drive one filter hook by hook, without sockets.

In the spirit of proxy-wasm's host emulator: build the factory from a config
mapping, make exchanges, call hooks one at a time and assert on the returned
:class:`~proxy.filter.Action`, on headers, bodies, ``vars`` and local
replies. Sync and coroutine hooks are both handled: the harness runs
coroutines on its own event loop, so tests stay plain functions::

    from proxy.testing import FilterHarness

    def test_blocks_unknown_team():
        h = FilterHarness(MyFactory, {"teams": ["a"]})
        ex = h.exchange(json={"model": "gpt-4o"}, headers={"x-team": "b"})
        assert h.request_headers(ex) is Action.CONTINUE
        h.request_body(ex)
        assert h.local_reply(ex).status == 403

Hooks that raise :class:`~proxy.errors.ProxyError` raise it to the test.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import orjson

from .context import FactoryContext
from .exchange import Exchange, LocalReply, Request, Response
from .filter import Action, Filter, FilterFactory
from .headers import Headers
from .sse import SseFramer
from .store import MemoryStore, SharedStore

__all__ = ["FilterHarness"]

T = TypeVar("T")


class FilterHarness:
    """Hosts one filter factory and drives its per-exchange filters."""

    def __init__(
        self,
        factory_class: type[FilterFactory],
        config: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        store: SharedStore | None = None,
        start: bool = True,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = store or MemoryStore()
        self.context = FactoryContext(self.store)
        self.factory = factory_class(name or factory_class.__name__, dict(config or {}), self.context)
        self._filters: dict[int, Filter] = {}
        if start:
            self.run(self.factory.start())

    def run(self, value: Any) -> Any:
        """Resolve ``value`` if it is awaitable (on the harness loop); else return it."""
        if inspect.isawaitable(value):
            return self.loop.run_until_complete(_as_coroutine(value))
        return value

    def close(self) -> None:
        """Close the factory, its background tasks and the loop."""
        self.run(self.factory.close())
        self.run(self.context.cancel_tasks())
        self.loop.close()

    def __enter__(self) -> FilterHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- exchanges -----------------------------------------------------------
    def exchange(
        self,
        method: str = "POST",
        path: str = "/v1/chat/completions",
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        json: Any = None,
        client: str = "127.0.0.1",
        request_id: str = "test-request",
    ) -> Exchange:
        """A fresh exchange with its filter created by the factory."""
        if json is not None:
            body = orjson.dumps(json)
        pairs = list((headers or {}).items())
        if json is not None and not any(k.lower() == "content-type" for k, _ in pairs):
            pairs.append(("content-type", "application/json"))
        ex = Exchange(request_id, Request(method, path, Headers.from_pairs(pairs), body), client)
        flt = self.factory.create(ex)
        ex.filters = [flt]
        self._filters[id(ex)] = flt
        return ex

    def filter(self, ex: Exchange) -> Filter:
        """The per-exchange filter instance of ``ex``."""
        return self._filters[id(ex)]

    def local_reply(self, ex: Exchange) -> LocalReply | None:
        """The local reply the filter asked for, if any."""
        return ex.control.local_reply

    def retry_requested(self, ex: Exchange) -> bool:
        """True if the filter asked for the request to be sent again."""
        return ex.control.retry

    # -- hooks ---------------------------------------------------------------
    def request_headers(self, ex: Exchange) -> Action:
        """Call ``on_request_headers``."""
        action: Action = self.run(self.filter(ex).on_request_headers(ex))
        return action

    def request_body(self, ex: Exchange) -> Action:
        """Call ``on_request_body`` with the whole body, as the core does."""
        action: Action = self.run(self.filter(ex).on_request_body(ex, ex.request.body, True))
        return action

    def response_headers(self, ex: Exchange, status: int = 200, headers: Mapping[str, str] | None = None) -> Action:
        """Set the response head and call ``on_response_headers``."""
        ex.response = Response(status, Headers.from_pairs((headers or {}).items()))
        ctype = ex.response.headers.get("content-type") or ""
        ex.is_sse = ctype.startswith("text/event-stream")
        action: Action = self.run(self.filter(ex).on_response_headers(ex))
        return action

    def response_body(self, ex: Exchange, data: bytes, end_of_stream: bool = False) -> tuple[Action, bytes]:
        """Call ``on_response_body`` once; return the action and the data passed on."""
        control = ex.control
        control.response_data = None
        action: Action = self.run(self.filter(ex).on_response_body(ex, data, end_of_stream))
        out = control.response_data if control.response_data is not None else data
        control.response_data = None
        return action, out

    def response_stream(self, ex: Exchange, raw: bytes) -> bytes:
        """Feed a whole SSE body event by event (with the core's PAUSE semantics);
        return what the client would receive."""
        framer = SseFramer()
        held = bytearray()
        out = bytearray()
        for event in [*framer.feed(raw), framer.flush()]:
            if not event:
                continue
            data = bytes(held + event) if held else event
            action, passed = self.response_body(ex, data, False)
            if action is Action.PAUSE:
                held = bytearray(passed)
                continue
            held = bytearray()
            out += passed
        _, tail = self.response_body(ex, bytes(held), True)
        out += tail
        return bytes(out)

    def complete(self, ex: Exchange) -> None:
        """Call ``on_exchange_complete``."""
        self.run(self.filter(ex).on_exchange_complete(ex))
        self._filters.pop(id(ex), None)


async def _as_coroutine(value: Awaitable[T]) -> T:
    return await value
