"""One exchange's trace record (collected on the loop) and the spans made from it (in the export thread).

:class:`ExchangeTrace` holds what the filter saw: ids drawn up front, the
request's GenAI parameters, and one :class:`AttemptRecord` per attempt
(copied from the core's :class:`~llmproxy.Attempt` when it completes: the
record keeps no core object alive while it waits in the export queue).
:func:`plan_spans` turns it into one SERVER span and one CLIENT span per
attempt (:class:`SpanData`), with explicit start and end times
(``perf_counter`` instants moved to the wall clock by one offset), so the
event loop never creates a span object, touches a context variable or
formats an attribute; :mod:`.otlp` encodes them, :func:`build_spans` makes
SDK ``ReadableSpan`` objects of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from llmproxy import Attempt, UpstreamError, Usage
from llmproxy.filters.metering.merged import merged_response
from llmproxy.filters.tracing import semconv as sc
from llmproxy.filters.tracing.content import Redactor, input_messages, output_messages
from llmproxy.filters.tracing.propagation import Parent

__all__ = [
    "REQUEST_KEYS",
    "AttemptRecord",
    "AttemptTarget",
    "ExchangeTrace",
    "SpanData",
    "SpanSettings",
    "StaticGroup",
    "Tokens",
    "build_spans",
    "client_group",
    "content_attributes",
    "plan_spans",
    "request_params",
    "server_group",
    "tokens",
]

_OK = Status(StatusCode.UNSET)

#: ``(input, output, cache_read, cache_write, reasoning, cost in USD or None)`` of a Usage.
Tokens = tuple[int, int, int, int, int, float | None]


#: The request fields :func:`request_params` reads, in its order (the filter keeps their values).
REQUEST_KEYS = (
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_k",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "n",
    "stop",
    "stop_sequences",
    "stream",
)
_NUMBERS = (
    sc.REQUEST_TEMPERATURE,
    sc.REQUEST_TOP_P,
    sc.REQUEST_TOP_K,
    sc.REQUEST_FREQUENCY_PENALTY,
    sc.REQUEST_PRESENCE_PENALTY,
)


def request_params(values: tuple[Any, ...]) -> dict[str, Any]:
    """The ``gen_ai.request.*`` parameters from the values of :data:`REQUEST_KEYS` in a request body."""
    out: dict[str, Any] = {}
    max_tokens, max_completion, max_output, *numbers, seed, choices, stop, stop_sequences, stream = values
    if max_tokens is None:
        max_tokens = max_completion if max_completion is not None else max_output
    if type(max_tokens) is int:
        out[sc.REQUEST_MAX_TOKENS] = max_tokens
    for name, value in zip(_NUMBERS, numbers, strict=True):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    if type(seed) is int:
        out[sc.REQUEST_SEED] = seed
    if type(choices) is int and choices != 1:
        out[sc.REQUEST_CHOICE_COUNT] = choices
    if stop is None:
        stop = stop_sequences
    if isinstance(stop, str):
        out[sc.REQUEST_STOP_SEQUENCES] = (stop,)
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        out[sc.REQUEST_STOP_SEQUENCES] = tuple(stop)
    out[sc.REQUEST_STREAM] = stream is True
    return out


def tokens(usage: Usage | None) -> Tokens | None:
    """The counts of ``usage`` as a plain tuple (None for none)."""
    if usage is None:
        return None
    cost = float(usage.cost.total) if usage.cost is not None else None
    return (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
        cost,
    )


@dataclass(slots=True)
class AttemptTarget:
    """Where one attempt went, as routing had it when the attempt was sent."""

    provider: str  # gen_ai.provider.name
    model: str  # the upstream model


@dataclass(slots=True)
class SpanSettings:
    """What the export thread needs besides the records (built once by the factory)."""

    resource: Resource
    scope: InstrumentationScope
    latest: bool = False
    #: None: no content on spans.
    redactor: Redactor | None = None
    max_content_chars: int = 65536
    #: The static attribute groups seen so far (see :class:`StaticGroup`); export thread only.
    groups: dict[tuple[Any, ...], StaticGroup] = field(default_factory=dict)
    #: The request parameter sets seen so far (see :meth:`ExchangeTrace.param_pairs`); export thread only.
    params: dict[tuple[Any, ...], tuple[tuple[str, Any], ...]] = field(default_factory=dict)


@dataclass(slots=True)
class AttemptRecord:
    """One finished attempt, copied from the core's :class:`~llmproxy.Attempt`."""

    number: int
    span_id: int
    provider: str
    model: str
    host: str
    port: int
    upstream: str
    key_id: str
    outcome: str
    status: int | None  # None: no response from the provider (the core synthesized one)
    error_type: str | None
    head_sent: bool
    started: float
    ended: float
    tokens: Tokens | None
    response_id: str | None
    response_model: str | None
    finish_reasons: tuple[str, ...]

    @classmethod
    def of(cls, attempt: Attempt, span_id: int, target: AttemptTarget | None) -> AttemptRecord:
        error = attempt.error
        synthesized = isinstance(error, UpstreamError) and not attempt.head_sent
        status = None if synthesized else attempt.status
        error_type: str | None = None
        if status is not None and status >= 400:
            error_type = str(status)
        if error is not None:
            error_type = error.code or type(error).__name__
        upstream = attempt.target
        return cls(
            attempt.number,
            span_id,
            target.provider if target is not None else "",
            target.model if target is not None else "",
            upstream.host,
            upstream.port,
            upstream.name,
            attempt.key_id,
            attempt.outcome._value_,  # (Enum.value is a descriptor call; _value_ is the attribute behind it)
            status,
            error_type,
            attempt.head_sent,
            attempt.started_at,
            attempt.ended_at,
            tokens(attempt.usage),
            attempt.response_id,
            attempt.response_model,
            attempt.finish_reasons,
        )


