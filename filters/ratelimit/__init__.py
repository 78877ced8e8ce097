"""The ``ratelimit`` builtin filter: rate limits and budgets (see :mod:`.filter`).

Authentication is the separate ``auth`` filter; this one reads the
principal it publishes (``vars["auth.principal"]``).
"""

from llmproxy.filters.ratelimit.filter import RateLimitFactory, RateLimitFilter
from llmproxy.filters.ratelimit.rules import principal_rules

__all__ = ["RateLimitFactory", "RateLimitFilter", "principal_rules"]
