"""The mock's ``POST /v1/responses``: a Responses object, whole or as its event stream.

Text (``x-mock-tokens`` words, cut by ``max_output_tokens``) or function calls
(``x-mock-tool-calls`` with function ``tools``), whole or streamed with the
real event sequence (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, one
``response.output_text.delta`` per token or ``response.function_call_arguments.delta``
per argument fragment, the ``.done`` events, ``response.completed`` or
``response.incomplete`` with usage). Every response stored (``store`` not
false) is kept, the last :data:`MAX_STORED` per server, so a request naming it
in ``previous_response_id`` is answered with the earlier turns counted in its
prompt; an unknown one is a 400, as OpenAI answers. ``GET`` and ``DELETE
/v1/responses/{id}`` answer for stored ones (:func:`lookup`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import orjson

from llmproxy.mock.content import arg_pieces, budget, prompt_tokens, text_of, text_pieces, tool_plan, tool_tokens
from llmproxy.mock.replies import Call, Flavour, Stream, Whole, error_reply

if TYPE_CHECKING:
    from llmproxy.mock.server import MockServer

__all__ = ["MAX_STORED", "lookup", "responses"]

#: Stored responses kept per server (oldest dropped first).
MAX_STORED: Final = 1000


def _event(kind: str, seq: int, payload: dict[str, Any]) -> bytes:
    payload["type"] = kind
    payload["sequence_number"] = seq
    return b"event: %b\ndata: %b\n\n" % (kind.encode(), orjson.dumps(payload))


def responses(call: Call) -> Whole | Stream:
    """``POST /v1/responses`` (see the module docstring)."""
    body = call.body
    store = call.server.stored_responses
    previous = body.get("previous_response_id")
    history = 0
    if previous is not None:
        if previous not in store:
            return error_reply(Flavour.OPENAI, 400, f"Previous response with id '{previous}' not found.")
        history = store[previous][0]
    s = call.server
    calls = tool_plan(call)
    n, cut = budget(call, "max_output_tokens")
    if calls:
        cut = False
    prompt = history + prompt_tokens({"input": body.get("input"), "instructions": body.get("instructions")})
    completion = tool_tokens(calls) if calls else n
    rid = s.next_id(b"resp_").decode()
    status = "incomplete" if cut else "completed"
    response: dict[str, Any] = {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": call.model,
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": previous,
        "store": body.get("store") is not False,
        "temperature": 1.0,
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": 1.0,
        "usage": None,
    }
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
    if calls:
        items: list[dict[str, Any]] = [
            {
                "id": s.next_id(b"fc_").decode(),
                "type": "function_call",
                "status": "completed",
                "call_id": s.next_id(b"call_").decode(),
                "name": name,
                "arguments": args,
            }
            for name, args in calls
        ]
    else:
        text = text_of(call, n)
        items = [
            {
                "id": s.next_id(b"msg_").decode(),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        ]
    final = {
        **response,
        "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": items,
        "usage": usage,
    }
    if body.get("store") is not False:
        store[rid] = (prompt + completion, orjson.dumps(final))
        while len(store) > MAX_STORED:
            store.popitem(last=False)
    if not call.stream:
        return Whole(200, orjson.dumps(final), steps=len(calls) * 4 if calls else n)
    seq = iter(range(1 << 30))
    preamble = [
        _event("response.created", next(seq), {"response": response}),
        _event("response.in_progress", next(seq), {"response": response}),
    ]
    content: list[bytes] = []
    for index, item in enumerate(items):
        iid = item["id"]
        if item["type"] == "function_call":
            opened = {**item, "status": "in_progress", "arguments": ""}
            content.append(_event("response.output_item.added", next(seq), {"output_index": index, "item": opened}))
            for frag in arg_pieces(call, item["arguments"]):
                content.append(
                    _event(
                        "response.function_call_arguments.delta",
                        next(seq),
                        {"item_id": iid, "output_index": index, "delta": frag},
                    )
                )
            content.append(
                _event(
                    "response.function_call_arguments.done",
                    next(seq),
                    {"item_id": iid, "output_index": index, "arguments": item["arguments"]},
                )
            )
            content.append(_event("response.output_item.done", next(seq), {"output_index": index, "item": item}))
            continue
        opened = {**item, "status": "in_progress", "content": []}
        part = item["content"][0]
        where = {"item_id": iid, "output_index": index, "content_index": 0}
        content.append(_event("response.output_item.added", next(seq), {"output_index": index, "item": opened}))
        content.append(_event("response.content_part.added", next(seq), {**where, "part": {**part, "text": ""}}))
        pieces = text_pieces(call) if call.reply is not None else [w + " " for w in part["text"].split(" ")[:n]]
        for piece in pieces:
            content.append(_event("response.output_text.delta", next(seq), {**where, "delta": piece, "logprobs": []}))
        content.append(_event("response.output_text.done", next(seq), {**where, "text": part["text"], "logprobs": []}))
        content.append(_event("response.content_part.done", next(seq), {**where, "part": part}))
        content.append(_event("response.output_item.done", next(seq), {"output_index": index, "item": item}))
    kind = "response.completed" if status == "completed" else "response.incomplete"
    tail = [_event(kind, next(seq), {"response": final})]
    return Stream(preamble, content, tail)


def lookup(server: MockServer, method: str, response_id: str) -> Whole:
    """``GET``/``DELETE /v1/responses/{id}``: the stored response, or its deletion; 404 when unknown."""
    stored = server.stored_responses.get(response_id)
    if stored is None:
        return error_reply(Flavour.OPENAI, 404, f"Response with id '{response_id}' not found.")
    if method == "DELETE":
        del server.stored_responses[response_id]
        return Whole(200, orjson.dumps({"id": response_id, "object": "response", "deleted": True}))
    return Whole(200, stored[1])
