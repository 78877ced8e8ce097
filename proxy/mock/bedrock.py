"""The Bedrock endpoints: Converse (JSON) and ConverseStream (``application/vnd.amazon.eventstream``).

``POST /model/{modelId}/converse`` and ``/converse-stream``: the model is the
path's (URL-decoded), the stream is chosen by the path (never by the body).
Text, ``toolUse`` blocks (when the request has ``toolConfig.tools`` and
``x-mock-tool-calls`` asks), a ``reasoningContent`` block first when
``additionalModelRequestFields.thinking`` is enabled, ``cacheReadInputTokens``
and ``cacheWriteInputTokens`` when the request has a ``cachePoint``.

A stream is real event-stream framing, encoded here (the test side: the
proxy decodes it with botocore): a 12-byte prelude (total length, headers
length, prelude CRC32), string headers ``:event-type``, ``:content-type``,
``:message-type``, the JSON payload, and the message CRC32. Events:
``messageStart``, ``contentBlockStart`` (tool use), ``contentBlockDelta``
per token or tool-input fragment, ``contentBlockStop``, ``messageStop``,
``metadata`` (usage, metrics).

Errors are ``{"message": ...}`` with ``x-amzn-errortype`` (``ThrottlingException``
for 429, ``ValidationException`` for 400 ...), for ``x-mock-status`` as for any route.

SigV4: with ``aws_credentials`` in the mock config (access key id -> secret
key), a request signed ``AWS4-HMAC-SHA256`` is checked by recomputing its
signature with botocore's own signer over the headers it names, the path and
the body as received: an unknown key id is a 403 ``UnrecognizedClientException``,
a mismatch a 403 ``InvalidSignatureException`` (so a body changed after
signing fails). ``Authorization: Bearer`` (Bedrock API keys) is accepted as is.
"""

from __future__ import annotations

import binascii
import struct
from typing import Any, Final
from urllib.parse import unquote

import orjson

from llmproxy.mock.content import WORD_JSON, prompt_tokens, reply_text, split3, tool_plan, tool_tokens
from llmproxy.mock.replies import Call, Flavour, Route, Stream, Whole

__all__ = ["ERROR_TYPES", "ROUTES", "check_signature", "encode_frame", "match"]

#: status -> ``x-amzn-errortype`` name.
ERROR_TYPES: Final[dict[int, str]] = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


def encode_frame(event_type: str, payload: bytes, message_type: str = "event") -> bytes:
    """One event-stream message with string headers and both CRCs."""
    names = (
        (":event-type" if message_type == "event" else ":exception-type", event_type),
        (":content-type", "application/json"),
        (":message-type", message_type),
    )
    headers = b"".join(
        bytes([len(n)]) + n.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode() for n, v in names
    )
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(headers))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + headers + payload
    return message + struct.pack(">I", binascii.crc32(message))


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return encode_frame(name, orjson.dumps(payload))


def match(path: str) -> tuple[dict[str, Route], str, bool] | None:
    """``(routes, model id, stream)`` for a Bedrock runtime path, else None."""
    if not path.startswith("/model/"):
        return None
    rest = path[len("/model/") :]
    model, _, op = rest.rpartition("/")
    if not model or op not in ("converse", "converse-stream"):
        return None
    return ROUTES, unquote(model), op == "converse-stream"


def _has_cache_point(body: dict[str, Any]) -> bool:
    blocks = [*(body.get("system") or [])]
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            blocks.extend(message.get("content") or [])
    return any(isinstance(b, dict) and "cachePoint" in b for b in blocks)


def _thinking(body: dict[str, Any]) -> bool:
    extra = body.get("additionalModelRequestFields")
    thinking = extra.get("thinking") if isinstance(extra, dict) else None
    return isinstance(thinking, dict) and thinking.get("type") == "enabled"


