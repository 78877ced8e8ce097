"""Shared fixtures: a background loop, the mock provider and proxies on real sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmproxy.mock import MockConfig, MockServer, start_mock

from .support import LoopThread, RunningProxy, start_proxy


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def mock(loop_thread: LoopThread) -> Iterator[MockServer]:
    """A fresh mock provider on a free loopback port."""
    server = loop_thread.call(start_mock("127.0.0.1", 0, MockConfig()))
    yield server
    loop_thread.call(server.close())


@pytest.fixture
def make_proxy(loop_thread: LoopThread) -> Iterator[Callable[[dict[str, Any]], RunningProxy]]:
    """Start proxies from config mappings; all are shut down after the test."""
    started: list[RunningProxy] = []

    def make(config: dict[str, Any]) -> RunningProxy:
        running = start_proxy(loop_thread, config)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop(0.5)


@pytest.fixture
def proxy(mock: MockServer, make_proxy: Callable[[dict[str, Any]], RunningProxy]) -> RunningProxy:
    """A proxy with an empty chain in front of ``mock``."""
    return make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "server": {"access_log": "off"}})
