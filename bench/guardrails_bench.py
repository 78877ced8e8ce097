"""Micro-benchmark: CPU the guardrails filter adds per KB of text.

Not a test (CPU only, one process, no sockets). Run
``python bench/guardrails_bench.py [--repeat R] [--kb N]``.

Issue 18's target: guardrails with 10 regex rules and the builtin detectors
(``secrets`` and ``pii``: 10 detectors) add at most 30 µs per 1 KB of text.
Measured with the real rule set and scanner classes over deterministic
model-like text (words, numbers, punctuation; one variant with two keys and
an email in each KB):

* whole text: :meth:`RuleSet.apply`, what a request's texts and a JSON
  response cost (``fix_request`` over a chat request of that size too);
* stream text: a :class:`StreamScanner` fed 4-character pieces (one token
  per SSE event), window 128;
* stream events: a :class:`StreamGuard` over real Chat Completions chunks
  (one event per call, the worst case), event parsing and re-serialising
  included, minus nothing.

The best of ``--repeat`` runs is kept.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmproxy.filters.guardrails.filter import _scan
from llmproxy.filters.guardrails.rules import RuleSet, parse_rules
from llmproxy.filters.guardrails.scanner import StreamScanner
from llmproxy.filters.guardrails.stream import StreamGuard
from llmproxy.filters.guardrails.texts import fix_request

TARGET_US_PER_KB = 30.0
NAMES = ("atlas", "borealis", "cygnus", "draco", "eridani", "fornax", "gemini", "hydra", "indus", "lyra")
RULES = [{"name": "secrets", "detectors": ["secrets", "pii"], "action": "redact"}] + [
    {"name": f"rule{i}", "regex": rf"(?i)\bproject[-_ ]?{name}\b|\b{name}-\d{{4,8}}\b", "action": "redact"}
    for i, name in enumerate(NAMES)
]
WORDS = [
    "the",
    "model",
    "returns",
    "a",
    "short",
    "answer",
    "with",
    "some",
    "context",
    "and",
    "a",
    "few",
    "numbers",
    "like",
    "42",
    "or",
    "2024",
    ",",
    "then",
    "it",
    "explains",
    "why",
    ";",
    "users",
    "asked",
    "about",
    "pricing",
    ",",
    "latency",
    "(",
    "p99",
    ")",
    "and",
    "the",
    "version",
    "3.11",
    "release",
    "notes",
    ".",
]


def make_text(kb: int, secrets: bool, seed: int = 18) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < kb * 1024:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
        if secrets and size % 1024 < 8:
            out.append("sk-proj-Abc123Def456Ghi789Jkl012Mno345 and mail jane.doe@example.com")
            size += 70
    return " ".join(out)[: kb * 1024]


def best_of(repeat: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - start)
    return best


def chat_events(text: str, piece: int) -> list[bytes]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = []
    for i in range(0, len(text), piece):
        chunk = {**head, "choices": [{"index": 0, "delta": {"content": text[i : i + piece]}, "finish_reason": None}]}
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    done = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    events.append(b"data: " + orjson.dumps(done) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def measure(rules: RuleSet, label: str, text: str, kb: int, repeat: int) -> float:
    """Print the four figures for ``text``; return the worst of the whole-text and request ones."""
    # two equal texts, alternated: a fresh object each call (the phone and card finders share
    # their digit runs per text object; a repeated object would only measure that memo)
    copies = [text[:1] + text[1:], text[:2] + text[2:]]
    flip = [0]

    def run_whole() -> None:
        flip[0] ^= 1
        rules.apply(copies[flip[0]])

    whole = best_of(repeat, run_whole) / 1000 / kb
    print(f"{label:13}  whole text        {whole:8.1f} µs/KB   (target <= {TARGET_US_PER_KB:g} µs/KB)")

    messages = [{"role": "user", "content": text[i : i + 512]} for i in range(0, len(text), 512)]
    request = orjson.dumps({"model": "m", "messages": messages})
    copy = best_of(repeat, lambda: orjson.loads(request)) / 1000 / kb
    req = best_of(repeat, lambda: _scan(rules, orjson.loads(request), fix_request)) / 1000 / kb - copy
    print(f"{label:13}  request texts     {req:8.1f} µs/KB   (target <= {TARGET_US_PER_KB:g} µs/KB; 512-char messages)")

    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]

    def run_scanner() -> None:
        scanner = StreamScanner(rules, 128)
        for piece in pieces:
            scanner.feed(piece)
        scanner.finish()

    stream = best_of(repeat, run_scanner) / 1000 / kb
    print(f"{label:13}  stream text       {stream:8.1f} µs/KB   (4-char pieces, window 128)")

    events = chat_events(text, 4)

    def run_guard() -> None:
        guard = StreamGuard(rules, 128, "chat")
        for event in events:
            guard.feed([event])
        guard.finish()

    guarded = best_of(max(3, repeat // 4), run_guard) / 1000
    print(
        f"{label:13}  stream events     {guarded / kb:8.1f} µs/KB   "
        f"({guarded / len(events):.2f} µs/event, {len(events)} events, parse + rewrite included)"
    )
    return max(whole, req)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--kb", type=int, default=8)
    args = parser.parse_args()
    rules = RuleSet(parse_rules(RULES, "bench"))
    assert len(rules.matchers) == 20  # 10 detectors + 10 regex rules
    worst = 0.0
    for label, secrets in (("clean text", False), ("with secrets", True)):
        text = make_text(args.kb, secrets)
        redacted = rules.apply(text)[0]
        assert "sk-proj" not in redacted and ("[redacted:" in redacted) is secrets
        worst = max(worst, measure(rules, label, text, args.kb, args.repeat))
    verdict = "met" if worst <= TARGET_US_PER_KB else "NOT met"
    print(f"worst whole-text/request figure: {worst:.1f} µs/KB: target {verdict}")


if __name__ == "__main__":
    main()
