"""The ``cors`` builtin filter: answers browser preflights and adds CORS headers to every response."""

from llmproxy.filters.cors.filter import CorsFactory, CorsFilter

__all__ = ["CorsFactory", "CorsFilter"]
