"""The ``failover`` filter: keep traffic on keys and providers that work.

Place it right after ``routing`` in the chain. Per exchange:

* ``on_request_body`` (after routing chose): refresh the health of the
  candidates' keys from the shared store and re-point the request at the
  first usable (provider, key) in routing's preference order, keys taken
  round-robin; nothing usable -> 503 with ``retry-after`` set to the
  soonest recovery (429 ``upstream_rate_limited`` when every key is cooling
  after its provider's 429, so the client sees the provider's rate limit);
* ``on_response_headers`` (and, for an error reply, ``on_response_body`` once
  its first 4 KiB are held): the provider's adapter classifies the attempt
  (``Adapter.classify``; :data:`_BOOK_KIND` maps its verdict: auth and quota
  eject the key, a rate limit cools it for the provider's wait, overload / 5xx
  / connect / reset / timeout count towards ``failure_threshold``, a request
  fault is relayed untouched) and, while attempts and the deadline allow,
  retry on the next usable key, then the next provider (a same-key retry
  waits an exponential backoff with jitter). Successful streams are held
  (head and events) until their first content event (decided on the parsed
  event, per protocol: :mod:`.stream`), so a stream that fails or ends
  before it is retried invisibly;
* ``on_exchange_complete``: a response that failed after content reached
  the client (the core ended a stream with an SSE error event) counts
  against its key; only a response that completed counts as its key's
  success (so a key that always dies mid-stream still reaches the threshold).

The response carries ``x-llmproxy-attempts``. Active health checks probe
ejected keys every ``health_check.interval`` with a one-token request; one
prober per provider across all workers and instances holds a lease in the
store. Key state is at ``GET /admin/failover`` and in ``/metrics``.

Config::

    failure_threshold: 3      # consecutive failures that eject a key
    success_threshold: 1      # consecutive probe successes that restore it
    cooldown: 30              # seconds a 429 cools a key without retry-after
    eject_for: 30             # seconds before an ejected key is probed (or tried, without health checks)
    max_attempts: 3           # per request, the first included
    share_interval: 1.0       # seconds a worker's view of a key's shared health is used before it
                              # is read again (0: read on every request); its own findings apply at once
    deadline: 60              # seconds after which no new attempt starts
    backoff: {base: 0.05, max: 2.0}
    health_check:             # omit or enabled: false to disable
      interval: 5
      timeout: 5
      model: gpt-4o-mini      # a client model name; default (and for providers
                              # that do not serve it): each provider's first model
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import orjson
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from llmproxy import (
    Action,
    ConfigError,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    MemoryStore,
    RateLimited,
    Section,
    ServiceUnavailable,
    StoreUnavailable,
    Timeouts,
    UpstreamError,
    iter_events,
)
from llmproxy.filters.failover.health import COOLING, EJECTED, HealthBook
from llmproxy.filters.failover.stream import Kind, classify
from llmproxy.filters.names import ROUTE
from llmproxy.filters.routing import RouteDecision, RoutingFactory, Target
from llmproxy.filters.routing.adapters import FailureKind
from llmproxy.filters.routing.table import Provider

__all__ = ["FailoverFactory", "FailoverFilter"]

log = logging.getLogger("llmproxy.failover")


#: What each adapter verdict does to the key (see HealthBook.failure); "client" leaves it alone, "ok" too.
_BOOK_KIND = {
    FailureKind.OK: "ok",
    FailureKind.RATE_LIMITED: "rate",
    FailureKind.QUOTA: "quota",
    FailureKind.AUTH: "auth",
    FailureKind.OVERLOADED: "server",
    FailureKind.SERVER: "server",
    FailureKind.BAD_REQUEST: "client",
    FailureKind.CONTEXT_LENGTH: "client",
    FailureKind.CONTENT_FILTER: "client",
}
#: How much of an error reply's body the adapter is shown.
_ERROR_PREFIX = 4096


class FailoverFilter(Filter):
    factory: FailoverFactory

    #: on_response_body looks at every event of what it is given (``iter_events``)
    sse_batches = True

    __slots__ = ("_ended", "_holding", "_ok", "_reading_error", "_routing", "_same_key_retries", "_seen", "_tried")

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self._routing: RouteDecision | None = None
        self._tried: set[tuple[str, int]] = set()
        self._holding = False
        #: While holding: how many bytes of the held data were classified already.
        self._seen = 0
        #: While holding: an end-of-stream event ([DONE], message_stop ...) was seen.
        self._ended = False
        #: The current attempt's response was accepted (counted as a success if it completes).
        self._ok = False
        #: An error reply's body is being held for the adapter's classification.
        self._reading_error = False
        self._same_key_retries = 0

    def _record(self) -> str:
        routing = self._routing
        assert routing is not None and routing.target is not None
        return HealthBook.record_key(routing.provider, routing.key_id)

    async def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action:
        routing = exchange.vars.get(ROUTE)
        if not isinstance(routing, RouteDecision) or not routing.candidates:
            return Action.CONTINUE
        self._routing = routing
        factory = self.factory
        await factory.book.refresh(
            [factory.record(t.provider, i) for t in routing.candidates for i in range(len(t.provider.targets))]
        )
        current = routing.target
        if current is not None and factory.book.usable(factory.record(current.provider, routing.key_index)):
            choice: tuple[Target, int] | None = (current, routing.key_index)
        else:
            choice = factory.choose(routing, self._tried)
        if choice is None:
            wait = factory.soonest_recovery(routing.candidates)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s: failover has no usable key for %s (all cooling: %s; soonest in %.1fs)",
                    exchange.id,
                    routing.model or "-",
                    factory.all_cooling(routing.candidates),
                    wait,
                )
            if factory.all_cooling(routing.candidates):
                # every key is rate limited by its provider: the client is told so, with the
                # providers' own retry-after, not that the service is down
                raise RateLimited(
                    "every provider key for this model is rate limited by its provider right now",
                    code="upstream_rate_limited",
                    headers=[("retry-after", str(max(1, math.ceil(wait))))],
                )
            raise ServiceUnavailable(
                "no healthy provider key is available for this model right now",
                code="no_healthy_upstream",
                headers=[("retry-after", str(max(1, math.ceil(wait))))],
            )
        target, key_index = choice
        if target is not routing.target or key_index != routing.key_index:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s: failover skips %s key %s (not usable), uses %s key %s",
                    exchange.id,
                    routing.provider,
                    routing.key_id or "-",
                    target.provider.name,
                    target.provider.key_ids[key_index],
                )
            routing.repoint(exchange, target, key_index)
        self._tried.add((target.provider.name, key_index))
        return Action.CONTINUE

    async def on_response_headers(self, exchange: Exchange) -> Action:
        routing = self._routing
        response = exchange.response
        if routing is None or routing.target is None or response is None:
            return Action.CONTINUE
        response.headers.set("x-llmproxy-attempts", str(exchange.attempts))
        self._holding = False
        self._seen = 0
        self._ended = False
        self._ok = False
        error = exchange.upstream_error
        self._reading_error = False
        if error is None and response.status >= 400:
            if response.status in (401, 403):  # the core never relays (nor shows) such a body
                exchange.skip_response_body(self)
                await self._error_reply(exchange, b"")
                return Action.CONTINUE
            self._reading_error = True  # classified by the adapter once its body's start is read
            return Action.PAUSE
        kind = "ok" if error is None else "server" if error.retryable else "client"
        if kind == "ok" and exchange.is_sse:
            self._holding = True  # until the first content delta (on_response_body)
            return Action.PAUSE
        exchange.skip_response_body(self)  # only a held stream needs the body
        if kind == "ok":
            self._ok = True
            return Action.CONTINUE
        if kind == "client":
            return Action.CONTINUE
        assert error is not None
        await self.factory.book.failure(self._record(), kind)
        await self._retry(exchange, f"{kind} ({error.code})")
        return Action.CONTINUE

    async def _error_reply(self, exchange: Exchange, body_prefix: bytes) -> None:
        """Act on an error reply as its provider's adapter classifies it (status, headers, body start)."""
        routing, response = self._routing, exchange.response
        assert routing is not None and routing.target is not None and response is not None
        book = self.factory.book
        failure = routing.target.provider.adapter.classify(
            response.status, response.headers.get, body_prefix, book.clock()
        )
        kind = _BOOK_KIND[failure.kind]
        if kind == "client":
            return
        await book.failure(self._record(), kind, failure.retry_after)
        await self._retry(exchange, f"{failure.kind.value} (status {response.status})")

    async def _retry(self, exchange: Exchange, why: str) -> bool:
        """Point the exchange at the next usable key and ask for a retry; False if none."""
        routing = self._routing
        factory = self.factory
        assert routing is not None and routing.target is not None
        if exchange.attempts >= factory.max_attempts or exchange.elapsed >= factory.deadline:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s: failover gives up after attempt %d on %s key %s: %s (%s)",
                    exchange.id,
                    exchange.attempts,
                    routing.provider,
                    routing.key_id or "-",
                    why,
                    "max_attempts reached" if exchange.attempts >= factory.max_attempts else "deadline passed",
                )
            return False
        choice = factory.choose(routing, self._tried)
        if choice is None:
            # every key was tried: the same key again, if it is still usable, after a backoff
            record = self._record()
            if not factory.book.usable(record):
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "request %s: failover gives up after attempt %d: %s; no usable key left",
                        exchange.id,
                        exchange.attempts,
                        why,
                    )
                return False
            self._same_key_retries += 1
            delay = min(factory.backoff_max, factory.backoff_base * 2 ** (self._same_key_retries - 1))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            choice = (routing.target, routing.key_index)
        target, key_index = choice
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s: failover retries attempt %d on %s key %s: %s; next: %s key %s",
                exchange.id,
                exchange.attempts,
                routing.provider,
                routing.key_id or "-",
                why,
                target.provider.name,
                target.provider.key_ids[key_index],
            )
        routing.repoint(exchange, target, key_index)
        self._tried.add((target.provider.name, key_index))
        exchange.retry()
        return True

    async def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        """While holding: classify the events not seen yet (see :mod:`.stream`).

        ``data`` is everything held so far (the core re-delivers it with each
        new event while this returns ``PAUSE``), so only ``data[_seen:]`` is
        new. An error event fails the attempt (retried if possible) even next
        to content in the same read, since nothing reached the client yet;
        otherwise the first content releases the stream; a stream that ends
        without content is accepted only after an end event.
        """
        if self._reading_error:
            if not end_of_stream and len(data) < _ERROR_PREFIX:
                return Action.PAUSE
            self._reading_error = False
            exchange.skip_response_body(self)
            await self._error_reply(exchange, data[:_ERROR_PREFIX])
            return Action.CONTINUE
        if not self._holding:
            return Action.CONTINUE
        new = data[self._seen :] if self._seen else data
        self._seen = len(data)
        content = failed = False
        for event in iter_events(new):
            if content and event.find(b"error") < 0:
                continue  # after the first content only an error event still matters (a byte check)
            kind = classify(event)
            if kind is Kind.ERROR:
                failed = True
                break
            if kind is Kind.CONTENT:
                content = True
                if new.find(b"error") < 0:
                    break  # the rest cannot hold an error event
            elif kind is Kind.END:
                self._ended = True
        if content and not failed:
            self._holding = False
            self._ok = True
            exchange.skip_response_body(self)  # content flows: nothing more to decide here
            return Action.CONTINUE
        if failed or (end_of_stream and not self._ended):
            self._holding = False
            await self.factory.book.failure(self._record(), "server")
            # nothing left to try: CONTINUE releases what came
            await self._retry(exchange, "stream error event" if failed else "stream ended without content")
            return Action.CONTINUE
        if end_of_stream:
            self._holding = False
            self._ok = True
            return Action.CONTINUE
        return Action.PAUSE

    async def on_exchange_complete(self, exchange: Exchange) -> None:
        error = exchange.error
        failed_mid_stream = (
            isinstance(error, UpstreamError) and exchange.response_started and exchange.upstream_error is None
        )
        if self._routing is None or self._routing.target is None:
            return
        if failed_mid_stream:
            # content had reached the client, so there was no retry: count it against the key
            await self.factory.book.failure(self._record(), "server")
        elif self._ok and error is None:
            await self.factory.book.success(self._record())


