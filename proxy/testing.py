"""Test harnesses for filter authors: the real chain without sockets.

(One module, over the core's ~400-line guide, on purpose: it is public API,
imported by plugin test suites as ``llmproxy.testing``, and its two harnesses
share the fake connection and scripted upstream below.)

:class:`ChainHarness` runs whole exchanges through the real
:class:`~llmproxy.engine.chain.Chain`, the response body stage, the SSE framer and the
attempt loop (:func:`llmproxy.engine.cycle.run_exchange`, the code the server runs);
only the two sockets are fakes. The upstream is a script of
:class:`ScriptedReply` objects, one per attempt (a whole body, chunks, SSE
events, or an :class:`~llmproxy.errors.UpstreamError` at send or mid-body); the
client side records exactly what the client would receive. Several filters
at once, retries, ``skip_response_body``, PAUSE, local replies, observers,
``on_attempt_complete`` and ``on_exchange_complete`` all go through the
core's own code, so a filter that passes here behaves the same in the
server (``tests/test_harness_vs_server.py`` checks it)::

    from llmproxy.attempt import Outcome
    from llmproxy.errors import UpstreamProtocolError
    from llmproxy.testing import ChainHarness, ScriptedReply

    def test_retries_elsewhere_then_streams():
        chain = [(RetryElsewhereFactory, {"fallback_url": "http://b.test"}), (StampFactory, {"value": "x"})]
        with ChainHarness(chain) as h:
            h.reply(
                ScriptedReply(503, json={"error": {"message": "busy"}}),
                ScriptedReply(events=[{"choices": [{"delta": {"content": "hi"}}]}, "[DONE]"]),
            )
            r = h.send("POST", "/v1/chat/completions", json={"model": "m", "stream": True})
            assert r.status == 200 and r.headers.get("x-stamp") == "x"
            assert r.events[-1].data == b"[DONE]"
            assert r.outcomes == [Outcome.RETRIED, Outcome.COMPLETED]
            assert r.upstream_requests[1].target.name == "fallback"

            h.reply(ScriptedReply(events=["one", UpstreamProtocolError("reset")]))
            r = h.send(json={"model": "m", "stream": True})
            assert b"upstream_protocol_error" in r.events[-1].data  # the core's final SSE error event

Filters are given as factory classes, ``(class, config)`` or ``(class,
config, name)``, in chain order. ``limits=`` takes a
:class:`~llmproxy.limits.Limits` (``dataclasses.replace(Limits(),
max_attempts=2)``); ``upstream=`` the default target's URL. The factories'
``context.upstream`` (health probes) is a real client, not the script.

:class:`FilterHarness` drives one filter hook by hook instead, for unit
tests of a single decision: build the factory from a config mapping, make
exchanges, call hooks one at a time and assert on the returned
:class:`~llmproxy.filter.Action`, on headers, bodies, ``vars`` and local
replies. Sync and coroutine hooks are both handled: the harness runs
coroutines on its own event loop, so tests stay plain functions::

    from llmproxy.testing import FilterHarness

    def test_blocks_unknown_team():
        h = FilterHarness(MyFactory, {"teams": ["a"]})
        ex = h.exchange(json={"model": "gpt-4o"}, headers={"x-team": "b"})
        assert h.request_headers(ex) is Action.CONTINUE
        h.request_body(ex)
        assert h.local_reply(ex).status == 403

Hooks that raise :class:`~llmproxy.errors.ProxyError` raise it to the test
(:class:`ChainHarness` instead answers them as the server does).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson

from llmproxy.attempt import Attempt, Outcome
from llmproxy.context import FactoryContext
from llmproxy.engine.chain import Chain
from llmproxy.engine.cycle import Runtime, run_exchange
from llmproxy.errors import UpstreamError
from llmproxy.exchange import Exchange, LocalReply, Request, Response
from llmproxy.filter import Action, Filter, FilterFactory
from llmproxy.headers import Headers
from llmproxy.http.request_head import valid_request_id
from llmproxy.http.sse import SseEvent, SseFramer, format_event, parse_event
from llmproxy.limits import Limits
from llmproxy.runtime.accesslog import AccessLog
from llmproxy.state.store import MemoryStore, SharedStore
from llmproxy.upstream import UpstreamPool, UpstreamTarget

if TYPE_CHECKING:
    from llmproxy.http.server import HttpConnection

__all__ = [
    "ChainHarness",
    "FilterHarness",
    "HarnessError",
    "HarnessResult",
    "RecordingConnection",
    "ScriptedReply",
    "ScriptedUpstream",
    "UpstreamRequest",
]

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


# == the real chain, through a fake-connection seam ====================================

FilterSpec = (
    type[FilterFactory]
    | tuple[type[FilterFactory], Mapping[str, Any]]
    | tuple[type[FilterFactory], Mapping[str, Any], str]
)
"""A chain entry: a factory class, ``(class, config)`` or ``(class, config, name)``."""

#: A scripted body piece: bytes, or an upstream error raised when the relay reads that far.
Piece = bytes | UpstreamError


class HarnessError(AssertionError):
    """The harness was misused (no scripted reply left) or the core broke the wire contract."""


@dataclass
class ScriptedReply:
    """One scripted upstream answer, consumed by one attempt.

    The body is ``json`` (serialised), ``body`` (one piece), ``chunks`` (one
    :meth:`~llmproxy.upstream.UpstreamResponse.read` each) or ``events`` (SSE:
    each a whole event as bytes, or a ``str``/mapping for a ``data:`` line;
    ``content-type: text/event-stream`` is added). A chunk or event may be an
    :class:`~llmproxy.errors.UpstreamError`: the read that reaches it raises it
    (a failure mid-body). ``error`` is raised by the send itself (connect
    refused, timeout before the head). The body is counted
    (``content_length``) when given as ``json`` or ``body`` unless
    ``chunked``; chunks and events are chunked (no length), as a provider
    streams them.
    """

    status: int = 200
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    body: bytes = b""
    json: Any = None
    chunks: Sequence[Piece] | None = None
    events: Sequence[bytes | str | Mapping[str, Any] | UpstreamError] | None = None
    error: UpstreamError | None = None
    chunked: bool = False

    def pieces(self) -> list[Piece]:
        """The body as the upstream's reads return it."""
        if self.events is not None:
            out: list[Piece] = []
            for event in self.events:
                if isinstance(event, (bytes, UpstreamError)):
                    out.append(event)
                elif isinstance(event, str):
                    out.append(format_event(event.encode()))
                else:
                    out.append(format_event(orjson.dumps(event)))
            return out
        if self.chunks is not None:
            return list(self.chunks)
        body = orjson.dumps(self.json) if self.json is not None else self.body
        return [body] if body else []

    def fields(self) -> list[tuple[bytes, bytes]]:
        """The response head's fields (lowercase names), framing included, as the pool returns them."""
        pairs = list(self.headers.items()) if isinstance(self.headers, Mapping) else list(self.headers)
        out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
        names = {k for k, _ in out}
        if b"content-type" not in names:
            if self.events is not None:
                out.append((b"content-type", b"text/event-stream"))
            elif self.json is not None:
                out.append((b"content-type", b"application/json"))
        length = self.content_length()
        if length is None:
            out.append((b"transfer-encoding", b"chunked"))
        else:
            out.append((b"content-length", b"%d" % length))
        return out

    def content_length(self) -> int | None:
        """The counted body length the pool would report, or None (chunked)."""
        if self.events is not None or self.chunks is not None or self.chunked:
            return None
        if self.status in (204, 304):
            return None
        return sum(len(p) for p in self.pieces() if isinstance(p, bytes))


