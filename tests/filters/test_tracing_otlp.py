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
    AttemptRecord,
    AttemptTarget,
    ExchangeTrace,
    SpanSettings,
    build_spans,
    plan_spans,
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
