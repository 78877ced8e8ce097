"""The codec registry seen from a new protocol: a toy codec with raw-byte framing (``framing =
"bytes"``, as an AWS event stream needs) registered with its adapter in a few lines, reached by the
openai and anthropic SDKs through routing's chat pivot, JSON and stream, usage and errors included.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import orjson
import pytest

from llmproxy import Usage
from llmproxy.filters.routing.adapters import Adapter, register
from llmproxy.filters.translate import CODECS, ChatCodec, register_codec
from tests.filters.scripted_provider import Reply, Scripted
from tests.support import RunningProxy

Json = dict[str, Any]


class _LinesDecoder:
    """NDJSON lines, cut anywhere, to chat chunks."""

    def __init__(self, include_usage: bool) -> None:
        self.usage: Usage | None = None
        self._rest = b""
        self._include_usage = include_usage
        self._head = b'data: {"id":"chatcmpl-toy","object":"chat.completion.chunk","created":1,"model":"toy","choices":'

    def feed(self, event: bytes | None, data: bytes) -> bytes:
        *lines, self._rest = (self._rest + data).split(b"\n")
        out = b""
        for line in lines:
            item = orjson.loads(line)
            if "t" in item:
                delta = orjson.dumps({"content": item["t"]})
                out += self._head + b'[{"index":0,"delta":%b,"finish_reason":null}]}\n\n' % delta
            else:
                self.usage = Usage(input_tokens=item["in"], output_tokens=item["out"])
                out += self._head + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
                if self._include_usage:
                    usage = {"prompt_tokens": item["in"], "completion_tokens": item["out"]}
                    out += self._head + b'[],"usage":%b}\n\n' % orjson.dumps(usage)
        return out

    def finish(self) -> bytes:
        return b"data: [DONE]\n\n"


@register_codec("toylines")
class _LinesCodec(ChatCodec):
    framing = "bytes"

    def encode_request(self, chat: Json, *, model: str) -> Json:
        return {"prompt": chat["messages"][-1]["content"], "stream": chat.get("stream") is True}

    def decode_response(self, body: Json, *, model: str) -> Json:
        message = {"role": "assistant", "content": body["text"]}
        usage = {
            "prompt_tokens": body["in"],
            "completion_tokens": body["out"],
            "total_tokens": body["in"] + body["out"],
        }
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {
            "id": "chatcmpl-toy",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    def stream_decoder(self, *, model: str, include_usage: bool) -> _LinesDecoder:
        return _LinesDecoder(include_usage)

    def decode_error(self, body: bytes, status: int) -> tuple[int, Json]:
        message = orjson.loads(body)["oops"]
        return status, {"error": {"message": message, "type": "server_error", "code": "toy", "param": None}}

    def usage(self, body: Json) -> Usage | None:
        return Usage(input_tokens=body["in"], output_tokens=body["out"])


@register("toylines")
class _LinesAdapter(Adapter):
    protocol = "toylines"
    native_apis = frozenset({"chat"})
    codec = CODECS["toylines"]

    def credential_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"x-toy-key", key.encode()),)

    def path(self, api: str, provider_model: str, query: str) -> str:
        return f"/toy/{provider_model}"

    def request_path(self, api: str, provider_model: str, query: str, *, stream: bool) -> str:
        return f"/toy/{provider_model}" + ("/stream" if stream else "")


_STREAM = [b'{"t":"Hello"}\n', b'{"t":" world"}\n', b'{"done":true,"in":3,"out":2}\n']


@pytest.fixture
def toy(scripted: Scripted, make_proxy: Any) -> RunningProxy:
    provider = {"name": "t", "type": "toylines", "base_url": scripted.url, "keys": ["k-toy"], "models": ["toy"]}
    return make_proxy({"filters": [{"name": "routing", "config": {"providers": [provider]}}]})  # type: ignore[no-any-return]


def test_byte_framed_stream_reaches_both_sdks(scripted: Scripted, toy: RunningProxy) -> None:
    scripted.replies.extend(
        [Reply(200, _STREAM, "application/x-ndjson", piece=5), Reply(200, _STREAM, "application/x-ndjson", piece=3)]
    )
    client = openai.OpenAI(base_url=toy.url + "/v1", api_key="x", max_retries=0)
    chunks = list(
        client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert scripted.requests[-1].target == "/toy/toy/stream"
    assert scripted.requests[-1].body == {"prompt": "hi", "stream": True}
    assert scripted.requests[-1].headers["x-toy-key"] == "k-toy"
    claude = anthropic.Anthropic(base_url=toy.url, api_key="x", max_retries=0)
    with claude.messages.stream(model="toy", max_tokens=9, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream) == "Hello world"
        assert s.get_final_message().usage.output_tokens == 2


def test_json_and_error_through_the_codec(scripted: Scripted, toy: RunningProxy) -> None:
    scripted.replies.extend([Reply(200, b'{"text":"whole","in":4,"out":1}'), Reply(503, b'{"oops":"toy is down"}')])
    client = openai.OpenAI(base_url=toy.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "whole" and reply.usage is not None
    assert scripted.requests[-1].target == "/toy/toy"
    claude = anthropic.Anthropic(base_url=toy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as exc:
        claude.messages.create(model="toy", max_tokens=9, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 503
    assert exc.value.body == {"type": "error", "error": {"type": "api_error", "message": "toy is down"}}
