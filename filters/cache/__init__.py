"""The ``cache`` builtin filter (see :mod:`llmproxy.filters.cache.filter`)."""

from llmproxy.filters.cache.filter import CacheFactory, CacheFilter

__all__ = ["CacheFactory", "CacheFilter"]
