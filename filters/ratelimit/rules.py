"""The ``ratelimit`` filter's rules: what a request is matched on, what it is counted by, the limits.

Two kinds, both parsed here from the filter's config and from a principal's
own ``limits`` / ``budgets`` sections (:func:`principal_rules`):

* :class:`LimitRule`: requests per minute (``rpm``), tokens per minute
  (``tpm``: input + output, or input only with ``tpm_counts: input``) and
  concurrent requests (``concurrent``), over a sliding ``window`` (60 s);
* :class:`BudgetRule`: tokens or US dollars per calendar ``period`` (``day``,
  ``month`` in UTC, or ``total``); ``hard`` budgets also cap a stream's output.

A rule applies when its ``match`` matches (every field given must match one
of its ``fnmatch`` patterns: ``model`` the client asked for, ``provider``
routing chose, ``principal``, ``team``, and ``headers: {name: pattern}``),
and its counters are keyed by the values of ``key`` (``principal``,
``team``, ``model``, ``provider``, ``header:NAME``: archgw's selector
header, the header's value becomes the counter key). A rule whose key needs
a value the request does not have (no team, no such header) does not apply.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from llmproxy import ConfigError, Headers, Section

__all__ = [
    "BudgetRule",
    "Facts",
    "LimitRule",
    "Match",
    "parse_budget",
    "parse_limit",
    "principal_rules",
]

KEY_PARTS = ("principal", "team", "model", "provider")
PERIODS = ("day", "month", "total")
#: Headers that carry credentials: never a counter key (keys are stored and shown).
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "cookie", "proxy-authorization"})


@dataclass(slots=True)
class Facts:
    """What rules are matched on and keyed by, for one request (built per request: a plain
    slotted class, cheaper to make than a frozen one; treat it as read-only)."""

    model: str
    provider: str
    principal: str
    team: str | None
    headers: Headers

    def value(self, part: str) -> str | None:
        if part == "principal":
            return self.principal
        if part == "team":
            return self.team
        if part == "model":
            return self.model or None
        if part == "provider":
            return self.provider or None
        return self.headers.get(part[7:])  # header:NAME


def _matcher(patterns: tuple[str, ...]) -> Any:
    """One compiled ``fullmatch``-style matcher for any of the ``fnmatch`` ``patterns``."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


@dataclass(frozen=True, slots=True)
class Match:
    """Patterns per fact; an empty tuple matches anything."""

    model: tuple[str, ...] = ()
    provider: tuple[str, ...] = ()
    principal: tuple[str, ...] = ()
    team: tuple[str, ...] = ()
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: The non-empty pattern sets, compiled once: (fact name or header name, is a header, matcher).
    _checks: tuple[tuple[str, bool, Any], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (name, False, _matcher(patterns))
            for name, patterns in (
                ("model", self.model),
                ("provider", self.provider),
                ("principal", self.principal),
                ("team", self.team),
            )
            if patterns
        ]
        checks += [(name, True, _matcher(patterns)) for name, patterns in self.headers]
        object.__setattr__(self, "_checks", tuple(checks))

    def matches(self, facts: Facts) -> bool:
        for name, header, match in self._checks:
            value = facts.headers.get(name) if header else getattr(facts, name)
            if value is None or match(value) is None:
                return False
        return True


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    match: Match
    key: tuple[str, ...]
    #: On a store failure: admit (True) or refuse with 503 (False).
    fail_open: bool

    def counter_key(self, facts: Facts) -> str | None:
        """``name|part=value|...``, or None when a key part has no value for this request."""
        if self.match._checks and not self.match.matches(facts):
            return None
        if not self.key:
            return self.name
        out = [self.name]
        for part in self.key:
            value = facts.value(part)
            if value is None:
                return None
            out.append(f"{part}={value}")
        return "|".join(out)


@dataclass(frozen=True, slots=True)
class LimitRule(_Rule):
    rpm: int | None = None
    tpm: int | None = None
    #: ``total`` (input + output) or ``input``.
    tpm_counts: str = "total"
    concurrent: int | None = None
    window: float = 60.0


@dataclass(frozen=True, slots=True)
class BudgetRule(_Rule):
    tokens: int | None = None
    #: Micro-dollars (US$ 1e-6).
    usd_micros: int | None = None
    period: str = "day"
    hard: bool = True
    usd: Decimal | None = field(default=None, compare=False)


def _patterns(sec: Section, key: str) -> tuple[str, ...]:
    value = sec.get(key, (str, list), None)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not items or not all(isinstance(p, str) and p for p in items):
        raise sec.error(key, "must be a pattern or a non-empty list of patterns")
    return tuple(items)


def _match(raw: Any, path: str) -> Match:
    sec = Section(raw, path, "")
    model, provider = _patterns(sec, "model"), _patterns(sec, "provider")
    principal, team = _patterns(sec, "principal"), _patterns(sec, "team")
    hsec = Section(sec.get("headers", dict, {}), f"{path}.headers", "")
    headers = []
    for name in list(hsec.data):
        if not isinstance(name, str) or not name:
            raise hsec.error(str(name), "header names must be strings")
        headers.append((name.lower(), _patterns(hsec, name)))
    hsec.finish()
    sec.finish()
    return Match(model, provider, principal, team, tuple(headers))


def _key(sec: Section, default: tuple[str, ...]) -> tuple[str, ...]:
    value = sec.get("key", (str, list), None)
    if value is None:
        return default
    parts = [value] if isinstance(value, str) else value
    out = []
    for part in parts:
        if not isinstance(part, str):
            raise sec.error("key", "must be a list of key parts")
        part = part.strip().lower()
        if part.startswith("header:") and len(part) > 7:
            if part[7:] in _SECRET_HEADERS:
                raise sec.error("key", f"{part}: a credential header cannot key a counter")
        elif part not in KEY_PARTS:
            raise sec.error("key", f"unknown key part {part!r} (principal, team, model, provider, header:NAME)")
        out.append(part)
    return tuple(out)


