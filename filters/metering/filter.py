"""The ``metering`` filter: the tokens and cost of every attempt and exchange.

Place it first in the chain (its request hook then reads the model the
client asked for before routing rewrites it; as an observer its place on
the response side does not matter). Per exchange:

* ``on_response_body`` (an observer): keeps references to the bytes relayed
  to the client for the current attempt (bounded by ``max_relayed_bytes``),
  in case the provider reports no usage;
* ``on_attempt_complete``: settles the attempt's :class:`~llmproxy.Usage`.
  Routing left what the provider reported on ``attempt.usage``; what is
  missing is counted with the tokenizer (the prompt from the request sent,
  the completion from the text and tool-call arguments the client
  received), with ``Source.TOKENIZER`` as provenance. An attempt that got
  no 2xx response from the provider spent nothing. The record is priced
  from the price book (``genai-prices``, overridable in ``prices:``);
  an unknown price leaves ``cost`` None, never 0;
* ``on_exchange_complete``: ``exchange.usage`` is the sum of the attempts',
  counted in the metrics; the access log prints it. A reply the ``cache``
  served has no attempt: its record (``Source.CACHE``, priced at zero unless
  the cache charges hits) is counted as it is.

On the hot path the filter costs one list append per relayed piece; the
tokenizer runs only when the provider gave no usage, or for the sampled
drift check (``drift_sample``: the share of requests whose prompt is also
counted to compare with the provider's count), and off the event loop for
large prompts.

Config::

    - name: metering
      config:
        prices:                      # USD per million tokens; override or add models
          my-model: {input: 0.15, output: 0.60, cache_read: 0.075}
        usage_header: false          # x-llmproxy-usage on non-streamed replies (debugging)
        drift_sample: 0.01           # 0..1
        max_relayed_bytes: 8388608   # relayed bytes kept per attempt for counting
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any, ClassVar

from prometheus_client import Counter, Histogram

from llmproxy import (
    Action,
    Attempt,
    ConfigError,
    Cost,
    Exchange,
    FactoryContext,
    Filter,
    FilterFactory,
    InvalidJSON,
    Section,
    Source,
    UpstreamConnectError,
    Usage,
)
from llmproxy.filters.metering.count_endpoint import ANTHROPIC_COUNT_TOKENS, PROTOCOLS, reply_async
from llmproxy.filters.metering.pricing import PriceBook, cost
from llmproxy.filters.metering.relayed import relayed_output
from llmproxy.filters.metering.tokenizer import count_prompt_async, count_text, warm
from llmproxy.filters.names import ROUTE
from llmproxy.filters.routing import RouteDecision, RoutingFactory
from llmproxy.filters.routing.table import NoProvider, Target

__all__ = ["USAGE_HEADER", "MeteringFactory", "MeteringFilter"]

log = logging.getLogger("llmproxy.metering")

USAGE_HEADER = "x-llmproxy-usage"

#: Token-counting endpoints answered here when no provider of the model has one
#: (see :mod:`llmproxy.filters.metering.count_endpoint`).
COUNT_PATHS = frozenset(PROTOCOLS)

#: Relayed bytes parsed on the loop when the provider gave no usage; above it, in a thread
#: (relayed_output costs about 16 us per event: 64 KiB of events is about 1 ms).
_INLINE_RELAYED_BYTES = 64 * 1024


class MeteringFilter(Filter):
    """Per-exchange metering state (see the module docstring)."""

    factory: MeteringFactory
    mutates_response_body: ClassVar[bool] = False

    __slots__ = ("_chunks", "_requested_model", "_size")

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self._chunks: list[bytes] = []
        self._size = 0
        self._requested_model = ""

    async def on_request_body(self, exchange: Exchange, body: bytes, end_of_stream: bool) -> Action:
        if not body:
            return Action.CONTINUE
        try:
            payload = exchange.request_json()  # parsed once, for every filter
        except InvalidJSON:
            return Action.CONTINUE  # routing (or the core) reports it
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            return Action.CONTINUE
        self._requested_model = model
        path = exchange.client_path.partition("?")[0]
        if path in COUNT_PATHS:
            await self._count_locally(exchange, path, payload, model)
        return Action.CONTINUE

    async def _count_locally(self, exchange: Exchange, path: str, payload: dict[str, Any], model: str) -> None:
        """Answer a token-counting request here, unless a provider of the model counts natively."""
        served = self.factory.served_model(model, native_count=path == ANTHROPIC_COUNT_TOKENS)
        if served is None:
            return  # forwarded to the provider's own endpoint (or routing's 404 for an unknown model)
        reply = await reply_async(path, payload, served)
        if reply is not None:
            exchange.send_local_reply(200, reply)

    def on_response_headers(self, exchange: Exchange) -> Action:
        self._chunks = []  # a new attempt: what an earlier one relayed is not this one's
        self._size = 0
        return Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        if data:
            size = self._size + len(data)
            if size <= self.factory.max_relayed_bytes:
                self._chunks.append(data)
            self._size = size
        return Action.CONTINUE

    async def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> None:
        attempt.usage = await self._settle(exchange, attempt)
        self._chunks = []

    def on_exchange_complete(self, exchange: Exchange) -> None:
        total: Usage | None = None
        for attempt in exchange.attempt_history:
            if attempt.usage is not None:
                total = attempt.usage if total is None else total.merged(attempt.usage)
        if total is not None:
            if not total.requested_model:
                total.requested_model = self._requested_model
            exchange.usage = total
            self.factory.count(total)
        elif exchange.usage is not None and exchange.usage.input_source is Source.CACHE:
            self.factory.count(exchange.usage)  # a cache hit: its counts under source="cache"

    # -- settling one attempt ----------------------------------------------------------
    async def _settle(self, exchange: Exchange, attempt: Attempt) -> Usage:
        factory = self.factory
        route = _route(exchange)
        # the attempt's own target: the route may already point at a retry's
        sent = route.target_of(attempt.number) if route is not None else None
        target = sent[0] if sent is not None else None
        model = (target.model if target else "") or self._requested_model
        provider = (target.provider.name if target else "") or attempt.target.name
        client_protocol = (route.client_protocol if route else "") or exchange.client_protocol
        provider_protocol = (target.provider.protocol if target else "") or client_protocol
        if route is not None and target is not None and target is not route.target:
            # the body now holds the retry's request (maybe in another protocol): count the client's
            provider_protocol = ""
        usage = attempt.usage
        status = attempt.status
        spent = usage is not None or (
            status is not None and 200 <= status < 300 and not isinstance(attempt.error, UpstreamConnectError)
        )
        if usage is None:
            usage = Usage(input_source=Source.TOKENIZER, output_source=Source.TOKENIZER)
            need_input = need_output = spent
        else:
            need_input = False
            need_output = bool(usage.extra.pop("partial", False))
            if need_output:
                usage.output_source = Source.TOKENIZER
        usage.model = usage.model or model
        usage.provider = usage.provider or provider
        usage.key_id = usage.key_id or attempt.key_id
        usage.requested_model = self._requested_model
        if need_input:
            counted = await self._count_prompt(exchange, provider_protocol, model)
            if counted is not None:
                usage.input_tokens, usage.encoding, usage.approximate = counted
        elif usage.input_source is Source.PROVIDER and factory.drift_sample and random.random() < factory.drift_sample:
            counted = await self._count_prompt(exchange, provider_protocol, model)
            if counted is not None and usage.input_tokens > 0:
                factory.drift.labels(factory.context.model_label(model)).observe(counted[0] / usage.input_tokens)
                usage.extra["prompt_drift"] = counted[0] - usage.input_tokens
        if need_output and self._chunks and attempt.head_sent:
            chunks, sse = self._chunks, attempt.is_sse or exchange.is_sse
            if self._size > _INLINE_RELAYED_BYTES:  # a long stream: parse it off the event loop
                out = await asyncio.to_thread(relayed_output, chunks, client_protocol, sse)
            else:
                out = relayed_output(chunks, client_protocol, sse)
            text = out.text + out.tool_arguments + out.reasoning
            if text:
                counted_out = count_text(text, model)
                usage.output_tokens = counted_out.tokens
                usage.encoding = usage.encoding or counted_out.encoding
                usage.approximate = usage.approximate or counted_out.approximate
                if out.reasoning:  # reasoning_content / thinking deltas: part of the output, also split out
                    usage.reasoning_tokens = min(count_text(out.reasoning, model).tokens, usage.output_tokens)
        elif need_output:
            usage.output_tokens = 0
        usage.cost = factory.price(usage, target)
        return usage

    async def _count_prompt(self, exchange: Exchange, protocol: str, model: str) -> tuple[int, str, bool] | None:
        """Count the prompt of the current request body in ``protocol``; "" counts the client's
        request as routing read it (an attempt that is no longer the current one)."""
        if not protocol:
            route = _route(exchange)
            payload: Any = route.client_json(exchange) if route is not None else None
            protocol = exchange.client_protocol
        else:
            try:
                payload = exchange.request_json()
            except InvalidJSON:
                return None  # not JSON: nothing to count
        if not isinstance(payload, dict):
            return None
        try:
            counted = await count_prompt_async(payload, protocol, model, wire_size=len(exchange.request.body))
        except Exception:
            log.exception("prompt count failed for model %s", model)
            return None
        return counted.tokens, counted.encoding, counted.approximate


def _route(exchange: Exchange) -> RouteDecision | None:
    """Routing's decision for the exchange, when routing runs."""
    route = exchange.vars.get(ROUTE)
    return route if isinstance(route, RouteDecision) else None