class ExchangeTrace:
    """One exchange's record; see the module docstring. Filled by the filter, read by :func:`plan_spans`."""

    __slots__ = (
        "attempts",
        "body",
        "captured",
        "chunks",
        "client_addr",
        "client_protocol",
        "client_secrets",
        "end",
        "error_type",
        "first_byte",
        "is_sse",
        "method",
        "next_span_id",
        "next_target",
        "offset_ns",
        "operation",
        "params",
        "parent",
        "path",
        "request_id",
        "request_values",
        "requested_model",
        "sampled",
        "server_span_id",
        "start",
        "status",
        "trace_id",
    )

    def __init__(self, trace_id: int, server_span_id: int, parent: Parent | None, sampled: bool) -> None:
        self.trace_id = trace_id
        self.server_span_id = server_span_id
        self.parent = parent
        self.sampled = sampled
        #: The span id the next attempt's upstream request carries, and where it goes.
        self.next_span_id = 0
        self.next_target: AttemptTarget | None = None
        self.attempts: list[AttemptRecord] = []
        self.operation: str | None = None
        self.requested_model = ""
        #: The request's parameters, as :func:`request_params` names them (from ``request_values``).
        self.params: dict[str, Any] = {}
        #: The values of :data:`REQUEST_KEYS` in the request body, when the filter read them
        #: (one C-level pass on the loop; checked and named in the export thread).
        self.request_values: tuple[Any, ...] | None = None
        self.chunks: list[bytes] | None = None  # relayed bytes, kept only for content capture
        self.captured = 0  # their size
        self.body: bytes | None = None  # the client's request body, kept only for content capture
        self.client_secrets: tuple[str, ...] = ()
        # set when the exchange ends
        self.method = ""
        self.path = ""
        self.client_addr = ""
        self.request_id = ""
        self.client_protocol = "openai"
        self.is_sse = False
        self.status: int | None = None
        self.error_type: str | None = None
        self.start = 0.0
        self.end = 0.0
        self.first_byte = 0.0
        self.offset_ns = 0

    def param_pairs(self, known: dict[tuple[Any, ...], tuple[tuple[str, Any], ...]]) -> tuple[tuple[str, Any], ...]:
        """The request parameters as attribute pairs; ``known``: the pairs of values seen before.

        Applications send the same few parameter sets again and again: they
        are checked and named once (keyed by value and type: ``1``, ``1.0``
        and ``True`` are equal keys, not the same attribute).
        """
        values = self.request_values
        if values is None:
            return tuple(self.params.items())
        key = (values, tuple(map(type, values)))
        try:
            pairs = known.get(key)
        except TypeError:  # a list (stop sequences): not kept
            return tuple(request_params(values).items())
        if pairs is None:
            pairs = tuple(request_params(values).items())
            if len(known) < MAX_GROUPS:
                known[key] = pairs
        return pairs

    @property
    def span_count(self) -> int:
        return 1 + len(self.attempts)

    def ns(self, instant: float) -> int:
        """A ``perf_counter`` instant as Unix-epoch nanoseconds."""
        return int(instant * 1e9) + self.offset_ns


