"""The ``failover`` builtin filter: key and provider failover with shared health."""

from .filter import FailoverFactory, FailoverFilter
from .health import HealthBook, KeyHealth

__all__ = ["FailoverFactory", "FailoverFilter", "HealthBook", "KeyHealth"]
