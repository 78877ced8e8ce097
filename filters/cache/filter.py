"""The ``cache`` builtin filter: exact-match replies served without the provider.

Config (all optional)::

    - name: cache           # after auth, before ratelimit (see "Where to put it")
      config:
        ttl: 300                  # seconds an entry lives
        max_entries: 10000        # worker-local LRU bounds
        max_bytes: 67108864       # (64 MiB); an entry bigger than max_entry_bytes is not kept
        max_entry_bytes: 1048576
        shared: false             # true: one entry for every principal
        any_temperature: false    # true: also cache requests with temperature > 0
        exclude_models: []        # fnmatch patterns on the client's model: never cached
        store: local              # local (this worker's LRU) or shared (the proxy's store: Redis
                                  # across workers and instances, the LRU in front of it)
        wait: 30                  # seconds a follower waits for the leader of its key
        charge_hits: false        # true: a hit costs what the reply first cost, charged by ratelimit

What is cached: ``POST`` chat completions, messages and responses with
status 200 and a complete body (the exchange ended without error, the
attempt completed: an upstream error, a truncated stream or a client
disconnect stores nothing). The key (:mod:`.key`) is the path, the mode
(stream or JSON), the upstream model after routing's mapping and the
request body without ``stream``, ``stream_options``, ``user``,
``metadata``; scoped by the principal's key id unless ``shared``. By
default only deterministic requests (``temperature`` unset or 0) are
cached: a sampled reply replayed would hide that a new call would differ.

A hit is a local reply with the original ``content-type`` and the bytes the
client first received (a stream is replayed as the same events, its usage
chunk included). ``x-llmproxy-cache: hit|miss|bypass`` is on every response
(bypass: not cacheable, ``cache-control: no-store``/``no-cache``, an
excluded model) whose request body got as far as ``cache`` in the chain
(set once, when the cache decides): a request refused before that
(``auth``'s 401, an invalid body) carries none.
``vars["cache.status"]`` says which.

What a hit costs: on a hit ``exchange.usage`` is the original reply's token
counts with ``Source.CACHE`` as their source and ``extra={"cache": "hit"}``;
``metering`` counts it under ``source="cache"`` and the access log prints
it. By default (``charge_hits: false``) its cost is zero
(``price_source="cache"``) and, replying in ``on_request_body`` before
``ratelimit``, it is never reserved or charged: a spent budget still serves
it. With ``charge_hits: true`` its cost is what the reply cost when first
served, and the chain's ``ratelimit`` filter admits and charges it on those
exact counts (:meth:`~llmproxy.filters.ratelimit.RateLimitFilter.charge`:
a request, its tokens, its cost, no concurrency slot) before it is served:
a budget without room refuses it with ratelimit's 429 (a replay cannot be
cut short, so a hard budget needs room for all of it).

Where to put it: a hit runs every filter's ``on_request_headers`` and
``on_exchange_complete`` but only the ``on_request_body`` hooks before
``cache``, so the earlier it sits the cheaper a hit (right after ``auth``,
which scopes the key). Before ``routing`` the key has the client's model
(an alias and its target are then separate entries) and a digest of the
routing filter's config, so an entry is never found again after a reload
changed the mapping it was stored under (a shared store outlives reloads).
After ``routing`` it has the upstream model. Rules of ``ratelimit`` keyed by
``provider`` need ``cache`` after ``routing`` to match a charged hit.

Entries are kept decoded in the worker's LRU (:class:`Entry`): a hit parses
nothing; the shared store holds their encoded form (:attr:`Entry.blob`).

Single flight: the first miss of a key leads; identical requests arriving
while it runs wait (at most ``wait`` seconds) and are served its reply; if
the leader fails (error, truncated, not cacheable) they are released to go
upstream themselves. With ``store: shared`` the leader also holds a lease
(the store's ``acquire_lease``, TTL ``wait``) on the key so followers on
other workers and instances poll the store (every 20 ms) for its entry
until the lease is released or expires.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
from collections.abc import Awaitable, Mapping
from decimal import Decimal
from typing import Any

import orjson
from prometheus_client import Counter

from llmproxy import (
    Action,
    Cost,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    Outcome,
    Source,
    StoreUnavailable,
    Usage,
)
from llmproxy.filters.cache.key import request_key, table_version
from llmproxy.filters.cache.lru import Lru
from llmproxy.filters.names import PRINCIPAL, ROUTE
from llmproxy.filters.ratelimit import RateLimitFactory, RateLimitFilter
from llmproxy.filters.routing import RoutingFactory

__all__ = ["STATUS", "CacheFactory", "CacheFilter"]

#: ``exchange.vars`` key: ``hit``, ``miss`` or ``bypass``.
STATUS = "cache.status"

_PATHS = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/responses"})
_KNOWN = frozenset(
    {
        "ttl",
        "max_entries",
        "max_bytes",
        "max_entry_bytes",
        "shared",
        "any_temperature",
        "exclude_models",
        "store",
        "wait",
        "charge_hits",
    }
)
_POLL = 0.02
#: Seconds after a hit by which the hit metrics show it.
_FLUSH_DELAY = 0.25
_FREE = Cost(Decimal(0), price_source="cache")


class Entry:
    """A stored reply, decoded once (an LRU hit serves it without parsing anything).

    ``blob`` is its form in the shared store: one JSON line (content type, the
    original usage counts and cost) then the body bytes.
    """

    __slots__ = ("blob", "body", "content_type", "cost", "counts")

    def __init__(
        self, content_type: str, body: bytes, counts: list[Any] | None, cost: Cost | None, blob: bytes
    ) -> None:
        self.content_type = content_type
        self.body = body
        #: input, output, cache read, cache write, reasoning tokens, model, provider (None: no record).
        self.counts = counts
        #: What the reply cost when it was first served (None: unknown).
        self.cost = cost
        self.blob = blob

    @classmethod
    def of_reply(cls, content_type: bytes, usage: Usage | None, body: bytes) -> Entry:
        meta: dict[str, Any] = {"ct": content_type.decode("latin-1")}
        counts = cost = None
        if usage is not None:
            counts = meta["u"] = [
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
                usage.model,
                usage.provider,
            ]
            cost = usage.cost
            if cost is not None:
                meta["c"] = [
                    *(str(d) for d in (cost.total, cost.input, cost.output, cost.cache_read, cost.cache_write)),
                    cost.currency,
                    cost.price_source,
                ]
        return cls(meta["ct"], body, counts, cost, orjson.dumps(meta) + b"\n" + body)

    @classmethod
    def decode(cls, blob: bytes) -> Entry:
        head, _, body = blob.partition(b"\n")
        meta = orjson.loads(head)
        c = meta.get("c")
        cost = None
        if c:
            total, part_in, part_out, read, write = (Decimal(d) for d in c[:5])
            cost = Cost(total, part_in, part_out, read, write, currency=c[5], price_source=c[6])
        return cls(meta["ct"], body, meta.get("u"), cost, blob)

    def usage(self, requested_model: str, charged: bool) -> Usage | None:
        """The record of one hit: the original counts (``Source.CACHE``), at zero cost unless ``charged``."""
        u = self.counts
        if u is None:
            return None
        return Usage(
            u[0],
            u[1],
            u[2],
            u[3],
            u[4],
            Source.CACHE,
            Source.CACHE,
            model=u[5],
            provider=u[6],
            requested_model=requested_model,
            cost=self.cost if charged else _FREE,
            extra={"cache": "hit"},
        )


class CacheFilter(Filter):
    """One exchange: look up, wait for a leader, or record the reply as it goes to the client."""

    factory: CacheFactory
    mutates_response_body = False
    __slots__ = ("buffer", "complete", "content_type", "key", "leader", "lease", "overflow")

    def __init__(self, factory: CacheFactory) -> None:
        super().__init__(factory)
        self.key: str | None = None  # set (with the recording state below) when this exchange may store its reply
        self.leader = False
        self.lease = False
        self.buffer: list[bytes]
        self.overflow: int
        self.complete: bool
        self.content_type: bytes

    def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action | Awaitable[Action]:
        key = self._key(exchange)
        if key is None:
            _mark(exchange, "bypass")
            return Action.CONTINUE
        entry = self.factory.lru.get(key)
        if entry is not None:
            return self._hit(exchange, entry)
        return self._miss(exchange, key)

    def _key(self, exchange: Exchange) -> str | None:
        """The request's cache key, or None when it is not cacheable (counted when it says so itself)."""
        factory = self.factory
        request = exchange.request
        if request.method != "POST" or exchange.client_path.partition("?")[0] not in _PATHS:
            return None
        control = request.headers.get("cache-control")
        if control is not None and ("no-store" in control or "no-cache" in control):
            factory.bypass.inc()
            return None
        route = exchange.vars.get(ROUTE)
        payload = route.client_json(exchange) if route is not None else exchange.request_json()
        if not isinstance(payload, dict):
            return None
        temperature = payload.get("temperature")
        if not factory.any_temperature and temperature not in (None, 0, 0.0):
            factory.bypass.inc()
            return None
        if factory.exclude and factory.excludes(exchange.model):
            factory.bypass.inc()
            return None
        principal = exchange.vars.get(PRINCIPAL)
        scope = "" if factory.shared or principal is None else principal.key_id
        # after routing: the upstream model (aliases share entries); before it: the client's
        # model, with the routing table's version in the scope (a changed mapping misses)
        model = route.model if route is not None else exchange.model
        return request_key(exchange.client_path, model, payload, payload.get("stream") is True, scope + factory.table)

    async def _miss(self, exchange: Exchange, key: str) -> Action:
        factory = self.factory
        if factory.use_store:
            entry = await factory.store_get(key)
            if entry is not None:
                factory.keep(key, entry)
                return await self._answer(exchange, entry)
        inflight = factory.inflight
        waiting = inflight.get(key)
        if waiting is not None:  # a leader, or a follower of another instance's, in this worker
            try:
                entry = await asyncio.wait_for(asyncio.shield(waiting), factory.wait)
            except TimeoutError:
                entry = None
            if entry is not None:
                return await self._answer(exchange, entry)
        elif not factory.use_store:
            self.leader = True
            inflight[key] = asyncio.get_running_loop().create_future()
        else:
            # claimed in this worker before the lease is asked for: the lease is re-entrant for
            # this worker's holder, so two of its exchanges must never both ask (two leaders)
            future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
            inflight[key] = future
            if await factory.lease(key):
                # the lease is ours: a leader elsewhere that stored its entry and released the
                # lease since the first look must not be followed by a second upstream call
                entry = await factory.store_get(key)
                if entry is None:
                    self.lease = self.leader = True
                else:
                    try:
                        await factory.context.store.release_lease(key + ":lock", factory.holder)
                    except StoreUnavailable:
                        factory.store_errors.inc()  # the lease expires on its own
            else:  # a leader elsewhere: this exchange waits for it, for this worker's followers too
                entry = await factory.poll(key)
            if not self.leader:
                if inflight.get(key) is future:
                    del inflight[key]
                if not future.done():
                    future.set_result(entry)
                if entry is not None:
                    factory.keep(key, entry)
                    return await self._answer(exchange, entry)
        self.key = key
        self.buffer = []
        self.overflow = 0
        self.complete = False
        self.content_type = b""
        _mark(exchange, "miss")
        factory.misses.inc()
        return Action.CONTINUE

    async def _answer(self, exchange: Exchange, entry: Entry) -> Action:
        result = self._hit(exchange, entry)
        return result if isinstance(result, Action) else await result

    def _hit(self, exchange: Exchange, entry: Entry) -> Action | Awaitable[Action]:
        """Answer with ``entry``: at once, or once ``ratelimit`` charged it (``charge_hits``)."""
        factory = self.factory
        usage = entry.usage(exchange.model, factory.charge_hits)
        _mark(exchange, "hit")
        if usage is not None and factory.charge_hits and factory.ratelimit_slot >= 0:
            return self._charged(exchange, entry, usage)
        self._serve(exchange, entry, usage)
        return Action.CONTINUE

    async def _charged(self, exchange: Exchange, entry: Entry, usage: Usage) -> Action:
        limiter = exchange.filters[self.factory.ratelimit_slot]
        assert isinstance(limiter, RateLimitFilter)
        await limiter.charge(exchange, usage)  # raises its 429 when the budget has no room (nothing served)
        self._serve(exchange, entry, usage)
        return Action.CONTINUE

    def _serve(self, exchange: Exchange, entry: Entry, usage: Usage | None) -> None:
        if usage is not None:
            exchange.usage = usage  # the record of what was served (a refused hit has none)
        exchange.send_local_reply(200, entry.body, content_type=entry.content_type)
        self.factory.count_hit(len(entry.body))

    def on_response_headers(self, exchange: Exchange) -> Action:
        response = exchange.response
        if self.key is None or response is None:
            return Action.CONTINUE
        if response.status != 200 or exchange.upstream_error is not None:
            self.key_failed()
            exchange.skip_response_body(self)
            return Action.CONTINUE
        self.content_type = response.headers.get_raw(b"content-type") or b"application/json"
        self.buffer = []
        self.overflow = 0
        self.complete = False
        return Action.CONTINUE

    def key_failed(self) -> None:
        """This exchange's reply will not be stored (its followers are released at the end)."""
        self.overflow = -1

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        if self.key is None or self.overflow < 0:
            return Action.CONTINUE
        self.overflow += len(data)
        if self.overflow > self.factory.max_entry_bytes:
            self.overflow = -1
            self.buffer = []
            return Action.CONTINUE
        if data:
            self.buffer.append(data)
        if end_of_stream:
            self.complete = True
        return Action.CONTINUE

    async def on_exchange_complete(self, exchange: Exchange) -> None:
        key = self.key
        if key is None:
            return
        factory = self.factory
        entry: Entry | None = None
        attempt = exchange.attempt
        stored = (
            self.complete
            and self.overflow >= 0
            and exchange.error is None
            and attempt is not None
            and attempt.outcome is Outcome.COMPLETED
        )
        if stored and attempt is not None:
            entry = Entry.of_reply(self.content_type, attempt.usage, b"".join(self.buffer))
            factory.keep(key, entry)
            factory.stored_bytes.inc(len(entry.blob))
        if self.leader:
            future = factory.inflight.pop(key, None)
            if future is not None and not future.done():
                future.set_result(entry)
        if factory.use_store:
            try:
                if entry is not None:
                    await factory.context.store.set(key, entry.blob, ttl=factory.ttl)
                if self.lease:
                    await factory.context.store.release_lease(key + ":lock", factory.holder)
            except StoreUnavailable:
                factory.store_errors.inc()


