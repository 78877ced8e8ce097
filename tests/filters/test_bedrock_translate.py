"""Golden transcripts for Bedrock Converse (written from the Converse API reference), the
event-stream decoder and the SigV4 signer (checked against botocore's own signer)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from llmproxy import UpstreamProtocolError, parse_event, split_events
from llmproxy.filters.routing.adapters.bedrock import EventStreamDecoder, SigV4Signer, _Credentials
from llmproxy.filters.translate import TranslationError
from llmproxy.filters.translate.bedrock import (
    BedrockCodec,
    ConverseStreamToMessagesStream,
    converse_response_to_messages,
    messages_request_to_converse,
)
from llmproxy.mock.bedrock import check_signature, encode_frame

CODEC = BedrockCodec()
IMAGE = "iVBORw0KGgo="


def test_messages_request_golden() -> None:
    request = {
        "model": "claude",
        "max_tokens": 512,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["STOP"],
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [
            {"name": "weather", "description": "Get weather", "input_schema": {"type": "object"}},
            {"name": "time", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
        ],
        "tool_choice": {"type": "tool", "name": "weather"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig1"},
                    {"type": "tool_use", "id": "tu_1", "name": "weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "rain", "is_error": True}],
            },
        ],
    }
    assert messages_request_to_converse(request) == {
        "system": [{"text": "You are terse."}, {"cachePoint": {"type": "default"}}],
        "messages": [
            {
                "role": "user",
                "content": [{"text": "What is this?"}, {"image": {"format": "png", "source": {"bytes": IMAGE}}}],
            },
            {
                "role": "assistant",
                "content": [
                    {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "sig1"}}},
                    {"toolUse": {"toolUseId": "tu_1", "name": "weather", "input": {"city": "Paris"}}},
                ],
            },
            {
                "role": "user",
                "content": [{"toolResult": {"toolUseId": "tu_1", "content": [{"text": "rain"}], "status": "error"}}],
            },
        ],
        "inferenceConfig": {"maxTokens": 512, "temperature": 0.5, "topP": 0.9, "stopSequences": ["STOP"]},
        "additionalModelRequestFields": {"top_k": 40, "thinking": {"type": "enabled", "budget_tokens": 1024}},
        "toolConfig": {
            "tools": [
                {
                    "toolSpec": {
                        "name": "weather",
                        "inputSchema": {"json": {"type": "object"}},
                        "description": "Get weather",
                    }
                },
                {"toolSpec": {"name": "time", "inputSchema": {"json": {"type": "object"}}}},
                {"cachePoint": {"type": "default"}},
            ],
            "toolChoice": {"tool": {"name": "weather"}},
        },
    }


def test_chat_request_goes_through_messages() -> None:
    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
    }
    out = CODEC.encode_request(chat, model="m")
    assert "inferenceConfig" not in out  # no made-up maxTokens
    assert out["system"] == [{"text": "sys"}]
    assert out["messages"][1] == {
        "role": "assistant",
        "content": [{"toolUse": {"toolUseId": "c1", "name": "f", "input": {"a": 1}}}],
    }
    assert out["messages"][2]["content"][0]["toolResult"]["toolUseId"] == "c1"
    assert out["toolConfig"]["toolChoice"] == {"any": {}}


def test_url_images_and_server_tools_are_refused() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    with pytest.raises(TranslationError) as caught:
        messages_request_to_converse({"messages": [{"role": "user", "content": [image]}]})
    assert caught.value.param == "messages[0].content[0].source"
    with pytest.raises(TranslationError) as tool:
        messages_request_to_converse({"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert tool.value.param == "tools[0].type"


RESPONSE = {
    "output": {
        "message": {
            "role": "assistant",
            "content": [
                {"reasoningContent": {"reasoningText": {"text": "think", "signature": "s"}}},
                {"text": "It rains."},
                {"toolUse": {"toolUseId": "tu_9", "name": "weather", "input": {"city": "Oslo"}}},
            ],
        }
    },
    "stopReason": "tool_use",
    "usage": {
        "inputTokens": 10,
        "outputTokens": 7,
        "totalTokens": 17,
        "cacheReadInputTokens": 3,
        "cacheWriteInputTokens": 2,
    },
    "metrics": {"latencyMs": 120},
}


def test_converse_response_golden() -> None:
    message = converse_response_to_messages(RESPONSE, model="claude")
    assert message["id"].startswith("msg_bdrk_")
    assert {k: v for k, v in message.items() if k != "id"} == {
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [
            {"type": "thinking", "thinking": "think", "signature": "s"},
            {"type": "text", "text": "It rains."},
            {"type": "tool_use", "id": "tu_9", "name": "weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "output_tokens": 7,
            "cache_read_input_tokens": 3,
            "cache_creation_input_tokens": 2,
        },
    }
    chat = CODEC.decode_response(RESPONSE, model="claude")
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "It rains."
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city":"Oslo"}'}
    usage = CODEC.usage(RESPONSE)
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (15, 7, 3, 2)


@pytest.mark.parametrize(
    ("status", "header", "openai_type"),
    [
        (429, "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/", "rate_limit_error"),
        (400, "ValidationException", "invalid_request_error"),
        (403, "AccessDeniedException", "permission_error"),
        (429, "ModelNotReadyException", "server_error"),
        (503, "ServiceUnavailableException", "server_error"),
    ],
)
def test_errors_golden(status: int, header: str, openai_type: str) -> None:
    got_status, envelope = CODEC.decode_error(b'{"message":"nope"}', status, error_type=header)
    name = header.split(":")[0]
    assert got_status == status
    assert envelope["error"]["message"] == f"{name}: nope"
    assert envelope["error"]["type"] == openai_type


def _frames() -> bytes:
    events: list[tuple[str, dict[str, Any]]] = [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "hm"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "sg"}}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "Hi"}, "p": "abcd"}),
        ("contentBlockStop", {"contentBlockIndex": 1}),
        ("contentBlockStart", {"contentBlockIndex": 2, "start": {"toolUse": {"toolUseId": "t1", "name": "f"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": '{"a":'}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": "1}"}}}),
        ("contentBlockStop", {"contentBlockIndex": 2}),
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": {"inputTokens": 5, "outputTokens": 9, "totalTokens": 14}, "metrics": {"latencyMs": 1}}),
    ]
    return b"".join(encode_frame(name, orjson.dumps(payload)) for name, payload in events)


def _decode(data: bytes, piece: int) -> bytes:
    decoder = EventStreamDecoder()
    out = b""
    for i in range(0, len(data), piece):
        chunk = data[i : i + piece]
        out += decoder.feed(chunk, i + piece >= len(data))
    return out


@pytest.mark.parametrize("piece", [1, 7, 100_000])
def test_event_stream_decoder_any_split(piece: int) -> None:
    sse = _decode(_frames(), piece)
    events = [parse_event(e) for e in split_events(sse)]
    assert [e.event for e in events][:2] == [b"messageStart", b"contentBlockDelta"]
    assert len(events) == 12
    assert orjson.loads(events[4].data)["delta"] == {"text": "Hi"}


def test_event_stream_decoder_rejects_bad_crc_and_cut_frames() -> None:
    frame = bytearray(encode_frame("messageStart", b'{"role":"assistant"}'))
    frame[-1] ^= 0xFF
    with pytest.raises(UpstreamProtocolError):
        EventStreamDecoder().feed(bytes(frame), False)
    with pytest.raises(UpstreamProtocolError):
        EventStreamDecoder().feed(encode_frame("messageStart", b"{}")[:-3], True)


def _botocore_sse(data: bytes) -> list[tuple[bytes | None, bytes]]:
    """What botocore's own EventStreamBuffer makes of ``data``: (event type, payload) per frame."""
    from botocore.eventstream import EventStreamBuffer

    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return [(m.headers[":event-type"].encode(), m.payload) for m in buffer]


