"""Hardening of the exchange driver: errors in the client's protocol, held JSON replies,
secrets, deep JSON, validated error headers, end hooks at shutdown.

Every test drives a real proxy over loopback, against the mock provider or a
scripted upstream (an asyncio server that answers by an ``x-script`` header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import anthropic
import httpx2
import openai
import pytest

from llmproxy import Action, Exchange, FactoryContext, Filter, FilterFactory, ProxyError
from llmproxy.mock import MockServer

from ..support import LoopThread, RunningProxy, raw_exchange, start_proxy, status_of

HI: list[Any] = [{"role": "user", "content": "hello there"}]
PROVIDER_KEY = "sk-live-provider-SECRET-T123"
MASKED = "sk-live-*****T123"


# -- a scripted upstream -----------------------------------------------------------------


class _Scripted(asyncio.Protocol):
    """Answers one request per connection by its ``x-script`` header; records request heads."""

    heads: ClassVar[list[bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        _Scripted.heads.append(head)
        self.buf = b""
        script = next(
            (line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"x-script:")),
            b"ok",
        )
        self._answer(script, head)

    def _json(self, status: bytes, body: bytes, extra: bytes = b"") -> None:
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, body)
        )

    def _answer(self, script: bytes, head: bytes) -> None:
        ok = json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        if script == b"json-cut":  # closes after 10 of the promised bytes
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(ok), ok[:10])
            )
            self.transport.close()
        elif script == b"json-stall":  # 10 bytes, then silence
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(ok), ok[:10])
            )
        elif script == b"chunked-cut":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                b"a\r\n%s\r\n" % ok[:10]
            )
            self.transport.close()
        elif script == b"auth-401":
            message = f"Incorrect API key provided: {MASKED}. Your key {PROVIDER_KEY} is wrong."
            self._json(b"401 Unauthorized", json.dumps({"error": {"message": message, "type": "x"}}).encode())
        elif script == b"auth-403":
            self._json(b"403 Forbidden", b'{"error":{"message":"key ' + PROVIDER_KEY.encode() + b' is disabled"}}')
        elif script == b"auth-401-html":
            body = b"<html>401 for " + PROVIDER_KEY.encode() + b"</html>"
            self.transport.write(
                b"HTTP/1.1 401 Unauthorized\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
        elif script == b"error-quotes-key":
            message = f"bad request for key {PROVIDER_KEY} ({MASKED})"
            self._json(b"400 Bad Request", json.dumps({"error": {"message": message, "type": "x"}}).encode())
        elif script == b"sse-cut":  # a stream that dies after its first content event
            chunk = json.dumps(
                {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"content": "hel"}, "finish_reason": None}],
                },
                separators=(",", ":"),
            ).encode()
            event = b"data: " + chunk + b"\n\n"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n" % (len(event), event)
            )
            self.transport.close()
        else:
            self._json(b"200 OK", ok)


@pytest.fixture
def scripted(loop_thread: LoopThread) -> Iterator[int]:
    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_Scripted, "127.0.0.1", 0)

    _Scripted.heads.clear()
    server = loop_thread.call(start())
    yield server.sockets[0].getsockname()[1]
    server.close()


def _routing(port: int, provider_type: str = "openai", **extra: Any) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}/v1" if provider_type == "openai" else f"http://127.0.0.1:{port}"
    provider = {"name": "p", "type": provider_type, "base_url": base, "keys": [PROVIDER_KEY], "models": ["m"]}
    provider.update(extra)
    return {"server": {"access_log": "off"}, "filters": [{"name": "routing", "config": {"providers": [provider]}}]}


def _post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.post(
        f"http://127.0.0.1:{port}{path}",
        content=body,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=10,
    )


def _anthropic_error(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    error: dict[str, Any] = body["error"]
    return error


# -- errors in the client's protocol -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "anthropic_type"),
    [
        ("/v1/messages", b"{not json", 400, "invalid_request_error"),
        ("/v1/messages", b'{"model": "nope", "max_tokens": 5, "messages": []}', 404, "not_found_error"),
        ("/v1/messages", b'{"max_tokens": 5, "messages": []}', 400, "invalid_request_error"),
        ("/v1/messages", b"[" * 300 + b"]" * 300, 400, "invalid_request_error"),
        ("/v1/messages/batches", b"{}", 404, "not_found_error"),
        ("/v1/messages/count_tokens", b"{bad", 400, "invalid_request_error"),
    ],
)
def test_the_proxys_own_errors_are_anthropic_shaped_on_messages(
    mock: MockServer, make_proxy: Any, path: str, body: bytes, status: int, anthropic_type: str
) -> None:
    proxy = make_proxy(_routing(mock.port, "anthropic"))
    response = _post(proxy.port, path, body)
    assert response.status_code == status
    assert _anthropic_error(response)["type"] == anthropic_type


def test_the_anthropic_sdk_raises_on_the_proxys_own_error(mock: MockServer, make_proxy: Any) -> None:
    proxy = make_proxy(_routing(mock.port, "anthropic"))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=5, messages=HI)
    body: Any = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("provider_type", ["anthropic", "openai"])  # same protocol, and translated
def test_a_stream_cut_mid_body_raises_in_the_anthropic_sdk(
    mock: MockServer, make_proxy: Any, provider_type: str
) -> None:
    """An error after the stream started is Anthropic's ``event: error``: the SDK raises, never a silent end."""
    proxy = make_proxy(_routing(mock.port, provider_type))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0, timeout=10)
    texts: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(
            model="m", max_tokens=50, messages=HI, extra_headers={"x-mock-fault": "drop", "x-mock-stall-after": "2"}
        ) as stream,
    ):
        for text in stream.text_stream:
            texts.append(text)
    assert texts  # content had reached the client before the cut
    body: Any = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "api_error"


