"""Stored bridged responses shared through a real ``redis-server``: a response made through one
proxy is continued (``previous_response_id``), read and deleted through another; another
principal never sees it; a Redis outage is a 503 for the follow-up, never a wrong answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from llmproxy.mock import MockServer
from tests.support import RunningProxy

from ..redis_server import redis_url

__all__ = ["redis_url"]  # re-exported so pytest sees the fixture in this module

Make = Callable[[dict[str, Any]], RunningProxy]


def _config(port: int, store: str) -> dict[str, Any]:
    provider = {
        "name": "an",
        "type": "anthropic",
        "base_url": f"http://127.0.0.1:{port}",
        "keys": ["sk-an"],
        "models": {"claude-x": "mock-claude"},
    }
    return {
        "store": store,
        "filters": [
            {
                "name": "tests.filters_for_tests:PrincipalByHeaderFactory",
                "config": {"principals": {"alice": {}, "bob": {}}},
            },
            {"name": "routing", "config": {"providers": [provider], "responses": {"ttl": 60}}},
        ],
    }


def _client(proxy: RunningProxy, who: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key="sk-client",
        max_retries=0,
        timeout=10,
        default_headers={"x-test-principal": who},
    )


def test_two_proxies_share_stored_responses(mock: MockServer, make_proxy: Make, redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/7"
    one = make_proxy(_config(mock.port, url))
    two = make_proxy(_config(mock.port, url))
    first = _client(one).responses.create(
        model="claude-x", input="my name is Ada", extra_headers={"x-mock-tokens": "2"}
    )
    follow = _client(two).responses.create(model="claude-x", input="my name?", previous_response_id=first.id)
    assert follow.status == "completed"
    sent = mock.requests[-1].body
    assert sent is not None
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert _client(two).responses.retrieve(first.id).output_text == first.output_text
    # bob cannot see, continue or delete alice's response
    with pytest.raises(openai.NotFoundError):
        _client(two, "bob").responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError):
        _client(two, "bob").responses.create(model="claude-x", input="x", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        _client(one, "bob").responses.delete(first.id)
    _client(one).responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        _client(two).responses.retrieve(first.id)


def test_store_down_is_a_503_for_the_follow_up(mock: MockServer, make_proxy: Make) -> None:
    from ..redis_server import REDIS_SERVER, SKIP_REASON, start_redis_server, stop_redis_server

    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    proc, url = start_redis_server()
    try:
        proxy = make_proxy(_config(mock.port, url))
        client = _client(proxy)
        first = client.responses.create(model="claude-x", input="hello")
        assert client.responses.retrieve(first.id).id == first.id
    finally:
        stop_redis_server(proc)
    with pytest.raises(openai.InternalServerError) as err:
        client.responses.create(model="claude-x", input="again", previous_response_id=first.id)
    assert err.value.status_code == 503
    with pytest.raises(openai.InternalServerError):
        client.responses.retrieve(first.id)
    # a new response is still answered (just not kept) while the store is down
    assert client.responses.create(model="claude-x", input="hello").status == "completed"
