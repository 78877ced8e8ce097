"""The ``ratelimit`` filter's cost on Redis: one round trip at admission, one at settlement.

Issue 13's speed rule, counted on a real ``redis-server`` with ``INFO
commandstats`` before and after: a proxy with the real ``auth`` filter (a
virtual key with its own limits and budgets), ``metering``, ``routing`` and
``ratelimit`` (a filter-wide rule too) sends, once warm (scripts loaded,
connections open), exactly one ``EVALSHA`` at admission and one at
settlement per exchange, and no other command: no ``GET``, no ``SCRIPT
LOAD``, no ``EVAL``.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from typing import Any

import openai
import pytest

from llmproxy.mock import MockServer

from ..redis_server import REDIS_SERVER, SKIP_REASON
from .test_failover_redis import RedisServer, redis_server
from .test_ratelimit import HI, KGOOD, MODEL, Make

__all__ = ["redis_server"]

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

KEY = "sk-rt-alice"


def _config(mock_port: int, store: str, budgets: Any) -> dict[str, Any]:
    provider = {
        "name": "p",
        "type": "openai",
        "base_url": f"http://127.0.0.1:{mock_port}/v1",
        "keys": [KGOOD],
        "models": {MODEL: "mock-gpt"},
    }
    entry = {"name": "alice", "key": KEY, "team": "t", "limits": {"rpm": 1000, "tpm": 1_000_000}, "budgets": budgets}
    rules = [{"name": "per-team", "key": ["team"], "rpm": 1000, "tpm": 1_000_000, "concurrent": 50}]
    return {
        "server": {"access_log": "off"},
        "store": store,
        "filters": [
            {"name": "auth", "config": {"keys": [entry]}},
            {"name": "metering"},
            {"name": "routing", "config": {"providers": [provider]}},
            {"name": "ratelimit", "config": {"rules": rules}},
        ],
    }


class Monitor:
    """``MONITOR`` on a raw connection of its own: every command clients send, in a thread.

    Commands a Lua script runs are shown as ``[0 lua]``; they are not round trips and are left out.
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("redis://").split("/")[0].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[bytes] = []
        self._buf = b""
        self._stop = False
        assert self._line() == b"+OK"
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _run(self) -> None:
        while not self._stop:
            try:
                self.lines.append(self._line())
            except TimeoutError:
                continue
            except (EOFError, OSError):
                return

    def commands(self) -> list[str]:
        """The client commands seen so far (names, lower case), scripts' own commands left out."""
        out = []
        for line in list(self.lines):
            match = re.match(rb'\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"', line)
            if match and match[1] != b"lua":
                out.append(match[2].decode().lower())
        return out

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


#: What redis-py sends when it opens a pooled connection.
_CONNECTION_SETUP = frozenset({"hello", "client", "select"})


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_one_evalsha_at_admission_and_one_at_settlement(
    redis_server: RedisServer, mock: MockServer, make_proxy: Make, stream: bool
) -> None:
    budgets = [{"tokens": 1_000_000, "period": "day"}, {"usd": 1000, "period": "month"}]
    proxy = make_proxy(_config(mock.port, redis_server.url, budgets))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=15)

    def one() -> None:
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=MODEL, messages=HI, max_tokens=20, stream=True, stream_options={"include_usage": True}
                )
            )
            assert chunks and chunks[-1].usage is not None
        else:
            reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20)
            assert reply.usage is not None

    for _ in range(3):  # warm: scripts loaded, pooled connections open
        one()
    time.sleep(0.3)  # the last warm-up settles
    monitor = Monitor(redis_server.url)
    try:
        n = 10
        for _ in range(n):
            one()
        deadline = time.monotonic() + 5
        while len(monitor.commands()) < 2 * n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # anything extra would show by now
        commands = monitor.commands()
    finally:
        monitor.close()
    # One EVALSHA to reserve, one to settle (the metered usage differs from the estimate), nothing
    # else. A settlement can overlap the next request's admission (the client has its last byte
    # before the settle is sent), so the pool may open one more connection: its handshake
    # (HELLO, CLIENT SETINFO) is per connection, not per request, and is left out.
    per_request = [c for c in commands if c not in _CONNECTION_SETUP]
    assert per_request == ["evalsha"] * (2 * n), commands
    assert commands.count("hello") <= 1, commands
