"""The ``ratelimit`` filter's plain-call path on the memory store, and its compiled templates.

On the memory store an exchange's admission and settlement are plain calls
(:meth:`llmproxy.SharedStore.reserve_now` / ``settle_now``): no coroutine of
the store's is awaited. The templates the filter compiles per principal,
model, provider and header values must keep counters apart exactly as the
rules say (a header-keyed rule: one counter per value; a header-matched rule:
only the requests that match). And a plain hook that returns a coroutine for
its slow path is awaited in every hook the chain runs.
"""

from __future__ import annotations

from typing import Any

import pytest

from llmproxy import Attempt, Exchange, Filter, FilterFactory
from llmproxy.mock import MockServer
from llmproxy.testing import ChainHarness, ScriptedReply

from .test_ratelimit import HI, MODEL, Make, call, factory_of, rl_config, used


def _chat(port: int, headers: dict[str, str]) -> int:
    return call(port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI}, headers).status


def test_memory_store_admits_and_settles_without_its_coroutines(
    mock: MockServer, make_proxy: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {"rules": [{"name": "all", "key": [], "rpm": 100, "tpm": 100_000, "concurrent": 10}]}
    proxy = make_proxy(rl_config(mock.port, config, {"alice": {}}))
    store = factory_of(proxy).store
    assert store.in_process

    async def refused(*args: Any) -> Any:
        raise AssertionError("the memory store's coroutine was used")

    monkeypatch.setattr(store, "reserve", refused)
    monkeypatch.setattr(store, "settle", refused)
    for _ in range(3):
        assert _chat(proxy.port, {"x-test-principal": "alice"}) == 200
    monkeypatch.undo()
    assert used(proxy.thread, store, "all|rpm") == 3
    assert used(proxy.thread, store, "all|conc", factory_of(proxy).concurrent_hold) == 0  # settled: slots back


def test_header_keyed_rule_keeps_one_counter_per_value(mock: MockServer, make_proxy: Make) -> None:
    config = {"rules": [{"name": "tenant", "key": ["header:x-tenant"], "rpm": 2}]}
    proxy = make_proxy(rl_config(mock.port, config, {"alice": {}}))
    a = {"x-test-principal": "alice", "x-tenant": "a"}
    b = {"x-test-principal": "alice", "x-tenant": "b"}
    assert [_chat(proxy.port, a) for _ in range(3)] == [200, 200, 429]
    assert [_chat(proxy.port, b) for _ in range(2)] == [200, 200]  # its own counter, template cached or not
    assert _chat(proxy.port, {"x-test-principal": "alice"}) == 200  # no value: the rule does not apply


def test_header_matched_rule_applies_to_matching_requests_only(mock: MockServer, make_proxy: Make) -> None:
    config = {"rules": [{"name": "gold", "match": {"headers": {"x-tier": "gold"}}, "key": [], "rpm": 1}]}
    proxy = make_proxy(rl_config(mock.port, config, {"alice": {}}))
    gold = {"x-test-principal": "alice", "x-tier": "gold"}
    silver = {"x-test-principal": "alice", "x-tier": "silver"}
    assert [_chat(proxy.port, gold) for _ in range(2)] == [200, 429]
    assert [_chat(proxy.port, silver) for _ in range(3)] == [200, 200, 200]
    assert _chat(proxy.port, gold) == 429


class _LateFilter(Filter):
    """Plain completion hooks that return a coroutine (a slow path), as the ratelimit filter's do."""

    factory: _LateFactory

    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> Any:
        return self._note("attempt")

    def on_exchange_complete(self, exchange: Exchange) -> Any:
        return self._note("exchange")

    async def _note(self, hook: str) -> None:
        self.factory.seen.append(hook)


class _LateFactory(FilterFactory):
    filter_class = _LateFilter

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: list[str] = []


def test_plain_completion_hook_returning_a_coroutine_is_awaited() -> None:
    with ChainHarness([_LateFactory]) as h:
        h.reply(ScriptedReply(json={"ok": True}))
        r = h.send("POST", "/v1/chat/completions", json={"model": "m"})
        assert r.status == 200
        factory = h.chain.factories[0]
        assert isinstance(factory, _LateFactory)
        assert factory.seen == ["attempt", "exchange"]
