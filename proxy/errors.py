"""Typed errors that know the HTTP status and OpenAI error envelope they become.

Every error a client can see is raised (or created) as a :class:`ProxyError`
subclass and rendered by exactly one function, :func:`render_error`, into the
OpenAI-style envelope ``{"error": {"message", "type", "param", "code"}}``.
Socket, TLS and h11 exceptions from the upstream side are mapped into
:class:`UpstreamError` subclasses once, in :mod:`llmproxy.upstream`, so filters
match on types and never on message strings.

Errors are rendered in the client's protocol: the OpenAI envelope for
OpenAI-style paths, Anthropic's ``{"type": "error", "error": {"type",
"message"}}`` for ``/v1/messages`` clients (the Anthropic ``type`` follows
the status, :data:`ANTHROPIC_TYPE_BY_STATUS`). After an event stream started,
an error is one final SSE event of that protocol: ``data: {"error": ...}``
(the openai SDK raises on it) or ``event: error`` (the anthropic SDK raises
on it).

Messages must never contain secrets: constructors take already-redacted text.
Extra header values are validated when the error is created (a CR or LF in
one would inject a field).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import orjson

from llmproxy.headers import check_field

__all__ = [
    "ANTHROPIC_TYPE_BY_STATUS",
    "BadRequest",
    "BodyTooLarge",
    "ClientDisconnected",
    "ClientProtocol",
    "FilterFailed",
    "HeaderTimeout",
    "HeadersTooLarge",
    "HttpVersionNotSupported",
    "InvalidJSON",
    "MethodNotAllowed",
    "ModelNotFound",
    "NotFound",
    "ProxyError",
    "RateLimited",
    "ServiceUnavailable",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamEventTooLarge",
    "UpstreamProtocolError",
    "UpstreamResponseTooLarge",
    "UpstreamTimeout",
    "anthropic_type_for_status",
    "protocol_of_path",
    "render_error",
    "render_sse_error",
]

#: The wire protocol a client speaks: the error shapes it understands.
ClientProtocol = Literal["openai", "anthropic"]

#: Anthropic error ``type`` by HTTP status (Anthropic's API reference, "Errors").
ANTHROPIC_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def protocol_of_path(path: str) -> ClientProtocol:
    """``anthropic`` for Anthropic's API (``/v1/messages`` and below it), else ``openai``.

    ``path`` may carry a query string, or be the start of a request line's
    target followed by a space.
    """
    if path.startswith("/v1/messages") and path[12:13] in ("", "/", "?", " "):
        return "anthropic"
    return "openai"


def anthropic_type_for_status(status: int) -> str:
    """The Anthropic error type for ``status`` (other 5xx: ``api_error``, other 4xx: ``invalid_request_error``)."""
    known = ANTHROPIC_TYPE_BY_STATUS.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


class ProxyError(Exception):
    """Base of every error the proxy turns into a client-visible response.

    ``status`` is the HTTP status, ``error_type`` and ``code`` fill the
    envelope's ``type`` and ``code`` fields, ``param`` names the offending
    request field when there is one. ``headers`` are extra response headers
    (``retry-after`` for example).
    """

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or []
        for name, value in self.headers:
            check_field(name.lower().encode("latin-1"), value.encode("latin-1"))
        if status is not None:
            self.status = status  # type: ignore[misc]  # per-instance override

    def head_fields(self) -> list[tuple[bytes, bytes]]:
        """The fields of this error's response head: JSON content type, then ``headers``
        (lowercase names, latin-1), without framing."""
        return [(b"content-type", b"application/json")] + [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers
        ]

    def envelope(self) -> dict[str, object]:
        """The OpenAI error envelope for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_envelope(self) -> dict[str, object]:
        """Anthropic's error body for this error (its ``type`` follows the status).

        Anthropic's shape has no ``param``: a ``param`` the message does not
        already mention leads the message (``"param: message"``, the form of
        Anthropic's own validation errors), so the field is still named.
        """
        message = self.message
        if self.param and self.param not in message:
            message = f"{self.param}: {message}"
        return {"type": "error", "error": {"type": anthropic_type_for_status(self.status), "message": message}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, message={self.message!r})"


class BadRequest(ProxyError):
    """400: the request is malformed (framing, headers or body)."""

    status = 400
    error_type = "invalid_request_error"
    default_code = "bad_request"


