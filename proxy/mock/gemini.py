"""The Gemini endpoints: ``POST .../models/{model}:generateContent`` and ``:streamGenerateContent``.

Routed by path suffix (the model is in the path, under any version
prefix such as ``/v1beta``). Replies follow Google AI Studio's shapes:
``candidates[].content.parts`` with ``text`` or ``functionCall`` parts,
``finishReason`` (STOP, MAX_TOKENS from ``generationConfig.maxOutputTokens``),
``usageMetadata`` (``promptTokenCount``, ``candidatesTokenCount``,
``totalTokenCount``), ``modelVersion`` and ``responseId``. A stream
(``?alt=sse``) is ``data: {...}\\r\\n\\r\\n`` events, each a whole
``GenerateContentResponse`` carrying the usage so far (the prompt count
from the first, the candidates count in the last, with the finish reason);
function calls come whole, one per event.

Safety blocks are asked for in the prompt: a user text containing
``[[mock:block-prompt]]`` gets ``promptFeedback.blockReason: SAFETY`` and
no candidates; ``[[mock:block-response]]`` a candidate with
``finishReason: SAFETY`` and no content. Errors use Gemini's envelope
``{"error": {"code", "message", "status"}}`` (see :func:`error_body` in
:mod:`.replies`); fault injection is the same as for the other routes.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from llmproxy.mock.content import WORD_JSON, prompt_tokens, reply_text, tool_tokens
from llmproxy.mock.replies import Call, Flavour, Route, Stream, Whole

__all__ = ["GENERATE", "STREAM_GENERATE", "route_of"]

GENERATE: Final = ":generateContent"
STREAM_GENERATE: Final = ":streamGenerateContent"


def route_of(path: str) -> tuple[str, bool] | None:
    """``(model, stream)`` for a Gemini generate path, else None."""
    _, sep, model = path.rpartition("/models/")
    if not sep:
        return None
    if model.endswith(GENERATE):
        return model[: -len(GENERATE)], False
    if model.endswith(STREAM_GENERATE):
        return model[: -len(STREAM_GENERATE)], True
    return None


def _texts(body: dict[str, Any]) -> str:
    out = []
    contents = body.get("contents")
    for content in contents if isinstance(contents, list) else ():
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return "\n".join(out)


def _tool_plan(call: Call) -> list[tuple[str, dict[str, Any]]]:
    if not call.tool_calls:
        return []
    names = []
    tools = call.body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        for declaration in declarations if isinstance(declarations, list) else ():
            if isinstance(declaration, dict) and isinstance(declaration.get("name"), str):
                names.append(declaration["name"])
    if not names:
        return []
    return [(names[i % len(names)], {"q": f"call {i}", "n": i}) for i in range(call.tool_calls)]


def _prompt(body: dict[str, Any]) -> int:
    system = body.get("systemInstruction")
    return prompt_tokens({"system": _texts({"contents": [system]}) if system else None, "text": _texts(body)})


def _budget(call: Call) -> tuple[int, bool]:
    config = call.body.get("generationConfig")
    limit = config.get("maxOutputTokens") if isinstance(config, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < call.tokens:
        return limit, True
    return call.tokens, False


def _usage(prompt: int, completion: int | None) -> dict[str, int]:
    if completion is None:
        return {"promptTokenCount": prompt, "totalTokenCount": prompt}
    return {"promptTokenCount": prompt, "candidatesTokenCount": completion, "totalTokenCount": prompt + completion}


def _sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\r\n\r\n"


def generate(call: Call) -> Whole | Stream:
    """One generate call (``call.stream``: the streaming endpoint)."""
    s = call.server
    text = _texts(call.body)
    prompt = _prompt(call.body)
    response_id = s.next_id(b"").decode()
    common = {"modelVersion": call.model, "responseId": response_id}
    if "[[mock:block-prompt]]" in text:
        blocked = {
            "promptFeedback": {
                "blockReason": "SAFETY",
                "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}],
            },
            "usageMetadata": _usage(prompt, None),
            **common,
        }
        return Stream([], [_sse(orjson.dumps(blocked))], []) if call.stream else Whole(200, orjson.dumps(blocked))
    if "[[mock:block-response]]" in text:
        candidate = {"finishReason": "SAFETY", "index": 0, "safetyRatings": []}
        body = {"candidates": [candidate], "usageMetadata": _usage(prompt, 0), **common}
        return Stream([], [_sse(orjson.dumps(body))], []) if call.stream else Whole(200, orjson.dumps(body))
    calls = _tool_plan(call)
    n, cut = _budget(call)
    reason = "MAX_TOKENS" if cut and not calls else "STOP"
    completion = tool_tokens([(name, orjson.dumps(args).decode()) for name, args in calls]) if calls else n
    if not call.stream:
        parts: list[dict[str, Any]]
        if calls:
            parts = [{"functionCall": {"name": name, "args": args}} for name, args in calls]
        else:
            parts = [{"text": reply_text(n)}]
        candidate = {"content": {"parts": parts, "role": "model"}, "finishReason": reason, "index": 0}
        body = {"candidates": [candidate], "usageMetadata": _usage(prompt, completion), **common}
        return Whole(200, orjson.dumps(body), steps=len(calls) * 4 if calls else n)
    tail_common = orjson.dumps(common)[1:]  # '"modelVersion":...}'
    running = orjson.dumps(_usage(prompt, None))
    content: list[bytes] = []
    if calls:
        for name, args in calls:
            part = orjson.dumps({"functionCall": {"name": name, "args": args}})
            content.append(
                _sse(
                    b'{"candidates":[{"content":{"parts":[%b],"role":"model"},"index":0}],"usageMetadata":%b,%b'
                    % (part, running, tail_common)
                )
            )
    else:
        words = WORD_JSON
        for i in range(n):
            content.append(
                _sse(
                    b'{"candidates":[{"content":{"parts":[{"text":%b}],"role":"model"},"index":0}],'
                    b'"usageMetadata":%b,%b' % (words[i % len(words)], running, tail_common)
                )
            )
    last = orjson.dumps(
        {
            "candidates": [{"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": reason, "index": 0}],
            "usageMetadata": _usage(prompt, completion),
            **common,
        }
    )
    return Stream([], content, [_sse(last)])


ROUTE: Final = Route(generate, Flavour.GEMINI, streams=True)