@pytest.mark.parametrize("read", [1, 3, 16, 61, 250, 100_000])
def test_event_stream_decoder_agrees_with_botocore_buffer(read: int) -> None:
    data = _frames() + encode_frame("contentBlockDelta", b"") + encode_frame("x" * 200, rb'{"a":"\u00e9"}')
    decoder = EventStreamDecoder()
    sse = b"".join(decoder.feed(data[i : i + read], i + read >= len(data)) for i in range(0, len(data), read))
    got = [(e.event, e.data) for e in map(parse_event, split_events(sse))]
    want = [(name, payload or b"{}") for name, payload in _botocore_sse(data)]
    assert got == want


@pytest.mark.parametrize(
    ("offset", "reason"),
    [(0, "ChecksumMismatch"), (9, "ChecksumMismatch"), (20, "ChecksumMismatch"), (-1, "ChecksumMismatch")],
)
def test_event_stream_decoder_checks_both_crcs(offset: int, reason: str) -> None:
    frame = bytearray(encode_frame("messageStart", b'{"role":"assistant"}'))
    frame[offset] ^= 0x01
    with pytest.raises(UpstreamProtocolError, match=reason):
        EventStreamDecoder().feed(bytes(frame), False)


def test_event_stream_decoder_rejects_impossible_lengths() -> None:
    import struct
    from binascii import crc32

    prelude = struct.pack(">II", 8, 0)  # shorter than its own prelude and CRC
    with pytest.raises(UpstreamProtocolError, match="InvalidPayloadLength"):
        EventStreamDecoder().feed(prelude + struct.pack(">I", crc32(prelude)) + b"\0" * 8, False)
    prelude = struct.pack(">II", 200_000, 150_000)  # botocore's 128 KiB header cap
    with pytest.raises(UpstreamProtocolError, match="InvalidHeadersLength"):
        EventStreamDecoder().feed(prelude + struct.pack(">I", crc32(prelude)), False)