def test_a_stream_cut_mid_body_is_an_openai_error_event_for_openai_clients(mock: MockServer, make_proxy: Any) -> None:
    proxy = make_proxy(_routing(mock.port, "anthropic"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="m", messages=HI, stream=True, extra_headers={"x-mock-fault": "drop", "x-mock-stall-after": "2"}
        ):
            pass


# -- same-protocol JSON replies are held to their end --------------------------------------


@pytest.mark.parametrize(
    ("script", "status", "code"),
    [
        ("json-cut", 502, "upstream_protocol_error"),
        ("chunked-cut", 502, "upstream_protocol_error"),
        ("json-stall", 504, "upstream_timeout"),
    ],
)
@pytest.mark.parametrize("routed", [False, True])
def test_a_json_reply_failing_after_its_head_is_a_clean_envelope(
    scripted: int, make_proxy: Any, script: str, status: int, code: str, routed: bool
) -> None:
    timeouts = {"connect": 2, "headers": 2, "idle": 0.3, "total": 5}
    if routed:
        config = _routing(scripted, timeouts=timeouts)
    else:
        config = {
            "server": {"access_log": "off"},
            "upstream": {"url": f"http://127.0.0.1:{scripted}", "timeouts": timeouts},
        }
    proxy = make_proxy(config)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=HI, extra_headers={"x-script": script})
    assert info.value.status_code == status
    body: Any = info.value.body
    assert body["code"] == code
    # the connection is usable for the next request
    assert client.chat.completions.create(model="m", messages=HI).choices[0].message.content == "hi"