@dataclass
class UpstreamRequest:
    """One request as the core sent it upstream."""

    target: UpstreamTarget
    method: str
    path: str
    headers: Headers
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


class _ScriptedResponse:
    """The :class:`~llmproxy.upstream.UpstreamResponse` interface over a :class:`ScriptedReply`."""

    def __init__(self, reply: ScriptedReply) -> None:
        self.status = reply.status
        self.headers = reply.fields()
        self.content_length = reply.content_length()
        self.http_version = b"1.1"
        self._pieces = reply.pieces()
        self._next = 0
        self.released = False
        self.closed = False

    async def read(self) -> bytes:
        await asyncio.sleep(0)  # a read is a wait on the network: let other tasks run
        if self._next >= len(self._pieces):
            return b""
        piece = self._pieces[self._next]
        self._next += 1
        if isinstance(piece, UpstreamError):
            raise piece
        return piece

    @property
    def at_end(self) -> bool:
        return self._next >= len(self._pieces)  # the last piece arrives with the body's end

    @property
    def buffered(self) -> bool:
        return False  # every scripted read is a separate arrival

    def stall_timeout(self) -> float:
        return 1.0

    def release(self) -> None:
        if not (self.released or self.closed):
            self.released = True

    def close(self) -> None:
        if not (self.released or self.closed):
            self.closed = True


