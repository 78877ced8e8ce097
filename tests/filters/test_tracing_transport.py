"""The export thread's transport: one kept-alive ``http.client`` connection, ``requests`` where it must stay."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from llmproxy import FactoryContext, MemoryStore
from llmproxy.filters.tracing.filter import TracingFactory
from llmproxy.filters.tracing.spans import ExchangeTrace
from llmproxy.filters.tracing.transport import ConnectionTransport, lighten
from tests.filters.otlp_receiver import Receiver
from tests.filters.test_tracing_otlp import record


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def factory(endpoint: str) -> TracingFactory:
    return TracingFactory("tracing", {"endpoint": endpoint, "timeout": 2}, FactoryContext(MemoryStore()))


def unbuilt(trace: ExchangeTrace) -> None:
    raise AssertionError("the record could not be encoded")


def test_exports_go_over_one_kept_alive_connection(receiver: Receiver) -> None:
    tracing = factory(receiver.url)
    assert isinstance(tracing.pipeline._exporter._client._transport, ConnectionTransport)  # type: ignore[attr-defined]
    for _ in range(3):
        assert tracing.pipeline._exporter.export([record(None)], unbuilt).sent == 3
    spans = receiver.wait_for(9)
    assert len(spans) == 9
    assert {span.kind for span in spans} == {"server", "client"}
    assert receiver.content_types == ["application/x-protobuf"] * 3
    assert len(set(receiver.peers)) == 1  # one connection for the three exports


class ClosingCollector:
    """Answers each POST with 200 and a kept-alive response, then closes the connection (an idle timeout)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/traces"
        self.posts = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                self.posts += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                time.sleep(0.05)  # the client has read the answer, and keeps the connection

    def close(self) -> None:
        self.sock.close()


def test_a_connection_the_collector_closed_is_reopened() -> None:
    collector = ClosingCollector()
    try:
        exporter = factory(collector.url).pipeline._exporter
        for _ in range(3):
            assert exporter.export([record(None)], unbuilt).sent == 3  # never dropped for a stale connection
            time.sleep(0.1)
        assert collector.posts == 3
    finally:
        collector.close()


def test_a_collector_that_is_down_fails_the_export() -> None:
    gone = Receiver()
    url = gone.url
    gone.close()
    outcome = factory(url).pipeline._exporter.export([record(None)], unbuilt)
    assert (outcome.sent, outcome.failed) == (0, 3)


def test_a_proxy_or_a_credential_provider_keeps_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://collector.test:4318/v1/traces"
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    provider = {"OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER": "vault"}
    assert not lighten(OTLPSpanExporter(endpoint=url), provider)  # its session carries the credentials
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    assert not lighten(OTLPSpanExporter(endpoint=url), {})  # requests goes through the proxy
    monkeypatch.setenv("NO_PROXY", "collector.test")
    exporter = OTLPSpanExporter(endpoint=url)
    assert lighten(exporter, {})
    assert isinstance(exporter._client._transport, ConnectionTransport)
    kept = OTLPSpanExporter(endpoint=url)
    lighten(kept, provider)
    assert isinstance(kept._client._transport, RequestsHTTPTransport)