def test_a_held_json_failure_is_retried_on_the_next_key(scripted: int, make_proxy: Any) -> None:
    config = _routing(scripted)
    config["filters"][0]["config"]["providers"][0]["keys"] = [PROVIDER_KEY, "sk-second-key-0000"]
    config["filters"].append({"name": "failover", "config": {"max_attempts": 2}})
    proxy = make_proxy(config)
    response = _post(
        proxy.port,
        "/v1/chat/completions",
        json.dumps({"model": "m", "messages": HI}).encode(),
        {"x-script": "json-cut"},
    )
    # every attempt gets the same script here, so both fail: the envelope keeps the filters' headers
    assert response.status_code == 502
    assert response.headers["x-llmproxy-attempts"] == "2"
    assert response.json()["error"]["code"] == "upstream_protocol_error"


def test_headers_set_by_filters_survive_an_error_after_a_held_read(scripted: int, make_proxy: Any) -> None:
    """A stream that fails while failover holds it: the error keeps x-llmproxy-attempts and header edits."""
    config = _routing(scripted)
    config["filters"] += [
        {"name": "failover", "config": {"max_attempts": 1}},
        {"name": "headers", "config": {"response": {"set": {"x-served-by": "llmproxy"}}}},
    ]
    proxy = make_proxy(config)
    response = _post(
        proxy.port,
        "/v1/chat/completions",
        json.dumps({"model": "m", "messages": HI, "stream": True}).encode(),
        {"x-script": "sse-cut"},
    )
    assert response.status_code == 200  # content had been released: the stream ends with an error event
    response = _post(
        proxy.port,
        "/v1/chat/completions",
        json.dumps({"model": "m", "messages": HI}).encode(),
        {"x-script": "json-cut"},
    )
    assert response.status_code == 502
    assert response.headers["x-llmproxy-attempts"] == "1"
    assert response.headers["x-served-by"] == "llmproxy"


# -- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["auth-401", "auth-403", "auth-401-html"])
@pytest.mark.parametrize("client_path", ["/v1/chat/completions", "/v1/messages"])
def test_a_provider_auth_error_never_relays_the_providers_text(
    scripted: int, make_proxy: Any, script: str, client_path: str
) -> None:
    proxy = make_proxy(_routing(scripted))
    body = {"model": "m", "messages": HI, "max_tokens": 5}
    response = _post(proxy.port, client_path, json.dumps(body).encode(), {"x-script": script})
    assert response.status_code == (403 if script == "auth-403" else 401)
    assert PROVIDER_KEY not in response.text and "T123" not in response.text
    assert "refused the credential the proxy holds" in response.text
    if client_path == "/v1/messages":
        assert _anthropic_error(response)["type"] in ("authentication_error", "permission_error")
    else:
        assert response.json()["error"]["code"] == "provider_auth_failed"


def test_a_default_upstreams_auth_error_is_rewritten_too(scripted: int, make_proxy: Any) -> None:
    proxy = make_proxy(
        {
            "server": {"access_log": "off"},
            "upstream": {"url": f"http://127.0.0.1:{scripted}", "headers": {"authorization": f"Bearer {PROVIDER_KEY}"}},
        }
    )
    response = _post(proxy.port, "/v1/chat/completions", b"{}", {"x-script": "auth-401"})
    assert response.status_code == 401
    assert PROVIDER_KEY not in response.text and MASKED not in response.text


