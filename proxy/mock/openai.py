"""The OpenAI endpoints: chat completions, legacy completions, embeddings, responses and models.

Each handler turns a :class:`~.replies.Call` into a whole reply or a stream
split into preamble (role chunk), content (one event per token or tool-call
fragment) and tail (finish, usage, ``[DONE]``); :data:`ROUTES` maps path and
method to handler.
"""

from __future__ import annotations

import base64
import functools
import struct
import time
import zlib
from typing import Any, Final

import orjson

from llmproxy.mock.content import (
    WORD_JSON,
    arg_pieces,
    budget,
    prompt_tokens,
    reply_text,
    text_of,
    text_pieces,
    tool_plan,
    tool_tokens,
)
from llmproxy.mock.replies import Call, Flavour, Route, Stream, Whole, error_reply
from llmproxy.mock.responses import responses

__all__ = ["ROUTES"]

_MODELS: Final = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "text-embedding-3-small")
_MODELS_BODY: Final = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"} for m in _MODELS],
    }
)
_EMBEDDING_DIM: Final = 8


@functools.lru_cache(maxsize=256)
def _chat_choices(n: int, finish: str) -> bytes:
    """The cached ``choices`` array of a non-streaming text chat completion."""
    message: dict[str, object] = {"role": "assistant", "content": reply_text(n), "refusal": None, "annotations": []}
    return orjson.dumps([{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}])