class MeteringHeaderFilter(MeteringFilter):
    """``usage_header: true``: also tells a non-streamed reply's usage in ``x-llmproxy-usage``.

    A debugging aid, off by default: the head and body of a non-streamed reply
    are held to its end (as routing already holds a translated one) so the
    header can carry the provider's counts, e.g. ``input=12; output=30;
    cached=0; cost=0.0000231``. Streams are never held: their usage is in
    their last events, and they get no header.
    """

    mutates_response_body: ClassVar[bool] = True
    sse_batches: ClassVar[bool] = True

    __slots__ = ("_hold",)

    def __init__(self, factory: FilterFactory) -> None:
        super().__init__(factory)
        self._hold = False

    def on_response_headers(self, exchange: Exchange) -> Action:
        super().on_response_headers(exchange)
        response = exchange.response
        self._hold = not exchange.is_sse and response is not None and 200 <= response.status < 300
        return Action.PAUSE if self._hold else Action.CONTINUE

    def on_response_body(self, exchange: Exchange, data: bytes, end_of_stream: bool) -> Action:
        if not self._hold:
            return super().on_response_body(exchange, data, end_of_stream)
        if not end_of_stream:
            return Action.PAUSE
        super().on_response_body(exchange, data, end_of_stream)
        attempt, response = exchange.attempt, exchange.response
        usage = attempt.usage if attempt is not None else None
        if usage is not None and response is not None:
            route = _route(exchange)
            sent = route.target_of(attempt.number) if route is not None and attempt is not None else None
            price = self.factory.price(usage, sent[0] if sent is not None else None)
            response.headers.set(
                USAGE_HEADER,
                f"input={usage.input_tokens}; output={usage.output_tokens}; cached={usage.cache_read_tokens}; "
                f"cost={price.total if price is not None else '?'}",
            )
        return Action.CONTINUE


