"""Builtin detectors: common secret shapes, emails, phone numbers and card numbers.

Every pattern is bounded (no unbounded quantifier before a match can begin)
so that a stream scanner holding back ``window`` characters sees every match
start: the longest text any builtin needs before it matches is under 64
characters (``-----BEGIN ENCRYPTED PRIVATE KEY-----``). A match may grow
past that (a key's tail, a PEM body): the scanner holds a match that touches
the end of what it has seen until it stops growing.

Card numbers are Luhn-checked (a 16-digit order number is not a card).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["DETECTORS", "GROUPS", "Detector", "find_emails", "luhn_ok"]


def luhn_ok(text: str) -> bool:
    """True when the digits of ``text`` pass the Luhn check (13 to 19 digits)."""
    digits = [ord(c) - 48 for c in text if "0" <= c <= "9"]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True, slots=True)
class Detector:
    """A named pattern, with an optional validator of the matched text.

    ``needles``: substrings one of which every match contains; a text with
    none of them is not scanned (a C-speed ``in`` instead of a regex pass).
    ``finder`` replaces the pattern's ``finditer`` where a regex would be
    slow: ``(start, end, candidate_only)`` from ``pos``; ``False`` marks a
    span that is not a match but must not be cut while it may grow.
    ``trigger`` replaces the needles for a stream's quiet check
    (:attr:`RuleSet.trigger <.rules.RuleSet.trigger>`) where they are too common (digits):
    a regular expression that any candidate starting more than
    :data:`~.rules.TRIGGER_MIN_KEEP` characters before the end contains.
    """

    name: str
    pattern: re.Pattern[str]
    validate: Callable[[str], bool] | None = None
    needles: tuple[str, ...] = ()
    finder: Callable[[str, int], Iterator[tuple[int, int, bool]]] | None = None
    trigger: str = ""


def _d(
    name: str,
    pattern: str,
    needles: tuple[str, ...],
    validate: Callable[[str], bool] | None = None,
    finder: Callable[[str, int], Iterator[tuple[int, int, bool]]] | None = None,
    trigger: str = "",
) -> Detector:
    return Detector(name, re.compile(pattern), validate, needles, finder, trigger)


_LOCAL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_EMAIL: Final = (
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}"
    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)
_DOMAIN: Final = re.compile(r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")


def find_emails(text: str, pos: int = 0) -> Iterator[tuple[int, int, bool]]:
    """The matches of the email pattern (``_EMAIL``) from ``pos``, found from each ``@`` outwards."""
    floor = pos
    at = text.find("@", pos)
    local = _LOCAL
    while at != -1:
        start = at
        while start > 0 and text[start - 1] in local and at - start <= 64:
            start -= 1
        if 0 < at - start <= 64 and start >= floor:
            domain = _DOMAIN.match(text, at + 1)
            if domain is not None:
                end = domain.end()
                yield start, end, True
                floor = end
                at = text.find("@", end)
                continue
        at = text.find("@", at + 1)


_DIGITS: Final = tuple("0123456789")
#: A run of digits and phone/card separators: phone and card numbers are looked for inside runs only.
#: A run of at least 8 digits (the fewest a phone number has) with up to two of `` ().-`` between
#: them, found in the text mapped to a byte class per character (ASCII texts: ``bytes.translate``
#: is C speed, and the pattern then starts with a literal, which ``re`` skips to quickly).
_RUN: Final = re.compile(rb"0(?:[-()]{0,2}0){7,}\)?")
#: A run of any length at the very end of the text (a stream's run that may still grow).
_TAIL_RUN: Final = re.compile(rb"[+(]?0(?:[-()]{0,2}0)*[-()]{0,2}\Z")
_STR_RUN: Final = re.compile(r"[0-9](?:[ ().-]{0,2}[0-9]){7,}\)?")
_STR_TAIL_RUN: Final = re.compile(r"[+(]?[0-9](?:[ ().-]{0,2}[0-9])*[ ().-]{0,2}\Z")
#: The quiet-check trigger of phone and card: 8 digits of a run. A finder's candidate is a run of at
#: least 8 digits, or a run at the end, which has 8 digits too once it is 26 characters long.
_RUN_TRIGGER: Final = r"[0-9](?:[ ().-]{0,2}[0-9]){7}"
_CLASSES: Final = bytes(
    ord("0") if chr(c).isdigit() and c < 128 else ord("-") if chr(c) in " .-" else c if chr(c) in "()+" else ord("x")
    for c in range(256)
)
_runs_memo: list[Any] = [None, -1, ()]


def _runs(text: str, pos: int) -> tuple[tuple[int, int, int], ...]:
    """``(start, end, digits)`` of the long runs from ``pos``, and of a run at the end of the text.

    A ``+`` or ``(`` just before a run belongs to it. The last text's runs are kept: phone and
    card share them.
    """
    memo = _runs_memo
    if memo[0] is text and memo[1] == pos:
        runs: tuple[tuple[int, int, int], ...] = memo[2]
        return runs
    subject: str | bytes = text
    run, tail_run = _STR_RUN, _STR_TAIL_RUN
    if text.isascii():
        subject = text.encode("ascii").translate(_CLASSES)
        run, tail_run = _RUN, _TAIL_RUN  # type: ignore[assignment]
    found = []
    for m in run.finditer(subject, pos):  # type: ignore[arg-type]
        s, e = m.span()
        if s > pos and text[s - 1] in "+(":
            s -= 1
        found.append((s, e, sum(1 for c in text[s:e] if "0" <= c <= "9")))
    tail = tail_run.search(subject, max(pos, len(text) - 64))  # type: ignore[arg-type]
    if tail is not None and (not found or found[-1][1] < tail.start()):
        s, e = tail.span()
        found.append((s, e, sum(1 for c in text[s:e] if "0" <= c <= "9")))
    runs = tuple(found)
    memo[0], memo[1], memo[2] = text, pos, runs
    return runs


def _in_runs(pattern: re.Pattern[str], least: int) -> Callable[[str, int], Iterator[tuple[int, int, bool]]]:
    """A finder: ``pattern``'s matches inside each run of at least ``least`` digits. Such runs, and a
    run at the end of the text, are also yielded as non-matches: a stream never cuts a run that
    holds a match or may still grow into one (the run decides where the pattern starts looking)."""

    def find(text: str, pos: int) -> Iterator[tuple[int, int, bool]]:
        tail = len(text) - 2
        for s, e, digits in _runs(text, pos):
            if digits >= least or e > tail:
                yield s, e, False
            if digits >= least:
                for m in pattern.finditer(text, s, e + 1):
                    if m.start() >= e:
                        break
                    yield m.start(), m.end(), True

    return find


_PHONE: Final = re.compile(
    r"(?:\+(?<![\w+]\+)\d{1,3}[ .-]?(?:\(\d{2,4}\)|\d{2,4})|\((?<![\w+]\()\d{2,4}\)|\d(?<![\w+]\d)\d{1,3})"
    r"(?:[ .-]?\d{3,4}){2}(?![\w])"
)
_CARD: Final = re.compile(r"\d(?<!\d\d)(?:[ -]?\d){12,18}(?!\d)")

#: Detectors by name.
DETECTORS: Final[dict[str, Detector]] = {
    d.name: d
    for d in (
        _d("openai_key", r"sk-(?<![A-Za-z0-9]sk-)(?!ant-)[A-Za-z0-9_-]{20,256}", ("sk-",)),
        _d("anthropic_key", r"sk-ant-(?<![A-Za-z0-9]sk-ant-)[A-Za-z0-9_-]{20,256}", ("sk-ant-",)),
        _d("aws_access_key", r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])", ("AKIA", "ASIA")),
        _d(
            "github_token",
            r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})",
            ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        ),
        _d("google_api_key", r"AIza(?<![A-Za-z0-9_-]AIza)[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])", ("AIza",)),
        _d("slack_token", r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,250}", ("xox",)),
        _d(
            "private_key",
            r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----[A-Za-z0-9+/=\s\\]{0,16384}"
            r"(?:-----END (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----)?",
            ("-----BEGIN ",),
        ),
        _d("email", _EMAIL, ("@",), finder=find_emails),
        _d("phone", _PHONE.pattern, _DIGITS, finder=_in_runs(_PHONE, 8), trigger=_RUN_TRIGGER),
        _d("card", _CARD.pattern, _DIGITS, luhn_ok, _in_runs(_CARD, 13), _RUN_TRIGGER),
    )
}

#: Names that stand for several detectors.
GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "secrets": (
        "openai_key",
        "anthropic_key",
        "aws_access_key",
        "github_token",
        "google_api_key",
        "slack_token",
        "private_key",
    ),
    "pii": ("email", "phone", "card"),
}
