"""Rules: what to look for, what to do, where they apply; and scanning a text with them.

A :class:`Rule` is one configured entry (detectors, regular expressions, a
deny list or a remote check) with an action (``block``, ``redact``, ``log``),
the side it watches (``request``, ``response`` or both) and its scope
(``models`` patterns, ``principals`` and ``teams``). A :class:`RuleSet` is the
compiled selection of rules that applies to one exchange side; it is cached
by the factory per distinct selection.

Scanning (:meth:`RuleSet.candidates`) runs every pattern over the text and
returns all candidate spans, sorted; :func:`clusters` merges overlapping
valid candidates into spans, each owned by its strongest rule (``block``
over ``redact`` over ``log``, then the leftmost, longest). The same two
steps run on whole texts and on stream windows, which is what makes a
stream's redaction equal to the redaction of its whole text.

A stream scanner first asks :attr:`RuleSet.trigger` (every matcher's needles,
or its own trigger pattern) whether any candidate can be there at all: model
text rarely holds a needle, so most of a stream is released after one look
at its new characters, and the matchers run only around a needle (see
:mod:`.scanner`).
"""

from __future__ import annotations

import bisect
import fnmatch
import re
import re._constants as _sre  # type: ignore[import-untyped]
import re._parser as _parser  # type: ignore[import-untyped]
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from llmproxy import ConfigError, Principal, Section, read_upstream
from llmproxy.filters.guardrails.detectors import DETECTORS, GROUPS

__all__ = [
    "ACTIONS",
    "SEPARATOR",
    "TRIGGER_MIN_KEEP",
    "Candidate",
    "Matcher",
    "RemoteCheck",
    "Rule",
    "RuleSet",
    "Span",
    "Trigger",
    "clusters",
    "parse_rules",
]

ACTIONS: Final = ("block", "redact", "log")
#: What :meth:`RuleSet.apply_many` puts between texts.
SEPARATOR: Final = "\n\x00\n"
#: A stream release must keep at least this many characters held for a trigger to prove it quiet
#: (a digit run at the end holds 8 digits of a run trigger once it is this long).
TRIGGER_MIN_KEEP: Final = 32
#: A trigger longer than this (an unbounded needle pattern) is searched from the release point.
_TRIGGER_MAX_WIDTH: Final = 4096
_PRIORITY: Final = {"block": 3, "redact": 2, "log": 1}
_SIDES: Final = ("both", "request", "response")
_FAILURES: Final = ("open", "closed")


@dataclass(frozen=True, slots=True)
class RemoteCheck:
    """A rule whose verdict comes from an HTTP service (see :mod:`.remote`)."""

    settings: Any  # llmproxy's UpstreamSettings (``read_upstream``)
    path: str
    timeout: float
    fail_open: bool


@dataclass(frozen=True, slots=True)
class Matcher:
    """One pattern of a rule (a rule with several detectors has several)."""

    rule: int
    pattern: re.Pattern[str]
    validate: Callable[[str], bool] | None = None
    needles: tuple[str, ...] = ()
    finder: Callable[[str, int], Iterator[tuple[int, int, bool]]] | None = None
    #: The needles are lowercase: look for them in the lowercased text.
    folded: bool = False
    #: A regular expression every candidate contains, instead of the needles (see ``Detector``).
    trigger: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    """One configured rule."""

    name: str
    action: str
    request: bool
    response: bool
    matchers: tuple[Matcher, ...] = ()
    remote: RemoteCheck | None = None
    models: tuple[str, ...] = ()
    principals: frozenset[str] = field(default_factory=frozenset)
    teams: frozenset[str] = field(default_factory=frozenset)

    def applies(self, model: str, principal: Principal | None) -> bool:
        """True when this rule's scope covers ``model`` (the client's name) and ``principal``."""
        if self.models and not any(fnmatch.fnmatchcase(model, p) for p in self.models):
            return False
        if self.principals or self.teams:
            if principal is None:
                return False
            if principal.name not in self.principals and (principal.team is None or principal.team not in self.teams):
                return False
        return True


class Candidate(NamedTuple):
    """A pattern match: ``[start, end)``, the matcher's rule, and whether its validator accepted it."""

    start: int
    end: int
    rule: int
    valid: bool


