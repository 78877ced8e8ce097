"""The stream cap's lazy counting cuts exactly where counting every event would.

:class:`StreamCap` keeps events aside while they cannot cross the allowance
even at one token per byte, and counts them only when needed; these tests
feed the same streams to it and to a reference that counts every event at
once (its ``_count``), for every allowance up to past the stream's total,
and compare what each passes on and where it cuts.
"""

from __future__ import annotations

import orjson
import pytest

from llmproxy.filters.ratelimit.cut import StreamCap

MODEL = "gpt-4o-mini"


def _openai_stream() -> list[bytes]:
    texts = ["Hello", " there", ", ", "naïve café ☕", " 🚀🚀", " and so on " * 5, "!"]
    events = [
        b"data: "
        + orjson.dumps({"id": "c1", "model": MODEL, "choices": [{"index": 0, "delta": {"content": t}}]})
        + b"\n\n"
        for t in texts
    ]
    call = {"index": 0, "id": "t1", "function": {"name": "lookup", "arguments": '{"q": "weather in Paris"}'}}
    events.append(
        b"data: " + orjson.dumps({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}) + b"\n\n"
    )
    events.append(b"data: [DONE]\n\n")
    return events


def _anthropic_stream() -> list[bytes]:
    def ev(kind: str, obj: dict[str, object]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"

    events = [ev("message_start", {"message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 3}}})]
    events.append(ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
    for text in ["Bonjour", " à tous", " — ", "long text " * 8]:
        events.append(ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}}))
    events.append(ev("content_block_stop", {"index": 0}))
    events.append(
        ev("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f"}})
    )
    for part in ['{"city":', ' "Paris"}']:
        events.append(
            ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": part}})
        )
    events.append(ev("content_block_stop", {"index": 1}))
    events.append(ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}}))
    events.append(ev("message_stop", {}))
    return events


def _run(cap: StreamCap, events: list[bytes], exact: bool) -> list[bytes | None]:
    """What ``cap`` answers for each event: lazily (``feed``) or counting each one (the reference)."""
    if not exact:
        return [cap.feed(e) for e in events]
    return [b"" if cap.cut else cap._count(e) for e in events]


@pytest.mark.parametrize(("protocol", "events"), [("openai", _openai_stream()), ("anthropic", _anthropic_stream())])
def test_lazy_counting_cuts_where_counting_every_event_does(protocol: str, events: list[bytes]) -> None:
    full = StreamCap(protocol, MODEL, 10**9, 5)
    assert all(out is None for out in _run(full, events, exact=True))
    total = full.used
    assert total > 20
    cuts = 0
    for allowance in range(1, total + 3):
        lazy = StreamCap(protocol, MODEL, allowance, 5)
        reference = StreamCap(protocol, MODEL, allowance, 5)
        got = _run(lazy, events, exact=False)
        want = _run(reference, events, exact=True)
        assert got == want, allowance
        assert lazy.cut == reference.cut
        cuts += lazy.cut
        if lazy.cut:
            assert lazy.used == reference.used <= allowance
    assert cuts == total - 1  # every allowance below the total cuts, none at or above it


def test_a_stream_far_from_its_allowance_is_never_parsed() -> None:
    cap = StreamCap("openai", MODEL, 10**9, 5)
    events = _openai_stream()
    assert all(cap.feed(e) is None for e in events)
    assert cap.used == 0 and len(cap.pending) == len(events)  # kept aside, not counted


@pytest.mark.parametrize(("protocol", "events"), [("openai", _openai_stream()), ("anthropic", _anthropic_stream())])
@pytest.mark.parametrize("per_batch", [2, 3, 5])
def test_batches_give_the_bytes_events_one_by_one_give(protocol: str, events: list[bytes], per_batch: int) -> None:
    total = StreamCap(protocol, MODEL, 10**9, 5)
    _run(total, events, exact=True)
    for allowance in range(1, total.used + 2):
        one_by_one = StreamCap(protocol, MODEL, allowance, 5)
        want = b"".join(
            e if out is None else out for e, out in zip(events, _run(one_by_one, events, exact=True), strict=True)
        )
        batched = StreamCap(protocol, MODEL, allowance, 5)
        got = b""
        for start in range(0, len(events), per_batch):
            batch = b"".join(events[start : start + per_batch])
            out = batched.feed_batch(batch)
            got += batch if out is None else out
        assert got == want, allowance
        assert batched.cut == one_by_one.cut
