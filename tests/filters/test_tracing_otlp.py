"""The hand-written OTLP encoder against the SDK's: the same records decode to the same request."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from llmproxy import Attempt, Headers, Outcome, Response, UpstreamTarget, UpstreamTimeout, Usage
from llmproxy.filters.tracing.content import Redactor
from llmproxy.filters.tracing.otlp import ExchangeWriter, OtlpEncoder
from llmproxy.filters.tracing.propagation import Parent
from llmproxy.filters.tracing.spans import (
    REQUEST_KEYS,
    AttemptRecord,
    AttemptTarget,
    ExchangeTrace,
    SpanSettings,
    build_spans,
    plan_spans,
    request_params,
)

TARGET = UpstreamTarget(name="p", scheme="https", host="api.example.com", port=443, key_id="abc123")


def record(parent: Parent | None, model: str = "gpt-x") -> ExchangeTrace:
    trace = ExchangeTrace(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x1111, parent, True)
    failed = Attempt(1, TARGET)
    failed.finish(Outcome.RETRIED, UpstreamTimeout("slow", phase="headers"))
    ok = Attempt(2, TARGET)
    ok.response = Response(200, Headers())
    ok.head_sent = True
    ok.usage = Usage(12, 7, cache_read_tokens=3, reasoning_tokens=1)
    ok.response_id, ok.response_model, ok.finish_reasons = "chatcmpl-1", "up-é", ("stop", "length")
    ok.finish(Outcome.COMPLETED)
    trace.attempts = [
        AttemptRecord.of(failed, 0x2222, AttemptTarget("openai", "up-a")),
        AttemptRecord.of(ok, 0x3333, AttemptTarget("azure.ai.openai", "up-é")),
    ]
    trace.operation = "chat"
    trace.requested_model = model
    trace.params = {"gen_ai.request.temperature": 0.25, "gen_ai.request.stream": True, "gen_ai.request.max_tokens": 9}
    trace.method, trace.path = "POST", "/v1/chat/completions?x=1"
    trace.request_id, trace.client_addr = "req-1", "10.0.0.1"
    trace.status, trace.is_sse = 200, True
    trace.start, trace.end = ok.started_at - 0.01, ok.ended_at + 0.001
    trace.first_byte, trace.offset_ns = ok.ended_at, 10**18
    trace.body = b'{"model":"m","messages":[{"role":"user","content":"a secret-abc"}]}'
    trace.chunks = [b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n']
    return trace


@pytest.mark.parametrize("sse", [True, False])
@pytest.mark.parametrize("latest", [False, True])
@pytest.mark.parametrize("content", [False, True])
def test_the_wire_encoder_writes_what_the_sdk_encoder_writes(latest: bool, content: bool, sse: bool) -> None:
    settings = SpanSettings(
        Resource.create({"service.name": "svc", "deployment.environment": "test", "n": 3}),
        InstrumentationScope("llmproxy.filters.tracing", "0.1.0"),
        latest,
        Redactor([r"secret-\\w+"]) if content else None,
    )
    records = [
        record(Parent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xABCD, 1, b"vendor=abc, other=x")),
        record(None, model="claude"),
        record(None),  # a second time: the cached KeyValues
    ]
    for r in records:
        r.is_sse = sse  # a JSON reply: no first-token event
    encoder = OtlpEncoder(dict(settings.resource.attributes), settings.scope.name, settings.scope.version or "")
    ours = ExportTraceServiceRequest()
    ours.ParseFromString(encoder.request([encoder.spans(r, plan_spans(r, settings)) for r in records]))
    theirs = encode_spans([span for r in records for span in build_spans(r, settings)])
    assert ours == theirs
    writer = ExchangeWriter(dict(settings.resource.attributes), settings.scope.name, settings.scope.version or "")
    direct = ExportTraceServiceRequest()
    direct.ParseFromString(writer.request([writer.exchange(r, settings) for r in records]))
    assert direct == theirs
    spans = ours.resource_spans[0].scope_spans[0].spans
    assert len(spans) == 9
    assert any(a.key == "gen_ai.input.messages" for a in spans[0].attributes) is content
    assert spans[0].trace_state == "vendor=abc,other=x"
    assert spans[1].status.code == 2 and spans[1].status.message == "upstream_timeout"


M = "gen_ai.request."


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, {M + "stream": False}),
        (
            {"max_tokens": 9, "temperature": 0.5, "top_p": 1, "stream": True, "n": 1, "seed": 7},
            {M + "max_tokens": 9, M + "temperature": 0.5, M + "top_p": 1, M + "seed": 7, M + "stream": True},
        ),
        (
            {"max_completion_tokens": 5, "n": 3, "stop": "END"},
            {M + "max_tokens": 5, M + "choice.count": 3, M + "stop_sequences": ("END",), M + "stream": False},
        ),
        (
            {"max_output_tokens": 4, "stop_sequences": ["a", "b"], "top_k": 40},
            {M + "max_tokens": 4, M + "top_k": 40, M + "stop_sequences": ("a", "b"), M + "stream": False},
        ),
        (
            {"max_tokens": "9", "temperature": True, "seed": 1.5, "stop": ["a", 1], "stream": "yes"},
            {M + "stream": False},
        ),
    ],
)
def test_request_parameters_are_checked_and_named(body: dict[str, object], expected: dict[str, object]) -> None:
    assert request_params(tuple(map(body.get, REQUEST_KEYS))) == expected


def test_parameter_sets_are_kept_by_value_and_type() -> None:
    known: dict[tuple[object, ...], tuple[tuple[str, object], ...]] = {}

    def pairs(body: dict[str, object]) -> dict[str, object]:
        trace = ExchangeTrace(1, 2, None, True)
        trace.request_values = tuple(map(body.get, REQUEST_KEYS))
        return dict(trace.param_pairs(known))

    assert pairs({"temperature": 1, "stream": True}) == {M + "temperature": 1, M + "stream": True}
    as_float = pairs({"temperature": 1.0, "stream": 1})  # equal values to the set above, other types
    assert as_float == {M + "temperature": 1.0, M + "stream": False}
    assert type(as_float[M + "temperature"]) is float
    assert pairs({"temperature": True}) == {M + "stream": False}
    assert pairs({"stop": ["x"]}) == {M + "stop_sequences": ("x",), M + "stream": False}  # a list: not kept
    assert len(known) == 3
    assert pairs({"temperature": 1, "stream": True}) == {M + "temperature": 1, M + "stream": True}
    assert len(known) == 3