class ScriptedUpstream:
    """A duck-typed :class:`~llmproxy.upstream.UpstreamPool`: answers each send with the next scripted reply.

    Replies scripted for a target name (``add(..., target="openai")``) are
    used for that target first; the others for any target, in order.
    """

    def __init__(self) -> None:
        self.queue: list[ScriptedReply] = []
        self.by_target: dict[str, list[ScriptedReply]] = {}
        #: Every request sent, in order.
        self.requests: list[UpstreamRequest] = []
        #: Every response handed out, in order (``released`` / ``closed`` tell how each ended).
        self.responses: list[_ScriptedResponse] = []
        self.exhausted: str | None = None

    def add(self, *replies: ScriptedReply, target: str | None = None) -> None:
        """Script the next replies (for ``target`` only, when given)."""
        (self.queue if target is None else self.by_target.setdefault(target, [])).extend(replies)

    async def send(
        self, target: UpstreamTarget, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> _ScriptedResponse:
        self.requests.append(UpstreamRequest(target, method.decode(), path.decode("latin-1"), Headers(headers), body))
        await asyncio.sleep(0)
        mine = self.by_target.get(target.name)
        queue = mine if mine else self.queue
        if not queue:
            self.exhausted = f"no scripted upstream reply left for attempt {len(self.requests)} (to {target.name!r})"
            raise HarnessError(self.exhausted)
        reply = queue.pop(0)
        if reply.error is not None:
            raise reply.error
        response = _ScriptedResponse(reply)
        self.responses.append(response)
        return response


class RecordingConnection:
    """The :class:`~llmproxy.http.server.HttpConnection` methods the core calls, recording what the client would get."""

    def __init__(self, body: bytes, head_request: bool) -> None:
        self._request_body = body
        self._head_request = head_request
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.body = bytearray()
        #: The body as the client receives it, one entry per flush (one TCP write).
        self.writes: list[bytes] = []
        self._pending: list[bytes] = []
        self._bodiless = False
        self.ended = False
        self.aborted = False
        self.finished = False
        self.violations: list[str] = []

    async def read_body(self) -> bytes:
        return self._request_body

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None) -> None:
        if self.status is not None:
            self.violations.append(f"a second response head ({status}) after {self.status}")
            return
        self.status = status
        self.headers = list(headers)
        self._bodiless = self._head_request or status < 200 or status in (204, 304)
        self.content_length = None if status < 200 or status in (204, 304) else content_length

    def write(self, data: bytes) -> None:
        if self.status is None:
            self.violations.append("body bytes written before the response head")
        if self._bodiless or not data:
            return
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            self.writes.append(data)
            self.body += data

    def end_response(self) -> None:
        self.flush()
        self.ended = True
        if self.content_length is not None and not self._bodiless and len(self.body) != self.content_length:
            self.violations.append(f"Content-Length {self.content_length} but {len(self.body)} body bytes written")

    @property
    def write_paused(self) -> bool:
        return False

    async def drain(self, stall_timeout: float | None = None) -> None:
        self.flush()

    def abort(self) -> None:
        self.flush()
        self.aborted = True

    def exchange_finished(self) -> None:
        self.finished = True


@dataclass
class HarnessResult:
    """What one :meth:`ChainHarness.send` produced, as the client and the upstream saw it."""

    #: The status the client received (None if the connection was closed before a head).
    status: int | None
    #: The response head the client received, framing fields (``content-length`` or
    #: ``transfer-encoding: chunked``) included as an HTTP/1.1 client sees them.
    headers: Headers
    #: The body bytes the client received.
    body: bytes
    #: The body as it went out, one entry per write (flush).
    writes: list[bytes]
    #: The connection was closed mid-response (a non-SSE response failing after its head).
    aborted: bool
    #: The exchange, after ``on_exchange_complete``.
    exchange: Exchange
    #: Every upstream request the exchange sent, in order.
    upstream_requests: list[UpstreamRequest]

    @property
    def attempts(self) -> list[Attempt]:
        """The exchange's attempts (``exchange.attempt_history``)."""
        return self.exchange.attempt_history

    @property
    def outcomes(self) -> list[Outcome]:
        """The outcome of each attempt, in order."""
        return [a.outcome for a in self.exchange.attempt_history]

    @property
    def events(self) -> list[SseEvent]:
        """The body's SSE events, parsed (for a ``text/event-stream`` response)."""
        framer = SseFramer(max_event=max(len(self.body), 1))
        raw = framer.feed(self.body)
        rest = framer.flush()
        if rest.strip():
            raw.append(rest)
        return [parse_event(event) for event in raw]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


