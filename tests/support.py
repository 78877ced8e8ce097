"""Test support: run the proxy and the mock provider on a background event loop.

The proxy and the mock run on one uvloop in a daemon thread, so tests can use
blocking clients (the official SDKs' sync clients, raw sockets) against real
loopback sockets.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from llmproxy.runtime.app import Proxy
from llmproxy.runtime.config import parse_config

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-loop")
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class RunningProxy:
    """A started :class:`Proxy` on the loop thread."""

    def __init__(self, thread: LoopThread, proxy: Proxy) -> None:
        self.thread = thread
        self.proxy = proxy
        self.port = proxy.port
        self.url = f"http://127.0.0.1:{proxy.port}"

    @property
    def runtime(self) -> Any:
        return self.proxy.runtime

    def stop(self, grace: float = 2.0) -> None:
        self.thread.call(self.proxy.shutdown(grace))


def start_proxy(thread: LoopThread, config: dict[str, Any]) -> RunningProxy:
    """Validate ``config`` (a conf.yaml mapping) and start a proxy on a free port."""
    cfg = parse_config(config, "test-config.yaml")
    proxy = Proxy(cfg)
    thread.call(proxy.start("127.0.0.1", 0))
    return RunningProxy(thread, proxy)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes and return everything read until the peer closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def talk(port: int, data: bytes, shut: bool = False, timeout: float = 3.0) -> tuple[bytes, bool, float]:
    """Send ``data`` (then FIN if ``shut``); return what came back, whether the peer
    closed the connection within ``timeout``, and how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        closed = False
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    return b"".join(chunks), closed, time.monotonic() - started


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    return int(response.split(b" ", 2)[1])


def wait_healthy(
    port: int,
    proc: subprocess.Popen[str],
    early_exit_output: Callable[[], str],
    what: str = "proxy",
    timeout: float = 20,
) -> None:
    """Wait until a proxy started as a subprocess answers ``/healthz``.

    Raises AssertionError with ``early_exit_output()`` if the process exits
    first, or when ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited early:\n{early_exit_output()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not become healthy")
