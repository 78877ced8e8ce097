"""The spend ledger: tokens and dollars by principal, team and model, for the admin page.

Every settled exchange adds its metered usage here (in-process, one dict
update); ``GET /admin/ratelimit`` shows this worker's ledger next to the
budget counters as last seen. The same spend is exported, summed over
workers, by the core's ``llmproxy_spent_tokens_total`` and
``llmproxy_spent_usd_total`` (labels ``principal``, ``team``, ``model``);
the budgets themselves live in the shared store.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

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

    def add(self, facts: Facts, usage: Usage) -> None:
        key = (facts.principal, facts.team or "-", facts.model or usage.requested_model or "-")
        row = self._rows.get(key)
        if row is None:
            if len(self._rows) >= _MAX_ROWS:
                return
            row = self._rows[key] = [0, 0, 0, Decimal(0)]  # requests, input, output, usd
        row[0] += 1
        row[1] += usage.input_tokens
        row[2] += usage.output_tokens
        if usage.cost is not None:
            row[3] += usage.cost.total

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