def _fail_open(sec: Section, default: bool) -> bool:
    mode = sec.get(
        "on_store_error",
        str,
        "open" if default else "closed",
        lambda v: None if v in ("open", "closed") else "must be open or closed",
    )
    return bool(mode == "open")


def _positive_int(v: int) -> str | None:
    return None if v > 0 else "must be a positive integer"


def _rule_head(
    sec: Section, path: str, name: str | None, default_key: tuple[str, ...]
) -> tuple[str, Match, tuple[str, ...]]:
    """A rule's name, match and counter key: from its section, or (a principal's own rule) ``name``
    with no match and ``default_key``."""
    rule_name = name or sec.get("name", str, None)
    if not rule_name:
        raise sec.error("name", "required")
    match = _match(sec.get("match", dict, {}), f"{path}.match") if name is None else Match()
    key = _key(sec, default_key) if name is None else default_key
    return rule_name, match, key


def parse_limit(raw: Any, path: str, *, name: str | None = None, default_key: tuple[str, ...] = ()) -> LimitRule:
    """A :class:`LimitRule` from its config mapping; ``ConfigError`` names ``path``'s field."""
    sec = Section(raw, path, "")
    rule_name, match, key = _rule_head(sec, path, name, default_key)
    rpm = sec.get("rpm", int, None, _positive_int)
    tpm = sec.get("tpm", int, None, _positive_int)
    counts = sec.get(
        "tpm_counts", str, "total", lambda v: None if v in ("total", "input") else "must be total or input"
    )
    concurrent = sec.get("concurrent", int, None, _positive_int)
    window = sec.get("window", float, 60.0, lambda v: None if 0 < v <= 86400 else "must be in (0, 86400] seconds")
    fail_open = _fail_open(sec, True)
    sec.finish()
    if rpm is None and tpm is None and concurrent is None:
        raise ConfigError("", path, "a limit needs rpm, tpm or concurrent")
    return LimitRule(rule_name, match, key, fail_open, rpm, tpm, counts, concurrent, window)


def parse_budget(raw: Any, path: str, *, name: str | None = None, default_key: tuple[str, ...] = ()) -> BudgetRule:
    """A :class:`BudgetRule` from its config mapping; ``ConfigError`` names ``path``'s field."""
    sec = Section(raw, path, "")
    rule_name, match, key = _rule_head(sec, path, name, default_key)
    tokens = sec.get("tokens", int, None, _positive_int)
    usd_raw = sec.get("usd", (int, float, str), None)
    usd: Decimal | None = None
    if usd_raw is not None:
        try:
            usd = Decimal(str(usd_raw))
        except InvalidOperation:
            raise sec.error("usd", "must be a number of US dollars") from None
        if not usd > 0:
            raise sec.error("usd", "must be positive")
    period = sec.get("period", str, "day", lambda v: None if v in PERIODS else "must be day, month or total")
    hard = sec.get("hard", bool, True)
    fail_open = _fail_open(sec, False)
    sec.finish()
    if (tokens is None) == (usd is None):
        raise ConfigError("", path, "a budget needs exactly one of tokens or usd")
    micros = int(usd * 1_000_000) if usd is not None else None
    return BudgetRule(rule_name, match, key, fail_open, tokens, micros, period, hard, usd)


def principal_rules(
    name: str, limits: Mapping[str, Any], budgets: Mapping[str, Any] | Sequence[Any]
) -> tuple[tuple[LimitRule, ...], tuple[BudgetRule, ...]]:
    """The rules of a principal's own sections (keyed by the principal).

    ``limits``: ``{rpm, tpm, tpm_counts, concurrent, window, on_store_error}``;
    ``budgets``: one mapping or a list of ``{tokens | usd, period, hard, on_store_error, name}``,
    each its own rule (all enforced; a refusal names the one that is spent): the rule is named
    ``principal:<name>:<budget name>``, the budget's name being its optional ``name`` or
    ``budget<index>``.
    Raises :class:`ConfigError` naming the field (an auth filter can call this at
    startup to refuse a bad key entry early).
    """
    limit_rules: list[LimitRule] = []
    budget_rules: list[BudgetRule] = []
    if limits:
        limit_rules.append(parse_limit(dict(limits), "limits", name=f"principal:{name}", default_key=("principal",)))
    items: list[Any]
    if not budgets:
        items = []
    elif isinstance(budgets, Mapping):
        items = [budgets]
    elif isinstance(budgets, Sequence) and not isinstance(budgets, str):
        items = list(budgets)
    else:
        raise ConfigError("", "budgets", "must be a mapping or a list of mappings")
    seen: set[str] = set()
    for i, item in enumerate(items):
        path = f"budgets[{i}]" if not isinstance(budgets, Mapping) else "budgets"
        raw = dict(item) if isinstance(item, Mapping) else item
        label = f"budget{i}"
        if isinstance(raw, dict) and "name" in raw:
            label = raw.pop("name")
            if not isinstance(label, str) or not _LABEL.fullmatch(label):
                raise ConfigError("", f"{path}.name", "must be 1-64 letters, digits or _ . - (it names the budget)")
        if label in seen:
            raise ConfigError("", f"{path}.name", f"budget name {label!r} is used twice")
        seen.add(label)
        budget_rules.append(parse_budget(raw, path, name=f"principal:{name}:{label}", default_key=("principal",)))
    return tuple(limit_rules), tuple(budget_rules)
