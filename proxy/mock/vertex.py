"""Claude on Vertex AI: ``.../publishers/anthropic/models/{model}:rawPredict`` and ``:streamRawPredict``.

The Anthropic Messages endpoint (:mod:`llmproxy.mock.anthropic`) at Vertex's
paths: the model and the stream come from the path; the body must have
``anthropic_version`` (``vertex-2023-10-16``) and no ``model`` (400 otherwise,
as Vertex answers). Gemini on Vertex needs nothing here: :func:`llmproxy.mock.gemini.route_of`
matches ``.../publishers/google/models/{model}:generateContent`` already.
"""

from __future__ import annotations

from typing import Final

from llmproxy.mock.anthropic import ROUTES as ANTHROPIC_ROUTES
from llmproxy.mock.replies import Call, Route, Stream, Whole, error_reply

__all__ = ["ROUTES", "match"]

_PUBLISHER: Final = "/publishers/anthropic/models/"
_MESSAGES: Final = ANTHROPIC_ROUTES["/v1/messages"]["POST"]


def match(path: str) -> tuple[dict[str, Route], str, bool] | None:
    """``(routes, model, stream)`` for a Vertex Claude path, else None."""
    _, sep, rest = path.rpartition(_PUBLISHER)
    if not sep or not path.startswith("/v1/projects/"):
        return None
    model, _, verb = rest.rpartition(":")
    if not model or verb not in ("rawPredict", "streamRawPredict"):
        return None
    return ROUTES, model, verb == "streamRawPredict"


def _raw_predict(call: Call) -> Whole | Stream:
    if "model" in call.body:
        return error_reply(_MESSAGES.flavour, 400, "model: Extra inputs are not permitted")
    if call.body.get("anthropic_version") != "vertex-2023-10-16":
        return error_reply(_MESSAGES.flavour, 400, "anthropic_version: must be vertex-2023-10-16")
    return _MESSAGES.handler(call)


ROUTES: Final[dict[str, Route]] = {"POST": Route(_raw_predict, _MESSAGES.flavour, streams=True)}
