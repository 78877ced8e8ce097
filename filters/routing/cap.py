"""An output ceiling that holds on every attempt: :func:`cap_output`.

A filter after routing may lower the output a request may produce (the
``ratelimit`` filter's hard budget clamps ``max_tokens``) by setting
:attr:`~llmproxy.filters.routing.RouteDecision.output_cap`. Routing rebuilds
the upstream body for every attempt (another key, or another provider with a
translation), so it applies the ceiling again each time, in the field of the
provider's API.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cap_output"]

#: The fields that cap the output, per provider API, the preferred one first.
_FIELDS = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "messages": ("max_tokens",),
    "responses": ("max_output_tokens",),
}


def cap_output(body: dict[str, Any], provider_api: str, cap: int) -> None:
    """Lower ``body``'s output cap to at most ``cap`` (in place), in ``provider_api``'s field.

    Every cap field present is lowered (none raised); when none is present the
    API's first field is set to ``cap``. An API without an output cap
    (embeddings) is left alone.
    """
    fields = _FIELDS.get(provider_api)
    if fields is None:
        return
    present = False
    for name in fields:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            present = True
            if value > cap:
                body[name] = cap
    if not present:
        body[fields[0]] = cap
