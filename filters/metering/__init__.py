"""The ``metering`` filter: tokens and cost of every attempt and exchange.

See :mod:`llmproxy.filters.metering.filter` (the filter),
:mod:`~llmproxy.filters.metering.tokenizer` (offline tiktoken counts),
:mod:`~llmproxy.filters.metering.pricing` (the price book) and
:mod:`~llmproxy.filters.metering.relayed` (what the client received).
"""

from llmproxy.filters.metering.filter import USAGE_HEADER, MeteringFactory, MeteringFilter

__all__ = ["USAGE_HEADER", "MeteringFactory", "MeteringFilter"]
