"""Token counting for metering: offline tiktoken encodings, per-model choice, prompt rules.

Public API (pure functions; the encodings load once, lazily, and can be warmed)::

    count_text(text, model) -> TokenCount
    count_completion_text(text, model) -> TokenCount
    count_prompt(body, protocol, model) -> TokenCount        # "openai" | "anthropic" | "responses"
    await count_prompt_async(body, protocol, model) -> TokenCount
    warm(models) -> None                                    # () loads the default encodings

``TokenCount.encoding`` names the encoding used; ``approximate`` is True when the model has no
public tokenizer (claude, gemini, llama, unknown names: counted with cl100k_base, see models.py),
when o200k_base is not installed, or when part of the prompt was estimated (tools, images whose
size is unknown, tool calls; see prompt_count.py). Special-token text in a prompt
(``<|endoftext|>``) is counted as ordinary text, never rejected.

Where counting runs (``count_prompt_async``): inline on the event loop when the body holds at most
``INLINE_LIMIT`` characters of text, else in a 2-thread pool. tiktoken's Rust core releases the GIL
while it encodes, but holds it to build the result list; texts over 32 KB are therefore encoded in
pieces cut at exact pre-tokenizer boundaries (see ``_pieces``). Measured on this machine:

* ``python -m llmproxy.filters.metering.tokenizer`` (count_prompt, one chat message of English
  prose, best of 5)::

      body text   gpt-4 (cl100k)   gpt-4o (o200k)
         1 KB        0.24 ms          0.13 ms
         4 KB        0.88 ms          0.48 ms
         8 KB        1.69 ms          0.93 ms
        16 KB        3.30 ms          1.81 ms
        64 KB        8.45 ms          7.18 ms
       256 KB       33.9 ms          28.7 ms
         1 MB        209 ms           119 ms

* a thread hop (``run_in_executor``) costs ~0.15 ms; two threads encoding 1 MB each take 1.4x
  one thread's time (the GIL is mostly released);
* counting an 800 KB prompt in the pool: the event loop's longest stall was 26 ms with one encode
  call, 5 ms (the interpreter's switch interval) with the 32 KB pieces.

~0.5 ms is passed between 1 and 4 KB (2 KB for cl100k), so ``INLINE_LIMIT = 2048``.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal, NamedTuple

from llmproxy.filters.metering.encodings import CL100K, O200K, EncodingUnavailable, get_encoding, installed, is_loaded
from llmproxy.filters.metering.models import encoding_for
from llmproxy.filters.metering.prompt_count import Tally, count_anthropic, count_openai_chat, count_responses

__all__ = [
    "INLINE_LIMIT",
    "EncodingUnavailable",
    "Protocol",
    "TokenCount",
    "count_completion_text",
    "count_prompt",
    "count_prompt_async",
    "count_prompt_inline",
    "count_text",
    "detect_protocol",
    "text_counter",
    "warm",
]

Protocol = Literal["openai", "anthropic", "responses"]
INLINE_LIMIT = 2048  # characters of body text counted on the event loop (see the module docstring)


class TokenCount(NamedTuple):
    """A token count, the encoding that produced it, and whether it only approximates the provider's."""

    tokens: int
    encoding: str
    approximate: bool


def _encoder(model: str) -> tuple[Any, str, bool]:
    choice = encoding_for(model)
    return get_encoding(choice.encoding).encode_ordinary, choice.encoding, choice.approximate


_CHUNK = 32768
_LINE_START = re.compile(r"\n(?=\S)")


