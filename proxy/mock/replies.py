"""What a provider handler returns, and the error envelopes of both providers.

A handler (:mod:`.openai`, :mod:`.anthropic`) turns a :class:`Call` into a
:class:`Whole` reply or a :class:`Stream` of SSE events; :mod:`.delivery`
then frames it and applies the request's :class:`~.plans.Plan`. A
:class:`Route` binds a handler to its error :class:`Flavour`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from llmproxy.mock.server import MockServer

__all__ = ["Call", "Flavour", "Route", "Stream", "Whole", "error_body", "error_reply"]


class Flavour(enum.Enum):
    """Which provider's error envelope a route answers with."""

    OPENAI = enum.auto()
    ANTHROPIC = enum.auto()
    #: AWS Bedrock: ``{"message"}`` with ``x-amzn-errortype``; streams in event-stream framing
    BEDROCK = enum.auto()
    GEMINI = enum.auto()


@dataclass(slots=True)
class Whole:
    """A complete non-streaming reply. ``steps`` is the number of generation
    steps it stands for (tokens), used for pacing."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    extra_headers: bytes = b""  # preformatted "name: value\r\n" lines
    steps: int = 0


@dataclass(slots=True)
class Stream:
    """A streaming reply as whole SSE events (each ending in a blank line)."""

    preamble: list[bytes]
    content: list[bytes]
    tail: list[bytes]


@dataclass(slots=True)
class Call:
    """What a provider handler needs: the parsed body and the plan's content knobs."""

    server: MockServer
    body: dict[str, Any]
    model: str  # echoed model name (model_prefix applied)
    model_json: bytes
    stream: bool
    tokens: int
    tool_calls: int
    #: ``x-mock-reply``: the reply text (None: the vocabulary words).
    reply: str | None = None
    #: ``x-mock-tool-args``: every tool call's arguments (None: ``{"q": "call i", "n": i}``).
    tool_args: str | None = None
    #: ``x-mock-chunk-chars``: characters per streamed text or argument event (0: the default split).
    chunk_chars: int = 0


# status -> (OpenAI type, OpenAI code); others fall back by class (4xx/5xx).
_OPENAI_KINDS: Final[dict[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}
_ANTHROPIC_KINDS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


#: status -> Gemini's (google.rpc) status name.
_GEMINI_STATUS: Final[dict[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_body(flavour: Flavour, status: int, message: str) -> bytes:
    """The error envelope for ``status`` in the provider form ``flavour``."""
    if flavour is Flavour.BEDROCK:
        return orjson.dumps({"message": message})
    if flavour is Flavour.GEMINI:
        name = _GEMINI_STATUS.get(status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")
        return orjson.dumps({"error": {"code": status, "message": message, "status": name}})
    if flavour is Flavour.ANTHROPIC:
        kind = _ANTHROPIC_KINDS.get(status, "invalid_request_error" if status < 500 else "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    etype, code = _OPENAI_KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


def error_reply(flavour: Flavour, status: int, message: str, retry_after: float | None = None) -> Whole:
    """An error reply, with ``retry-after`` (integral seconds printed without a fraction) if given."""
    extra = b""
    if retry_after is not None:
        text = str(int(retry_after)) if retry_after == int(retry_after) else repr(retry_after)
        extra = b"retry-after: %b\r\n" % text.encode()
    if flavour is Flavour.BEDROCK:
        from llmproxy.mock.bedrock import ERROR_TYPES

        name, _, rest = message.partition(":")
        if not name.endswith("Exception") or " " in name:
            name, rest = (
                ERROR_TYPES.get(status, "ValidationException" if status < 500 else "InternalServerException"),
                message,
            )
        extra += b"x-amzn-errortype: %b:http://internal.amazon.com/coral/com.amazon.bedrock/\r\n" % name.encode()
        message = rest
    return Whole(status, error_body(flavour, status, message), extra_headers=extra)


@dataclass(frozen=True, slots=True)
class Route:
    """A provider endpoint: its handler, error flavour, and whether it can stream."""

    handler: Callable[[Call], Whole | Stream]
    flavour: Flavour
    streams: bool = False
    needs_body: bool = True
