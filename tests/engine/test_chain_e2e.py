"""The filter chain over real sockets: order, local replies, body replacement,
SSE framing and rewriting, retries, failures, async hooks, the end hook."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmproxy.mock import MockServer

from .. import filters_for_tests as tf
from ..support import LoopThread, RunningProxy, raw_exchange, status_of

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
Make = Callable[[dict[str, Any]], RunningProxy]


def _request(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
    )


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, v = line.split(b":", 1)
        headers[k.decode().lower()] = v.decode().strip()
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        rest = body
        while True:
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        body = out
    return int(lines[0].split()[1]), headers, body


def _filters(*names: str, **configs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": f"tests.filters_for_tests:{n}", "config": configs.get(n.split(":")[0], {})} for n in names]


def test_hook_order(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "filters": [
                {"name": "tests.filters_for_tests:RecorderFactory", "config": {"tag": "first"}},
                {"name": "tests.filters_for_tests:RecorderFactory", "config": {"tag": "second"}},
            ],
        }
    )
    response = raw_exchange(proxy.port, _request())
    status, headers, _ = _split(response)
    assert status == 200
    rid = headers["x-request-id"]
    calls = [(tag, hook) for tag, hook, r in tf.CALLS if r == rid]
    assert calls == [
        ("first", "request_headers"),
        ("second", "request_headers"),
        ("first", "request_body"),
        ("second", "request_body"),
        ("second", "response_headers"),
        ("first", "response_headers"),
        ("first", "complete"),
        ("second", "complete"),
    ]


def test_local_reply(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "filters": _filters("BlockFactory")})
    status, headers, body = _split(raw_exchange(proxy.port, _request(extra=b"X-Block: 1\r\n")))
    assert status == 403 and json.loads(body)["error"]["code"] == "blocked"
    assert int(headers["content-length"]) == len(body)
    assert mock.requests == []
    assert _split(raw_exchange(proxy.port, _request()))[0] == 200


def test_body_replacement_sets_exact_content_length(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "filters": _filters("ReplaceBodyFactory")}
    )
    status, headers, body = _split(raw_exchange(proxy.port, _request()))
    assert status == 200
    payload = json.loads(body)
    assert payload["replaced"] is True and payload["original_bytes"] > 100
    assert headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in headers


@pytest.mark.parametrize("skip", [False, True])
def test_skip_response_body_relays_it_untouched_with_its_length(mock: MockServer, make_proxy: Make, skip: bool) -> None:
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "filters": _filters("UpperUnlessSkippedFactory")}
    )
    factory = tf.UpperUnlessSkippedFactory.instances[-1]
    status, headers, body = _split(raw_exchange(proxy.port, _request(extra=b"X-Skip-Body: 1\r\n" if skip else b"")))
    assert status == 200
    if skip:
        assert factory.calls == 0
        assert json.loads(body)["object"] == "chat.completion"
        assert headers["content-length"] == str(len(body))  # the provider's own framing
    else:
        assert factory.calls > 0
        assert b'"OBJECT":"CHAT.COMPLETION"' in body
        # a JSON reply is held to its end (limits.json_hold_bytes): the proxy's exact length, not chunks
        assert headers["content-length"] == str(len(body))
        assert "transfer-encoding" not in headers


def test_skip_response_body_mid_stream_stops_the_calls(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "filters": _filters("FirstEventOnlyFactory", "UpperUnlessSkippedFactory"),
        }
    )
    first, upper = tf.FirstEventOnlyFactory.instances[-1], tf.UpperUnlessSkippedFactory.instances[-1]
    status, _, body = _split(raw_exchange(proxy.port, _request(STREAM_BODY, b"X-Mock-Tokens: 5\r\n")))
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) >= 6
    assert len(first.seen) == 1  # then it opted out; the other filter still saw every event
    assert upper.calls >= len(events)
    assert all(e.startswith(b"DATA: ") for e in events)


def test_async_hook_rewrites_request_json(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "filters": _filters("AsyncModelRewriteFactory")}
    )
    assert _split(raw_exchange(proxy.port, _request()))[0] == 200
    assert mock.requests[-1].model == "rewritten-m"
    assert mock.requests[-1].headers["content-length"] == str(len(BODY) + len("rewritten-"))


def test_filter_failure_is_500_with_request_id_and_no_internals(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "filters": _filters("BoomFactory")})
    status, _headers, body = _split(raw_exchange(proxy.port, _request(extra=b"X-Request-Id: rid-123\r\n")))
    assert status == 500
    err = json.loads(body)["error"]
    assert "rid-123" in err["message"] and err["code"] == "filter_error"
    assert b"sk-should-not-leak" not in body and b"Traceback" not in body
    assert mock.requests == []


def test_fail_open_filter_is_skipped(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "filters": _filters("BoomOpenFactory")})
    assert _split(raw_exchange(proxy.port, _request()))[0] == 200


def test_retry_to_another_upstream(mock: MockServer, loop_thread: LoopThread, make_proxy: Make) -> None:
    from llmproxy.mock import MockConfig, start_mock

    backup = loop_thread.call(start_mock("127.0.0.1", 0, MockConfig()))
    try:
        proxy = make_proxy(
            {
                "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
                "filters": [
                    {
                        "name": "tests.filters_for_tests:RetryElsewhereFactory",
                        "config": {"fallback_url": f"http://127.0.0.1:{backup.port}"},
                    }
                ],
            }
        )
        for fault in (b"X-Mock-Status: 503\r\n", b"X-Mock-Fault: reset\r\n"):
            status, headers, body = _split(raw_exchange(proxy.port, _request(extra=fault)))
            assert status == 200, body
            assert headers["x-attempts"] == "2"
        assert len(mock.requests) == 2 and len(backup.requests) == 2
    finally:
        loop_thread.call(backup.close())


def test_retry_when_stream_ends_before_content(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{mock.port}"}, "filters": _filters("HoldUntilContentFactory")}
    )
    response = raw_exchange(proxy.port, _request(STREAM_BODY, b"X-Mock-Fault: drop\r\nX-Mock-Stall-After: 0\r\n"))
    status, _, body = _split(response)
    assert status == 200
    assert b"[DONE]" in body and b'"error"' not in body
    assert len(mock.requests) == 2


class _FragmentingUpstream(asyncio.Protocol):
    """Writes an SSE response split at awkward byte boundaries, slowly."""

    EVENTS = [b'data: {"n":%d,"text":"token %d"}\n\n' % (i, i) for i in range(6)] + [b"data: [DONE]\n\n"]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            asyncio.get_running_loop().create_task(self._respond())

    async def _respond(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        raw = b"".join(self.EVENTS)
        for i in range(0, len(raw), 7):
            self.transport.write(raw[i : i + 7])
            await asyncio.sleep(0.002)
        self.transport.close()


@pytest.fixture
def fragmenting_upstream(loop_thread: LoopThread) -> Iterator[int]:
    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_FragmentingUpstream, "127.0.0.1", 0)

    server = loop_thread.call(start())
    yield server.sockets[0].getsockname()[1]
    server.close()


def test_sse_filter_sees_whole_events_and_rewrites(fragmenting_upstream: int, make_proxy: Make) -> None:
    tf.SseRewriteFactory.instances.clear()
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{fragmenting_upstream}"}, "filters": _filters("SseRewriteFactory")}
    )
    status, _, body = _split(raw_exchange(proxy.port, _request(STREAM_BODY)))
    assert status == 200
    factory = tf.SseRewriteFactory.instances[-1]
    assert factory.events == _FragmentingUpstream.EVENTS  # whole events, never fragments
    assert b"[DONE]" not in body  # dropped
    assert body.count(b"TOKEN") == 6  # rewritten
    assert body.endswith(b'event: injected\ndata: {"by":"filter"}\n\n')  # injected


def test_observer_never_delays_events(fragmenting_upstream: int, make_proxy: Make) -> None:
    tf.ObserverFactory.instances.clear()
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{fragmenting_upstream}"}, "filters": _filters("ObserverFactory")}
    )
    status, _, body = _split(raw_exchange(proxy.port, _request(STREAM_BODY)))
    assert status == 200
    assert body == b"".join(_FragmentingUpstream.EVENTS)
    seen = tf.ObserverFactory.instances[-1].seen
    assert [d for _, d, end in seen if not end] == _FragmentingUpstream.EVENTS
    assert seen[-1][2] is True


def test_end_hook_runs_once_on_every_path(mock: MockServer, make_proxy: Make) -> None:
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}", "timeouts": {"headers": 0.3}},
            "filters": [{"name": "tests.filters_for_tests:RecorderFactory", "config": {"tag": "paths"}}],
        }
    )
    cases = {
        b"": "complete",
        b"X-Mock-Status: 500\r\n": "complete",
        b"X-Mock-Fault: reset\r\n": "complete:upstream_connect_error",
        b"X-Mock-Fault: stall\r\n": "complete:upstream_timeout",
    }
    for extra, expected in cases.items():
        _, headers, _ = _split(raw_exchange(proxy.port, _request(extra=extra)))
        rid = headers["x-request-id"]
        time.sleep(0.02)
        completes = [hook for tag, hook, r in tf.CALLS if r == rid and hook.startswith("complete")]
        assert completes == [expected], (extra, completes)
    bad = raw_exchange(proxy.port, _request(b"{not json"))
    assert status_of(bad) == 400


class _OneWriteUpstream(_FragmentingUpstream):
    """Writes the whole SSE response in one write (many events in one upstream read)."""

    async def _respond(self) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        self.transport.write(head + b"".join(self.EVENTS))
        self.transport.close()


@pytest.fixture
def one_write_upstream(loop_thread: LoopThread) -> Iterator[int]:
    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_OneWriteUpstream, "127.0.0.1", 0)

    server = loop_thread.call(start())
    yield server.sockets[0].getsockname()[1]
    server.close()


def test_a_batch_filter_gets_a_read_of_whole_events_in_one_call(one_write_upstream: int, make_proxy: Make) -> None:
    tf.BatchRecorderFactory.instances.clear()
    proxy = make_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{one_write_upstream}"}, "filters": _filters("BatchRecorderFactory")}
    )
    status, _, body = _split(raw_exchange(proxy.port, _request(STREAM_BODY)))
    assert status == 200
    assert body == b"".join(_OneWriteUpstream.EVENTS)
    calls = tf.BatchRecorderFactory.instances[-1].calls
    assert b"".join(calls) == body
    assert len(calls) < len(_OneWriteUpstream.EVENTS)  # batched, not one call per event
    assert all(call.endswith(b"\n\n") for call in calls)  # whole events only


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-filter-first", "batch-filter-last"])
def test_a_per_event_filter_still_sees_one_event_per_call_next_to_a_batch_filter(
    one_write_upstream: int, make_proxy: Make, batch_first: bool
) -> None:
    tf.BatchRecorderFactory.instances.clear()
    tf.SseRewriteFactory.instances.clear()
    # response hooks run in reverse chain order: the last filter listed sees the body first
    names = (
        ("SseRewriteFactory", "BatchRecorderFactory") if batch_first else ("BatchRecorderFactory", "SseRewriteFactory")
    )
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{one_write_upstream}"}, "filters": _filters(*names)})
    status, _, body = _split(raw_exchange(proxy.port, _request(STREAM_BODY)))
    assert status == 200
    assert tf.SseRewriteFactory.instances[-1].events == _OneWriteUpstream.EVENTS  # one whole event per call
    assert body.count(b"TOKEN") == 6 and b"[DONE]" not in body
    calls = tf.BatchRecorderFactory.instances[-1].calls
    if batch_first:
        assert len(calls) == 1 and calls[0] == b"".join(_OneWriteUpstream.EVENTS)
    else:
        assert b"".join(calls) == body  # what the rewrite released, whole events
