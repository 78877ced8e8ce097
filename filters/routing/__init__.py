"""The ``routing`` builtin filter: providers, model mapping, weighted routing,
OpenAI <-> Anthropic translation. See :mod:`filters.routing.table` for the
config and :mod:`filters.routing.filter` for the per-exchange behaviour."""

from .decision import RouteDecision
from .filter import HINT_HEADER, RoutingFactory, RoutingFilter
from .table import ModelMap, Provider, RoutingTable, Target, key_id

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
