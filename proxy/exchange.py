"""One request/response cycle: what filters see and change.

An :class:`Exchange` lives exactly one cycle; the connection it arrived on
is a separate object (:mod:`llmproxy.http.server`) that filters never touch. Fields
that are not per-request never live here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from llmproxy.control import HookControl
from llmproxy.errors import ClientProtocol, InvalidJSON, ProxyError, UpstreamError, protocol_of_path
from llmproxy.headers import Headers, check_field

if TYPE_CHECKING:
    from llmproxy.attempt import Attempt
    from llmproxy.filter import Filter
    from llmproxy.upstream import UpstreamTarget
    from llmproxy.usage import Usage

__all__ = ["Exchange", "LocalReply", "Request", "Response"]


class Request:
    """The request as it will be sent upstream; filters may change any field."""

    __slots__ = ("body", "headers", "http_version", "method", "path")

    def __init__(self, method: str, path: str, headers: Headers, body: bytes = b"", http_version: str = "1.1") -> None:
        self.method = method
        #: The request target: path plus query string, as sent upstream.
        self.path = path
        self.headers = headers
        self.body = body
        self.http_version = http_version

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} body={len(self.body)}B>"


class Response:
    """The response head as it will be sent downstream."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


class LocalReply:
    """A response produced by a filter or the core instead of the upstream."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


_UNPARSED: Any = object()

#: The deepest JSON the proxy can write again (orjson's serialiser stops at 255
#: levels; its parser at 1024). A request nested deeper is refused when parsed,
#: not when it is re-serialised for the upstream.
MAX_JSON_DEPTH = 254


def _too_deep(body: bytes, value: Any) -> bool:
    """True when ``value`` (parsed from ``body``) is nested deeper than :data:`MAX_JSON_DEPTH`.

    Counting brackets is a cheap bound that almost every request passes; only
    a body with that many containers is serialised once to find out.
    """
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return True
    return False


class Exchange:
    """Per-request state shared by the core and every filter in the chain.

    ``vars`` is a free-form dict for filters to pass facts to each other
    (for example routing leaves the provider name for metering); names
    should be prefixed with the filter's name.
    """

    __slots__ = (
        "_json",
        "_json_dirty",
        "attempt",
        "attempt_history",
        "attempts",
        "bytes_received",
        "bytes_sent",
        "client_addr",
        "client_path",
        "control",
        "error",
        "extra_response_headers",
        "filters",
        "first_byte_at",
        "id",
        "is_sse",
        "model",
        "request",
        "response",
        "response_started",
        "started_at",
        "upstream",
        "upstream_error",
        "usage",
        "vars",
    )

    def __init__(self, request_id: str, request: Request, client_addr: str) -> None:
        self.id = request_id
        self.request = request
        #: The path the client asked for (``request.path`` may be rewritten by filters).
        self.client_path = request.path
        self.client_addr = client_addr
        self.started_at = time.perf_counter()
        self.response: Response | None = None
        #: Where the request goes; the core's default upstream unless a filter sets it.
        self.upstream: UpstreamTarget | None = None
        #: The failure of the current attempt, when the response was synthesized.
        self.upstream_error: UpstreamError | None = None
        #: The error that ended the exchange (None on success).
        self.error: ProxyError | None = None
        #: Attempts made to the upstream (1 unless a filter asked for retries).
        self.attempts = 0
        #: The current (or last) upstream attempt; None before the first is sent.
        self.attempt: Attempt | None = None
        #: Every attempt of this exchange, in order (the last is ``attempt``).
        self.attempt_history: list[Attempt] = []
        self.is_sse = False
        #: True once any response byte (the head included) was written downstream.
        self.response_started = False
        self.bytes_received = 0
        self.bytes_sent = 0
        #: ``time.perf_counter()`` when the first response body byte went downstream (0: none yet);
        #: minus ``started_at`` it is the time to first token of a stream.
        self.first_byte_at = 0.0
        self.vars: dict[str, Any] = {}
        #: The ``model`` of the request JSON as the client sent it ("" when there is none, or
        #: before the body was parsed): set by :meth:`request_json`, never changed by filters.
        self.model = ""
        #: Tokens and cost of the whole exchange (the sum of its attempts'), set by
        #: the ``metering`` filter before ``on_exchange_complete``; None without it.
        self.usage: Usage | None = None
        self.filters: list[Filter] = []
        #: Fields :meth:`set_response_header` added to whatever response the client gets.
        self.extra_response_headers: list[tuple[bytes, bytes]] | None = None
        self._json: Any = _UNPARSED
        self._json_dirty = False
        #: What the hooks asked of the core (read by the chain runner and the driver only).
        self.control = HookControl()

    def __repr__(self) -> str:
        return f"<Exchange {self.id} {self.request.method} {self.request.path}>"

    # -- request body -----------------------------------------------------
    def request_json(self) -> Any:
        """The request body parsed as JSON, parsed once and shared by every filter.

        Raises :class:`InvalidJSON` (400) when the body is not JSON. Changes to
        the returned object are sent upstream only after
        :meth:`set_request_json` (or :meth:`mark_request_json_changed`).
        """
        if self._json is _UNPARSED:
            body = self.request.body
            try:
                value = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                if "depth" in exc.msg:
                    raise InvalidJSON(
                        f"request JSON is nested deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
                    ) from None
                raise InvalidJSON(f"request body is not valid JSON: {exc.msg}") from None
            if _too_deep(body, value):
                raise InvalidJSON(f"request JSON is nested deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep")
            self._json = value
            if isinstance(value, dict):
                model = value.get("model")
                if isinstance(model, str) and not self.model:
                    self.model = model
        return self._json

    def set_request_json(self, value: Any) -> None:
        """Replace the request JSON; the core serialises it once before sending."""
        self._json = value
        self._json_dirty = True

    def mark_request_json_changed(self) -> None:
        """Say that the object from :meth:`request_json` was changed in place."""
        self._json_dirty = True

    def set_request_body(self, body: bytes) -> None:
        """Replace the raw request body (forgets any parsed JSON)."""
        self.request.body = body
        self._json = _UNPARSED
        self._json_dirty = False

    def final_request_body(self) -> bytes:
        """The body to send upstream (serialising changed JSON once). For the core."""
        if self._json_dirty:
            self.request.body = orjson.dumps(self._json)
            self._json_dirty = False
        return self.request.body

    # -- replies and control --------------------------------------------
    def send_local_reply(
        self,
        status: int,
        body: bytes | dict[str, Any] | list[Any] = b"",
        headers: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> None:
        """Answer the client without (or instead of) the upstream.

        Allowed until the response has started. A ``dict`` or ``list`` body is
        sent as JSON. The chain stops after the current hook returns. Header
        names and values are validated (``ValueError`` for one that would
        break the head: a CR, LF or NUL, or a name that is not a token).
        """
        if self.response_started:
            raise RuntimeError("send_local_reply after the response started")
        if isinstance(body, (dict, list)):
            payload = orjson.dumps(body)
            content_type = content_type or "application/json"
        else:
            payload = body
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers or []]
        if content_type:
            raw.append((b"content-type", content_type.encode("latin-1")))
        for name, value in raw:
            check_field(name, value)
        self.control.local_reply = LocalReply(status, raw, payload)

    def set_response_header(self, name: str, value: str) -> None:
        """Set a field of the response head the client receives, whatever produces it.

        Unlike editing ``exchange.response.headers`` in ``on_response_headers``
        (which runs for upstream responses only), a field added here is also
        written on local replies (any filter's) and on the error responses the
        core renders: CORS headers, a cache status. Call it any time before the
        response starts; the core appends the fields once, after the filters'
        header edits, replacing the response's own fields of that name; setting
        a name again here replaces the earlier value. Names and values are
        validated (``ValueError``).
        """
        if self.response_started:
            raise RuntimeError("set_response_header after the response started")
        field = (name.lower().encode("latin-1"), value.encode("latin-1"))
        check_field(*field)
        if self.extra_response_headers is None:
            self.extra_response_headers = [field]
        else:
            self.extra_response_headers = [kv for kv in self.extra_response_headers if kv[0] != field[0]]
            self.extra_response_headers.append(field)

    def retry(self) -> None:
        """Ask the core to send the (possibly changed) request again.

        Valid from response hooks while nothing has gone downstream; the
        current upstream response is discarded and its connection closed.
        Change ``upstream``, headers or body before calling it to try
        elsewhere. The core caps attempts at ``limits.max_attempts``.
        """
        if self.response_started:
            raise RuntimeError("retry after the response started")
        self.control.retry = True

    def set_response_data(self, data: bytes) -> None:
        """In ``on_response_body``: replace the data passed on to the next filter."""
        self.control.response_data = data

    def end_response_body(self) -> None:
        """In ``on_response_body``: this is the body's last data; stop reading the upstream.

        The data this hook passes on (its replacement, typically the protocol's
        own ending events: a cap reached mid-stream) is relayed, then the body
        ends as if the upstream had ended it: every mutating filter gets its
        ``end_of_stream`` call, observers see the end, and the upstream
        connection is closed (its unread rest is never relayed). The attempt
        completes normally.
        """
        self.control.end_body = True

    def skip_response_body(self, filter_: Filter) -> None:
        """``filter_`` has nothing (more) to do with this response's body.

        From ``on_response_headers``: its ``on_response_body`` is not called
        for the current attempt (a retry asks again), and when no filter wants
        the body the core relays it untouched as it arrives, with the
        upstream's Content-Length, instead of running it through the
        response-body stage. From ``on_response_body``: it is not called for
        the rest of this body (a filter that held a stream until it saw what
        it needed). Say it whenever you can: it keeps a full chain close to an
        empty one.
        """
        control = self.control
        if control.skipped is None:
            control.skipped = set()
        control.skipped.add(id(filter_))

    @property
    def client_protocol(self) -> ClientProtocol:
        """The protocol of the API the client called: ``anthropic`` for ``/v1/messages*``, else ``openai``.

        Errors the proxy makes itself are rendered in it.
        """
        return protocol_of_path(self.client_path)

    @property
    def elapsed(self) -> float:
        """Seconds since the request head was parsed."""
        return time.perf_counter() - self.started_at
