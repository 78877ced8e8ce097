"""Micro-benchmark: CPU per SSE event of usage extraction, for every stream protocol.

Not a test (CPU only, one process, no sockets). Run
``python bench/usage_bench.py [--events N] [--repeat R]``.

Issue 12's target: usage extraction costs at most 1 µs per event in total,
routing's share included. What a same-protocol stream pays per event for
usage is routing's ``on_response_body`` in its watch mode (the byte check
``USAGE_OBJECT`` on every batch; the events that carry a usage object are
cut out, parsed, merged and published on the attempt) plus metering's
``on_response_body`` (it keeps the relayed bytes, counted only if the
provider reports no usage). Both are driven here directly with the real
filter classes and a minimal exchange stand-in, one event per call (the
worst case: a paced stream arrives one event per read), over:

* OpenAI Chat Completions with ``include_usage`` (``"usage": null`` in
  every chunk, the usage chunk last), the usage chunk relayed and dropped
  (the client did not ask for it);
* Anthropic Messages (usage in ``message_start`` and ``message_delta``);
* OpenAI Responses (``"usage": null`` in ``response.created``, the usage
  inside ``response.completed``).

Reported: the pass-through loop (one call per event, the floor), routing's
watch, metering's, and the two together, in µs per event over the floor.
The best of ``--repeat`` runs is kept. A translated stream parses every
event for the translator anyway; its usage share is the same byte check
plus the same parse of the usage events, so it is bounded by these figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from translate_bench import anthropic_stream, best_of, openai_stream

from llmproxy import Attempt, UpstreamTarget
from llmproxy.filters.metering.filter import MeteringFilter
from llmproxy.filters.routing.filter import RoutingFilter, _Mode
from llmproxy.filters.routing.usage import StreamUsage
from llmproxy.filters.translate import ChatStreamToResponsesStream
from llmproxy.http.sse import parse_event


class _Provider:
    name = "p"


class _Target:
    model = "gpt-4o"
    provider = _Provider()


_UPSTREAM = UpstreamTarget.from_url("p", "http://upstream.test")  # parsed once: the core's work, not timed


class _Exchange:
    """What routing's and metering's ``on_response_body`` touch on an exchange."""

    def __init__(self) -> None:
        self.vars: dict[str, Any] = {}
        self.attempt = Attempt(1, _UPSTREAM)  # the real one (the core makes it, not the filters)
        self.data: bytes | None = None

    def set_response_data(self, data: bytes) -> None:
        self.data = data


class _MeteringFactory:
    max_relayed_bytes = 8 * 1024 * 1024


def responses_stream(n: int) -> list[bytes]:
    """A Responses API stream (``response.created`` ... ``response.completed`` with usage)."""
    translator = ChatStreamToResponsesStream(
        request={"model": "gpt-4o", "input": "weather?", "stream": True}, response_id="resp_1", model="gpt-4o"
    )
    out = b"".join(translator.feed(*parse_event(raw)) for raw in openai_stream(n)) + translator.finish()
    return [event + b"\n\n" for event in out.split(b"\n\n") if event]


def _routing(protocol: str, api: str, include_usage_asked: bool) -> RoutingFilter:
    routing = RoutingFilter(None)  # type: ignore[arg-type]  # the watch path never reads the factory
    routing.api = api
    routing.client_protocol = protocol
    routing.current = _Target()  # type: ignore[assignment]
    routing._mode = _Mode.WATCH_STREAM
    routing._previous = routing._before = b""  # as _choose_mode leaves them for a new response
    routing._usage = StreamUsage(protocol)
    routing._stream = True
    routing._include_usage_asked = include_usage_asked
    return routing


def bench(name: str, events: list[bytes], protocol: str, api: str, asked: bool, repeat: int) -> float:
    """Print and return routing + metering µs per event over the floor."""
    last = len(events) - 1
    sink: list[bytes] = []

    def floor() -> None:
        forward = sink.append
        for raw in events:
            forward(raw)
        sink.clear()

    def routing_only() -> None:
        exchange = _Exchange()
        body = _routing(protocol, api, asked).on_response_body
        for i, raw in enumerate(events):
            body(exchange, raw, i == last)  # type: ignore[arg-type]
        assert exchange.attempt.usage is not None, name

    def metering_only() -> None:
        exchange = _Exchange()
        body = MeteringFilter(_MeteringFactory()).on_response_body  # type: ignore[arg-type]
        for i, raw in enumerate(events):
            body(exchange, raw, i == last)  # type: ignore[arg-type]

    def both() -> None:
        exchange = _Exchange()
        route = _routing(protocol, api, asked).on_response_body
        meter = MeteringFilter(_MeteringFactory()).on_response_body  # type: ignore[arg-type]
        for i, raw in enumerate(events):
            end = i == last
            route(exchange, raw, end)  # type: ignore[arg-type]
            meter(exchange, raw, end)  # type: ignore[arg-type]

    n = len(events)
    base = best_of(repeat, floor) / n / 1000
    routing = best_of(repeat, routing_only) / n / 1000 - base
    metering = best_of(repeat, metering_only) / n / 1000 - base
    total = best_of(repeat, both) / n / 1000 - base
    usage_events = sum(1 for raw in events if b'"usage":{' in raw)
    print(f"{name}  ({n} events, {usage_events} with usage, best of {repeat})")
    print(f"  floor (a call per event)  {base:6.3f} µs/event")
    print(f"  routing usage watch      +{routing:6.3f} µs/event")
    print(f"  metering relayed bytes   +{metering:6.3f} µs/event")
    print(f"  both                     +{total:6.3f} µs/event   (target <= 1 µs)")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=50, help="text deltas per stream (default 50)")
    parser.add_argument("--repeat", type=int, default=2000, help="runs per measurement (default 2000)")
    args = parser.parse_args()
    n, r = args.events, args.repeat
    worst = max(
        bench("OpenAI chat, include_usage asked (usage chunk relayed)", openai_stream(n), "openai", "chat", True, r),
        bench("OpenAI chat, usage chunk injected and dropped", openai_stream(n), "openai", "chat", False, r),
        bench("Anthropic (message_start, message_delta)", anthropic_stream(n), "anthropic", "messages", True, r),
        bench("OpenAI Responses (response.completed)", responses_stream(n), "openai", "responses", True, r),
    )
    print(f"worst: +{worst:.3f} µs/event")


if __name__ == "__main__":
    main()