class Span(NamedTuple):
    """A resolved span: ``[start, end)`` owned by ``rule`` (overlapping candidates merged)."""

    start: int
    end: int
    rule: int


def clusters(cands: Sequence[Candidate], rules: Sequence[Rule]) -> list[Span]:
    """Merge the valid, overlapping ``cands`` (sorted) into spans owned by their strongest rule."""
    out: list[Span] = []
    cur_s = cur_e = -1
    cur_r = -1
    for s, e, r, valid in cands:
        if not valid:
            continue
        if s < cur_e:
            if e > cur_e:
                cur_e = e
            if _PRIORITY[rules[r].action] > _PRIORITY[rules[cur_r].action]:
                cur_r = r
            continue
        if cur_r >= 0:
            out.append(Span(cur_s, cur_e, cur_r))
        cur_s, cur_e, cur_r = s, e, r
    if cur_r >= 0:
        out.append(Span(cur_s, cur_e, cur_r))
    return out


class RuleSet:
    """The compiled rules of one exchange side: their patterns, and the remote checks."""

    __slots__ = ("always", "markers", "matchers", "remote", "rules", "trigger")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self.matchers = tuple(
            Matcher(i, m.pattern, m.validate, m.needles, m.finder, m.folded, m.trigger)
            for i, rule in enumerate(self.rules)
            for m in rule.matchers
        )
        self.remote = tuple(rule for rule in self.rules if rule.remote is not None)
        #: ``[redacted:<rule>]`` per rule.
        self.markers = tuple(f"[redacted:{rule.name}]" for rule in self.rules)
        #: What every matcher with needles or a trigger contains: where none of it occurs, none
        #: of those matchers has a candidate (None: no such matcher); the matchers it leaves out.
        self.trigger, self.always = _trigger(self.matchers)

    def __bool__(self) -> bool:
        return bool(self.matchers)

    def candidates(self, text: str, pos: int = 0, matchers: Sequence[Matcher] | None = None) -> list[Candidate]:
        """Every pattern's non-empty matches in ``text`` from ``pos`` (lookbehinds see before it), sorted;
        of ``matchers`` only when given."""
        out: list[Candidate] = []
        lowered: str | None = None
        for m in self.matchers if matchers is None else matchers:
            needles = m.needles
            if needles:
                if m.folded:
                    if lowered is None:
                        lowered = text.lower()
                    haystack = lowered
                else:
                    haystack = text
                for needle in needles:
                    if needle in haystack:
                        break
                else:
                    continue
            validate = m.validate
            if m.finder is not None:
                for s, e, match in m.finder(text, pos):
                    valid = match and (validate is None or validate(text[s:e]))
                    out.append(Candidate(s, e, m.rule, valid))
                continue
            for found in m.pattern.finditer(text, pos):
                s, e = found.span()
                if s != e:
                    out.append(Candidate(s, e, m.rule, validate is None or validate(found.group())))
        if len(out) > 1:
            out.sort(key=_by_start_longest)
        return out

    def triggered(self, text: str, pos: int, triggers: bool = True) -> list[Matcher]:
        """The matchers that may have a candidate in ``text`` from ``pos``: those with a needle there,
        or their trigger when ``triggers`` (else they are kept), and the ones with neither."""
        region = text[pos:]
        lowered: str | None = None
        found: dict[str, bool] = {}
        out: list[Matcher] = []
        for m in self.matchers:
            if m.trigger:
                if triggers:
                    hit = found.get(m.trigger)
                    if hit is None:
                        hit = found[m.trigger] = re.search(m.trigger, region) is not None
                    if not hit:
                        continue
            elif m.needles:
                haystack = region
                if m.folded:
                    if lowered is None:
                        lowered = region.lower()
                    haystack = lowered
                for needle in m.needles:
                    if needle in haystack:
                        break
                else:
                    continue
            out.append(m)
        return out

    def render(self, text: str, spans: Sequence[Span], start: int, end: int) -> str:
        """``text[start:end]`` with every redacting span in it replaced by its marker."""
        parts: list[str] = []
        at = start
        rules = self.rules
        for s, e, r in spans:
            if rules[r].action != "redact":
                continue
            parts.append(text[at:s])
            parts.append(self.markers[r])
            at = e
        if not parts:
            return text[start:end]
        parts.append(text[at:end])
        return "".join(parts)

    def apply_many(self, texts: Sequence[str]) -> tuple[list[str], list[int]]:
        """Scan several texts (a request's, a response's) in one pass: the texts redacted (the same
        objects when unchanged) and the rule of every span found.

        They are scanned joined by :data:`SEPARATOR` (a NUL between newlines, which no builtin
        matches), so a dozen short messages cost one scan, not a dozen; a span that still
        crosses a separator is cut at it and applied to both texts.
        """
        if len(texts) == 1:
            new, spans = self.apply(texts[0])
            return [new], [span.rule for span in spans]
        joined = SEPARATOR.join(texts)
        cands = self.candidates(joined)
        spans = clusters(cands, self.rules) if cands else []
        out = list(texts)
        if not spans:
            return out, []
        starts: list[int] = []
        at = 0
        for text in texts:
            starts.append(at)
            at += len(text) + len(SEPARATOR)
        per: dict[int, list[Span]] = {}
        for span in spans:
            i = bisect.bisect_right(starts, span.start) - 1
            while i < len(texts) and starts[i] < span.end:
                lo = max(span.start, starts[i]) - starts[i]
                hi = min(span.end, starts[i] + len(texts[i])) - starts[i]
                if hi > lo:
                    per.setdefault(i, []).append(Span(lo, hi, span.rule))
                i += 1
        for i, text_spans in per.items():
            out[i] = self.render(texts[i], text_spans, 0, len(texts[i]))
        return out, [span.rule for span in spans]

    def apply(self, text: str) -> tuple[str, list[Span]]:
        """Scan a whole text: the redacted text and every span found (its rules' actions say what they mean)."""
        cands = self.candidates(text)
        if not cands:
            return text, []
        spans = clusters(cands, self.rules)
        return self.render(text, spans, 0, len(text)), spans