@pytest.mark.parametrize("client_path", ["/v1/chat/completions", "/v1/messages"])
def test_provider_error_text_quoting_the_key_is_redacted(scripted: int, make_proxy: Any, client_path: str) -> None:
    proxy = make_proxy(_routing(scripted))
    body = {"model": "m", "messages": HI, "max_tokens": 5}
    response = _post(proxy.port, client_path, json.dumps(body).encode(), {"x-script": "error-quotes-key"})
    assert response.status_code == 400
    assert PROVIDER_KEY not in response.text and MASKED not in response.text
    assert "[redacted]" in response.text
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        ("?api_key=sk-client-1", b""),
        ("?key=sk-client-1", b""),
        ("?API_KEY=sk-client-1&x=1", b"?x=1"),
        ("?api%5Fkey=sk-client-1", b""),
        ("?api-key=sk-client-1&api-version=2024-10-21", b"?api-version=2024-10-21"),
        ("?a=1&access_token=sk-client-1&b=2", b"?a=1&b=2"),
        ("?apikey=sk-client-1", b""),
        ("?x=1", b"?x=1"),
    ],
)
@pytest.mark.parametrize("routed", [False, True])
def test_client_credentials_in_the_query_never_reach_the_provider(
    scripted: int, make_proxy: Any, query: str, forwarded: bytes, routed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = (
        _routing(scripted)
        if routed
        else {"server": {"access_log": "text"}, "upstream": {"url": f"http://127.0.0.1:{scripted}"}}
    )
    config["server"] = {"access_log": "text"}
    proxy = make_proxy(config)
    response = _post(proxy.port, "/v1/chat/completions" + query, json.dumps({"model": "m", "messages": HI}).encode())
    assert response.status_code == 200
    request_line = _Scripted.heads[-1].split(b"\r\n", 1)[0]
    assert request_line == b"POST /v1/chat/completions" + forwarded + b" HTTP/1.1"
    assert b"sk-client-1" not in _Scripted.heads[-1]
    proxy_lines = [r.getMessage() for r in caplog.records if r.name.startswith("llmproxy")]
    assert proxy_lines and not any("sk-client-1" in line for line in proxy_lines)


# -- bad input: deep JSON, invalid header values from filters ------------------------------


@pytest.mark.parametrize("depth", [255, 300, 1000, 1023, 1024, 1025, 5000])
@pytest.mark.parametrize("routed", [False, True])
def test_json_deeper_than_the_proxy_can_write_is_a_400(
    mock: MockServer, make_proxy: Any, depth: int, routed: bool
) -> None:
    config = _routing(mock.port) if routed else {"upstream": {"url": f"http://127.0.0.1:{mock.port}"}}
    proxy = make_proxy(config)
    nested = b'{"model": "m", "messages": [], "x": ' + b"[" * depth + b"]" * depth + b"}"
    response = _post(proxy.port, "/v1/chat/completions", nested)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] in ("json_too_deep", "invalid_json")
    assert "254" in error["message"]
    assert mock.requests == []


def test_json_at_the_deepest_writable_level_goes_upstream(mock: MockServer, make_proxy: Any) -> None:
    proxy = make_proxy(_routing(mock.port))
    depth = 254 - 2  # the object and the "x" array count
    nested = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * depth
    nested += b"]" * depth + b"}"
    response = _post(proxy.port, "/v1/chat/completions", nested)
    assert response.status_code == 200, response.text


class _InjectingFilter(Filter):
    factory: _InjectingFactory

    def on_request_headers(self, exchange: Exchange) -> Action:
        how = exchange.request.headers.get("x-inject")
        value = "ok\r\nset-cookie: injected=1"
        if how == "local":
            exchange.send_local_reply(200, b"x", headers=[("x-note", value)])
        elif how == "local-ctl":
            exchange.send_local_reply(200, b"x", headers=[("x-note", "a\x7fb")])
        elif how == "local-name":
            exchange.send_local_reply(200, b"x", headers=[("x note", "v")])
        elif how == "error":
            raise ProxyError("nope", status=429, headers=[("retry-after", value)])
        elif how == "error-lf":
            raise ProxyError("nope", status=429, headers=[("retry-after", "1\nx-evil: 1")])
        return Action.CONTINUE


class _InjectingFactory(FilterFactory):
    filter_class = _InjectingFilter

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)


@pytest.mark.parametrize("how", ["local", "local-ctl", "local-name", "error", "error-lf"])
def test_header_values_from_filters_are_validated(mock: MockServer, make_proxy: Any, how: str) -> None:
    proxy = make_proxy(
        {
            "server": {"access_log": "off"},
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "filters": [{"name": "tests.engine.test_hardening_core:_InjectingFactory"}],
        }
    )
    raw = raw_exchange(
        proxy.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nX-Inject: %s\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}" % how.encode(),
    )
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert b"set-cookie" not in head and b"x-evil" not in head
    assert status_of(raw) == 500


