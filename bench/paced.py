"""Streams paced like a real model: time to first byte and per-event delay.

One client, one request at a time (concurrency 1), on a keep-alive
connection. The mock is asked, per request, for a first content token after
``ttft`` ms and one more every ``itl`` ms (``x-mock-ttft-ms``,
``x-mock-itl-ms``, ``x-mock-tokens``). For each stream the client records,
relative to the moment the request was sent:

* ``ttfb``: the first ``data:`` byte (the mock sends its role chunk at once,
  so this is the cost of the round trip and of the response head);
* ``first_token``: the first event with non-empty ``content`` (~``ttft``);
* the arrival of every content event, and from it the *lag* of content
  event *i*: ``arrival - (ttft + i * itl)``, i.e. how late it is against
  the mock's own schedule, and the gaps between consecutive events.

Through the proxy minus direct, the lag is the time the proxy adds to each
event; the gap difference shows whether that delay accumulates.
"""

from __future__ import annotations

import math
import re
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from wire import Endpoint, ProtocolError, ResponseParser

__all__ = ["PacedClient", "StreamTiming", "summarize"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_CONTENT = re.compile(rb'"content"\s*:\s*"[^"]')


@dataclass
class StreamTiming:
    """Arrival times (seconds after the send) of one stream's parts."""

    ttfb: float
    first_token: float
    content_times: list[float] = field(default_factory=list)
    events: int = 0
    status: int = 0


class PacedClient:
    """A keep-alive SSE client that timestamps every event as it arrives."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.endpoint.host, self.endpoint.port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def measure(self, request: bytes) -> StreamTiming:
        """Send one streaming request and time its events; raises on a broken reply."""
        sock = self._connect()
        parser = ResponseParser(keep_body=True)
        t0 = time.monotonic()
        sock.sendall(request)
        ttfb = first_token = -1.0
        content: list[float] = []
        events = 0
        scanned = 0
        done = False
        while not done:
            data = sock.recv(65536)
            now = time.monotonic() - t0
            done = parser.feed(data) if data else parser.eof()
            if not data and not done:
                self.close()
                raise ProtocolError("connection closed mid-stream")
            body = parser.body
            if ttfb < 0 and b"data:" in body:
                ttfb = now
            while (m := _EVENT_END.search(body, scanned)) is not None:
                event = bytes(body[scanned : m.start()])
                scanned = m.end()
                events += 1
                if _CONTENT.search(event):
                    if first_token < 0:
                        first_token = now
                    content.append(now)
        if not parser.keep_alive:
            self.close()
        return StreamTiming(ttfb, first_token, content, events, parser.status)


def _p(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (seconds in, ms out)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[min(rank, len(ordered)) - 1] * 1000, 3)


def summarize(timings: list[StreamTiming], ttft_s: float, itl_s: float) -> dict[str, Any]:
    """Percentiles in ms of TTFB, first token, per-event lag and inter-event gap."""
    lags: list[float] = []
    gaps: list[float] = []
    for t in timings:
        for i, arrival in enumerate(t.content_times):
            lags.append(arrival - (ttft_s + i * itl_s))
        gaps += [b - a for a, b in zip(t.content_times, t.content_times[1:], strict=False)]
    ttfb = [t.ttfb for t in timings]
    first = [t.first_token for t in timings]
    return {
        "streams": len(timings),
        "events_per_stream": int(statistics.median(t.events for t in timings)) if timings else 0,
        "ttfb_p50": _p(ttfb, 50),
        "ttfb_p90": _p(ttfb, 90),
        "first_token_p50": _p(first, 50),
        "event_lag_p50": _p(lags, 50),
        "event_lag_p99": _p(lags, 99),
        "event_lag_mean": round(statistics.fmean(lags) * 1000, 3) if lags else None,
        "gap_mean": round(statistics.fmean(gaps) * 1000, 3) if gaps else None,
        "gap_p99": _p(gaps, 99),
    }