def _by_start_longest(c: Candidate) -> tuple[int, int]:
    return (c.start, -c.end)


class Trigger(NamedTuple):
    """What a stream's quiet check looks for (:attr:`RuleSet.trigger`): every needle of the matchers
    it covers (``folded`` ones in the lowercased text), and the detectors' own trigger patterns."""

    needles: tuple[str, ...]
    folded: tuple[str, ...]
    #: The detectors' trigger patterns in one (None: none).
    pattern: re.Pattern[str] | None
    #: The longest text any of them matches (0: unbounded).
    width: int
    #: One character of each needle (its rarest; both cases and what lowers to it when folded):
    #: a text with none of them holds no needle, one pass over it instead of one per needle.
    keys: frozenset[str]

    def found(self, text: str, pos: int) -> bool:
        """True when one of them occurs in ``text`` from ``pos``."""
        region = text[pos:]
        if not self.keys.isdisjoint(region):
            for needle in self.needles:
                if needle in region:
                    return True
            if self.folded:
                lowered = region.lower()
                for needle in self.folded:
                    if needle in lowered:
                        return True
        return self.pattern is not None and self.pattern.search(region) is not None


#: Characters from the most to the least common in model text (English letters by frequency);
#: a needle is keyed by its character furthest down (one not listed: digits, capitals, symbols).
_COMMON: Final = " etaoinsrhldcumfpgwybvETAOINSRHLDCUMFPGWYBV0123456789kxjqzKXJQZ.,"
#: The characters outside ASCII whose ``str.lower`` holds an ASCII letter (all of Unicode, checked).
_LOWERS_TO: Final = {"i": "\u0130", "k": "\u212a"}


def _key(needle: str, folded: bool) -> str:
    """The characters keying ``needle``: its rarest, in every case that lowers to it when folded."""
    rank = {c: i for i, c in enumerate(_COMMON)}
    char = max(needle, key=lambda c: rank.get(c, len(_COMMON)))
    if not folded or not char.isalpha():
        return char
    return char + char.upper() + _LOWERS_TO.get(char, "")


