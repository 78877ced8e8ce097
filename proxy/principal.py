"""Who is calling: :class:`Principal`, set by an authenticating filter.

The ``auth`` filter resolves the client's virtual key to a principal and
publishes it on ``exchange.vars["auth.principal"]`` (see
:mod:`llmproxy.filters.names`); limiters, budgets, tracing and the access log
read it from there. A principal never holds the key itself: ``key_id`` is a
short, non-secret id (derived from the key's hash) that is safe to log, to
put in metrics and to use in store keys.

``limits`` and ``budgets`` are the principal's own sections of the config,
kept as read (plain mappings) so the filter that enforces them parses them,
and an auth filter does not need to know their schema.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ANONYMOUS", "Principal"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True, eq=False)
class Principal:
    """A caller identified by a virtual key (or the anonymous caller of ``auth: none``).

    Compared and hashed by identity: one object per configured principal.
    """

    #: Unique name from the config (``alice``); what logs, metrics and the ledger show.
    name: str
    #: Non-secret id of the key used (``vk-3f9a1c2e``); "" for the anonymous principal.
    key_id: str = ""
    #: Team the principal belongs to, if any: limits and budgets may be keyed by it.
    team: str | None = None
    #: ``fnmatch`` patterns of the client-facing models it may ask for; empty means any.
    models: tuple[str, ...] = ()
    #: The principal's own ``limits`` section (read by the ``ratelimit`` filter).
    limits: Mapping[str, Any] = field(default_factory=_empty)
    #: The principal's own ``budgets`` section (read by the ``ratelimit`` filter): one budget
    #: mapping, or a sequence of them (several budgets, e.g. tokens per day and USD per month).
    budgets: Mapping[str, Any] | Sequence[Mapping[str, Any]] = field(default_factory=_empty)
    #: Free-form labels from the config (owner, cost centre, ...).
    metadata: Mapping[str, str] = field(default_factory=_empty)

    def allows_model(self, model: str) -> bool:
        """True when ``model`` (the client-facing name) matches one of :attr:`models` (or there are none)."""
        if not self.models:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


#: The caller when no authentication is configured (``auth: none``).
ANONYMOUS = Principal(name="anonymous")