def _usage(attrs: dict[str, Any], counts: Tokens | None) -> None:
    if counts is None:
        return
    attrs[sc.USAGE_INPUT_TOKENS] = counts[0]
    attrs[sc.USAGE_OUTPUT_TOKENS] = counts[1]
    if counts[2]:
        attrs[sc.USAGE_CACHE_READ_INPUT_TOKENS] = counts[2]
    if counts[3]:
        attrs[sc.USAGE_CACHE_CREATION_INPUT_TOKENS] = counts[3]
    if counts[4]:
        attrs[sc.USAGE_REASONING_OUTPUT_TOKENS] = counts[4]
    if counts[5] is not None:
        attrs[sc.COST_USD] = counts[5]


def _response(attrs: dict[str, Any], attempt: AttemptRecord) -> None:
    if attempt.response_id:
        attrs[sc.RESPONSE_ID] = attempt.response_id
    if attempt.response_model:
        attrs[sc.RESPONSE_MODEL] = attempt.response_model
    if attempt.finish_reasons:
        attrs[sc.RESPONSE_FINISH_REASONS] = attempt.finish_reasons


def _provider(attrs: dict[str, Any], provider: str, latest: bool) -> None:
    if provider:
        attrs[sc.PROVIDER_NAME] = provider
        if not latest:
            attrs[sc.SYSTEM] = provider


def _first_token(
    trace: ExchangeTrace, start: float, latest: bool, attrs: dict[str, Any]
) -> list[tuple[str, int, dict[str, Any]]]:
    if not trace.first_byte or not trace.is_sse:
        return []
    seconds = max(trace.first_byte - start, 0.0)
    if latest:
        attrs[sc.RESPONSE_TIME_TO_FIRST_CHUNK] = seconds
    return [(sc.FIRST_TOKEN_EVENT, trace.ns(trace.first_byte), {sc.RESPONSE_TIME_TO_FIRST_CHUNK: seconds})]


def content_attributes(attrs: dict[str, Any], trace: ExchangeTrace, settings: SpanSettings) -> None:
    redactor = settings.redactor
    if redactor is None:
        return
    limit = settings.max_content_chars

    def put(name: str, value: list[dict[str, Any]]) -> None:
        if value:
            text = orjson.dumps(redactor.value(value, trace.client_secrets)).decode()
            attrs[name] = text if len(text) <= limit else text[:limit] + "...[truncated]"

    if trace.body is not None:
        try:
            body = orjson.loads(trace.body)
        except orjson.JSONDecodeError:
            body = None
        messages, system = input_messages(body, trace.client_protocol)
        put(sc.INPUT_MESSAGES, messages)
        put(sc.SYSTEM_INSTRUCTIONS, system)
    if trace.chunks:
        put(
            sc.OUTPUT_MESSAGES,
            output_messages(merged_response(trace.chunks, trace.client_protocol, trace.is_sse), trace.client_protocol),
        )