class MeteringFactory(FilterFactory):
    """Price book, metrics and settings of the ``metering`` filter."""

    filter_class = MeteringFilter
    fail_open = True  # metering never fails an exchange

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        sec = Section(config, "", "")
        try:
            prices = sec.get("prices", dict, {})
            self.usage_header: bool = sec.get("usage_header", bool, False)
            self.drift_sample: float = sec.get(
                "drift_sample", float, 0.01, lambda v: None if 0 <= v <= 1 else "must be between 0 and 1"
            )
            self.max_relayed_bytes: int = sec.get(
                "max_relayed_bytes", int, 8 * 1024 * 1024, lambda v: None if v >= 0 else "must be >= 0"
            )
            sec.finish()
        except ConfigError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
        self.prices = PriceBook(prices)  # ValueError names the field
        self._routing: RoutingFactory | None = None
        if self.usage_header:
            self.filter_class = MeteringHeaderFilter  # type: ignore[misc]
        registry = context.metrics
        self.tokens = Counter(
            "llmproxy_tokens",
            "Tokens metered, by upstream model, provider, kind (input, output, cache_read, cache_write, "
            "reasoning) and source (provider, tokenizer)",
            ["model", "provider", "kind", "source"],
            registry=registry,
        )
        self.cost_usd = Counter(
            "llmproxy_cost_usd",
            "Spend in US dollars, by upstream model and provider",
            ["model", "provider"],
            registry=registry,
        )
        self.cost_unknown = Counter(
            "llmproxy_cost_unknown", "Exchanges whose model has no known price", ["model"], registry=registry
        )
        # labels() takes a lock and validates the label values on every call: each label set's
        # child is looked up once (as many as prometheus_client keeps itself)
        self._children: dict[tuple[str, ...], Any] = {}
        self.drift = Histogram(
            "llmproxy_tokenizer_prompt_drift_ratio",
            "Our prompt token count divided by the provider's, per upstream model (sampled)",
            ["model"],
            buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0),
            registry=registry,
        )

    def preload(self) -> None:
        """Load the served models' encodings before the workers fork: one copy for all of them."""
        self._routing = next((f for f in self.context.factories if isinstance(f, RoutingFactory)), None)
        warm(self._served_models())

    async def start(self) -> None:
        """Load the tokenizer's encodings off the loop, so the first count does not pay for it
        (already loaded when :meth:`preload` ran before the fork)."""
        self._routing = next((f for f in self.context.factories if isinstance(f, RoutingFactory)), None)
        await asyncio.to_thread(warm, self._served_models())

    def _served_models(self) -> list[str]:
        """The upstream models routing lists: only their encodings are loaded at startup (each
        costs tens of MiB); an encoding for another model loads on its first count, in a thread."""
        routing = self._routing
        if routing is None:
            return []
        names: list[str] = []
        for provider in routing.table.providers.values():
            for listed in provider.models.listed():
                names.append(provider.models.resolve(listed) or listed)
        return names

    def served_model(self, model: str, native_count: bool) -> str | None:
        """The upstream model to count ``model``'s prompt with locally, or None when the request
        should go on: a provider of the model has its own counting endpoint (``native_count``),
        or no provider serves it (routing then answers 404)."""
        routing = self._routing
        if routing is None:
            return model  # no routing: count with the name the client gave
        table = routing.table
        if native_count:
            try:
                table.candidates(model, "count_tokens", None)
                return None  # an Anthropic-type provider counts it itself
            except NoProvider:
                pass
        for api in ("chat", "messages", "responses"):
            try:
                return table.candidates(model, api, None)[0].model
            except NoProvider:
                continue
        return None

    def price(self, usage: Usage, target: Target | None) -> Cost | None:
        """``usage``'s cost: its model priced for the provider's type (``openai``, ``anthropic``...)
        when routing chose the ``target``, else for the provider's name."""
        provider = target.provider.adapter.type_name if target is not None else usage.provider
        return cost(usage, self.prices.lookup(provider, usage.model))

    def count(self, usage: Usage) -> None:
        """Add one exchange's usage to the metrics."""
        model, provider = self.context.model_label(usage.model), usage.provider or "-"
        children = self._children
        for kind, value, source in (
            ("input", usage.input_tokens, usage.input_source),
            ("output", usage.output_tokens, usage.output_source),
            ("cache_read", usage.cache_read_tokens, usage.input_source),
            ("cache_write", usage.cache_write_tokens, usage.input_source),
            ("reasoning", usage.reasoning_tokens, usage.output_source),
        ):
            if value:
                key = (model, provider, kind, source.value)
                child = children.get(key)
                if child is None:
                    child = children[key] = self.tokens.labels(*key)
                child.inc(value)
        if usage.cost is None:
            unknown_key = ("", model)  # (no token label set starts with "")
            child = children.get(unknown_key)
            if child is None:
                child = children[unknown_key] = self.cost_unknown.labels(model)
            child.inc()
        else:
            cost_key = (model, provider)
            child = children.get(cost_key)
            if child is None:
                child = children[cost_key] = self.cost_usd.labels(model, provider)
            child.inc(float(usage.cost.total))