# -- shutdown: async end hooks finish before the store closes ------------------------------


class _SlowEndFilter(Filter):
    factory: _SlowEndFactory

    async def on_exchange_complete(self, exchange: Exchange) -> None:
        await asyncio.sleep(0.2)
        await self.factory.context.store.set("end-hook", b"done")
        self.factory.finished += 1


class _SlowEndFactory(FilterFactory):
    filter_class = _SlowEndFilter
    instances: ClassVar[list[_SlowEndFactory]] = []

    def __init__(self, name: str, config: Mapping[str, Any], context: FactoryContext) -> None:
        super().__init__(name, config, context)
        self.finished = 0
        self.finished_at_close = -1
        _SlowEndFactory.instances.append(self)

    async def close(self) -> None:
        self.finished_at_close = self.finished


def test_async_end_hooks_finish_before_the_store_closes(mock: MockServer, loop_thread: LoopThread) -> None:
    running: RunningProxy = start_proxy(
        loop_thread,
        {
            "server": {"access_log": "off"},
            "upstream": {"url": f"http://127.0.0.1:{mock.port}"},
            "filters": [{"name": "tests.engine.test_hardening_core:_SlowEndFactory"}],
        },
    )
    factory = _SlowEndFactory.instances[-1]
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        body = json.dumps({"model": "m", "messages": HI, "stream": True}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nx-mock-fault: stall\r\n"
            b"content-type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        running.stop(0.1)  # the stream is cut at once: its end hook still runs to its end
    assert factory.finished == 1
    assert factory.finished_at_close == 1


# -- the connection's own rejections speak the client's protocol too -----------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /v1/messages HTTP/1.1\r\nHost: p\r\nContent-Length: 999999999\r\n\r\n", 413),
        (b"POST /v1/messages HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /v1/messages HTTP/1.1\r\nHost: p\r\nX-Bad: a\x7fb\r\nContent-Length: 0\r\n\r\n", 400),
        (b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: p\nX: y\r\n\r\n", 400),
        (b"POST http://p/v1/messages HTTP/1.1\r\nHost: p\r\nContent-Length: 999999999\r\n\r\n", 413),
        (b"POST /v1/messages HTTP/1.1\r\nHost: p\r\n" + b"X-F: v\r\n" * 200 + b"\r\n", 431),
    ],
)
def test_rejections_of_anthropic_requests_are_anthropic_shaped(
    mock: MockServer, make_proxy: Any, head: bytes, status: int
) -> None:
    proxy = make_proxy({"server": {"access_log": "off"}, "upstream": {"url": f"http://127.0.0.1:{mock.port}"}})
    raw = raw_exchange(proxy.port, head)
    assert status_of(raw) == status
    body = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 999999999\r\n\r\n",
        b"POST /v1/messagesX HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ],
)
def test_other_rejections_stay_openai_shaped(mock: MockServer, make_proxy: Any, head: bytes) -> None:
    proxy = make_proxy({"server": {"access_log": "off"}, "upstream": {"url": f"http://127.0.0.1:{mock.port}"}})
    raw = raw_exchange(proxy.port, head)
    body = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body


@pytest.mark.parametrize("option", ["probe_interval=abc", "probe_interval=-1"])
def test_a_bad_store_option_is_a_config_error_naming_the_field(loop_thread: LoopThread, option: str) -> None:
    from llmproxy.runtime.app import make_store
    from llmproxy.runtime.config import ConfigError

    with pytest.raises(ConfigError) as info:
        loop_thread.call(make_store(f"redis://127.0.0.1:1/0?{option}", "conf.yaml"))
    assert "conf.yaml: store:" in str(info.value) and "probe_interval" in str(info.value)