class StaticGroup:
    """The attributes a span shares with many others (operation, provider, model, parameters, host, ...).

    :func:`plan_spans` keeps one group per distinct combination (bounded by
    :data:`MAX_GROUPS`), so an encoder can write a group's bytes once and
    reuse them (``encoded``, set by :mod:`.otlp`).
    """

    __slots__ = ("encoded", "pairs")

    def __init__(self, pairs: tuple[tuple[str, Any], ...]) -> None:
        self.pairs = pairs
        self.encoded: bytes | None = None


#: Distinct static groups kept; past it, groups are built per span (still correct, only slower).
MAX_GROUPS = 4096


@dataclass(slots=True)
class SpanData:
    """One span, ready to encode: what both encoders (:mod:`.otlp`, :func:`build_spans`) take.

    Its attributes are ``static``'s pairs, then ``attributes`` (those of this span alone).
    """

    name: str
    server: bool  # SERVER, else CLIENT
    span_id: int
    parent_id: int  # 0: a root span
    parent_remote: bool
    start: int  # Unix-epoch nanoseconds
    end: int
    static: StaticGroup
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    error: str | None  # error.type: the span's status is ERROR

    def all_attributes(self) -> dict[str, Any]:
        out = dict(self.static.pairs)
        out.update(self.attributes)
        return out


def _group(groups: dict[tuple[Any, ...], StaticGroup], key: tuple[Any, ...], attrs: dict[str, Any]) -> StaticGroup:
    group = StaticGroup(tuple(attrs.items()))
    if len(groups) < MAX_GROUPS:
        groups[key] = group
    return group


def client_group(
    groups: dict[tuple[Any, ...], StaticGroup],
    operation: str | None,
    model: str,
    params: tuple[tuple[str, Any], ...],
    attempt: AttemptRecord,
    latest: bool,
) -> StaticGroup:
    key = (
        False,
        attempt.number,
        attempt.outcome,
        attempt.status,
        attempt.error_type,
        operation,
        attempt.provider,
        model,
        params,
        attempt.host,
        attempt.port,
        attempt.upstream,
        attempt.key_id,
    )
    group = groups.get(key)
    if group is not None:
        return group
    attrs: dict[str, Any] = {}
    if operation:
        attrs[sc.OPERATION_NAME] = operation
        _provider(attrs, attempt.provider, latest)
        if model:
            attrs[sc.REQUEST_MODEL] = model
        attrs.update(params)
    attrs[sc.SERVER_ADDRESS] = attempt.host
    attrs[sc.SERVER_PORT] = attempt.port
    attrs[sc.UPSTREAM_NAME] = attempt.upstream
    if attempt.key_id:
        attrs[sc.KEY_ID] = attempt.key_id
    attrs[sc.ATTEMPT_NUMBER] = attempt.number
    attrs[sc.ATTEMPT_OUTCOME] = attempt.outcome
    if attempt.status is not None:
        attrs[sc.HTTP_RESPONSE_STATUS_CODE] = attempt.status
    if attempt.error_type:
        attrs[sc.ERROR_TYPE] = attempt.error_type
    return _group(groups, key, attrs)


def server_group(
    groups: dict[tuple[Any, ...], StaticGroup],
    trace: ExchangeTrace,
    path: str,
    params: tuple[tuple[str, Any], ...],
    provider: str,
    error_type: str | None,
    latest: bool,
) -> StaticGroup:
    operation, model, attempts = trace.operation, trace.requested_model, len(trace.attempts)
    key = (True, trace.method, path, trace.status, error_type, attempts, operation, provider, model, params)
    group = groups.get(key)
    if group is not None:
        return group
    attrs: dict[str, Any] = {sc.HTTP_REQUEST_METHOD: trace.method, sc.URL_PATH: path, sc.ATTEMPTS: attempts}
    if trace.status is not None:
        attrs[sc.HTTP_RESPONSE_STATUS_CODE] = trace.status
    if error_type:
        attrs[sc.ERROR_TYPE] = error_type
    if operation:
        attrs[sc.OPERATION_NAME] = operation
        _provider(attrs, provider, latest)
        if model:
            attrs[sc.REQUEST_MODEL] = model
        attrs.update(params)
    return _group(groups, key, attrs)


