"""The hold-back window without sockets: random texts, secrets at random places, random piece sizes.

The released text must never contain a planted secret (at any moment, not
only at the end), must equal the whole text's redaction, and a text with
nothing flagged is held back at most ``window`` characters plus one piece.
"""

from __future__ import annotations

import random

import pytest

from llmproxy import parse_event
from llmproxy.filters.guardrails.detectors import DETECTORS, luhn_ok
from llmproxy.filters.guardrails.rules import RuleSet, parse_rules
from llmproxy.filters.guardrails.scanner import Blocked, StreamScanner
from llmproxy.filters.guardrails.stream import _fields

SECRETS = [
    "sk-proj-Abc123Def456Ghi789Jkl012Mno345",
    "sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345",
    "AKIAQWERTYUIOPASDFGH",
    "ghp_" + "a1B2" * 9,
    "AIza" + "B" * 35,
    "xoxb-1234567890-abcdefghij",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234\nabcd==\n-----END RSA PRIVATE KEY-----",
    "joe.bloggs@example.org",
    "4111 1111 1111 1111",
    "+1 415-555-0134",
]
FILLER = [
    "alpha", "beta", "4", "2024", "x@", "sk-", "AKIA", "the", "-", "gh", "(555)", "@", ".", "\n", "42 17",
    "café", "日本 12", "٣٤٥", "415 555", "+44",
]  # fmt: skip
RULES = [
    {"name": "s", "detectors": ["secrets", "pii"], "action": "redact"},
    {"name": "deny", "deny": ["Top Secret", "codename"], "action": "redact"},
    {"name": "log", "regex": r"alpha\s+beta", "action": "log"},
]


