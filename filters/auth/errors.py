"""The auth filter's two refusals, rendered by the core in the client's protocol.

* :class:`InvalidApiKey`, 401: OpenAI's envelope with ``type:
  invalid_request_error`` and ``code: invalid_api_key`` (what OpenAI itself
  answers for a bad key) and ``www-authenticate: Bearer`` for OpenAI-style
  paths; Anthropic clients get ``authentication_error``.
* :class:`ModelNotAllowed`, 403: ``type: permission_error``, ``code:
  model_not_allowed``, ``param: model``; Anthropic clients get
  ``permission_error``.

Messages never quote the key (not even masked: the caller knows what it sent).
"""

from __future__ import annotations

from llmproxy import ProxyError

__all__ = ["InvalidApiKey", "ModelNotAllowed", "invalid_api_key"]

_MESSAGES = {
    "missing": (
        "Missing API key: send your virtual key as 'Authorization: Bearer <key>' "
        "(or in an x-api-key or api-key header)."
    ),
    "malformed": (
        "Malformed credentials: send one key, as 'Authorization: Bearer <key>', 'x-api-key: <key>' or 'api-key: <key>'."
    ),
    "unknown": "Incorrect API key provided.",
}
_CHALLENGE = [("www-authenticate", "Bearer")]


class InvalidApiKey(ProxyError):
    """401: no key, a malformed credential, or a key that is not (or no longer) configured."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class ModelNotAllowed(ProxyError):
    """403: the caller's key may not use the requested model."""

    status = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


def invalid_api_key(reason: str, openai_path: bool) -> InvalidApiKey:
    """The 401 for ``reason`` (missing, malformed, unknown); with the Bearer challenge on OpenAI-style paths."""
    return InvalidApiKey(_MESSAGES[reason], headers=_CHALLENGE if openai_path else None)
