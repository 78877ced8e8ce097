"""Replay one upstream SSE stream through a stream translator, split at every byte.

The proxy frames the provider's bytes with :class:`llmproxy.SseFramer` and
hands each whole event (name, joined ``data``) to the translator, exactly as
:func:`replay` does here. :func:`splits` gives every way the tests cut a
stream: whole, one byte at a time, and in two pieces at every byte boundary.
:func:`assert_split_invariant` checks that every cut gives the same client
events as the whole stream (after ``normal``, which hides what legitimately
differs between two runs: timestamps, random ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import orjson

from llmproxy import SseFramer, parse_event


class Translator(Protocol):
    def feed(self, event: bytes | None, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


def replay(translator: Translator, pieces: list[bytes]) -> bytes:
    """The client bytes ``translator`` produces for the upstream body arriving as ``pieces``."""
    framer = SseFramer(1 << 20)
    out = bytearray()
    for piece in pieces:
        for raw in framer.feed(piece):
            event = parse_event(raw)
            framed = translator.feed(event.event, event.data)
            assert framed == b"" or framed.endswith(b"\n\n"), framed
            out += framed
    out += translator.finish()
    assert translator.finish() == b"", "finish() must be idempotent"
    return bytes(out)


def splits(stream: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, then two pieces cut at every byte boundary."""
    yield [stream]
    yield [stream[i : i + 1] for i in range(len(stream))]
    for cut in range(1, len(stream)):
        yield [stream[:cut], stream[cut:]]


def events(body: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) of each framed client event; ``[DONE]`` stays bytes-as-str."""
    out: list[tuple[str | None, Any]] = []
    for raw in body.split(b"\n\n"):
        if not raw:
            continue
        parsed = parse_event(raw + b"\n\n")
        name = parsed.event.decode() if parsed.event is not None else None
        out.append((name, "[DONE]" if parsed.data == b"[DONE]" else orjson.loads(parsed.data)))
    return out


def renumber(
    keys: tuple[str, ...] = ("id", "item_id"), drop: tuple[str, ...] = ("created", "created_at")
) -> Callable[[list[tuple[str | None, Any]]], list[tuple[str | None, Any]]]:
    """A ``normal`` that replaces the values under ``keys`` by their first-seen order and drops ``drop``."""

    def normal(evs: list[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
        ids: dict[str, str] = {}

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {
                    k: (ids.setdefault(v, f"id{len(ids)}") if k in keys and isinstance(v, str) else walk(v))
                    for k, v in node.items()
                    if k not in drop
                }
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node

        return [(name, walk(value)) for name, value in evs]

    return normal


def assert_split_invariant(
    make: Callable[[], Translator],
    stream: bytes,
    normal: Callable[[list[tuple[str | None, Any]]], list[tuple[str | None, Any]]],
) -> list[tuple[str | None, Any]]:
    """Every split of ``stream`` gives the whole stream's client events; returns them (normalised)."""
    expected: list[tuple[str | None, Any]] | None = None
    for pieces in splits(stream):
        got = normal(events(replay(make(), pieces)))
        if expected is None:
            expected = got
        else:
            assert got == expected, [len(p) for p in pieces]
    assert expected is not None
    return expected