def _include_usage(body: dict[str, Any]) -> bool:
    """True when ``stream_options.include_usage`` is true."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(prompt: int, completion: int) -> bytes:
    """An OpenAI ``usage`` object."""
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (prompt, completion, prompt + completion)


def _chat(call: Call) -> Whole | Stream:
    """``POST /v1/chat/completions``: text or tool calls, whole or streamed."""
    s = call.server
    body = call.body
    calls = tool_plan(call)
    n, cut = budget(call, "max_completion_tokens", "max_tokens")
    finish = "tool_calls" if calls else ("length" if cut else "stop")
    prompt = prompt_tokens(body)
    completion = tool_tokens(calls) if calls else n
    cid = s.next_id(b"chatcmpl-")
    created = int(time.time())
    if not call.stream:
        if calls:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "tool_calls": [
                    {"id": s.next_id(b"call_").decode(), "type": "function", "function": {"name": nm, "arguments": a}}
                    for nm, a in calls
                ],
            }
            choices = orjson.dumps([{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}])
        elif call.reply is not None:
            reply: dict[str, object] = {"role": "assistant", "content": call.reply, "refusal": None, "annotations": []}
            choices = orjson.dumps([{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}])
        else:
            choices = _chat_choices(n, finish)
        return Whole(
            200,
            b'{"id":"%b","object":"chat.completion","created":%d,"model":%b,"choices":%b,"usage":%b,'
            b'"service_tier":"default","system_fingerprint":"fp_mock"}'
            % (cid, created, call.model_json, choices, _usage(prompt, completion)),
            steps=len(calls) * 4 if calls else n,
        )
    include_usage = _include_usage(body)
    usage_null = b',"usage":null' if include_usage else b""
    pre = (
        b'data: {"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,'
        b'"system_fingerprint":"fp_mock","choices":[{"index":0,"delta":' % (cid, created, call.model_json)
    )
    post = b',"logprobs":null,"finish_reason":null}]%b}\n\n' % usage_null
    content: list[bytes] = []
    if calls:
        heads = [
            b'{"index":%d,"id":"%b","type":"function","function":{"name":%b,"arguments":""}}'
            % (i, s.next_id(b"call_"), orjson.dumps(name))
            for i, (name, _) in enumerate(calls)
        ]
        preamble = [pre + b'{"role":"assistant","content":null,"tool_calls":[%b],"refusal":null}' % heads[0] + post]
        for i, (_, args) in enumerate(calls):
            if i:
                content.append(pre + b'{"tool_calls":[%b]}' % heads[i] + post)
            for frag in arg_pieces(call, args):
                content.append(
                    pre + b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}' % (i, orjson.dumps(frag)) + post
                )
    else:
        preamble = [pre + b'{"role":"assistant","content":"","refusal":null}' + post]
        words = tuple(orjson.dumps(p) for p in text_pieces(call)) if call.reply is not None else WORD_JSON
        count = len(words) if call.reply is not None else n
        content = [pre + b'{"content":%b}' % words[i % len(words)] + post for i in range(count)]
    tail = [pre + b'{},"logprobs":null,"finish_reason":"%b"}]%b}\n\n' % (finish.encode(), usage_null)]
    if include_usage:
        tail.append(
            b'data: {"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,'
            b'"system_fingerprint":"fp_mock","choices":[],"usage":%b}\n\n'
            % (cid, created, call.model_json, _usage(prompt, completion))
        )
    tail.append(b"data: [DONE]\n\n")
    return Stream(preamble, content, tail)


def _completions(call: Call) -> Whole | Stream:
    """``POST /v1/completions`` (legacy text completion), whole or streamed."""
    n, cut = budget(call, "max_tokens")
    finish = b'"length"' if cut else b'"stop"'
    prompt = prompt_tokens(call.body.get("prompt"))
    cid = call.server.next_id(b"cmpl-")
    created = int(time.time())
    if not call.stream:
        text = orjson.dumps(text_of(call, n))
        choice = b'[{"text":%b,"index":0,"logprobs":null,"finish_reason":%b}]' % (text, finish)
        return Whole(
            200,
            b'{"id":"%b","object":"text_completion","created":%d,"model":%b,"choices":%b,"usage":%b}'
            % (cid, created, call.model_json, choice, _usage(prompt, n)),
            steps=n,
        )
    pre = b'data: {"id":"%b","object":"text_completion","created":%d,"model":%b,"choices":[{"text":' % (
        cid,
        created,
        call.model_json,
    )
    words = tuple(orjson.dumps(p) for p in text_pieces(call)) if call.reply is not None else WORD_JSON
    count = len(words) if call.reply is not None else n
    post = b',"index":0,"logprobs":null,"finish_reason":null}]}\n\n'
    content = [pre + words[i % len(words)] + post for i in range(count)]
    tail = [pre + b'"","index":0,"logprobs":null,"finish_reason":%b}]}\n\n' % finish]
    if _include_usage(call.body):
        tail.append(
            b'data: {"id":"%b","object":"text_completion","created":%d,"model":%b,"choices":[],"usage":%b}\n\n'
            % (cid, created, call.model_json, _usage(prompt, n))
        )
    tail.append(b"data: [DONE]\n\n")
    return Stream([], content, tail)


def _embedding(item: object) -> list[float]:
    """A deterministic 8-float vector for one input item; values are exact in float32."""
    seed = zlib.crc32(orjson.dumps(item))
    out: list[float] = []
    for _ in range(_EMBEDDING_DIM):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(((seed >> 16) % 256 - 128) / 256)
    return out


def _embeddings(call: Call) -> Whole | Stream:
    """``POST /v1/embeddings``: one vector per input item, ``float`` or ``base64`` encoded."""
    raw = call.body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        items: list[object] = [raw]
    elif isinstance(raw, list) and raw:
        items = list(raw)
    else:
        return error_reply(Flavour.OPENAI, 400, "'input' must be a non-empty string or array")
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vector = _embedding(item)
        encoded: object = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    prompt = prompt_tokens(items)
    body = {
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
    return Whole(200, orjson.dumps(body), steps=1)


def _models(call: Call) -> Whole | Stream:
    """``GET /v1/models``: a fixed list of model ids."""
    return Whole(200, _MODELS_BODY)


# path -> method -> route. Every provider route is recorded and can be faulted.
ROUTES: Final[dict[str, dict[str, Route]]] = {
    "/v1/chat/completions": {"POST": Route(_chat, Flavour.OPENAI, streams=True)},
    "/v1/completions": {"POST": Route(_completions, Flavour.OPENAI, streams=True)},
    "/v1/embeddings": {"POST": Route(_embeddings, Flavour.OPENAI)},
    "/v1/models": {"GET": Route(_models, Flavour.OPENAI, needs_body=False)},
    "/v1/responses": {"POST": Route(responses, Flavour.OPENAI, streams=True)},
}
