"""Filters used by the tests, loaded by dotted path (``tests.filters_for_tests:Name``)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from typing import Any, ClassVar

from llmproxy import Action, Attempt, Exchange, FactoryContext, Filter, FilterFactory, Principal, UpstreamTarget
from llmproxy.filters.names import PRINCIPAL
from llmproxy.http.sse import parse_event

#: What hooks ran, across every exchange, as (tag, hook, request id).
CALLS: list[tuple[str, str, str]] = []


class RecorderFilter(Filter):
    factory: RecorderFactory

    def _note(self, ex: Exchange, hook: str) -> None:
        CALLS.append((self.factory.config.get("tag", self.factory.name), hook, ex.id))

    def on_request_headers(self, exchange: Exchange) -> Action:
        self._note(exchange, "request_headers")
        return Action.CONTINUE

    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action:
        self._note(exchange, "request_body")
        return Action.CONTINUE

    def on_response_headers(self, exchange: Exchange) -> Action:
        self._note(exchange, "response_headers")
        return Action.CONTINUE

    def on_exchange_complete(self, exchange: Exchange) -> None:
        self._note(exchange, "complete:" + (exchange.error.code or "") if exchange.error else "complete")


class RecorderFactory(FilterFactory):
    filter_class = RecorderFilter


class ObserverFilter(Filter):
    """Observes response events without delaying them; records arrival times."""

    mutates_response_body = False
    factory: ObserverFactory

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        self.factory.seen.append((asyncio.get_running_loop().time(), data, end_of_stream))
        return Action.CONTINUE


class ObserverFactory(FilterFactory):
    filter_class = ObserverFilter
    instances: ClassVar[list[ObserverFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.seen: list[tuple[float, bytes, bool]] = []
        ObserverFactory.instances.append(self)


class ReplaceBodyFilter(Filter):
    """Holds the whole (non-SSE) response and replaces it with a fixed body."""

    def on_response_headers(self, exchange: Exchange) -> Action:
        return Action.PAUSE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        if not end_of_stream:
            return Action.PAUSE
        exchange.set_response_data(b'{"replaced":true,"original_bytes":%d}' % len(data))
        return Action.CONTINUE


class ReplaceBodyFactory(FilterFactory):
    filter_class = ReplaceBodyFilter


class UpperUnlessSkippedFilter(Filter):
    """Upper-cases the response body, unless the request says ``x-skip-body`` (then it opts out)."""

    factory: UpperUnlessSkippedFactory

    def on_response_headers(self, exchange: Exchange) -> Action:
        if "x-skip-body" in exchange.request.headers:
            exchange.skip_response_body(self)
        return Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        self.factory.calls += 1
        exchange.set_response_data(data.upper())
        return Action.CONTINUE


class UpperUnlessSkippedFactory(FilterFactory):
    filter_class = UpperUnlessSkippedFilter
    instances: ClassVar[list[UpperUnlessSkippedFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.calls = 0
        UpperUnlessSkippedFactory.instances.append(self)


class FirstEventOnlyFilter(Filter):
    """Looks at the first SSE event only, then opts out of the rest of the body."""

    factory: FirstEventOnlyFactory

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        self.factory.seen.append(data)
        exchange.skip_response_body(self)
        return Action.CONTINUE


class FirstEventOnlyFactory(FilterFactory):
    filter_class = FirstEventOnlyFilter
    instances: ClassVar[list[FirstEventOnlyFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.seen: list[bytes] = []
        FirstEventOnlyFactory.instances.append(self)


class SseRewriteFilter(Filter):
    """Uppercases content events, drops the [DONE] event, injects one at the end.

    Records every event it saw, to prove it saw whole events only.
    """

    factory: SseRewriteFactory

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        # the last event may come with end_of_stream (the contract: data at the end may be empty)
        out = b""
        if data:
            self.factory.events.append(data)
            if parse_event(data).data != b"[DONE]":
                out = data.replace(b"token", b"TOKEN")
        if end_of_stream:
            out += b'event: injected\ndata: {"by":"filter"}\n\n'
        exchange.set_response_data(out)
        return Action.CONTINUE


class SseRewriteFactory(FilterFactory):
    filter_class = SseRewriteFilter
    instances: ClassVar[list[SseRewriteFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.events: list[bytes] = []
        SseRewriteFactory.instances.append(self)


class BatchRecorderFilter(Filter):
    """Takes batches of whole SSE events (``sse_batches``); records each call's data, passes it on."""

    factory: BatchRecorderFactory
    sse_batches = True

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        if data:
            self.factory.calls.append(data)
        return Action.CONTINUE