def test_event_stream_header_cache_is_shared_and_bounded() -> None:
    from llmproxy.filters.routing.adapters.bedrock import HEAD_CACHE_SIZE, EventStreamDecoders

    decoders = EventStreamDecoders()
    frames = b"".join(encode_frame(f"event{i}", b"{}") for i in range(HEAD_CACHE_SIZE + 10))
    first = decoders().feed(frames, True)
    assert decoders().feed(frames, True) == first  # a second response, past the cache's bound
    assert first.count(b"event: event") == HEAD_CACHE_SIZE + 10
    assert len(decoders._heads) == HEAD_CACHE_SIZE


def test_exception_frame_becomes_an_error_event() -> None:
    frame = encode_frame("throttlingException", b'{"message":"slow down"}', message_type="exception")
    sse = EventStreamDecoder().feed(frame, True)
    event = parse_event(next(iter(split_events(sse))))
    assert event.event == b"error"
    assert orjson.loads(event.data) == {"__type": "ThrottlingException", "message": "slow down"}
    translator = ConverseStreamToMessagesStream(model="m")
    out = translator.feed(event.event, event.data)
    assert b'"type":"rate_limit_error"' in out and translator.failed


def test_stream_golden_to_messages_and_chat() -> None:
    events = [parse_event(e) for e in split_events(_decode(_frames(), 50))]
    translator = ConverseStreamToMessagesStream(model="claude")
    out = b"".join(translator.feed(e.event, e.data) for e in events) + translator.finish()
    anthropic = [(parse_event(e).event, orjson.loads(parse_event(e).data)) for e in split_events(out)]
    names = [n for n, _ in anthropic]
    assert names == [
        b"message_start",
        b"content_block_start",
        b"content_block_delta",
        b"content_block_delta",
        b"content_block_stop",
        b"content_block_start",
        b"content_block_delta",
        b"content_block_stop",
        b"content_block_start",
        b"content_block_delta",
        b"content_block_delta",
        b"content_block_stop",
        b"message_delta",
        b"message_stop",
    ]
    assert anthropic[3][1]["delta"] == {"type": "signature_delta", "signature": "sg"}
    assert anthropic[8][1]["content_block"] == {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    assert anthropic[12][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 5, "output_tokens": 9},
    }
    assert translator.usage is not None and translator.usage.output_tokens == 9
    chat = CODEC.stream_decoder(model="claude", include_usage=True)
    chat_out = b"".join(chat.feed(e.event, e.data) for e in events) + chat.finish()
    chunks = [orjson.loads(e[6:]) for e in chat_out.split(b"\n\n") if e.startswith(b"data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hi"
    args = "".join(
        tc["function"].get("arguments", "")
        for c in chunks
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls") or []
    )
    assert args == '{"a":1}'
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    assert chat_out.endswith(b"data: [DONE]\n\n")
    assert chat.usage is not None and chat.usage.input_tokens == 5


def test_signer_matches_botocore_and_the_mock_check() -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import ReadOnlyCredentials

    creds = _Credentials({"aws_access_key_id": "AKID", "aws_secret_access_key": "SECRET"}, 300)
    signer = SigV4Signer("us-west-2", creds)
    body = b'{"messages":[]}'
    url = "https://bedrock-runtime.us-west-2.amazonaws.com/model/m%3A0/converse"
    fields = [
        (b"host", b"bedrock-runtime.us-west-2.amazonaws.com"),
        (b"content-type", b"application/json"),
        (b"x-request-id", b"r1"),
        (b"authorization", b"Bearer client-key"),
    ]
    signed = dict(signer.sign(b"POST", url, fields, body))
    assert signed[b"x-request-id"] == b"r1" and not signed[b"authorization"].startswith(b"Bearer")
    # botocore's own signer, on the same request at the same instant, gives the same header
    reference = {
        "host": "bedrock-runtime.us-west-2.amazonaws.com",
        "content-type": "application/json",
        "x-amz-date": signed[b"x-amz-date"].decode(),
    }
    request = AWSRequest(method="POST", url=url, data=body, headers=reference)
    request.context["timestamp"] = signed[b"x-amz-date"].decode()
    auth = SigV4Auth(ReadOnlyCredentials("AKID", "SECRET", None), "bedrock", "us-west-2")
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    assert signed[b"authorization"].decode().endswith("Signature=" + expected)
    headers = {k.decode(): v.decode() for k, v in signed.items()}
    path = "/model/m%3A0/converse"
    assert check_signature("POST", path, headers, body, {"AKID": "SECRET"}) is None
    refused = check_signature("POST", path, headers, body + b" ", {"AKID": "SECRET"})
    assert refused is not None and refused[0] == 403 and "InvalidSignatureException" in refused[1]


def test_unresolved_credentials_fail_the_signature_not_the_loop() -> None:
    creds = _Credentials.__new__(_Credentials)
    creds.frozen = None
    creds.error = "AWS credentials are not resolved yet"
    with pytest.raises(RuntimeError, match="not resolved"):
        SigV4Signer("us-east-1", creds).sign(b"POST", "https://x/", [], b"")