def _converse(call: Call) -> Whole | Stream:
    body = call.body
    config = body.get("toolConfig")
    tools = config.get("tools") if isinstance(config, dict) else None
    names = [t["toolSpec"]["name"] for t in tools or [] if isinstance(t, dict) and "toolSpec" in t]
    calls = tool_plan(Call(call.server, {"tools": [{"name": n} for n in names]}, call.model, call.model_json,
                           call.stream, call.tokens, call.tool_calls))  # fmt: skip
    inference = body.get("inferenceConfig")
    limit = inference.get("maxTokens") if isinstance(inference, dict) else None
    n = call.tokens
    cut = isinstance(limit, int) and limit < n
    if cut:
        n = int(limit)  # type: ignore[arg-type]
    stop = "tool_use" if calls else ("max_tokens" if cut else "end_turn")
    prompt = prompt_tokens({"system": body.get("system"), "messages": body.get("messages")})
    completion = tool_tokens(calls) if calls else n
    usage: dict[str, int] = {"inputTokens": prompt, "outputTokens": completion, "totalTokens": prompt + completion}
    if _has_cache_point(body):
        usage["cacheReadInputTokens"] = 8
        usage["cacheWriteInputTokens"] = 4
    tool_ids = [call.server.next_id(b"tooluse_").decode() for _ in calls]
    thinking = _thinking(body)
    if not call.stream:
        content: list[dict[str, Any]] = []
        if thinking:
            content.append({"reasoningContent": {"reasoningText": {"text": "Let me think.", "signature": "sig-mock"}}})
        if calls:
            content += [
                {"toolUse": {"toolUseId": tid, "name": name, "input": orjson.loads(args)}}
                for tid, (name, args) in zip(tool_ids, calls, strict=True)
            ]
        else:
            content.append({"text": reply_text(n)})
        reply = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop,
            "usage": usage,
            "metrics": {"latencyMs": 12},
        }
        return Whole(200, orjson.dumps(reply), steps=len(calls) * 4 if calls else n)
    preamble = [_event("messageStart", {"role": "assistant"})]
    events: list[bytes] = []
    index = 0
    if thinking:
        delta = {"reasoningContent": {"text": "Let me think."}}
        events.append(_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": delta}))
        signature = {"reasoningContent": {"signature": "sig-mock"}}
        events.append(_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": signature}))
        events.append(_event("contentBlockStop", {"contentBlockIndex": 0}))
        index = 1
    if calls:
        for i, (tid, (name, args)) in enumerate(zip(tool_ids, calls, strict=True)):
            at = index + i
            start = {"toolUse": {"toolUseId": tid, "name": name}}
            events.append(_event("contentBlockStart", {"contentBlockIndex": at, "start": start}))
            for frag in split3(args):
                delta = {"toolUse": {"input": frag}}
                events.append(_event("contentBlockDelta", {"contentBlockIndex": at, "delta": delta}))
            events.append(_event("contentBlockStop", {"contentBlockIndex": at}))
    else:
        words = WORD_JSON
        for i in range(n):
            data = b'{"contentBlockIndex":%d,"delta":{"text":%b}}' % (index, words[i % len(words)])
            events.append(encode_frame("contentBlockDelta", data))
        events.append(_event("contentBlockStop", {"contentBlockIndex": index}))
    tail = [
        _event("messageStop", {"stopReason": stop}),
        _event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}),
    ]
    return Stream(preamble, events, tail)


def check_signature(
    method: str, path: str, headers: dict[str, str], body: bytes, secrets: dict[str, str]
) -> tuple[int, str] | None:
    """None when the request's SigV4 signature is right (or it is not SigV4-signed); else (403, why)."""
    auth = headers.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return None
    from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import ReadOnlyCredentials  # type: ignore[import-untyped]

    parts = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 ") :].split(","))
    key_id, _date, region, service, _ = parts["Credential"].split("/")
    secret = secrets.get(key_id)
    if secret is None:
        return 403, "UnrecognizedClientException:The security token included in the request is invalid."
    signed = {name: headers.get(name, "") for name in parts["SignedHeaders"].split(";")}
    request = AWSRequest(method=method, url=f"http://{headers.get('host', '')}{path}", data=body, headers=signed)
    request.context["timestamp"] = headers.get("x-amz-date", "")
    signer = SigV4Auth(ReadOnlyCredentials(key_id, secret, headers.get("x-amz-security-token")), service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if expected != parts.get("Signature"):
        return 403, (
            "InvalidSignatureException:The request signature we calculated does not match the signature you "
            "provided. Check your AWS Secret Access Key and signing method."
        )
    return None


ROUTES: Final[dict[str, Route]] = {"POST": Route(_converse, Flavour.BEDROCK, streams=True)}