class FailoverFactory(FilterFactory):
    """Health book, key choice, active health checks, metrics and admin page."""

    filter_class = FailoverFilter

    def __init__(
        self, name: str, config: Mapping[str, Any], context: FactoryContext, *, clock: Callable[[], float] = time.time
    ) -> None:
        """``clock`` gives wall-clock seconds for key health (a fake one in tests)."""
        super().__init__(name, config, context)
        routing = context.find_factory(RoutingFactory)
        if routing is None:
            raise ValueError("the failover filter needs the routing filter before it in the chain")
        self.table = routing.table
        sec = Section(config, "", "")
        try:
            failure_threshold = sec.get("failure_threshold", int, 3, _at_least(1))
            success_threshold = sec.get("success_threshold", int, 1, _at_least(1))
            cooldown = sec.get("cooldown", float, 30.0, _positive)
            eject_for = sec.get("eject_for", float, 30.0, _positive)
            self.max_attempts = sec.get("max_attempts", int, 3, _at_least(1))
            share_interval = sec.get("share_interval", float, 1.0, _at_least(0))
            self.deadline = sec.get("deadline", float, 60.0, _positive)
            backoff = Section(sec.get("backoff", dict, {}), "backoff", "")
            self.backoff_base = backoff.get("base", float, 0.05, _positive)
            self.backoff_max = backoff.get("max", float, 2.0, _positive)
            backoff.finish()
            hc = Section(sec.get("health_check", dict, None), "health_check", "")
            self.health_checks = hc.get("enabled", bool, bool(hc.data))
            self.interval = hc.get("interval", float, 5.0, _positive)
            self.probe_timeout = hc.get("timeout", float, 5.0, _positive)
            probe_model = hc.get("model", str, None)
            hc.finish()
            sec.finish()
        except ConfigError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
        providers = self.table.providers.values()
        if probe_model is not None and not any(p.models.resolve(probe_model) for p in providers):
            raise ValueError(f"health_check.model: no provider serves model {probe_model!r}")
        self.probe_models: dict[str, str] = {}
        for provider in providers:
            model = provider.models.resolve(probe_model) if probe_model else None
            if model is None and provider.models.listed():
                # not served by this provider (or none configured): its first model, or
                # its ejected keys could never be restored
                model = provider.models.resolve(provider.models.listed()[0])
            if model is not None:
                self.probe_models[provider.name] = model
        registry = context.metrics
        self.store_errors = Counter(
            "llmproxy_failover_store_errors", "Shared store calls that failed (key health)", registry=registry
        )
        self.probes = Counter("llmproxy_failover_probes_sent", "Health-check probes sent", registry=registry)
        self.book = HealthBook(
            context.store,
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            cooldown=cooldown,
            eject_for=eject_for,
            trial_after_ejection=not self.health_checks,
            share_interval=share_interval,
            clock=clock,
            on_store_error=self.store_errors.inc,
        )
        if context.workers > 1 and isinstance(context.store, MemoryStore) and context.worker_id == 0:
            # accepted (health is advisory, not an exact quota) but worth one line
            log.warning(
                "failover with %d workers and the memory store: each worker learns key health on its own "
                "and probes ejected keys itself; use store: redis://... to share it",
                context.workers,
            )
        self.instance_id = f"{os.uname().nodename}:{os.getpid()}:{random.getrandbits(32):08x}"
        context.metrics.register(_HealthCollector(self))
        context.add_admin_page("/admin/failover", self.admin_page)

    @staticmethod
    def record(provider: Provider, key_index: int) -> str:
        return HealthBook.record_key(provider.name, provider.key_ids[key_index])

    # -- choosing ---------------------------------------------------------------
    def choose(self, routing: RouteDecision, tried: set[tuple[str, int]]) -> tuple[Target, int] | None:
        """The first usable, untried (target, key index) in routing's preference order."""
        now = self.book.clock()
        for target in routing.candidates:
            provider = target.provider
            count = len(provider.targets)
            start = provider.next_key_index()
            for offset in range(count):
                index = (start + offset) % count
                if (provider.name, index) in tried:
                    continue
                if self.book.usable(self.record(provider, index), now):
                    return target, index
        return None

    def all_cooling(self, candidates: list[Target]) -> bool:
        """True when every candidate key is cooling after a 429 (none is ejected or broken)."""
        records = [
            self.book.health(self.record(t.provider, i)) for t in candidates for i in range(len(t.provider.targets))
        ]
        return bool(records) and all(r.state == COOLING for r in records)

    def soonest_recovery(self, candidates: list[Target]) -> float:
        now = self.book.clock()
        waits = [
            max(0.0, self.book.health(self.record(t.provider, i)).until - now)
            for t in candidates
            for i in range(len(t.provider.targets))
        ]
        return min(waits) if waits else self.interval

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        await self._forget_removed_keys()
        if self.health_checks:
            self.context.every(self.interval, self.probe_tick, name="failover-health-check")

    async def close(self) -> None:
        for provider in self.table.providers.values():
            with contextlib.suppress(StoreUnavailable):
                await self.context.store.release_lease(f"failover-probe:{provider.name}", self.instance_id)

    async def _forget_removed_keys(self) -> None:
        """Drop shared records of keys no longer configured; keep the rest (restart, reload)."""
        store = self.context.store
        for provider in self.table.providers.values():
            registry = f"failover:keys:{provider.name}"
            try:
                raw, _ = await store.get(registry)
                previous = set(orjson.loads(raw)) if raw else set()
                for gone in previous - set(provider.key_ids):
                    await self.book.forget(HealthBook.record_key(provider.name, gone))
                await store.set(registry, orjson.dumps(sorted(provider.key_ids)))
            except StoreUnavailable as exc:
                log.warning("cannot reconcile key health for provider %s: %s", provider.name, exc)

    # -- active health checks ---------------------------------------------------
    async def probe_tick(self) -> None:
        """Probe due ejected keys of every provider whose probe lease this instance holds."""
        # A lease is renewed once per tick, and a tick lasts up to one probe
        # timeout per provider (probes of a stalled key run to their timeout)
        # before the next starts an interval later: the lease must outlive
        # that with a margin, or the holder loses it while still probing.
        ttl = self.probe_timeout * len(self.table.providers) + self.interval * 3
        for provider in self.table.providers.values():
            model = self.probe_models.get(provider.name)
            if model is None or not provider.targets:
                continue
            try:
                if not await self.context.store.acquire_lease(f"failover-probe:{provider.name}", self.instance_id, ttl):
                    continue
            except StoreUnavailable:
                continue
            records = [self.record(provider, i) for i in range(len(provider.targets))]
            await self.book.refresh(records, force=True)
            now = self.book.clock()
            due = [
                i
                for i, r in enumerate(records)
                if self.book.health(r).state == EJECTED and self.book.health(r).until <= now
            ]
            await asyncio.gather(*(self._probe(provider, i, model) for i in due))

    async def _probe(self, provider: Provider, key_index: int, model: str) -> None:
        """One one-token request on a provider key, through the core's upstream client."""
        target = replace(provider.targets[key_index], timeouts=Timeouts(*(self.probe_timeout,) * 4))
        method, path, extra, body = provider.adapter.probe_request(model)
        headers = [*extra, (b"x-llmproxy-probe", b"1")]
        ok = False
        self.probes.inc()
        try:
            reply = await self.context.upstream.request(target, method, path, headers=headers, body=body)
            ok = 200 <= reply.status < 300
        except UpstreamError as exc:
            log.info("health check of %s key %s failed: %s", provider.name, provider.key_ids[key_index], exc.message)
        await self.book.probe_result(self.record(provider, key_index), ok, self.interval)

    # -- visibility ---------------------------------------------------------------
    def key_states(self) -> Iterator[dict[str, Any]]:
        now = self.book.clock()
        for provider in self.table.providers.values():
            for index, key_id in enumerate(provider.key_ids):
                health = self.book.health(self.record(provider, index))
                state = health.state
                if state != "healthy" and health.usable(now, self.book.trial_after_ejection):
                    state = "healthy" if state == "cooling" else "trial"
                yield {
                    "provider": provider.name,
                    "key_id": key_id,
                    "state": state,
                    "failures": health.failures,
                    "reason": health.reason or None,
                    "until": health.until or None,
                    "next_probe": health.until if health.state == EJECTED and self.health_checks else None,
                }

    def admin_page(self) -> dict[str, Any]:
        return {
            "store_available": self.book.store_available,
            "instance": self.instance_id,
            "health_checks": self.health_checks,
            "keys": list(self.key_states()),
        }


class _HealthCollector:
    """Exports key state as ``llmproxy_upstream_key_*`` gauges at scrape time.

    Key health is shared through the store, so with several workers the
    scraping worker's view is the answer (no per-worker sum, no worker label).
    """

    def __init__(self, factory: FailoverFactory) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "llmproxy_upstream_key_state",
            "1 for the current state of each provider key",
            labels=["provider", "key_id", "state"],
        )
        failures = GaugeMetricFamily(
            "llmproxy_upstream_key_failures", "Consecutive failures of each provider key", labels=["provider", "key_id"]
        )
        for row in self.factory.key_states():
            state.add_metric([row["provider"], row["key_id"], row["state"]], 1)
            failures.add_metric([row["provider"], row["key_id"]], row["failures"])
        yield state
        yield failures
        yield GaugeMetricFamily(
            "llmproxy_failover_store_available",
            "1 when the shared store answers",
            value=int(self.factory.book.store_available),
        )


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least(low: int) -> Any:
    def check(value: int) -> str | None:
        return None if value >= low else f"must be at least {low}"

    return check
