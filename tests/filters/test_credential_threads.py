"""A reload (and shutdown) stops the credential refresh threads of the Bedrock and Vertex adapters.

Each provider without static credentials resolves and refreshes them in a
thread of its own; the routing factory's ``close`` stops them, so a reload
that replaces the routing table leaves no thread behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from llmproxy.mock import MockServer
from llmproxy.runtime.config import parse_config
from tests.support import RunningProxy

Make = Callable[[dict[str, Any]], RunningProxy]


def _bedrock(mock: MockServer) -> dict[str, Any]:
    # no keys: the standard AWS chain, here from the environment (set below)
    return {"type": "bedrock", "region": "us-east-1", "base_url": f"http://127.0.0.1:{mock.port}"}


def _vertex(mock: MockServer) -> dict[str, Any]:
    # no access_token: google-auth in a thread (the missing file fails it, and it tries again)
    return {
        "type": "vertex",
        "project": "p",
        "region": "us-east5",
        "base_url": f"http://127.0.0.1:{mock.port}",
        "credentials_file": "/nonexistent/service-account.json",
    }


def _config(entry: dict[str, Any], stamp: str) -> dict[str, Any]:
    provider = {"name": f"p-{stamp}", "models": {"m": "m"}, **entry}
    return {"filters": [{"name": "routing", "config": {"providers": [provider]}}]}


def _threads(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name and t.is_alive())


def _settles(name: str, count: int) -> bool:
    deadline = time.monotonic() + 5
    while _threads(name) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    return _threads(name) == count


@pytest.mark.parametrize(
    ("entry", "thread"),
    [(_bedrock, "llmproxy-aws-credentials"), (_vertex, "llmproxy-google-credentials")],
)
def test_a_reload_leaves_no_extra_credential_thread(
    mock: MockServer, make_proxy: Make, monkeypatch: pytest.MonkeyPatch, entry: Any, thread: str
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTHREADTEST000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "thread-test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    before = _threads(thread)
    proxy = make_proxy(_config(entry(mock), "one"))
    assert _settles(thread, before + 1)
    for stamp in ("two", "three"):
        assert proxy.thread.call(proxy.proxy.reload(parse_config(_config(entry(mock), stamp), "reloaded.yaml")))
        assert _settles(thread, before + 1)  # the new table's thread runs, the old one ended