def _trigger(matchers: Sequence[Matcher]) -> tuple[Trigger | None, tuple[Matcher, ...]]:
    """:attr:`RuleSet.trigger` and the matchers it leaves out (no needles, no trigger).

    The needles are looked for with ``in`` (C speed), each once, and only in a text holding one of
    their key characters: one regular expression of them all would be slower (``re`` tries an
    alternation at every position).
    """
    needles: dict[str, None] = {}
    folded: dict[str, None] = {}
    patterns: dict[str, None] = {}
    always: list[Matcher] = []
    for m in matchers:
        if m.trigger:
            patterns[m.trigger] = None  # each a regular expression source
        elif m.needles:
            (folded if m.folded else needles).update(dict.fromkeys(m.needles))
        else:
            always.append(m)
    if not (needles or folded or patterns):
        return None, tuple(always)
    width = max((len(n) for n in (*needles, *folded)), default=1)
    for source in patterns:
        try:
            most = _parser.parse(source).getwidth()[1]
        except Exception:  # the private parser changed: searched from the release point, still correct
            most = 0
        width = 0 if not most or most > _TRIGGER_MAX_WIDTH else max(width, most)
        if not width:
            break
    compiled = re.compile("|".join(f"(?:{source})" for source in patterns)) if patterns else None
    keys = frozenset("".join([_key(n, False) for n in needles] + [_key(n, True) for n in folded]))
    return Trigger(tuple(needles), tuple(folded), compiled, width, keys), tuple(always)


# -- needles: literals every match of a regular expression contains ------------------------

_LITERAL = _sre.LITERAL
_ZERO_WIDTH = frozenset({_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT})
_REPEATS = frozenset({_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)})


def _strength(needles: tuple[str, ...] | None) -> int:
    return min(len(n) for n in needles) if needles else 0


def _needles_of(seq: Any) -> tuple[str, ...] | None:
    """Substrings one of which every match of the parsed sequence ``seq`` contains (None: unknown)."""
    best: tuple[str, ...] | None = None
    run: list[str] = []

    def close() -> None:
        nonlocal best
        if run and len(run) > _strength(best):
            best = ("".join(run),)
        run.clear()

    for op, av in seq:
        if op is _LITERAL:
            run.append(chr(av))
            continue
        if op in _ZERO_WIDTH:
            continue  # consumes nothing: the literals around it are adjacent in the match
        close()
        inner: tuple[str, ...] | None = None
        if op is _sre.SUBPATTERN:
            _, add_flags, _, sub = av
            if not add_flags & _sre.SRE_FLAG_IGNORECASE:
                inner = _needles_of(sub.data)
        elif op is _sre.BRANCH:
            union: list[str] = []
            for branch in av[1]:
                found = _needles_of(branch.data)
                if not found:
                    union = []
                    break
                union.extend(found)
            inner = tuple(dict.fromkeys(union)) or None
        elif op in _REPEATS and av[0] >= 1:
            inner = _needles_of(av[2].data)
        if inner and _strength(inner) > _strength(best):
            best = inner
    close()
    return best


def needles_for(pattern: re.Pattern[str]) -> tuple[tuple[str, ...], bool]:
    """``(needles, folded)``: literals one of which every match contains, lowercased when the pattern
    ignores case (``folded``); ``()`` when none are known (the pattern is then always run)."""
    try:
        parsed = _parser.parse(pattern.pattern, pattern.flags)
    except Exception:  # the private parser changed: no needles, still correct
        return (), False
    found = _needles_of(parsed.data) or ()
    folded = bool(pattern.flags & re.IGNORECASE)
    if folded:
        if not all(n.isascii() for n in found):
            return (), False
        found = tuple(n.lower() for n in found)
    return found, folded


# -- config -------------------------------------------------------------------------------


def _strings(sec: Section, key: str) -> list[str]:
    value = sec.get(key, list, [])
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise sec.error(f"{key}[{i}]", "must be a non-empty string")
    return list(value)


def _compile(sec: Section, key: str, source: str, flags: int) -> re.Pattern[str]:
    try:
        pattern = re.compile(source, flags)
    except re.error as exc:
        raise sec.error(key, f"invalid regular expression {source!r}: {exc}") from None
    if pattern.fullmatch(""):
        raise sec.error(key, f"regular expression {source!r} matches the empty string")
    return pattern


def _regex_matcher(rule: int, pattern: re.Pattern[str]) -> Matcher:
    needles, folded = needles_for(pattern)
    return Matcher(rule, pattern, needles=needles, folded=folded)


