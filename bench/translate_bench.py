"""Micro-benchmark: cost per SSE event of the stream translators in filters.translate.

Not a test. Run ``python bench/translate_bench.py [--events N] [--repeat R]``.

Each direction replays a realistic stream (role/start event, N text deltas
of a few characters each, one tool call with N/3 argument fragments, the
finish and usage events) and prints microseconds per event for:

* ``pass-through``: the raw event handed on unchanged (one function call);
* ``parse only``: :func:`proxy.sse.parse_event`, which a translating filter
  needs anyway to get ``event``/``data``;
* ``translate``: ``parse_event`` then ``feed``, plus ``finish`` once.

The best of ``--repeat`` runs is reported, per the usual micro-benchmark
practice (the minimum is the least disturbed by the rest of the machine).
On a shared machine, ``--ir`` reports callgrind's instruction count per event
instead, which does not depend on load (each figure is the difference between
a process running 6 and 1 times, so imports and warm-up cancel out; a few
minutes per direction); ``--only TEXT`` picks the directions.
The budget is about 50 µs per event over pass-through (10 µs for the
Responses bridges: Chat -> Responses, and Anthropic -> Chat -> Responses chained;
10 µs for Gemini -> Chat, the codec's own decoder, issue 17; 10 µs for Bedrock,
where "translate" includes decoding the binary event-stream frames with botocore,
as the core's stream decoder does before routing sees SSE events).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmproxy.filters.routing.adapters.bedrock import EventStreamDecoders
from llmproxy.filters.translate import (
    ChainedStream,
    ChatStreamToMessagesStream,
    ChatStreamToResponsesStream,
    EventTranslator,
    MessagesStreamToChatStream,
)
from llmproxy.filters.translate.bedrock import BedrockCodec, ConverseStreamToMessagesStream
from llmproxy.filters.translate.gemini import GeminiStreamDecoder
from llmproxy.http.sse import parse_event, split_events
from llmproxy.mock.bedrock import encode_frame

WORDS = [
    "Hello",
    " there",
    ",",
    " the",
    " weather",
    " in",
    " Paris",
    " is",
    " \u201cmild\u201d",
    " \u2014",
    " 18\u00b0C",
    ".\n",
]


def _anthropic_event(payload: dict[str, object]) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def anthropic_stream(n: int) -> list[bytes]:
    usage = {"input_tokens": 1200, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}
    message: dict[str, object] = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    events = [_anthropic_event({"type": "message_start", "message": message})]
    events.append(
        _anthropic_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    )
    for i in range(n):
        delta = {"type": "text_delta", "text": WORDS[i % len(WORDS)]}
        events.append(_anthropic_event({"type": "content_block_delta", "index": 0, "delta": delta}))
    events.append(_anthropic_event({"type": "content_block_stop", "index": 0}))
    tool = {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}
    events.append(_anthropic_event({"type": "content_block_start", "index": 1, "content_block": tool}))
    for i in range(n // 3):
        delta = {"type": "input_json_delta", "partial_json": '{"city": "Paris' if i == 0 else f', "k{i}": "v{i}"'}
        events.append(_anthropic_event({"type": "content_block_delta", "index": 1, "delta": delta}))
    events.append(_anthropic_event({"type": "content_block_stop", "index": 1}))
    stop = {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}}
    events.append(_anthropic_event({**stop, "usage": {"output_tokens": n}}))
    events.append(_anthropic_event({"type": "message_stop"}))
    return events


def openai_stream(n: int) -> list[bytes]:
    def chunk(delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
        payload = {
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion.chunk",
            "created": 1741570283,
            "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "system_fingerprint": "fp_eb9dce56a8",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": WORDS[i % len(WORDS)]}) for i in range(n)]
    call = {"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function"}
    events.append(chunk({"tool_calls": [{**call, "function": {"name": "get_weather", "arguments": ""}}]}))
    for i in range(n // 3):
        fragment = '{"city": "Paris' if i == 0 else f', "k{i}": "v{i}"'
        events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}))
    events.append(chunk({}, "tool_calls"))
    usage = {"prompt_tokens": 1200, "completion_tokens": n, "total_tokens": 1200 + n}
    events.append(b"data: " + orjson.dumps({"id": "chatcmpl-B9", "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def gemini_stream(n: int) -> list[bytes]:
    """A ``streamGenerateContent?alt=sse`` stream as Gemini frames it: each event a whole
    ``GenerateContentResponse`` with the usage so far, calls whole, CRLF event ends."""
    common = {"modelVersion": "gemini-2.5-flash", "responseId": "pBXzaJ2hM9XkxN8PqfTtwQ4"}
    running = {
        "promptTokenCount": 1200,
        "totalTokenCount": 1200,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}],
    }

    def chunk(parts: list[dict[str, object]], finish: str | None = None, usage: object = running) -> bytes:
        candidate: dict[str, object] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish is not None:
            candidate["finishReason"] = finish
        return b"data: " + orjson.dumps({"candidates": [candidate], "usageMetadata": usage, **common}) + b"\r\n\r\n"

    events = [chunk([{"text": WORDS[i % len(WORDS)]}]) for i in range(n)]
    events.append(chunk([{"functionCall": {"name": "get_weather", "args": {"city": "Paris", "unit": "C"}}}]))
    final = {"promptTokenCount": 1200, "candidatesTokenCount": n, "thoughtsTokenCount": 40, "totalTokenCount": 1240 + n}
    events.append(chunk([{"text": ""}], "STOP", final))
    return events


def bedrock_stream(n: int) -> list[bytes]:
    """A ConverseStream as Bedrock frames it: binary event-stream messages (``p`` padding included)."""

    def frame(name: str, payload: dict[str, object]) -> bytes:
        return encode_frame(name, orjson.dumps(payload))

    events = [frame("messageStart", {"role": "assistant", "p": "abcdefgh"})]
    events += [
        frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": WORDS[i % len(WORDS)]}, "p": "abcdef"})
        for i in range(n)
    ]
    events.append(frame("contentBlockStop", {"contentBlockIndex": 0}))
    start = {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather"}}
    events.append(frame("contentBlockStart", {"contentBlockIndex": 1, "start": start}))
    events += [
        frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"ci'}}})
        for _ in range(n // 3)
    ]
    events.append(frame("contentBlockStop", {"contentBlockIndex": 1}))
    events.append(frame("messageStop", {"stopReason": "tool_use"}))
    usage = {"inputTokens": 1200, "outputTokens": n, "totalTokens": 1200 + n}
    events.append(frame("metadata", {"usage": usage, "metrics": {"latencyMs": 900}}))
    return events


def frame_runs(frames: list[bytes], make: Callable[[], EventTranslator]) -> dict[str, Callable[[], None]]:
    """Pass-through and translate for binary frames read 8 at a time: decode (botocore), split, parse, feed."""
    reads = [b"".join(frames[i : i + 8]) for i in range(0, len(frames), 8)]
    sink: list[bytes] = []

    def passthrough() -> None:
        forward = sink.append
        for raw in frames:
            forward(raw)
        sink.clear()

    def translate() -> None:
        decoder = EventStreamDecoders()()
        translator = make()
        last = len(reads) - 1
        for i, read in enumerate(reads):
            for raw in split_events(decoder.feed(read, i == last)):
                event, data = parse_event(raw)
                sink.append(translator.feed(event, data))
        sink.append(translator.finish())
        sink.clear()

    return {"pass-through": passthrough, "translate": translate}


def event_runs(events: list[bytes], make: Callable[[], EventTranslator]) -> dict[str, Callable[[], None]]:
    """Pass-through, parse only, and translate (parse then feed, finish once) for SSE events."""
    sink: list[bytes] = []

    def passthrough() -> None:
        forward = sink.append
        for raw in events:
            forward(raw)
        sink.clear()

    def parse_only() -> None:
        for raw in events:
            sink.append(parse_event(raw).data)
        sink.clear()

    def translate() -> None:
        translator = make()
        for raw in events:
            event, data = parse_event(raw)
            sink.append(translator.feed(event, data))
        sink.append(translator.finish())
        sink.clear()

    return {"pass-through": passthrough, "parse only": parse_only, "translate": translate}


def best_of(repeat: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - start)
    return best


def cases(n: int) -> list[tuple[str, int, dict[str, Callable[[], None]]]]:
    """Every direction: (title, events per stream, the runs)."""
    request = {"model": "gpt-x", "input": "weather?", "stream": True}
    codec = BedrockCodec()
    anthropic, openai, gemini, bedrock = anthropic_stream(n), openai_stream(n), gemini_stream(n), bedrock_stream(n)

    def chat_to_responses(model: str) -> ChatStreamToResponsesStream:
        return ChatStreamToResponsesStream(request=request, response_id="resp_1", model=model)

    table: list[tuple[str, list[bytes], Callable[..., dict[str, Callable[[], None]]], Callable[[], EventTranslator]]]
    table = [
        (
            "Anthropic -> OpenAI (MessagesStreamToChatStream)",
            anthropic,
            event_runs,
            lambda: MessagesStreamToChatStream(model="gpt-4o", include_usage=True),
        ),
        (
            "OpenAI -> Anthropic (ChatStreamToMessagesStream)",
            openai,
            event_runs,
            lambda: ChatStreamToMessagesStream(model="claude-sonnet-4-5"),
        ),
        (
            "Chat -> Responses (ChatStreamToResponsesStream)",
            openai,
            event_runs,
            lambda: chat_to_responses("gpt-4o"),
        ),
        (
            "Anthropic -> Responses (ChainedStream: Messages -> Chat -> Responses)",
            anthropic,
            event_runs,
            lambda: ChainedStream(
                MessagesStreamToChatStream(model="claude", include_usage=True), chat_to_responses("claude")
            ),
        ),
        (
            "Gemini -> OpenAI (GeminiStreamDecoder)",
            gemini,
            event_runs,
            lambda: GeminiStreamDecoder(model="gemini-2.5-flash", include_usage=True),
        ),
        (
            "Gemini -> Anthropic (ChainedStream: Gemini -> Chat -> Messages)",
            gemini,
            event_runs,
            lambda: ChainedStream(
                GeminiStreamDecoder(model="gemini", include_usage=True), ChatStreamToMessagesStream(model="gemini")
            ),
        ),
        (
            "Gemini -> Responses (ChainedStream: Gemini -> Chat -> Responses)",
            gemini,
            event_runs,
            lambda: ChainedStream(GeminiStreamDecoder(model="gemini", include_usage=True), chat_to_responses("gemini")),
        ),
        (
            "Bedrock -> Anthropic (event stream -> Messages, messages_native)",
            bedrock,
            frame_runs,
            lambda: ConverseStreamToMessagesStream(model="claude"),
        ),
        (
            "Bedrock -> OpenAI (event stream -> Chat, BedrockCodec)",
            bedrock,
            frame_runs,
            lambda: codec.stream_decoder(model="claude", include_usage=True),
        ),
        (
            "Bedrock -> Responses (event stream -> Chat -> Responses)",
            bedrock,
            frame_runs,
            lambda: ChainedStream(
                codec.stream_decoder(model="claude", include_usage=True), chat_to_responses("claude")
            ),
        ),
    ]
    return [(title, len(events), runs(events, make)) for title, events, runs, make in table]


def instructions(case: str, run: str, times: int, n: int) -> int:
    """Callgrind's instruction count of this script running ``run`` of ``case`` ``times`` times (after one warm run)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/cg.out",
            sys.executable,
            __file__,
            "--events",
            str(n),
            "--child",
            case,
            run,
            str(times),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise SystemExit(f"no callgrind total for {case!r}: {done.stderr[-500:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=600, help="text deltas per stream (default 600)")
    parser.add_argument("--repeat", type=int, default=200, help="runs per measurement (default 200)")
    parser.add_argument("--only", default="", help="only the directions whose title holds this text")
    parser.add_argument(
        "--ir",
        action="store_true",
        help="callgrind instructions per event instead of time (load-independent): each run counted"
        " as the difference between 6 and 1 runs in a process, so imports and warm-up cancel out",
    )
    parser.add_argument("--child", nargs=3, metavar=("CASE", "RUN", "TIMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, run, times = args.child
        runs = next(runs for title, _, runs in cases(args.events) if title == case)
        for _ in range(int(times) + 1):
            runs[run]()
        return
    for title, n, runs in cases(args.events):
        if args.only not in title:
            continue
        if args.ir:
            figures = {
                run: (instructions(title, run, 6, args.events) - instructions(title, run, 1, args.events)) / (5 * n)
                for run in runs
            }
            unit, header, digits = "Ir", "callgrind", 0
        else:
            figures = {run: best_of(args.repeat, call) / n / 1000 for run, call in runs.items()}
            unit, header, digits = "µs", f"best of {args.repeat}", 2
        print(f"{title}  ({n} events, {header})")
        for run, value in figures.items():
            over = value - figures["pass-through"]
            extra = f"   (+{over:.{digits}f} over pass-through)" if run == "translate" else ""
            print(f"  {run:<16} {value:9.{digits}f} {unit}/event{extra}")


if __name__ == "__main__":
    main()
