"""The hold-back window: scanning a text that arrives in pieces without letting a flagged span out.

A :class:`StreamScanner` keeps the text of one stream channel (a message's
content, one tool call's arguments) that it has not released yet. Each
:meth:`~StreamScanner.feed` appends a piece and releases what can no longer
be part of a match:

* once more than ``window`` characters are held, everything more than
  ``window - window // 8`` characters before the end (a steady stream is so
  scanned once per ``window // 8`` characters rather than once per event), unless a
  candidate match (valid or not, of any rule) starts before that point and
  reaches past it, or touches the end of the text seen so far (it may still
  grow): the release point then moves back to that candidate's start;
* matches in the released part are resolved and redacted exactly as on the
  whole text (:meth:`RuleSet.apply`): every pattern is scanned from the same
  point with the same left context, so the released text equals the whole
  text's redaction, whatever the piece sizes.

``window - window // 8`` must cover the longest text a rule needs to see
before it begins to match (the builtin detectors need at most 72: an email's
64-character local part and its domain), so the window should be at least
83 characters (default 128). A held candidate
that keeps growing is held until it ends (bounded by the patterns' own
bounds). :meth:`~StreamScanner.finish` releases the rest.

A release first asks the rule set's trigger (:attr:`RuleSet.trigger`: every
matcher's needles) whether any candidate can start in the held
text: when none can, only the matchers without needles run (usually none) and
the text goes out as it is. The search resumes where the last one that found
nothing ended, less the trigger's width (a needle that straddled the old end),
so a quiet stream searches each character about once; the matchers run only
while a needle is held, each over the held text as before.

A span of a ``block`` rule in the released part raises :class:`Blocked`;
``log`` spans are reported and released unchanged.
"""

from __future__ import annotations

from time import perf_counter
from typing import Final

from llmproxy.filters.guardrails.rules import TRIGGER_MIN_KEEP, RuleSet, Span, clusters

__all__ = ["CONTEXT", "Blocked", "StreamScanner"]

#: Released characters kept as left context, for lookbehinds and word boundaries.
CONTEXT: Final = 32
#: A candidate ending this close to the end may still change (lookaheads): held.
_LOOKAHEAD: Final = 2


class Blocked(Exception):
    """A span of a ``block`` rule was found; ``rule`` names it (the matched text is never kept)."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


class StreamScanner:
    """One channel's held text (see the module docstring)."""

    __slots__ = (
        "_arrivals",
        "_buf",
        "_clean",
        "_ctx",
        "_max_held",
        "_released",
        "hits",
        "keep",
        "max_wait",
        "rules",
        "window",
    )

    def __init__(self, rules: RuleSet, window: int) -> None:
        self.rules = rules
        self.window = window
        #: What a release keeps held: window - window // 8, so a steady stream is scanned once
        #: per ``window // 8`` characters, not once per event.
        self.keep = window - window // 8
        #: Left context (released text) + held text.
        self._buf = ""
        self._ctx = 0
        #: No trigger match starts in ``_buf[_ctx:_clean - trigger_width + 1]`` (the last quiet search).
        self._clean = 0
        #: Characters released so far (offset of ``_buf[_ctx]`` in the channel's text).
        self._released = 0
        #: (channel offset where a piece ends, ``perf_counter`` when it arrived), oldest first.
        self._arrivals: list[tuple[int, float]] = []
        #: Spans found in released text, for counting and logs (rule indices of ``rules``).
        self.hits: list[int] = []
        #: Most characters held before the last release (held text only grows between releases).
        self._max_held = 0
        #: The longest a character waited (seconds).
        self.max_wait = 0.0

    @property
    def held(self) -> int:
        """Characters held now."""
        return len(self._buf) - self._ctx

    @property
    def max_held(self) -> int:
        """Most characters held at once."""
        return max(self._max_held, len(self._buf) - self._ctx)

    def feed(self, piece: str) -> str:
        """Append ``piece``; return the text released by it (possibly empty). Raises :class:`Blocked`."""
        if not piece:
            return ""
        buf = self._buf + piece
        self._buf = buf
        held = len(buf) - self._ctx
        self._arrivals.append((self._released + held, perf_counter()))
        if held <= self.window:
            return ""
        return self._release(False)

    def finish(self) -> str:
        """Release everything held (the channel ended). Raises :class:`Blocked`."""
        if len(self._buf) == self._ctx:
            return ""
        return self._release(True)

    def _release(self, final: bool) -> str:
        buf, ctx, rules = self._buf, self._ctx, self.rules
        size = len(buf)
        if size - ctx > self._max_held:
            self._max_held = size - ctx
        cut = size if final else size - self.keep
        quiet = self._quiet(buf, ctx, final)
        if quiet and not rules.always:
            return self._advance(buf, ctx, cut, buf[ctx:cut])
        if quiet:
            cands = rules.candidates(buf, ctx, rules.always)
        else:
            cands = rules.candidates(buf, ctx, rules.triggered(buf, ctx, final or self.keep >= TRIGGER_MIN_KEEP))
        if cands and not final:
            moved = True
            while moved:
                moved = False
                for s, e, _, _ in cands:
                    if s >= cut:
                        break
                    if e > cut or e + _LOOKAHEAD > size:
                        cut = s
                        moved = True
                        break
        if cut <= ctx:
            return ""
        spans = clusters([c for c in cands if c.end <= cut], rules.rules)
        return self._advance(buf, ctx, cut, self._resolve(buf, spans, ctx, cut))

    def _advance(self, buf: str, ctx: int, cut: int, out: str) -> str:
        """Release ``buf[ctx:cut]`` as ``out``; keep the left context and the held rest."""
        keep = max(0, cut - CONTEXT)
        self._buf = buf[keep:]
        self._ctx = cut - keep
        self._clean -= keep
        self._released += cut - ctx
        self._note_wait()
        return out

    def _quiet(self, buf: str, ctx: int, final: bool) -> bool:
        """True when no matcher the trigger covers can have a candidate in ``buf[ctx:]`` that the
        release would see (one starting before the cut)."""
        rules = self.rules
        trigger = rules.trigger
        if trigger is None:
            return True  # every matcher is in ``rules.always``
        if not final and self.keep < TRIGGER_MIN_KEEP:
            return False
        width = trigger.width
        if trigger.found(buf, max(ctx, self._clean - width + 1) if width else ctx):
            return False
        self._clean = len(buf)
        return True

    def _resolve(self, buf: str, spans: list[Span], start: int, end: int) -> str:
        rules = self.rules.rules
        for span in spans:
            self.hits.append(span.rule)
            if rules[span.rule].action == "block":
                raise Blocked(rules[span.rule].name)
        return self.rules.render(buf, spans, start, end)

    def _note_wait(self) -> None:
        arrivals = self._arrivals
        released = self._released
        now = perf_counter()
        n = 0
        for end, at in arrivals:
            if end > released:
                break
            n += 1
            wait = now - at
            if wait > self.max_wait:
                self.max_wait = wait
        if n:
            del arrivals[:n]