class ChainHarness:
    """Runs whole exchanges through the real chain, body stage, SSE framer and attempt loop.

    Only the two sockets are fakes: a :class:`ScriptedUpstream` stands in for
    the upstream pool and a :class:`RecordingConnection` for the client
    connection; :func:`llmproxy.engine.cycle.run_exchange` runs between them, exactly as
    in the server (see the module docstring for an example).
    """

    def __init__(
        self,
        filters: Sequence[FilterSpec] = (),
        *,
        upstream: str | UpstreamTarget | None = "http://upstream.test",
        limits: Limits | None = None,
        store: SharedStore | None = None,
        validate_json: bool = True,
        routes: Mapping[str, frozenset[str]] | None = None,
        start: bool = True,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = store or MemoryStore()
        self.context = FactoryContext(self.store)
        #: The scripted upstream (the runtime's pool); script replies with :meth:`reply`.
        self.upstream = ScriptedUpstream()
        factories: list[FilterFactory] = []
        for spec in filters:
            cls, config, name = _spec(spec)
            factory = cls(name, dict(config), self.context)
            factories.append(factory)
            self.context.factories.append(factory)
        target = UpstreamTarget.from_url("default", upstream) if isinstance(upstream, str) else upstream
        self.runtime = Runtime(
            chain=Chain(factories),
            pool=cast(UpstreamPool, self.upstream),
            limits=limits or Limits(),
            default_upstream=target,
            validate_json=validate_json,
            access_log=AccessLog(enabled=False),
        )
        if routes is not None:
            self.runtime.routes = dict(routes)
        self._served = 0
        self._started = False
        if start:
            for factory in factories:
                self.run(factory.start())
            self._started = True

    @property
    def chain(self) -> Chain:
        return self.runtime.chain

    @property
    def factories(self) -> tuple[FilterFactory, ...]:
        return self.runtime.chain.factories

    def run(self, value: Any) -> Any:
        """Resolve ``value`` if it is awaitable (on the harness loop); else return it."""
        if inspect.isawaitable(value):
            return self.loop.run_until_complete(_as_coroutine(value))
        return value

    def reply(self, *replies: ScriptedReply, target: str | None = None) -> ChainHarness:
        """Script the upstream's next replies, one per attempt (for ``target`` only, when given)."""
        self.upstream.add(*replies, target=target)
        return self

    def send(
        self,
        method: str = "POST",
        path: str = "/v1/chat/completions",
        *,
        json: Any = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        client: str = "127.0.0.1",
        request_id: str | None = None,
    ) -> HarnessResult:
        """Run one exchange to its end (``on_exchange_complete`` included) and return what it produced.

        The request head is what an HTTP/1.1 client would send: ``host`` and
        ``content-length`` are added (and ``content-type`` for ``json``) unless
        given. Raises :class:`HarnessError` when the upstream script ran out or
        the core broke the wire contract (two heads, a length that does not
        match the body).
        """
        if json is not None:
            body = orjson.dumps(json)
        pairs = list((headers or {}).items())
        names = {k.lower() for k, _ in pairs}
        if "host" not in names:
            pairs.insert(0, ("host", "proxy.test"))
        if json is not None and "content-type" not in names:
            pairs.append(("content-type", "application/json"))
        if (body or method not in ("GET", "HEAD")) and "content-length" not in names:
            pairs.append(("content-length", str(len(body))))
        self._served += 1
        given = Headers.from_pairs(pairs).get_raw(b"x-request-id")
        if request_id is None and given is not None and valid_request_id(given):
            request_id = given.decode("ascii")  # as the server adopts a client's valid id
        rid = request_id or f"harness-{self._served}"
        ex = Exchange(rid, Request(method, path, Headers.from_pairs(pairs), b""), client)
        conn = RecordingConnection(body, method == "HEAD")
        sent_before = len(self.upstream.requests)
        self.upstream.exhausted = None
        self.loop.run_until_complete(run_exchange(self.runtime, cast("HttpConnection", conn), ex))
        if self.upstream.exhausted is not None:
            raise HarnessError(self.upstream.exhausted)
        if conn.violations:
            raise HarnessError("; ".join(conn.violations))
        if not conn.finished:
            raise HarnessError("the exchange did not finish")
        fields = list(conn.headers)
        if conn.status is not None and conn.status >= 200 and conn.status not in (204, 304):
            if conn.content_length is not None:
                fields.append((b"content-length", b"%d" % conn.content_length))
            else:
                fields.append((b"transfer-encoding", b"chunked"))
        return HarnessResult(
            status=conn.status,
            headers=Headers(fields),
            body=bytes(conn.body),
            writes=conn.writes,
            aborted=conn.aborted,
            exchange=ex,
            upstream_requests=self.upstream.requests[sent_before:],
        )

    def close(self) -> None:
        """Close every factory, their background tasks and the loop."""
        if self._started:
            for factory in self.factories:
                self.run(factory.close())
        self.run(self.context.cancel_tasks())
        self.loop.close()

    def __enter__(self) -> ChainHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spec(spec: FilterSpec) -> tuple[type[FilterFactory], Mapping[str, Any], str]:
    if isinstance(spec, tuple):
        cls = spec[0]
        config = spec[1] if len(spec) > 1 else {}
        name = spec[2] if len(spec) > 2 else cls.__name__
        return cls, config, name
    return spec, {}, spec.__name__


async def _as_coroutine(value: Awaitable[T]) -> T:
    return await value
