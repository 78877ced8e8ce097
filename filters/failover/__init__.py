"""The ``failover`` builtin filter: key and provider failover with shared health."""

from llmproxy.filters.failover.filter import FailoverFactory, FailoverFilter
from llmproxy.filters.failover.health import HealthBook, KeyHealth

__all__ = ["FailoverFactory", "FailoverFilter", "HealthBook", "KeyHealth"]