class BatchRecorderFactory(FilterFactory):
    filter_class = BatchRecorderFilter
    instances: ClassVar[list[BatchRecorderFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.calls: list[bytes] = []
        BatchRecorderFactory.instances.append(self)


class RetryElsewhereFilter(Filter):
    """On an error status or upstream failure, retry once against ``fallback_url``."""

    factory: RetryElsewhereFactory

    def on_response_headers(self, exchange: Exchange) -> Action:
        assert exchange.response is not None
        if (exchange.response.status >= 500 or exchange.response.status == 429) and exchange.attempts < 2:
            exchange.upstream = self.factory.fallback
            exchange.request.headers.remove("x-mock-status")
            exchange.request.headers.remove("x-mock-fault")
            exchange.retry()
        exchange.response.headers.set("x-attempts", str(exchange.attempts))
        return Action.CONTINUE


class RetryElsewhereFactory(FilterFactory):
    filter_class = RetryElsewhereFilter

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.fallback = UpstreamTarget.from_url("fallback", str(config["fallback_url"]))


class HoldUntilContentFilter(Filter):
    """Holds SSE events until one carries content (as failover does), retries on a
    stream that ends before any content."""

    factory: HoldUntilContentFactory

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self.released = False

    def on_response_headers(self, exchange: Exchange) -> Action:
        if exchange.upstream_error is not None and exchange.attempts < 2:
            # the stream died before anything reached the client: try again
            exchange.request.headers.remove("x-mock-fault")
            exchange.retry()
        return Action.PAUSE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        if self.released:
            return Action.CONTINUE
        if b'"content":"' in data and b'"content":""' not in data.rsplit(b"\n\n", 2)[-2]:
            self.released = True
            return Action.CONTINUE
        if end_of_stream and exchange.attempts < 2:
            exchange.request.headers.remove("x-mock-fault")
            exchange.retry()
            return Action.CONTINUE
        return Action.PAUSE


class HoldUntilContentFactory(FilterFactory):
    filter_class = HoldUntilContentFilter


class BoomFilter(Filter):
    def on_request_headers(self, exchange: Exchange) -> Action:
        raise RuntimeError("secret internals sk-should-not-leak")


class BoomFactory(FilterFactory):
    filter_class = BoomFilter


class BoomOpenFactory(FilterFactory):
    filter_class = BoomFilter
    fail_open = True


class BlockFilter(Filter):
    """Replies 403 locally when the request has ``x-block``."""

    def on_request_headers(self, exchange: Exchange) -> Action:
        if "x-block" in exchange.request.headers:
            exchange.send_local_reply(
                403, {"error": {"message": "blocked", "type": "permission_error", "param": None, "code": "blocked"}}
            )
        return Action.CONTINUE


class BlockFactory(FilterFactory):
    filter_class = BlockFilter


class AsyncModelRewriteFilter(Filter):
    """An async body hook that changes the request JSON (model name)."""

    async def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action:
        await asyncio.sleep(0.001)
        payload = exchange.request_json()
        payload["model"] = "rewritten-" + payload["model"]
        exchange.mark_request_json_changed()
        return Action.CONTINUE


class AsyncModelRewriteFactory(FilterFactory):
    filter_class = AsyncModelRewriteFilter


class UsageRecorderFilter(Filter):
    """Records every attempt's ``attempt.usage`` (and outcome) in ``on_attempt_complete``."""

    factory: UsageRecorderFactory

    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> None:
        self.factory.attempts.append((attempt.outcome.value, attempt.usage))
        self.factory.finishes.append(attempt.finish_reasons)

    def on_exchange_complete(self, exchange: Exchange) -> None:
        self.factory.exchanges.append(exchange.usage)


class UsageRecorderFactory(FilterFactory):
    filter_class = UsageRecorderFilter
    instances: ClassVar[list[UsageRecorderFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.attempts: list[tuple[str, Any]] = []
        self.finishes: list[tuple[str, ...]] = []
        self.exchanges: list[Any] = []
        UsageRecorderFactory.instances.append(self)


class PrincipalByHeaderFilter(Filter):
    """Publishes the principal named by ``x-test-principal`` (a stand-in for the auth filter)."""

    factory: PrincipalByHeaderFactory

    def on_request_headers(self, exchange: Exchange) -> Action:
        name = exchange.request.headers.get("x-test-principal")
        principal = self.factory.principals.get(name or "")
        if principal is not None:
            exchange.vars[PRINCIPAL] = principal
        return Action.CONTINUE


class PrincipalByHeaderFactory(FilterFactory):
    """``config: {principals: {name: {team, limits, budgets}}}``."""

    filter_class = PrincipalByHeaderFilter

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.principals = {
            key: Principal(
                name=key,
                key_id=f"vk-{key}",
                team=spec.get("team"),
                limits=spec.get("limits") or {},
                budgets=spec.get("budgets") or {},
            )
            for key, spec in (config.get("principals") or {}).items()
        }


class FakeAuthFilter(Filter):
    """A stand-in for the ``auth`` filter (not on this branch), reading the same config:
    ``keys: [{name, key | key_hash, team, models, limits, budgets, metadata}]``; other keys get 401."""

    factory: FakeAuthFactory

    def on_request_headers(self, exchange: Exchange) -> Action:
        value = exchange.request.headers.get("authorization") or ""
        token = value[7:] if value.lower().startswith("bearer ") else exchange.request.headers.get("x-api-key")
        digest = "sha256:" + hashlib.sha256((token or "").encode()).hexdigest()
        principal = self.factory.by_hash.get(digest)
        if principal is None:
            exchange.send_local_reply(
                401, {"error": {"message": "invalid key", "type": "invalid_request_error", "code": "invalid_api_key"}}
            )
            return Action.CONTINUE
        exchange.vars[PRINCIPAL] = principal
        return Action.CONTINUE


class FakeAuthFactory(FilterFactory):
    filter_class = FakeAuthFilter

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.by_hash: dict[str, Principal] = {}
        for spec in config.get("keys") or []:
            digest = spec.get("key_hash") or "sha256:" + hashlib.sha256(spec["key"].encode()).hexdigest()
            self.by_hash[digest] = Principal(
                name=spec["name"],
                key_id="vk-" + digest[7:15],
                team=spec.get("team"),
                models=tuple(spec.get("models") or ()),
                limits=spec.get("limits") or {},
                budgets=spec.get("budgets") or {},
                metadata=spec.get("metadata") or {},
            )