def plan_spans(trace: ExchangeTrace, settings: SpanSettings) -> list[SpanData]:
    """The SERVER span (first) and the CLIENT spans of one exchange (see the module docstring)."""
    latest, operation, groups = settings.latest, trace.operation, settings.groups
    params = trace.param_pairs(settings.params)
    spans: list[SpanData] = [None]  # type: ignore[list-item]  # the SERVER span goes first
    relayed: AttemptRecord | None = None
    for attempt in trace.attempts:
        model = attempt.model or trace.requested_model
        attrs: dict[str, Any] = {}
        error_type = attempt.error_type
        _usage(attrs, attempt.tokens)
        _response(attrs, attempt)
        events: list[tuple[str, int, dict[str, Any]]] = []
        if attempt.head_sent:
            relayed = attempt
            events = _first_token(trace, attempt.started, latest, attrs)
        name = f"{operation} {model}" if operation and model else operation or f"{trace.method} {attempt.upstream}"
        spans.append(
            SpanData(
                name,
                False,
                attempt.span_id,
                trace.server_span_id,
                False,
                trace.ns(attempt.started),
                trace.ns(attempt.ended or trace.end),
                client_group(groups, operation, model, params, attempt, latest),
                attrs,
                events,
                error_type,
            )
        )
    last = relayed or (trace.attempts[-1] if trace.attempts else None)

    path = trace.path.partition("?")[0]
    attrs = {sc.REQUEST_ID: trace.request_id}
    if trace.client_addr:
        attrs[sc.CLIENT_ADDRESS] = trace.client_addr
    error_type = trace.error_type
    if error_type is None and trace.status is not None and trace.status >= 500:
        error_type = str(trace.status)
    events = []
    if operation:  # usage and response facts are the CLIENT spans' (a backend summing spans counts them once)
        events = _first_token(trace, trace.start, latest, attrs)
        content_attributes(attrs, trace, settings)
    model = trace.requested_model
    name = f"{operation} {model}" if operation and model else operation or f"{trace.method} {path}"
    parent = trace.parent
    spans[0] = SpanData(
        name,
        True,
        trace.server_span_id,
        parent.span_id if parent else 0,
        parent is not None,
        trace.ns(trace.start),
        trace.ns(trace.end),
        server_group(groups, trace, path, params, last.provider if last is not None else "", error_type, latest),
        attrs,
        events,
        error_type,
    )
    return spans


def build_spans(trace: ExchangeTrace, settings: SpanSettings) -> list[ReadableSpan]:
    """The spans of one exchange as the SDK's ``ReadableSpan`` objects (for an SDK ``SpanExporter``)."""
    flags = TraceFlags(TraceFlags.SAMPLED if trace.sampled else TraceFlags.DEFAULT)
    parent = trace.parent
    state = TraceState()
    if parent is not None and parent.tracestate:
        state = TraceState.from_header([parent.tracestate.decode("latin-1")])
    out: list[ReadableSpan] = []
    for data in plan_spans(trace, settings):
        context = SpanContext(trace.trace_id, data.span_id, False, flags, state)
        parent_context = None
        if data.parent_id:
            parent_flags = TraceFlags(parent.flags) if data.parent_remote and parent is not None else flags
            parent_context = SpanContext(trace.trace_id, data.parent_id, data.parent_remote, parent_flags, state)
        out.append(
            ReadableSpan(
                data.name,
                context,
                parent_context,
                settings.resource,
                data.all_attributes(),
                [Event(name, attrs, at) for name, at, attrs in data.events],
                kind=SpanKind.SERVER if data.server else SpanKind.CLIENT,
                status=Status(StatusCode.ERROR, data.error) if data.error else _OK,
                start_time=data.start,
                end_time=data.end,
                instrumentation_scope=settings.scope,
            )
        )
    return out