def _deny_pattern(words: Sequence[str]) -> re.Pattern[str]:
    """One case-insensitive pattern for ``words``: a word character at a phrase's edge must not touch another."""
    parts = []
    for word in sorted(set(words), key=len, reverse=True):
        part = re.escape(word)
        if re.match(r"\w", word[0]):
            part = r"(?<!\w)" + part
        if re.match(r"\w", word[-1]):
            part += r"(?!\w)"
        parts.append(part)
    return re.compile("|".join(parts), re.IGNORECASE)


def _remote(sec: Section, file: str) -> RemoteCheck:
    raw = sec.get("remote", dict, None)
    where = f"{sec.path}.remote"
    remote = Section(raw, where, file)
    timeout = remote.get("timeout", float, 1.0, lambda v: None if v > 0 else "must be greater than 0")
    failure = remote.get("failure", str, "closed", lambda v: None if v in _FAILURES else "must be open or closed")
    path = remote.get("path", str, "")
    upstream = {k: v for k, v in remote.data.items() if k in ("url", "headers", "tls")}
    remote.used.update(("url", "headers", "tls"))
    remote.finish()
    settings = read_upstream(upstream, where, file)
    return RemoteCheck(settings, path, timeout, failure == "open")


def parse_rules(raw: Any, file: str) -> list[Rule]:
    """Read the ``rules`` list; raise :class:`ConfigError` naming the field and the reason."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(file, "rules", "must be a non-empty list of rules")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        sec = Section(item, f"rules[{i}]", file)
        kinds = [k for k in ("detector", "detectors", "regex", "regexes", "deny", "remote") if sec.data.get(k)]
        if len(kinds) != 1:
            reason = "needs exactly one of detector, detectors, regex, regexes, deny, remote"
            raise ConfigError(file, f"rules[{i}]", reason)
        kind = kinds[0]
        action = sec.get("action", str, "block")
        if action not in ACTIONS:
            raise sec.error("action", f"unknown action {action!r} (allowed: {', '.join(ACTIONS)})")
        side = sec.get("side", str, "both")
        if side not in _SIDES:
            raise sec.error("side", f"must be one of {', '.join(_SIDES)}")
        flags = re.IGNORECASE if sec.get("ignore_case", bool, False) else 0
        matchers: list[Matcher] = []
        remote: RemoteCheck | None = None
        default_name: str | None = None
        if kind in ("detector", "detectors"):
            listed = [sec.get("detector", str, "")] if kind == "detector" else _strings(sec, "detectors")
            for name in listed:
                if name not in DETECTORS and name not in GROUPS:
                    known = ", ".join(sorted((*DETECTORS, *GROUPS)))
                    raise sec.error(kind, f"unknown detector {name!r} (known: {known})")
                for detector in GROUPS.get(name, (name,)):
                    d = DETECTORS[detector]
                    matchers.append(Matcher(len(rules), d.pattern, d.validate, d.needles, d.finder, trigger=d.trigger))
            default_name = listed[0] if len(listed) == 1 else None
        elif kind in ("regex", "regexes"):
            sources = [sec.get("regex", str, "")] if kind == "regex" else _strings(sec, "regexes")
            for source in sources:
                matchers.append(_regex_matcher(len(rules), _compile(sec, kind, source, flags)))
        elif kind == "deny":
            matchers.append(_regex_matcher(len(rules), _deny_pattern(_strings(sec, "deny"))))
        else:
            remote = _remote(sec, file)
            if action == "redact":
                raise sec.error("action", "a remote check can block or log, not redact")
            if side == "response":
                raise sec.error("side", "a remote check runs on the request")
        name = sec.get("name", str, default_name)
        if not name:
            raise sec.error("name", f"is required for a {kind} rule")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
            raise sec.error("name", "must be 1-64 letters, digits, '_', '.', ':' or '-'")
        if name in names:
            raise sec.error("name", f"rule {name!r} is defined twice")
        names.add(name)
        rule = Rule(
            name=name,
            action=action,
            request=side in ("both", "request"),
            response=side in ("both", "response") and remote is None,
            matchers=tuple(matchers),
            remote=remote,
            models=tuple(_strings(sec, "models")),
            principals=frozenset(_strings(sec, "principals")),
            teams=frozenset(_strings(sec, "teams")),
        )
        sec.finish()
        rules.append(rule)
    return rules
