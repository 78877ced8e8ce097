"""The mock server: routes, the request log, control endpoints, and starting it.

:meth:`MockServer.respond` decides each reply: control endpoints first
(never recorded, never faulted), then the provider route from
:data:`_ROUTES` (the OpenAI and Anthropic tables), recorded in
:attr:`MockServer.requests` before its plan is resolved, so a faulted
request is logged too.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import signal
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import orjson

from llmproxy.mock import anthropic, bedrock, gemini, openai, responses, vertex
from llmproxy.mock.config import MockConfig, ReceivedRequest
from llmproxy.mock.connection import Connection
from llmproxy.mock.delivery import Delivery, End, Framer
from llmproxy.mock.plans import BadHeader, Planner, credential_of
from llmproxy.mock.replies import Call, Flavour, Route, Stream, Whole, error_reply
from llmproxy.mock.wire import RawRequest

__all__ = ["MAX_LOG", "MockServer", "serve_mock", "start_mock"]

# The request log keeps at most MAX_LOG entries; it is trimmed to
# _LOG_TRIM_TO in one go so that appending stays O(1) amortised.
MAX_LOG: Final = 10_000
_LOG_TRIM_TO: Final = 9_000

# path -> method -> route. Every provider route is recorded and can be faulted.
_ROUTES: Final[dict[str, dict[str, Route]]] = {**openai.ROUTES, **anthropic.ROUTES}


def _list_requests(server: MockServer) -> Whole:
    return Whole(200, orjson.dumps(server.requests))


def _clear_requests(server: MockServer) -> Whole:
    count = len(server.requests)
    server.requests.clear()
    return Whole(200, b'{"deleted":%d}' % count)


def _health(server: MockServer) -> Whole:
    return Whole(200, b'{"status":"ok"}')


# Control endpoints: never recorded, never faulted.
_CONTROL: Final[dict[str, dict[str, Callable[[MockServer], Whole]]]] = {
    "/_mock/requests": {"GET": _list_requests, "DELETE": _clear_requests},
    "/_mock/health": {"GET": _health},
}


class MockServer:
    """A running mock provider: one listening socket, its config and its request log.

    ``requests`` holds the last (at most ``MAX_LOG``) provider requests in
    arrival order; tests may read and clear it. Per-key fault counters live
    here, so two servers never share state. Create with :func:`start_mock`;
    :meth:`close` stops listening, aborts every connection (stalled ones
    too) and awaits every pacing task.
    """

    host: str
    port: int

    def __init__(self, config: MockConfig, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.requests: list[ReceivedRequest] = []
        self.planner = Planner(config)
        self.framer = Framer(config)
        self._config = config
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._head_cache: dict[str, RawRequest] = {}
        self._ids = itertools.count(1)
        #: Stored ``/v1/responses`` replies (id -> prompt tokens of the conversation so far, and the
        #: final response object),
        #: for ``previous_response_id``; bounded by :data:`llmproxy.mock.responses.MAX_STORED`.
        self.stored_responses: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._id_tag = secrets.token_hex(4).encode()

    def __repr__(self) -> str:
        return (
            f"<MockServer {self.host}:{self.port} connections={len(self._connections)} "
            f"active_tasks={len(self._tasks)} requests={len(self.requests)}>"
        )

    @property
    def config(self) -> MockConfig:
        """The server-wide behaviour; read on every request, so a test may change it (or its ``keys``) live."""
        return self._config

    @config.setter
    def config(self, config: MockConfig) -> None:
        self._config = self.planner.config = self.framer.config = config

    @property
    def active_tasks(self) -> int:
        """Pacing tasks in flight (one per paced exchange); 0 when every stream has ended."""
        return len(self._tasks)

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._connections)

    async def close(self) -> None:
        """Stop listening, abort every connection and await every pacing task. Idempotent."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def next_id(self, prefix: bytes) -> bytes:
        """A unique id such as ``chatcmpl-1a2b3c4d00002a`` (random per server, then a counter)."""
        return b"%b%b%06x" % (prefix, self._id_tag, next(self._ids))

    def record(self, req: ReceivedRequest) -> None:
        """Append ``req`` to the log, trimming it to stay within ``MAX_LOG``."""
        log = self.requests
        log.append(req)
        if len(log) > MAX_LOG:
            del log[: len(log) - _LOG_TRIM_TO]

    # -- one exchange -------------------------------------------------------

    def respond(self, raw: RawRequest) -> Delivery:
        """Decide the whole reply to ``raw``: route, record, plan, fault and pacing."""
        keep = raw.keep_alive
        whole = self.framer.whole
        control = _CONTROL.get(raw.path)
        if control is not None:
            action = control.get(raw.method)
            if action is None:
                return whole(keep, error_reply(Flavour.OPENAI, 405, f"{raw.method} not allowed on {raw.path}"))
            return whole(keep, action(self))
        methods = _ROUTES.get(raw.path)
        path_route = (bedrock.match(raw.path) or vertex.match(raw.path)) if methods is None else None
        if path_route is not None:
            methods = path_route[0]
        gemini_route = gemini.route_of(raw.path) if methods is None else None
        if gemini_route is not None:
            methods = {"POST": gemini.ROUTE}
        if methods is None and raw.path.startswith("/v1/responses/") and raw.method in ("GET", "DELETE"):
            return whole(keep, responses.lookup(self, raw.method, raw.path[len("/v1/responses/") :]))
        if methods is None:
            flavour = Flavour.ANTHROPIC if raw.path.startswith("/v1/messages") else Flavour.OPENAI
            return whole(keep, error_reply(flavour, 404, f"Invalid URL ({raw.method} {raw.path})"))
        route = methods.get(raw.method)
        if route is None:
            return whole(keep, error_reply(_route_flavour(methods), 405, f"{raw.method} not allowed on {raw.path}"))
        body: dict[str, Any] | None = None
        invalid = False
        if raw.body:
            try:
                parsed = orjson.loads(raw.body)
            except orjson.JSONDecodeError:
                invalid = True
            else:
                if isinstance(parsed, dict):
                    body = parsed
                else:
                    invalid = True
        headers = raw.headers
        credential = credential_of(headers)
        model = body.get("model") if body is not None else None
        stream = route.streams and body is not None and body.get("stream") is True
        if path_route is not None:  # Bedrock, Claude on Vertex: the model and the stream are the path's
            model, stream = path_route[1], path_route[2]
        if gemini_route is not None:  # the model and the streaming are in the path
            model, stream = gemini_route[0], gemini_route[1] and body is not None
        self.record(
            ReceivedRequest(
                raw.method,
                raw.path,
                headers,
                model if isinstance(model, str) else None,
                credential,
                stream,
                body,
            )
        )
        flavour = route.flavour
        if invalid:
            return whole(keep, error_reply(flavour, 400, "We could not parse the JSON body of your request."))
        if body is None and route.needs_body:
            return whole(keep, error_reply(flavour, 400, "the request body must be a JSON object"))
        if path_route is not None and self._config.aws_credentials:
            refused = bedrock.check_signature(raw.method, raw.path, headers, raw.body, self._config.aws_credentials)
            if refused is not None:
                return whole(keep, error_reply(flavour, refused[0], refused[1]))
        try:
            plan = self.planner.plan(headers, credential, raw.mocked)
        except BadHeader as exc:
            return whole(keep, error_reply(flavour, 400, str(exc)))
        if plan.fault == "reset":
            return Delivery([], End.RESET, keep_alive=False)
        if plan.fault is None and plan.status is not None:
            return whole(keep, error_reply(flavour, plan.status, plan.reason, plan.retry_after))
        name = model if isinstance(model, str) else "mock-model"
        prefix = self._config.model_prefix
        if prefix:
            name = prefix + name
        call = Call(
            self,
            body or {},
            name,
            orjson.dumps(name),
            stream,
            plan.tokens,
            plan.tool_calls,
            plan.reply,
            plan.tool_args,
            plan.chunk_chars,
        )
        reply = route.handler(call)
        if isinstance(reply, Stream):
            return self.framer.stream(raw, reply, plan, flavour)
        return whole(keep, reply, plan)

    # -- bookkeeping used by Connection ----------------------------------------

    def _attach(self, server: asyncio.AbstractServer) -> None:
        self._server = server
        sockets = getattr(server, "sockets", ())
        if sockets:
            self.port = int(sockets[0].getsockname()[1])


def _route_flavour(methods: dict[str, Route]) -> Flavour:
    """The error flavour of a path (from any of its routes)."""
    return next(iter(methods.values())).flavour


async def start_mock(host: str = "127.0.0.1", port: int = 0, config: MockConfig | None = None) -> MockServer:
    """Start a mock provider on the running loop; ``port=0`` picks a free port (see ``.port``)."""
    server = MockServer(config if config is not None else MockConfig(), host)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: Connection(server), host, port, backlog=2048, reuse_address=True)
    server._attach(listener)
    return server


async def _serve_until_signal(host: str, port: int, config: MockConfig | None) -> None:
    server = await start_mock(host, port, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    print(f"llmproxy mock upstream listening on http://{host}:{server.port}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.close()


def serve_mock(host: str, port: int, config: MockConfig | None = None) -> None:
    """Run a mock provider on uvloop until SIGINT or SIGTERM (blocking).

    Prints ``llmproxy mock upstream listening on http://HOST:PORT`` once
    listening (the real port when ``port`` is 0), and returns after a clean
    shutdown.
    """
    import uvloop

    uvloop.run(_serve_until_signal(host, port, config))
