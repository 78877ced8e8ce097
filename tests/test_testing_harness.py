"""proxy.testing.FilterHarness drives one filter hook by hook, without sockets."""

from __future__ import annotations

import pytest

from filters.headers import HeadersFilterFactory
from proxy import Action, InvalidJSON
from proxy.testing import FilterHarness

from . import filters_for_tests as tf


def test_headers_filter_through_harness() -> None:
    with FilterHarness(
        HeadersFilterFactory,
        {"request": {"set": {"x-team": "a"}, "remove": ["x-debug"]}, "response": {"add": {"x-served-by": "llmproxy"}}},
    ) as h:
        ex = h.exchange(headers={"x-debug": "1", "x-team": "old"}, json={"model": "m"})
        assert h.request_headers(ex) is Action.CONTINUE
        assert ex.request.headers.get("x-team") == "a" and "x-debug" not in ex.request.headers
        assert h.response_headers(ex, 200, {"content-type": "application/json"}) is Action.CONTINUE
        assert ex.response is not None and ex.response.headers.get_all("x-served-by") == ["llmproxy"]


def test_headers_filter_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match=r"request\.sett: unknown key"):
        FilterHarness(HeadersFilterFactory, {"request": {"sett": {}}})


def test_local_reply_and_async_hooks() -> None:
    with FilterHarness(tf.BlockFactory) as h:
        ex = h.exchange(headers={"x-block": "1"})
        h.request_headers(ex)
        reply = h.local_reply(ex)
        assert reply is not None and reply.status == 403
    with FilterHarness(tf.AsyncModelRewriteFactory) as h:
        ex = h.exchange(json={"model": "gpt"})
        assert h.request_body(ex) is Action.CONTINUE
        assert ex.final_request_body() == b'{"model":"rewritten-gpt"}'
        bad = h.exchange(body=b"{nope")
        with pytest.raises(InvalidJSON):
            h.request_body(bad)


def test_pause_then_replace_body() -> None:
    with FilterHarness(tf.ReplaceBodyFactory) as h:
        ex = h.exchange()
        assert h.response_headers(ex) is Action.PAUSE
        action, _ = h.response_body(ex, b'{"a":', False)
        assert action is Action.PAUSE
        action, out = h.response_body(ex, b'{"a":1}', True)
        assert action is Action.CONTINUE and out == b'{"replaced":true,"original_bytes":7}'


def test_response_stream_helper() -> None:
    with FilterHarness(tf.SseRewriteFactory) as h:
        ex = h.exchange()
        h.response_headers(ex, 200, {"content-type": "text/event-stream"})
        out = h.response_stream(ex, b"data: token 1\n\ndata: [DONE]\n\n")
        assert out == b'data: TOKEN 1\n\nevent: injected\ndata: {"by":"filter"}\n\n'


def test_retry_request_is_visible() -> None:
    with FilterHarness(tf.RetryElsewhereFactory, {"fallback_url": "http://127.0.0.1:1"}) as h:
        ex = h.exchange()
        ex.attempts = 1
        h.response_headers(ex, 503)
        assert h.retry_requested(ex) and ex.upstream is not None and ex.upstream.name == "fallback"
