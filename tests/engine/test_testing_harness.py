"""proxy.testing: FilterHarness drives one filter hook by hook; ChainHarness runs whole exchanges
through the real chain and attempt loop, without sockets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import orjson
import pytest

from llmproxy import Action, Exchange, FactoryContext, Filter, FilterFactory, InvalidJSON
from llmproxy.attempt import Attempt, Outcome
from llmproxy.errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from llmproxy.filters.headers import HeadersFilterFactory
from llmproxy.testing import ChainHarness, FilterHarness, HarnessError, ScriptedReply

from .. import filters_for_tests as tf


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


# -- ChainHarness: whole exchanges through the real chain and attempt loop ------------------


class _LifecycleFilter(Filter):
    """Records ``on_attempt_complete`` and ``on_exchange_complete`` (into its factory)."""

    factory: _LifecycleFactory

    def on_attempt_complete(self, exchange: Exchange, attempt: Attempt) -> None:
        self.factory.seen.append((attempt.number, attempt.outcome, attempt.status))

    def on_exchange_complete(self, exchange: Exchange) -> None:
        self.factory.completed.append(exchange.id)


class _LifecycleFactory(FilterFactory):
    filter_class = _LifecycleFilter

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.seen: list[tuple[int, Outcome, int | None]] = []
        self.completed: list[str] = []


STREAM = {"model": "m", "stream": True}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chain_several_filters_on_a_stream() -> None:
    chain = [
        (HeadersFilterFactory, {"response": {"set": {"x-served-by": "llmproxy"}}}),
        tf.ObserverFactory,
        tf.SseRewriteFactory,
        _LifecycleFactory,
    ]
    with ChainHarness(chain) as h:
        h.reply(ScriptedReply(events=["token 1", b"data: token 2\n\n", "[DONE]"]))
        r = h.send(json=STREAM, headers={"x-request-id": "req-7"})
        assert r.status == 200
        assert r.headers.get("x-served-by") == "llmproxy"
        assert r.headers.get("transfer-encoding") == "chunked"
        assert r.headers.get("content-type") == "text/event-stream"
        assert [(e.event, e.data) for e in r.events] == [
            (None, b"data: TOKEN 1".removeprefix(b"data: ")),
            (None, b"TOKEN 2"),
            (b"injected", b'{"by":"filter"}'),
        ]
        observer = cast(tf.ObserverFactory, h.factories[1])
        assert b"".join(data for _, data, _ in observer.seen) == r.body  # observers see the client's bytes
        assert observer.seen[-1][2] is True
        rewrite = cast(tf.SseRewriteFactory, h.factories[2])
        assert rewrite.events == [b"data: token 1\n\n", b"data: token 2\n\n", b"data: [DONE]\n\n"]
        life = cast(_LifecycleFactory, h.factories[3])
        assert life.seen == [(1, Outcome.COMPLETED, 200)] and life.completed == [r.exchange.id]
        assert r.outcomes == [Outcome.COMPLETED]
        sent = r.upstream_requests[0]
        assert sent.method == "POST" and sent.path == "/v1/chat/completions" and sent.json() == STREAM
        assert sent.headers.get("x-request-id") == r.exchange.id == r.headers.get("x-request-id") == "req-7"


def test_chain_retry_sends_the_next_scripted_reply() -> None:
    chain = [(tf.RetryElsewhereFactory, {"fallback_url": "http://fallback.test/base"}), _LifecycleFactory]
    with ChainHarness(chain) as h:
        h.reply(ScriptedReply(503, json={"error": {"message": "busy"}}), ScriptedReply(json={"ok": True}))
        r = h.send(json=CHAT)
        assert r.status == 200 and r.json() == {"ok": True}
        assert r.headers.get("x-attempts") == "2" and r.headers.get("content-length") == str(len(r.body))
        assert r.outcomes == [Outcome.RETRIED, Outcome.COMPLETED]
        assert [a.status for a in r.attempts] == [503, 200]
        assert [q.target.name for q in r.upstream_requests] == ["default", "fallback"]
        assert r.upstream_requests[1].path == "/base/v1/chat/completions"
        assert cast(_LifecycleFactory, h.factories[1]).seen == [(1, Outcome.RETRIED, 503), (2, Outcome.COMPLETED, 200)]
        assert all(resp.released or resp.closed for resp in h.upstream.responses)


def test_chain_upstream_error_at_send_is_presented_to_the_hooks() -> None:
    with ChainHarness([(tf.RetryElsewhereFactory, {"fallback_url": "http://fallback.test"})]) as h:
        h.reply(ScriptedReply(error=UpstreamConnectError("refused")), ScriptedReply(json={"ok": 1}))
        r = h.send(json=CHAT)
        assert r.status == 200 and r.outcomes == [Outcome.RETRIED, Outcome.COMPLETED]
        assert isinstance(r.attempts[0].error, UpstreamConnectError)
    with ChainHarness() as h:
        h.reply(ScriptedReply(error=UpstreamTimeout("slow", phase="headers")))
        r = h.send(json=CHAT)
        assert r.status == 504 and r.json()["error"]["code"] == "upstream_timeout"
        assert r.outcomes == [Outcome.FAILED]


@pytest.mark.parametrize("skip", [False, True])
def test_chain_skip_response_body(skip: bool) -> None:
    with ChainHarness([tf.UpperUnlessSkippedFactory]) as h:
        h.reply(ScriptedReply(body=b"hello", headers={"content-type": "text/plain"}))
        r = h.send(json=CHAT, headers={"x-skip-body": "1"} if skip else {})
        factory = cast(tf.UpperUnlessSkippedFactory, h.factories[0])
        if skip:  # untouched, with the upstream's counted length
            assert r.body == b"hello" and r.headers.get("content-length") == "5" and factory.calls == 0
        else:
            assert r.body == b"HELLO" and factory.calls > 0


def test_chain_pause_replaces_the_body_with_an_exact_length() -> None:
    with ChainHarness([tf.ReplaceBodyFactory]) as h:
        h.reply(ScriptedReply(chunks=[b'{"a":', b"1}"], headers={"content-type": "application/json"}))
        r = h.send(json=CHAT)
        assert r.body == b'{"replaced":true,"original_bytes":7}'
        assert r.headers.get("content-length") == str(len(r.body)) and "transfer-encoding" not in r.headers


@pytest.mark.parametrize(
    ("reply", "status", "aborted", "last_event"),
    [
        # a stream that fails after its head: the core's final SSE error event
        (ScriptedReply(events=["one", UpstreamProtocolError("reset")]), 200, False, "upstream_protocol_error"),
        (ScriptedReply(events=["one", UpstreamTimeout("idle", phase="idle")]), 200, False, "upstream_timeout"),
        # a held JSON reply cut short: a clean envelope instead of half a 200
        (
            ScriptedReply(
                chunks=[b'{"a":', UpstreamProtocolError("reset")], headers={"content-type": "application/json"}
            ),
            502,
            False,
            None,
        ),
        # a non-JSON body past its head: the connection is closed
        (
            ScriptedReply(chunks=[b"abc", UpstreamProtocolError("reset")], headers={"content-type": "text/plain"}),
            200,
            True,
            None,
        ),
    ],
)
def test_chain_upstream_error_mid_body(
    reply: ScriptedReply, status: int, aborted: bool, last_event: str | None
) -> None:
    with ChainHarness([_LifecycleFactory]) as h:
        h.reply(reply)
        r = h.send(json=STREAM)
        assert r.status == status and r.aborted is aborted
        assert r.outcomes == [Outcome.FAILED]
        assert isinstance(r.attempts[0].error, UpstreamError)
        assert r.exchange.error is not None
        if last_event is not None:
            assert r.events[0].data == b"one" and orjson.loads(r.events[-1].data)["error"]["code"] == last_event
        assert cast(_LifecycleFactory, h.factories[0]).completed == [r.exchange.id]
        assert h.upstream.responses[0].closed


def test_chain_local_reply_never_reaches_the_upstream() -> None:
    with ChainHarness([tf.BlockFactory, _LifecycleFactory]) as h:
        r = h.send(json=CHAT, headers={"x-block": "1"})
        assert r.status == 403 and r.json()["error"]["code"] == "blocked"
        assert r.upstream_requests == [] and r.attempts == []
        assert cast(_LifecycleFactory, h.factories[1]).completed == [r.exchange.id]


def test_chain_errors_and_misuse() -> None:
    with ChainHarness([tf.BoomFactory]) as h:
        r = h.send(json=CHAT)
        assert r.status == 500 and "BoomFactory" in r.json()["error"]["message"]
    with ChainHarness() as h:
        assert h.send("GET", "/nope").status == 404
        with pytest.raises(HarnessError, match="no scripted upstream reply"):
            h.send(json=CHAT)


class _StampFilter(Filter):
    def on_response_headers(self, exchange: Exchange) -> Action:
        assert exchange.response is not None
        exchange.response.headers.set("x-stamp", str(self.factory.config.get("value", "stamped")))
        return Action.CONTINUE


class _StampFactory(FilterFactory):
    filter_class = _StampFilter


def test_the_documented_example() -> None:
    """The example of proxy/testing.py's docstring and README's "Writing a filter", as written there."""
    chain = [(tf.RetryElsewhereFactory, {"fallback_url": "http://b.test"}), (_StampFactory, {"value": "x"})]
    with ChainHarness(chain) as h:
        h.reply(
            ScriptedReply(503, json={"error": {"message": "busy"}}),
            ScriptedReply(events=[{"choices": [{"delta": {"content": "hi"}}]}, "[DONE]"]),
        )
        r = h.send("POST", "/v1/chat/completions", json={"model": "m", "stream": True})
        assert r.status == 200 and r.headers.get("x-stamp") == "x"
        assert r.events[-1].data == b"[DONE]"
        assert r.outcomes == [Outcome.RETRIED, Outcome.COMPLETED]
        assert r.upstream_requests[1].target.name == "fallback"

        h.reply(ScriptedReply(events=["one", UpstreamProtocolError("reset")]))
        r = h.send(json={"model": "m", "stream": True})
        assert b"upstream_protocol_error" in r.events[-1].data
