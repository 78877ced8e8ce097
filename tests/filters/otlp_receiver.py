"""An OTLP/HTTP trace receiver for the tests: decodes ``ExportTraceServiceRequest`` protobuf.

:class:`Receiver` runs the standard library's threading HTTP server in a
daemon thread (no code shared with the proxy or the OpenTelemetry
exporter). ``mode`` scripts its answers: ``ok`` (200 with an
``ExportTraceServiceResponse``), ``refuse`` (503), ``reject`` (400) or
``slow`` (sleeps ``delay`` seconds, then 200). Received spans are kept
flattened, with their resource's attributes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

__all__ = ["Receiver", "SpanView"]

KINDS = {Span.SPAN_KIND_SERVER: "server", Span.SPAN_KIND_CLIENT: "client", Span.SPAN_KIND_INTERNAL: "internal"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if kind is None:
        return None
    return getattr(value, kind)


@dataclass
class SpanView:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    status: int
    resource: dict[str, Any] = field(default_factory=dict)


class Receiver:
    def __init__(self, mode: str = "ok", delay: float = 0.0, port: int = 0) -> None:
        self.mode = mode
        self.delay = delay
        self.spans: list[SpanView] = []
        self.posts = 0
        self.content_types: list[str] = []
        self.peers: list[int] = []  # the client port of each POST (one per kept-alive connection)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                receiver.posts += 1
                receiver.peers.append(self.client_address[1])
                receiver.content_types.append(self.headers.get("content-type", ""))
                if receiver.mode == "slow":
                    time.sleep(receiver.delay)
                if receiver.mode in ("refuse", "reject"):
                    body = b"no"
                    self.send_response(503 if receiver.mode == "refuse" else 400)
                else:
                    receiver._take(raw)
                    body = ExportTraceServiceResponse().SerializeToString()
                    self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, raw: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(raw)
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        SpanView(
                            span.name,
                            KINDS.get(span.kind, str(span.kind)),
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.start_time_unix_nano,
                            span.end_time_unix_nano,
                            {a.key: _value(a.value) for a in span.attributes},
                            [
                                (e.name, e.time_unix_nano, {a.key: _value(a.value) for a in e.attributes})
                                for e in span.events
                            ],
                            span.status.code,
                            resource,
                        )
                    )

    def wait_for(self, count: int, timeout: float = 5.0) -> list[SpanView]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.spans) < count:
            time.sleep(0.02)
        return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