def _pieces(rng: random.Random, text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        out.append(text[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("seed", range(8))
def test_random_streams_equal_the_whole_redaction_and_never_leak(seed: int) -> None:
    rng = random.Random(seed)
    rules = RuleSet(parse_rules(RULES, "t"))
    for _ in range(150):
        parts = [rng.choice(FILLER) for _ in range(rng.randint(0, 60))]
        planted = rng.sample(SECRETS, rng.randint(0, 4)) + (["codename"] if rng.random() < 0.3 else [])
        for secret in planted:
            parts.insert(rng.randint(0, len(parts)), f" {secret} ")  # delimited: a secret, not part of a word
        text = rng.choice([" ", "", "  "]).join(parts)
        scanner = StreamScanner(rules, rng.choice([84, 100, 128, 256]))
        released = ""
        for piece in _pieces(rng, text):
            released += scanner.feed(piece)
            for secret in planted:
                assert secret not in released
        released += scanner.finish()
        whole = rules.apply(text)[0]
        assert released == whole
        for secret in planted:
            assert secret not in released


def test_nothing_flagged_is_held_at_most_a_window_and_a_piece() -> None:
    rules = RuleSet(parse_rules(RULES, "t"))
    scanner = StreamScanner(rules, 128)
    text = "lorem ipsum dolor sit amet " * 100
    fed = released = 0
    for i in range(0, len(text), 7):
        piece = text[i : i + 7]
        fed += len(piece)
        released += len(scanner.feed(piece))
        assert fed - released <= 128 + 7
    assert scanner.max_held <= 128 + 7
    assert released + len(scanner.finish()) == len(text)


def test_a_block_span_raises_with_the_rule_name_only() -> None:
    rules = RuleSet(parse_rules([{"name": "keys", "detectors": ["secrets"]}], "t"))
    scanner = StreamScanner(rules, 100)
    out = scanner.feed("x" * 200)
    with pytest.raises(Blocked) as info:
        for piece in ["the key: sk-ab", "cdefghijklmnopqrstuvwxyz", "0123 and " + "y" * 200]:
            out += scanner.feed(piece)
        scanner.finish()
    assert info.value.rule == "keys" and "sk-" not in str(info.value)
    assert "sk-" not in out


@pytest.mark.parametrize(
    ("detector", "text", "found"),
    [
        ("card", "pay 4111 1111 1111 1111 now", True),
        ("card", "order 4111 1111 1111 1112 now", False),  # fails Luhn
        ("email", "write to a.b+c@mail.example.co.uk.", True),
        ("email", "not an email: a@b", False),
        ("openai_key", "task-abcdefghijklmnopqrstuvwxyz", False),
        ("anthropic_key", "sk-ant-api03-" + "x" * 30, True),
        ("aws_access_key", "AKIAIOSFODNN7EXAMPLE", True),
        ("phone", "call (415) 555-0134 today", True),
        ("phone", "in 2024 we had 42 of them", False),
    ],
)
def test_detectors(detector: str, text: str, found: bool) -> None:
    rules = RuleSet(parse_rules([{"detector": detector, "action": "redact"}], "t"))
    assert (rules.apply(text)[0] != text) is found
    assert detector in DETECTORS


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("5500 0000 0000 0004") and not luhn_ok("1234567812345678")


def test_deny_lists_are_case_insensitive_and_word_bounded() -> None:
    rules = RuleSet(parse_rules([{"name": "d", "deny": ["forbidden-word", "top secret"], "action": "redact"}], "t"))
    assert rules.apply("a Forbidden-Word.")[0] == "a [redacted:d]."
    assert rules.apply("TOP   SECRET")[0] == "TOP   SECRET"
    assert rules.apply("Top Secret!")[0] == "[redacted:d]!"
    assert rules.apply("forbidden-words, unforbidden-word")[0] == "forbidden-words, unforbidden-word"


#: Rules whose quiet check differs: a needle-less regex (always run), a case-folded one, a
#: long needle (straddles the resumed search), and the digit-run trigger of phone and card.
QUIET_RULES = [
    {"name": "pii", "detectors": ["phone", "card", "email"], "action": "redact"},
    {"name": "shape", "regex": r"[A-Z]{3}[0-9]{3}", "action": "redact"},
    {"name": "folded", "regex": r"(?i)project[- ]?lyra", "action": "redact"},
    {"name": "long", "deny": ["a-rather-long-needle-phrase"], "action": "redact"},
]
QUIET_FILLER = [
    "word", "12", "345", "6789", "-", "(", ")", ".", "PROJECT-Lyra", "project lyra", "ABC123",
    "a-rather-long-needle-phrase", "x@", "@", "jo@mail.example.com", "\u212a", "İ",
    "4111 1111 1111 1111", "+1 415-555-0134", "555 0134",
]  # fmt: skip


@pytest.mark.parametrize("window", [30, 40, 84, 128])
@pytest.mark.parametrize("seed", range(4))
def test_the_quiet_check_never_skips_a_candidate(window: int, seed: int) -> None:
    """Texts made of needle pieces (split anywhere by the piece sizes): the trigger must see every
    needle that straddles where its last search ended, or the output would differ."""
    rng = random.Random(1000 + seed)
    rules = RuleSet(parse_rules(QUIET_RULES, "t"))
    assert rules.trigger is not None and rules.always  # the needle-less regex runs on every release
    for _ in range(120):
        text = rng.choice([" ", "  ", "\n"]).join(rng.choice(QUIET_FILLER) for _ in range(rng.randint(0, 80)))
        scanner = StreamScanner(rules, window)
        released = "".join(scanner.feed(piece) for piece in _pieces(rng, text)) + scanner.finish()
        assert released == rules.apply(text)[0]


@pytest.mark.parametrize(
    "raw",
    [
        b'data: {"a":1}\n\n', b'event: x\ndata: {"a":1}\n\n', b"data: [DONE]\n\n", b"data:{}\n\n",
        b"event:x\ndata: {}\n\n", b": comment\ndata: {}\n\n", b"data: a\ndata: b\n\n",
        b"event: x\ndata: a\ndata: b\n\n", b"data: {}\r\n\r\n", b"data: {}", b"event: x\n\n",
        b"event: x\nid: 1\ndata: {}\n\n", b"data: \n\n", b"data: x\nevent: y\n\n",
    ],
)  # fmt: skip
def test_the_event_fast_path_reads_what_parse_event_reads(raw: bytes) -> None:
    event = parse_event(raw)
    assert _fields(raw) == (event.event, event.data)
