"""Every stream golden, replayed split at every byte of the upstream stream, in every direction.

The upstream body goes through :class:`llmproxy.SseFramer` as the proxy frames it (whole, one
byte at a time, and in two pieces cut at every byte boundary; see ``sse_replay``) and then through
the routing filter's translator for each direction that starts from that provider protocol:

* an Anthropic provider stream (``messages_stream_to_chat`` and ``messages_stream_to_responses``
  goldens): to an OpenAI Chat client, and to a Responses client (Messages -> Chat -> Responses);
* a Chat Completions provider stream (``chat_stream_to_messages``, ``chat_stream_to_responses``):
  to an Anthropic client, and to a Responses client (Chat -> Responses).

Each cut must give the golden's events when the golden is of that direction, and otherwise the
whole stream's events; the Responses events must carry the text and the tool arguments the
provider sent, byte for byte, and its cache token counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmproxy.filters.translate import (
    ChainedStream,
    ChatStreamToMessagesStream,
    ChatStreamToResponsesStream,
    MessagesStreamToChatStream,
)
from tests.filters.sse_replay import Translator, assert_split_invariant, events, renumber
from tests.filters.test_translate_golden import (
    CASES,
    anthropic_provider_sent,
    load,
    openai_provider_sent,
)

ANTHROPIC_STREAMS = ("messages_stream_to_chat", "messages_stream_to_responses")
CHAT_STREAMS = ("chat_stream_to_messages", "chat_stream_to_responses")
STREAMS = [p for p in CASES if load(p)["kind"] in ANTHROPIC_STREAMS + CHAT_STREAMS]

#: Chat and Messages events: ids are the provider's, only ``created`` (a clock) differs.
plain = renumber(keys=(), drop=("created",))
#: Responses events: item ids are random, ``created_at`` a clock.
responses_normal = renumber()


def _to_responses(provider: str, model: str) -> Translator:
    responses = ChatStreamToResponsesStream(request={"model": model}, response_id="resp_golden", model=model)
    if provider == "anthropic":
        return ChainedStream(MessagesStreamToChatStream(model=model, include_usage=True), responses)
    return responses


def _golden(case: dict[str, Any]) -> list[tuple[str | None, Any]]:
    if case["kind"].endswith("_to_responses"):
        return [(e["event"], e["data"]) for e in case["expected"]]
    return plain(events("".join(case["expected"]).encode()))


def test_every_stream_golden_is_replayed() -> None:
    kinds = {load(p)["kind"] for p in STREAMS}
    assert kinds == set(ANTHROPIC_STREAMS + CHAT_STREAMS)
    assert len(STREAMS) >= 16


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.stem)
def test_other_protocol_client_at_every_split(path: Path) -> None:
    """OpenAI client of an Anthropic provider, Anthropic client of an OpenAI-compatible one."""
    case = load(path)
    stream = "".join(case["input"]).encode()
    if case["kind"] in ANTHROPIC_STREAMS:
        model = case["args"]["model"] if case["kind"] == "messages_stream_to_chat" else "gpt-4o"
        usage = case["args"].get("include_usage", True)

        def make() -> Translator:
            return MessagesStreamToChatStream(model=model, include_usage=usage)
    else:
        model = case["args"]["model"] if case["kind"] == "chat_stream_to_messages" else "claude"

        def make() -> Translator:
            return ChatStreamToMessagesStream(model=model)

    got = assert_split_invariant(make, stream, plain)
    if case["kind"] in ("messages_stream_to_chat", "chat_stream_to_messages"):
        assert got == _golden(case)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.stem)
def test_responses_client_at_every_split(path: Path) -> None:
    """A Responses client of a Chat provider, and of an Anthropic one (through Chat)."""
    case = load(path)
    stream = "".join(case["input"]).encode()
    provider = "anthropic" if case["kind"] in ANTHROPIC_STREAMS else "openai"
    model = case["args"]["model"] if case["kind"].endswith("_to_responses") else "m"
    got = assert_split_invariant(lambda: _to_responses(provider, model), stream, responses_normal)
    if case["kind"].endswith("_to_responses"):
        assert got == _golden(case)
    # What the provider sent reaches the Responses client, byte for byte.
    if provider == "anthropic":
        text, by_block, error = anthropic_provider_sent(case["input"])
        args = [by_block[i] for i in sorted(by_block)]
        failed = error is not None
    else:
        text, by_index, failed = openai_provider_sent(case["input"])
        args = [by_index[i] for i in sorted(by_index)]
    last_name, last = got[-1]
    if failed:
        assert last_name == "response.failed"
        return
    assert last_name in ("response.completed", "response.incomplete"), last_name
    output = last["response"]["output"]
    assert "".join(p["text"] for i in output if i["type"] == "message" for p in i["content"]) == text
    assert [i["arguments"] for i in output if i["type"] == "function_call"] == args
    deltas: dict[str, str] = {}
    for name, data in got:
        if name == "response.function_call_arguments.delta":
            deltas[data["item_id"]] = deltas.get(data["item_id"], "") + data["delta"]
    assert [deltas.get(i["id"], "") for i in output if i["type"] == "function_call"] == args
    usage = last["response"]["usage"]
    if usage is not None:
        assert usage["input_tokens_details"]["cached_tokens"] == _cached(case, provider)


def _cached(case: dict[str, Any], provider: str) -> int:
    """The cache reads the provider reported (its last report wins)."""
    cached = 0
    for raw in case["input"]:
        for _, data in events(raw.encode()):
            if not isinstance(data, dict):
                continue
            usage = data.get("usage") or (data.get("message") or {}).get("usage")
            if not isinstance(usage, dict):
                continue
            if provider == "anthropic" and "cache_read_input_tokens" in usage:
                cached = usage["cache_read_input_tokens"]
            elif provider == "openai" and "prompt_tokens_details" in usage:
                cached = (usage["prompt_tokens_details"] or {}).get("cached_tokens") or 0
    return cached
