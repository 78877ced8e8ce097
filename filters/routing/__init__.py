"""The ``routing`` builtin filter: providers, model mapping, weighted routing,
OpenAI <-> Anthropic translation. See :mod:`llmproxy.filters.routing.table` for the
config and :mod:`llmproxy.filters.routing.filter` for the per-exchange behaviour."""

from llmproxy.filters.routing.decision import RouteDecision
from llmproxy.filters.routing.filter import HINT_HEADER, RoutingFactory, RoutingFilter
from llmproxy.filters.routing.table import ModelMap, Provider, RoutingTable, Target, key_id

__all__ = [
    "HINT_HEADER",
    "ModelMap",
    "Provider",
    "RouteDecision",
    "RoutingFactory",
    "RoutingFilter",
    "RoutingTable",
    "Target",
    "key_id",
]
