"""Every ``exchange.vars`` key a builtin filter sets: one place, namespaced by filter.

Builtin filters pass facts to each other (and to third-party filters) as
typed objects under these keys, never as filter objects. A plugin reads
them; only the filter named in the key writes them.

===================  ==============================================  ===========
key                  value                                           set by
===================  ==============================================  ===========
``auth.principal``   :class:`llmproxy.Principal`: who is calling     auth
                     (resolved from the virtual key)
``routing.route``    :class:`llmproxy.filters.routing.RouteDecision`: the      routing
                     API, protocols, candidates, and the current
                     attempt's provider, upstream model and key id;
                     failover re-points it with ``repoint()``
``routing.usage``    the provider's usage, OpenAI-shaped             routing
                     (``prompt_tokens``, ``completion_tokens``, ...)
                     when the response carried it (the typed record
                     is ``exchange.attempt.usage``, see
                     :class:`llmproxy.Usage`)
``guardrails.held``  ``(characters, seconds)``: the most a guarded  guardrails
                     stream held back at once and the longest a
                     character waited (set when the stream ends)
``cache.status``     ``"hit"``, ``"miss"`` or ``"bypass"``            cache
===================  ==============================================  ===========
"""

from __future__ import annotations

__all__ = ["GUARDRAILS_HELD", "PRINCIPAL", "ROUTE", "USAGE"]

#: :class:`llmproxy.Principal` of the exchange.
PRINCIPAL = "auth.principal"

#: :class:`llmproxy.filters.routing.RouteDecision` of the exchange.
ROUTE = "routing.route"
#: The provider-reported usage (a dict, OpenAI-shaped).
USAGE = "routing.usage"

#: ``(max held characters, max hold seconds)`` of a guarded stream.
GUARDRAILS_HELD = "guardrails.held"