def _pieces(text: str) -> Iterable[str]:
    """``text`` cut into ~``_CHUNK``-char pieces just after a newline followed by a non-space.

    Exact for cl100k_base and o200k_base: no pre-tokenizer piece of either pattern continues past
    a newline into a non-space character, so every cut is a piece boundary of the whole text. It
    bounds how long one encode call holds the GIL (converting its result list), so the event
    loop keeps running while a large prompt is counted in a thread. A text with no such newline
    is one piece.
    """
    start = 0
    n = len(text)
    while n - start > _CHUNK:
        cut = _LINE_START.search(text, start + _CHUNK // 2, start + _CHUNK)
        if cut is None:
            cut = _LINE_START.search(text, start + _CHUNK)
            if cut is None:
                break
        yield text[start : cut.end()]
        start = cut.end()
    yield text[start:]


def count_text(text: str, model: str) -> TokenCount:
    """Tokens of ``text`` in ``model``'s encoding (no chat framing)."""
    encode, name, approximate = _encoder(model)
    if len(text) <= _CHUNK:
        return TokenCount(len(encode(text)) if text else 0, name, approximate)
    return TokenCount(sum(len(encode(piece)) for piece in _pieces(text)), name, approximate)


#: Texts up to this many chars are counted once per encoding and remembered: roles, names,
#: tool names and short fields recur in every request, and one encode call costs far more
#: than a dict lookup (the regex pre-tokenizer's set-up dominates a short text).
_SHORT_TEXT = 16
#: Short texts remembered per encoding (cleared when full: a bound, not an LRU).
_SHORT_CACHE = 4096
_short_counts: dict[str, dict[str, int]] = {}


def _counter(model: str) -> tuple[Callable[[str], int], str, bool]:
    """``(count, encoding name, approximate)``: a function giving the tokens of a text in
    ``model``'s encoding, long texts in pieces (:func:`_pieces`), short ones remembered."""
    encode, name, approximate = _encoder(model)
    short = _short_counts.setdefault(name, {})

    def count(text: str) -> int:
        size = len(text)
        if size <= _SHORT_TEXT:
            if not text:
                return 0
            tokens = short.get(text)
            if tokens is None:
                if len(short) >= _SHORT_CACHE:
                    short.clear()
                tokens = short[text] = len(encode(text))
            return tokens
        if size <= _CHUNK:
            return len(encode(text))
        return sum(len(encode(piece)) for piece in _pieces(text))

    return count, name, approximate


def text_counter(model: str) -> Callable[[str], int]:
    """A function giving the tokens of a text in ``model``'s encoding: :func:`count_text`'s
    count with the encoding looked up once (for callers that count many small texts)."""
    return _counter(model)[0]


def count_completion_text(text: str, model: str) -> TokenCount:
    """Tokens of relayed output text (a completion's content), as providers count completion tokens."""
    return count_text(text, model)


def count_prompt(body: dict[str, Any], protocol: Protocol | str, model: str) -> TokenCount:
    """Prompt tokens of a request ``body`` as sent to a provider speaking ``protocol``.

    ``openai``: a chat completions body (``messages``); a body with ``input`` and no ``messages``
    is counted as a Responses body. ``responses``: a Responses body. ``anthropic``: a messages body.
    Raises ValueError for another protocol.
    """
    enc, name, approximate = _counter(model)
    func_init = 7 if name == O200K else 10
    tally: Tally
    if protocol == "anthropic":
        tally = count_anthropic(body, enc)
    elif protocol == "responses" or (protocol == "openai" and "messages" not in body and "input" in body):
        tally = count_responses(body, enc, model, func_init)
    elif protocol == "openai":
        tally = count_openai_chat(body, enc, model, func_init)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    return TokenCount(tally.tokens, name, approximate or tally.approximate)


_ANTHROPIC_BLOCKS = frozenset(("tool_use", "tool_result", "thinking", "redacted_thinking", "document"))


def detect_protocol(body: dict[str, Any]) -> Protocol:
    """Guess a request body's protocol: ``responses`` (``input``, no ``messages``), ``anthropic``
    (a top-level ``system``, or a content block only Anthropic has: tool_use, tool_result,
    thinking, document, or an image with a ``source``), else ``openai`` chat.
    """
    if "messages" not in body and "input" in body:
        return "responses"
    if "system" in body:
        return "anthropic"
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and (block.get("type") in _ANTHROPIC_BLOCKS or "source" in block):
                    return "anthropic"
    return "openai"


def _text_size(value: Any, limit: int) -> int:
    """Characters of string data in ``value``, stopping once past ``limit`` (a cheap walk)."""
    if isinstance(value, str):
        return len(value)
    total = 0
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return 0
    for item in items:
        total += _text_size(item, limit - total)
        if total > limit:
            break
    return total


_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmproxy-tokens")
    return _pool


def count_prompt_inline(
    body: dict[str, Any], protocol: Protocol | str, model: str, *, wire_size: int | None = None
) -> TokenCount | None:
    """:func:`count_prompt` when it is cheap enough for the event loop (the encoding is loaded and
    the text is at most ``INLINE_LIMIT`` chars), else None: :func:`count_prompt_async` then
    counts it in a thread. For hooks that stay plain calls on the common path."""
    if is_loaded(encoding_for(model).encoding) and (
        (wire_size is not None and wire_size <= INLINE_LIMIT) or _text_size(body, INLINE_LIMIT) <= INLINE_LIMIT
    ):
        return count_prompt(body, protocol, model)
    return None


async def count_prompt_async(
    body: dict[str, Any], protocol: Protocol | str, model: str, *, wire_size: int | None = None
) -> TokenCount:
    """:func:`count_prompt` that never stalls the loop: inline below ``INLINE_LIMIT`` chars, else in a thread.

    ``wire_size``: the size in bytes of the JSON ``body`` was parsed from, when known; a body no
    longer than ``INLINE_LIMIT`` bytes cannot hold more characters of text, so it is counted
    inline without walking it first. The first call for an encoding that is not loaded yet also
    runs in the thread (loading takes ~0.5-1 s); call :func:`warm` at startup to avoid that.
    """
    counted = count_prompt_inline(body, protocol, model, wire_size=wire_size)
    if counted is not None:
        return counted
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), partial(count_prompt, body, protocol, model))


def warm(models: Iterable[str]) -> None:
    """Load the encodings ``models`` need (blocking; run it in a thread). ``()`` loads the defaults:
    cl100k_base, and o200k_base when installed. Raises EncodingUnavailable if cl100k_base is missing.
    """
    names = {encoding_for(m).encoding for m in models}
    if not names:
        names = {CL100K} | ({O200K} if installed(O200K) else set())
    for name in sorted(names):
        get_encoding(name)


def _bench() -> None:  # python -m llmproxy.filters.metering.tokenizer
    prose = "The quick brown fox jumps over the lazy dog, and then it writes a report about it. "
    for model in ("gpt-4", "gpt-4o"):
        warm([model])
        for kb in (1, 4, 8, 16, 64, 256, 1024):
            text = (prose * (kb * 1024 // len(prose) + 1))[: kb * 1024]
            body = {"messages": [{"role": "user", "content": text}]}
            best = min(_timed(body, model) for _ in range(5))
            sys.stdout.write(f"{model:8} {encoding_for(model).encoding} {kb:5} KB {best * 1e3:8.3f} ms\n")


def _timed(body: dict[str, Any], model: str) -> float:
    start = time.perf_counter()
    count_prompt(body, "openai", model)
    return time.perf_counter() - start


if __name__ == "__main__":
    _bench()
