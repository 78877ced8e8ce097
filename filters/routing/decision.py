"""The routing decision, published for the filters after routing (``vars["routing.route"]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmproxy import Exchange
    from llmproxy.filters.routing.filter import RoutingFilter
    from llmproxy.filters.routing.table import Target

__all__ = ["RouteDecision"]


class RouteDecision:
    """Where routing sent the current attempt, and what else could serve it.

    ``candidates`` are the targets able to serve the request, in preference
    order; ``target`` and ``key_index`` the current attempt's choice (with
    ``provider``, ``model`` - the upstream model name - and ``key_id``, the
    key's short hash). ``attempted`` lists the (provider, key index) pairs
    chosen so far. A filter that moves the request elsewhere (failover)
    calls :meth:`repoint`: routing rewrites the upstream, path, headers and
    body for the new choice, translating when its protocol differs, and
    keeping :attr:`output_cap`.
    """

    __slots__ = (
        "_slot",
        "api",
        "attempted",
        "candidates",
        "client_protocol",
        "key_index",
        "output_cap",
        "requested_model",
        "sent",
        "target",
    )

    def __init__(
        self,
        api: str,
        client_protocol: str,
        candidates: list[Target],
        slot: int,
        requested_model: str = "",
    ) -> None:
        self.api = api
        #: The model name the client asked for (an alias or a pattern, before mapping).
        self.requested_model = requested_model
        self.client_protocol = client_protocol
        self.candidates = candidates
        self.target: Target | None = None
        self.key_index = 0
        self.attempted: list[tuple[str, int]] = []
        #: (first attempt number, target, key index) for every choice, in order: the choice
        #: made for attempt n holds until the next one (see :meth:`target_of`).
        self.sent: list[tuple[int, Target, int]] = []
        #: A ceiling on the output tokens of every later attempt, set by a filter after routing
        #: (the ``ratelimit`` filter's hard budget): routing writes it into each body it builds
        #: for a retry (another key or provider), in the provider API's field
        #: (:func:`~llmproxy.filters.routing.cap.cap_output`). The filter lowers the current
        #: attempt's body itself. None: no ceiling.
        self.output_cap: int | None = None
        #: Where routing's filter sits in ``exchange.filters`` (an index, not the object:
        #: no reference cycle, so an exchange is freed by reference counting alone).
        self._slot = slot

    @property
    def provider(self) -> str:
        return self.target.provider.name if self.target is not None else ""

    @property
    def provider_protocol(self) -> str:
        return self.target.provider.protocol if self.target is not None else ""

    @property
    def model(self) -> str:
        """The model name sent to the provider."""
        return self.target.model if self.target is not None else ""

    @property
    def key_id(self) -> str:
        return self.target.provider.key_ids[self.key_index] if self.target is not None else ""

    @property
    def translated(self) -> bool:
        """The provider speaks another protocol than the client (requests and responses are translated)."""
        return self.target is not None and self.provider_protocol != self.client_protocol

    def target_of(self, attempt_number: int) -> tuple[Target, int] | None:
        """The target and key index attempt ``attempt_number`` was sent to, or None.

        ``target`` is where the *next* attempt goes: by the time an attempt
        completes, failover may already have re-pointed the route for a retry.
        A filter accounting for a finished attempt (its model, provider, price)
        asks here instead.
        """
        found = None
        for first, target, key_index in self.sent:
            if first > attempt_number:
                break
            found = (target, key_index)
        return found

    def client_json(self, exchange: Exchange) -> dict[str, Any]:
        """The client's request JSON as routing read it, before any translation (do not modify).

        ``exchange.request_json()`` is the body for the current provider; this is what the
        client sent, e.g. to tell a field the client set from one a translation added.
        """
        routing: RoutingFilter = exchange.filters[self._slot]  # type: ignore[assignment]
        return routing._body

    def repoint(self, exchange: Exchange, target: Target, key_index: int) -> None:
        """Send ``exchange``'s next attempt to ``target`` with its ``key_index``-th key."""
        routing: RoutingFilter = exchange.filters[self._slot]  # type: ignore[assignment]
        routing.apply(exchange, target, key_index)

    def __repr__(self) -> str:
        return f"<RouteDecision {self.api} -> {self.provider}/{self.model} key={self.key_id or '-'}>"
