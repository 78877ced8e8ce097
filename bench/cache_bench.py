"""Cache hit latency vs the mock provider's direct reply (issue 18: a hit must be faster).

Not a test, and a wall-clock benchmark: run it on a quiet machine.
``python bench/cache_bench.py [--requests N] [--tokens T] [--json out.json] [--smoke]``

Starts, in this process on one background uvloop thread, the mock provider
(``--tokens`` content words per reply, no pacing) and a proxy with
``routing`` + ``cache`` in front of it; then, sequentially on one keep-alive
connection each, with a small blocking raw-socket client:

* ``direct``: the mock's own reply to ``POST /v1/chat/completions``;
* ``hit``: the same request through the proxy, after one warm-up miss, so
  every measured request is ``x-llmproxy-cache: hit`` (checked);

for a JSON reply and a stream (``"stream": true``). Prints p50/p90/p99 and
mean in microseconds per request and writes them as JSON with ``--json``.
``--smoke`` runs 50 requests per phase (seconds, for CI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmproxy.mock import MockConfig, start_mock
from llmproxy.runtime.app import Proxy
from llmproxy.runtime.config import parse_config


class _Loop:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


class _Client:
    """One keep-alive HTTP/1.1 connection; reads a Content-Length or chunked reply whole."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def post(self, body: bytes) -> tuple[dict[str, str], bytes]:
        self.sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer sk-bench\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
        )
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")[1:]
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}
        if "content-length" in fields:
            return fields, self._take(int(fields["content-length"]))
        out = []
        while True:
            size = int(self._until(b"\r\n"), 16)
            chunk = self._take(size + 2)
            if size == 0:
                return fields, b"".join(out)
            out.append(chunk[:-2])


def _measure(port: int, body: bytes, n: int, want_hit: bool) -> list[float]:
    client = _Client(port)
    client.post(body)  # warm-up (the miss that fills the cache)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fields, _ = client.post(body)
        times.append((time.perf_counter() - start) * 1e6)
        if want_hit and fields.get("x-llmproxy-cache") != "hit":
            raise SystemExit(f"expected a hit, got {fields.get('x-llmproxy-cache')}")
    return times


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)

    def q(p: float) -> float:
        return round(times[min(len(times) - 1, int(p * len(times)))], 1)

    return {"p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "mean_us": round(statistics.fmean(times), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    n = 50 if args.smoke else args.requests
    loop = _Loop()
    mock = loop.call(start_mock("127.0.0.1", 0, MockConfig(tokens=args.tokens)))
    config = {
        "filters": [
            {
                "name": "routing",
                "config": {
                    "providers": [
                        {
                            "name": "mock",
                            "type": "openai",
                            "base_url": f"http://127.0.0.1:{mock.port}/v1",
                            "keys": ["sk-bench-provider"],
                            "models": {"bench": "mock-gpt"},
                        }
                    ]
                },
            },
            {"name": "cache", "config": {"max_entries": 16}},
        ]
    }
    proxy = Proxy(parse_config(config, "cache-bench.yaml"))
    loop.call(proxy.start("127.0.0.1", 0))
    results: dict[str, Any] = {"requests": n, "tokens": args.tokens}
    try:
        for mode, stream in (("json", False), ("stream", True)):
            body = json.dumps(
                {"model": "bench", "stream": stream, "messages": [{"role": "user", "content": "cache bench"}]}
            ).encode()
            direct = _summary(_measure(mock.port, body, n, want_hit=False))
            hit = _summary(_measure(proxy.port, body, n, want_hit=True))
            results[mode] = {"direct": direct, "hit": hit}
            print(f"{mode:6}  direct {direct}\n        hit    {hit}")
    finally:
        loop.call(proxy.shutdown(0.5))
        loop.call(mock.close())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