class InvalidJSON(BadRequest):
    """400: the request body is not valid JSON."""

    default_code = "invalid_json"


class NotFound(ProxyError):
    """404: no route serves this method and path."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class HeaderTimeout(ProxyError):
    """408: the client did not send a complete request head in time."""

    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class BodyTooLarge(ProxyError):
    """413: the request body is larger than ``limits.max_body_bytes``."""

    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class HeadersTooLarge(ProxyError):
    """431: the request head is larger than ``limits.max_header_bytes`` or has too many fields."""

    status = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class RateLimited(ProxyError):
    """429: a limit was hit; ``retry-after`` should be set in ``headers``."""

    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class FilterFailed(ProxyError):
    """500: a fail-closed filter raised an unexpected exception."""

    status = 500
    error_type = "server_error"
    default_code = "filter_error"


class ServiceUnavailable(ProxyError):
    """503: nothing can serve the request right now (draining, nothing healthy)."""

    status = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class UpstreamError(ProxyError):
    """Base of failures talking to the upstream; raised only by :mod:`llmproxy.upstream`.

    ``retryable`` tells a failover policy whether the request may be sent
    again (nothing of the response reached the client when it is raised
    before the head).
    """

    status = 502
    error_type = "upstream_error"
    default_code = "upstream_error"
    retryable: ClassVar[bool] = True


class UpstreamConnectError(UpstreamError):
    """502: the upstream could not be reached (DNS, refused, reset, TLS handshake)."""

    default_code = "upstream_connect_error"


class UpstreamProtocolError(UpstreamError):
    """502: the upstream broke HTTP (bad framing, closed mid-response)."""

    default_code = "upstream_protocol_error"


class UpstreamResponseTooLarge(UpstreamError):
    """502: a response a filter asked to buffer is larger than the buffer cap."""

    default_code = "upstream_response_too_large"
    retryable = False


class UpstreamTimeout(UpstreamError):
    """504: the upstream did not answer in time.

    ``phase`` is one of ``connect``, ``headers``, ``idle`` or ``total``.
    """

    status = 504
    error_type = "timeout_error"
    default_code = "upstream_timeout"

    def __init__(self, message: str, *, phase: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.phase = phase


def render_error(error: ProxyError, protocol: ClientProtocol = "openai") -> bytes:
    """Serialise ``error`` as the JSON error body of the client's ``protocol``."""
    if protocol == "anthropic":
        return orjson.dumps(error.anthropic_envelope())
    return orjson.dumps(error.envelope())


def render_sse_error(error: ProxyError, protocol: ClientProtocol = "openai", *, responses: bool = False) -> bytes:
    """Serialise ``error`` as a final SSE event of the client's ``protocol``, for streams that already started.

    ``responses``: the client called the Responses API, whose stream error is an ``error`` event
    with ``type``, ``code``, ``message``, ``param`` and ``sequence_number`` at the top level.
    """
    if protocol == "anthropic":
        return b"event: error\ndata: " + orjson.dumps(error.anthropic_envelope()) + b"\n\n"
    if responses:
        payload = {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "sequence_number": 0,
        }
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
    return b"data: " + orjson.dumps(error.envelope()) + b"\n\n"


class ClientDisconnected(ProxyError):
    """499 (nginx's convention): the client went away before the exchange ended.

    Never sent (there is nobody to send it to); recorded as ``exchange.error``
    so end hooks and the access log can tell a disconnect from a success.
    """

    status = 499
    error_type = "client_error"
    default_code = "client_closed_request"


class MethodNotAllowed(ProxyError):
    """405: the path exists but not for this method."""

    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class HttpVersionNotSupported(ProxyError):
    """505: the request is not HTTP/1.x (an HTTP/2 preface, for example)."""

    status = 505
    error_type = "invalid_request_error"
    default_code = "http_version_not_supported"


class ModelNotFound(NotFound):
    """404: no provider serves the requested model."""

    default_code = "model_not_found"


class UpstreamEventTooLarge(UpstreamError, ValueError):
    """502: a server-sent event from the upstream is larger than ``limits.max_sse_event_bytes``.

    Raised by :class:`llmproxy.http.sse.SseFramer`; also a ``ValueError``, which the
    framer raised before it was typed.
    """

    default_code = "upstream_event_too_large"
    retryable = False
