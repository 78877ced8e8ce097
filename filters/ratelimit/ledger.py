"""The spend ledger: tokens and dollars by principal, team and model.

Every settled exchange adds its metered usage here (in-process, one dict
update) and to the Prometheus counters ``llmproxy_ratelimit_spent_tokens_total``
and ``llmproxy_ratelimit_spent_usd_total`` (labels ``principal``, ``team``,
``model``), which a scrape sums over workers and instances. The budgets
themselves live in the shared store; ``GET /admin/ratelimit`` shows this
worker's ledger next to the budget counters as last seen.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from llmproxy import Usage

if TYPE_CHECKING:
    from llmproxy.filters.ratelimit.rules import Facts

__all__ = ["Ledger"]

#: Rows kept for the admin page (principal x team x model); the metrics have them all.
_MAX_ROWS = 10_000


class Ledger:
    """Spend by (principal, team, model) for this worker; see the module docstring."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str], list[Any]] = {}
        self._tokens: Counter | None = None
        self._usd: Counter | None = None
        self._label: Callable[[str], str] = str

    def register(self, registry: CollectorRegistry, model_label: Callable[[str], str] = str) -> None:
        """Count spend in ``registry``, the model label bounded by ``model_label``
        (``FactoryContext.model_label``: names no config declared become ``other``)."""
        self._label = model_label
        self._tokens = Counter(
            "llmproxy_ratelimit_spent_tokens",
            "Tokens spent, by principal, team, client-facing model and kind (input, output)",
            ["principal", "team", "model", "kind"],
            registry=registry,
        )
        self._usd = Counter(
            "llmproxy_ratelimit_spent_usd",
            "US dollars spent (priced models only), by principal, team and client-facing model",
            ["principal", "team", "model"],
            registry=registry,
        )

    def add(self, facts: Facts, usage: Usage) -> None:
        key = (facts.principal, facts.team or "-", facts.model or usage.requested_model or "-")
        row = self._rows.get(key)
        if row is None:
            if len(self._rows) >= _MAX_ROWS:
                return
            row = self._rows[key] = [0, 0, 0, Decimal(0)]
        row[0] += 1
        row[1] += usage.input_tokens
        row[2] += usage.output_tokens
        if usage.cost is not None:
            row[3] += usage.cost.total
        if self._tokens is not None and self._usd is not None:
            labels = (key[0], key[1], self._label(key[2]))
            self._tokens.labels(*labels, "input").inc(usage.input_tokens)
            self._tokens.labels(*labels, "output").inc(usage.output_tokens)
            if usage.cost is not None:
                self._usd.labels(*labels).inc(float(usage.cost.total))

    def view(self) -> list[dict[str, Any]]:
        return [
            {
                "principal": p,
                "team": t,
                "model": m,
                "requests": row[0],
                "input_tokens": row[1],
                "output_tokens": row[2],
                "usd": str(row[3]),
            }
            for (p, t, m), row in sorted(self._rows.items())
        ]
