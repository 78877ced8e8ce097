"""The official openai SDK through the proxy to the mock provider."""

from __future__ import annotations

import openai
import pytest

from llmproxy.mock import MockServer

from .support import RunningProxy


def _client(proxy: RunningProxy, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client-key", max_retries=0, timeout=10, **kwargs)  # type: ignore[arg-type]


def test_chat_completion(proxy: RunningProxy, mock: MockServer) -> None:
    reply = _client(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert mock.requests[-1].model == "gpt-test"


def test_chat_completion_stream(proxy: RunningProxy, mock: MockServer) -> None:
    stream = _client(proxy).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 16
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert mock.requests[-1].stream is True


def test_stream_with_usage(proxy: RunningProxy) -> None:
    stream = _client(proxy).chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_embeddings_and_models(proxy: RunningProxy) -> None:
    client = _client(proxy)
    emb = client.embeddings.create(model="emb-test", input=["a", "b"])
    assert len(emb.data) == 2
    models = client.models.list()
    assert len(list(models)) >= 1


def test_client_key_never_reaches_provider(proxy: RunningProxy, mock: MockServer) -> None:
    _client(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    received = mock.requests[-1]
    assert received.credential is None
    assert "sk-client-key" not in repr(received.headers)


@pytest.mark.parametrize(
    ("headers", "exc_type", "status"),
    [
        ({"x-mock-status": "429", "x-mock-retry-after": "3"}, openai.RateLimitError, 429),
        ({"x-mock-status": "401"}, openai.AuthenticationError, 401),
        ({"x-mock-status": "400"}, openai.BadRequestError, 400),
        ({"x-mock-status": "500"}, openai.InternalServerError, 500),
        ({"x-mock-fault": "reset"}, openai.InternalServerError, 502),
    ],
)
def test_errors_surface_as_typed_exceptions(
    proxy: RunningProxy, headers: dict[str, str], exc_type: type[openai.APIStatusError], status: int
) -> None:
    with pytest.raises(exc_type) as info:
        _client(proxy).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict) and "message" in body
    if status == 429:
        assert info.value.response.headers["retry-after"] == "3"


def test_unknown_path_is_404_not_found_error(proxy: RunningProxy) -> None:
    client = _client(proxy)
    with pytest.raises(openai.NotFoundError) as info:
        client.post("/fine_tuning/nope", cast_to=object, body={})
    assert info.value.body["code"] == "unknown_url"  # type: ignore[index]


def test_upstream_down_is_502(make_proxy) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    proxy = make_proxy({"upstream": {"url": f"http://127.0.0.1:{dead_port}"}, "server": {"access_log": "off"}})
    with pytest.raises(openai.InternalServerError) as info:
        _client(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_connect_error"  # type: ignore[index]


def test_upstream_timeout_is_504(mock: MockServer, make_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{mock.port}", "timeouts": {"headers": 0.3}},
            "server": {"access_log": "off"},
        }
    )
    with pytest.raises(openai.APIStatusError) as info:
        _client(proxy).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-fault": "stall"}
        )
    assert info.value.status_code == 504
    assert info.value.body["code"] == "upstream_timeout"  # type: ignore[index]
