"""The Anthropic endpoints: messages (text or tool_use blocks, whole or streamed) and count_tokens.

A stream has ``event:`` lines: ``message_start``, ``content_block_start``
and ``ping`` as preamble, one ``content_block_delta`` per token or
tool-input fragment as content, then ``content_block_stop``,
``message_delta`` and ``message_stop``. Errors use Anthropic's envelope.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from llmproxy.mock.content import (
    WORD_JSON,
    arg_pieces,
    budget,
    prompt_tokens,
    text_of,
    text_pieces,
    tool_plan,
    tool_tokens,
)
from llmproxy.mock.replies import Call, Flavour, Route, Stream, Whole

__all__ = ["ROUTES"]

_JSON_DELTA: Final = b'{"type":"content_block_delta","index":%d,"delta":{"type":"input_json_delta","partial_json":%b}}'


def _sse(event: bytes, data: bytes) -> bytes:
    """One Anthropic-style SSE event with an ``event:`` line."""
    return b"event: %b\ndata: %b\n\n" % (event, data)


def _input(args: str) -> Any:
    """A tool_use block's ``input``: the arguments parsed, or ``{"text": args}`` when they are not JSON."""
    try:
        return orjson.loads(args)
    except orjson.JSONDecodeError:
        return {"text": args}


def _messages(call: Call) -> Whole | Stream:
    """``POST /v1/messages`` (Anthropic): text or tool_use blocks, whole or streamed."""
    s = call.server
    calls = tool_plan(call)
    n, cut = budget(call, "max_tokens")
    stop = "tool_use" if calls else ("max_tokens" if cut else "end_turn")
    prompt = prompt_tokens({"system": call.body.get("system"), "messages": call.body.get("messages")})
    completion = tool_tokens(calls) if calls else n
    mid = s.next_id(b"msg_").decode()
    tool_ids = [s.next_id(b"toolu_").decode() for _ in calls]
    if not call.stream:
        blocks: list[dict[str, Any]]
        if calls:
            blocks = [
                {"type": "tool_use", "id": tid, "name": name, "input": _input(args)}
                for tid, (name, args) in zip(tool_ids, calls, strict=True)
            ]
        else:
            blocks = [{"type": "text", "text": text_of(call, n)}]
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        }
        return Whole(200, orjson.dumps(message), steps=len(calls) * 4 if calls else n)
    start = {
        "type": "message_start",
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 1},
        },
    }
    ping = _sse(b"ping", b'{"type":"ping"}')
    content: list[bytes] = []
    if calls:
        starts = [
            _sse(
                b"content_block_start",
                orjson.dumps(
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "tool_use", "id": tid, "name": name, "input": {}},
                    }
                ),
            )
            for i, (tid, (name, _)) in enumerate(zip(tool_ids, calls, strict=True))
        ]
        preamble = [_sse(b"message_start", orjson.dumps(start)), starts[0], ping]
        for i, (_, args) in enumerate(calls):
            if i:
                content.append(_sse(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % (i - 1)))
                content.append(starts[i])
            for frag in arg_pieces(call, args):
                data = _JSON_DELTA
                content.append(_sse(b"content_block_delta", data % (i, orjson.dumps(frag))))
        last = len(calls) - 1
    else:
        block = b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
        preamble = [_sse(b"message_start", orjson.dumps(start)), _sse(b"content_block_start", block), ping]
        words = tuple(orjson.dumps(p) for p in text_pieces(call)) if call.reply is not None else WORD_JSON
        count = len(words) if call.reply is not None else n
        content = [
            _sse(
                b"content_block_delta",
                b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%b}}'
                % words[i % len(words)],
            )
            for i in range(count)
        ]
        last = 0
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": completion},
    }
    tail = [
        _sse(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % last),
        _sse(b"message_delta", orjson.dumps(delta)),
        _sse(b"message_stop", b'{"type":"message_stop"}'),
    ]
    return Stream(preamble, content, tail)


def _count_tokens(call: Call) -> Whole | Stream:
    """``POST /v1/messages/count_tokens`` (Anthropic)."""
    prompt = prompt_tokens({"system": call.body.get("system"), "messages": call.body.get("messages")})
    return Whole(200, b'{"input_tokens":%d}' % prompt)


ROUTES: Final[dict[str, dict[str, Route]]] = {
    "/v1/messages": {"POST": Route(_messages, Flavour.ANTHROPIC, streams=True)},
    "/v1/messages/count_tokens": {"POST": Route(_count_tokens, Flavour.ANTHROPIC)},
}