class CacheFactory(FilterFactory):
    """The cache's config, its worker-local LRU, the in-flight leaders and metrics."""

    filter_class = CacheFilter

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        unknown = set(config) - _KNOWN
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(_KNOWN))})")
        self.ttl = _number(config, "ttl", 300.0)
        self.wait = _number(config, "wait", 30.0)
        max_entries = int(_number(config, "max_entries", 10000))
        max_bytes = int(_number(config, "max_bytes", 64 * 1024 * 1024))
        self.max_entry_bytes = int(_number(config, "max_entry_bytes", 1024 * 1024))
        self.shared = _flag(config, "shared")
        self.any_temperature = _flag(config, "any_temperature")
        self.charge_hits = _flag(config, "charge_hits")
        store = config.get("store", "local")
        if store not in ("local", "shared"):
            raise ValueError("store: must be local or shared")
        self.use_store = store == "shared"
        patterns = config.get("exclude_models") or []
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError("exclude_models: must be a list of model patterns")
        self.exclude = tuple(patterns)
        self.lru: Lru[Entry] = Lru(max_entries, max_bytes)
        self.inflight: dict[str, asyncio.Future[Entry | None]] = {}
        self.holder = f"{os.getpid()}:{id(self):x}"
        #: Mixed into every key's scope when ``routing`` comes after the cache: its config's digest.
        self.table = ""
        #: The chain position of the ``ratelimit`` filter that charges hits (-1: none, or not charged).
        self.ratelimit_slot = -1
        registry = context.metrics
        self.hits = Counter("llmproxy_cache_hits", "Replies served from the cache", registry=registry)
        self.misses = Counter("llmproxy_cache_misses", "Cacheable requests sent upstream", registry=registry)
        self.bypass = Counter("llmproxy_cache_bypass", "Requests the cache stayed out of", registry=registry)
        self.hit_bytes = Counter("llmproxy_cache_hit_bytes", "Body bytes served from the cache", registry=registry)
        self.stored_bytes = Counter("llmproxy_cache_stored_bytes", "Bytes of entries stored", registry=registry)
        self.store_errors = Counter("llmproxy_cache_store_errors", "Shared store calls that failed", registry=registry)
        #: Hits and their bytes counted since the last :meth:`flush_metrics` (plain ints on the hit path).
        self._pending_hits = 0
        self._pending_hit_bytes = 0

    async def start(self) -> None:
        factories = self.context.factories
        mine = factories.index(self) if self in factories else -1
        later = factories[mine + 1 :]
        routing = next((f for f in later if isinstance(f, RoutingFactory)), None)
        if routing is not None:
            self.table = "|" + table_version(routing.config)
        if self.charge_hits:
            self.ratelimit_slot = next((i for i, f in enumerate(factories) if isinstance(f, RateLimitFactory)), -1)

    def count_hit(self, size: int) -> None:
        """Count a hit of ``size`` body bytes: in the metrics at the next flush, at most
        ``_FLUSH_DELAY`` later (a counter's ``inc`` takes a lock: it would be most of a hit's cost)."""
        if not self._pending_hits:
            asyncio.get_running_loop().call_later(_FLUSH_DELAY, self.flush_metrics)
        self._pending_hits += 1
        self._pending_hit_bytes += size

    def flush_metrics(self) -> None:
        """Move the hits counted since the last flush into the metrics."""
        if self._pending_hits:
            self.hits.inc(self._pending_hits)
            self.hit_bytes.inc(self._pending_hit_bytes)
            self._pending_hits = self._pending_hit_bytes = 0

    async def close(self) -> None:
        self.flush_metrics()
        await super().close()

    def excludes(self, model: str) -> bool:
        """Whether the client's ``model`` matches an ``exclude_models`` pattern."""
        return any(fnmatch.fnmatchcase(model, p) for p in self.exclude)

    def keep(self, key: str, entry: Entry) -> None:
        """Put ``entry`` in this worker's LRU."""
        self.lru.put(key, entry, self.ttl, len(entry.blob))

    async def store_get(self, key: str) -> Entry | None:
        try:
            value, _ = await self.context.store.get(key)
        except StoreUnavailable:
            self.store_errors.inc()
            return None
        return Entry.decode(value) if value is not None else None

    async def lease(self, key: str) -> bool:
        """Try to lead ``key`` across instances; True also when the store is down (go upstream)."""
        try:
            return await self.context.store.acquire_lease(key + ":lock", self.holder, self.wait)
        except StoreUnavailable:
            self.store_errors.inc()
            return True

    async def poll(self, key: str) -> Entry | None:
        """Wait (at most ``wait``) for another instance's leader: its entry, or None when it gave up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        store = self.context.store
        while loop.time() < deadline:
            await asyncio.sleep(_POLL)
            try:
                value, _ = await store.get(key)
                if value is not None:
                    return Entry.decode(value)
                # is the lease free? (this worker holds none for the key: its one exchange that
                # polls claimed the key first, so no leader of this worker shares the holder)
                if await store.acquire_lease(key + ":lock", self.holder, 0.001):
                    await store.release_lease(key + ":lock", self.holder)
                    # the leader stores its entry before it releases: looked for once more, since
                    # it may have done both since the first look
                    value, _ = await store.get(key)
                    return Entry.decode(value) if value is not None else None  # None: it gave up
            except StoreUnavailable:
                self.store_errors.inc()
                return None
        return None


def _mark(exchange: Exchange, status: str) -> None:
    """Say what the cache did: ``vars["cache.status"]`` and the ``x-llmproxy-cache`` field, set once."""
    exchange.vars[STATUS] = status
    exchange.set_response_header("x-llmproxy-cache", status)


def _number(config: Mapping[str, Any], field: str, default: float) -> float:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{field}: must be a number > 0")
    return float(value)


def _flag(config: Mapping[str, Any], field: str) -> bool:
    value = config.get(field, False)
    if not isinstance(value, bool):
        raise ValueError(f"{field}: must be true or false")
    return value
