"""Error bodies between the OpenAI and the Anthropic envelopes, and the translators' own error.

OpenAI-style bodies are ``{"error": {"message", "type", "param", "code"}}``
(all four keys always present, ``param``/``code`` may be null). Anthropic-style
bodies are ``{"type": "error", "error": {"type", "message"}}``.

The HTTP status is authoritative for the *kind* of error: OpenAI-compatible
servers disagree on ``type`` strings, so the Anthropic type is chosen from the
status. Going the other way the Anthropic type is kept in ``code`` (lossless)
and ``type`` is the OpenAI-side family used by :mod:`llmproxy.errors`.

A body that is not a JSON error envelope (an HTML page from a load balancer,
plain text, an empty body) is wrapped: its text, decoded as UTF-8 with
replacement and cut to :data:`MAX_MESSAGE_CHARS`, becomes the message.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from llmproxy import anthropic_type_for_status

__all__ = [
    "MAX_MESSAGE_CHARS",
    "TranslationError",
    "anthropic_envelope_from_openai",
    "anthropic_error_to_openai",
    "openai_envelope_from_anthropic",
    "openai_error_to_anthropic",
]

#: Longest message kept from a non-JSON error body. Error pages can be large
#: HTML documents; clients only show the first line or so.
MAX_MESSAGE_CHARS = 2048


class TranslationError(ValueError):
    """A request, response or stream event that cannot be translated.

    Raised for structurally invalid input (``messages`` not a list, an unknown
    role, tool-call arguments that are not a JSON object, an SSE payload that
    is not JSON). ``param`` names the offending field, in the OpenAI style
    (``messages[2].tool_calls[0].function.arguments``), when there is one.
    The proxy renders it as a 400 before the response starts, or as a final
    SSE error event after.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# OpenAI-side ``type`` for each Anthropic type; the families match proxy.errors.
_OPENAI_TYPE_BY_ANTHROPIC: dict[str, str] = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "billing_error": "insufficient_quota",
    "permission_error": "permission_error",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
    "timeout_error": "timeout_error",
    "api_error": "server_error",
    "overloaded_error": "server_error",
}

# Anthropic type for an OpenAI ``type``/``code``, used when no status is known
# (an error inside a stream).
_ANTHROPIC_TYPE_BY_OPENAI: dict[str, str] = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "invalid_api_key": "authentication_error",
    "permission_error": "permission_error",
    "insufficient_quota": "billing_error",
    "not_found_error": "not_found_error",
    "model_not_found": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "rate_limit_exceeded": "rate_limit_error",
    "requests": "rate_limit_error",
    "tokens": "rate_limit_error",
    "timeout_error": "timeout_error",
    "server_error": "api_error",
    "overloaded_error": "overloaded_error",
}


def _text_of(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text[:MAX_MESSAGE_CHARS] if text else "(empty error body)"


def _loads_or_none(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _inner_error(parsed: object) -> Mapping[str, object] | None:
    """The ``error`` object of either envelope, or a bare error object."""
    if not isinstance(parsed, Mapping):
        return None
    inner = parsed.get("error")
    if isinstance(inner, Mapping):
        return inner
    if isinstance(parsed.get("message"), str):
        return parsed
    return None


def _message_of(error: Mapping[str, object] | None, fallback: str) -> str:
    if error is not None:
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    return fallback


def openai_envelope_from_anthropic(
    error: Mapping[str, object] | None, *, status: int | None = None, fallback: str = ""
) -> dict[str, object]:
    """The OpenAI envelope for an Anthropic ``error`` object.

    ``error`` is the inner ``{"type", "message"}`` object (None when the body
    had none). The Anthropic type comes from ``error["type"]``, else from
    ``status``; it is kept in ``code``. ``fallback`` is the message when the
    error object has none.
    """
    anthropic_type = error.get("type") if error is not None else None
    if not isinstance(anthropic_type, str) or not anthropic_type:
        anthropic_type = anthropic_type_for_status(status) if status is not None else "api_error"
    openai_type = _OPENAI_TYPE_BY_ANTHROPIC.get(anthropic_type)
    if openai_type is None:
        openai_type = "server_error" if status is None or status >= 500 else "invalid_request_error"
    return {
        "error": {
            "message": _message_of(error, fallback or "Upstream error"),
            "type": openai_type,
            "param": None,
            "code": anthropic_type,
        }
    }


def anthropic_envelope_from_openai(
    error: Mapping[str, object] | None, *, status: int | None = None, fallback: str = ""
) -> dict[str, object]:
    """The Anthropic envelope for an OpenAI ``error`` object.

    With a ``status`` the Anthropic type follows the status; without one (an
    error event inside a stream) it follows the OpenAI ``code`` then ``type``,
    defaulting to ``api_error``.
    """
    if status is not None:
        anthropic_type = anthropic_type_for_status(status)
    else:
        anthropic_type = "api_error"
        if error is not None:
            for key in ("code", "type"):
                value = error.get(key)
                if isinstance(value, str) and value in _ANTHROPIC_TYPE_BY_OPENAI:
                    anthropic_type = _ANTHROPIC_TYPE_BY_OPENAI[value]
                    break
    return {
        "type": "error",
        "error": {"type": anthropic_type, "message": _message_of(error, fallback or "Upstream error")},
    }


def openai_error_to_anthropic(body: bytes, status: int) -> bytes:
    """Rewrite an OpenAI-style error response body as an Anthropic one.

    The Anthropic ``error.type`` follows ``status`` (400 invalid_request_error,
    401 authentication_error, 403 permission_error, 404 not_found_error,
    429 rate_limit_error, 529 overloaded_error, other 5xx api_error, other 4xx
    invalid_request_error). The message is the body's ``error.message``; a
    body that is not a JSON envelope becomes the message itself.
    """
    error = _inner_error(_loads_or_none(body))
    fallback = _text_of(body) if error is None else ""
    return orjson.dumps(anthropic_envelope_from_openai(error, status=status, fallback=fallback))


def anthropic_error_to_openai(body: bytes, status: int) -> bytes:
    """Rewrite an Anthropic error response body as an OpenAI-style one.

    The result always has ``message``, ``type``, ``param`` (null) and
    ``code`` (the Anthropic error type, e.g. ``overloaded_error``). ``type``
    is ``invalid_request_error``, ``authentication_error``,
    ``permission_error``, ``rate_limit_error``, ``insufficient_quota``,
    ``timeout_error`` or ``server_error``. A body that is not a JSON envelope
    becomes the message, its type following ``status``.
    """
    error = _inner_error(_loads_or_none(body))
    fallback = _text_of(body) if error is None else ""
    return orjson.dumps(openai_envelope_from_anthropic(error, status=status, fallback=fallback))
