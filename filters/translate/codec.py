"""The chat-pivot codec interface: how a provider protocol maps to and from Chat Completions.

OpenAI Chat Completions is the pivot. A provider protocol other than the
two the routing filter translates directly (``openai``, ``anthropic``) is
one :class:`ChatCodec`, registered by name with :func:`register_codec`; an
adapter names it in ``Adapter.codec``. Routing then composes every client
API with it, never with per-protocol branches:

=================  ==================================================================
client calls       request / JSON response / stream
=================  ==================================================================
chat               ``encode_request`` / ``decode_response`` / ``stream_decoder``
messages           ``messages_request_to_chat`` then ``encode_request`` /
                   ``decode_response`` then ``chat_response_to_messages`` /
                   ``ChainedStream(stream_decoder, ChatStreamToMessagesStream)``
responses          ``responses_request_to_chat`` then ``encode_request`` /
                   ``decode_response`` then ``chat_response_to_responses`` /
                   ``ChainedStream(stream_decoder, ChatStreamToResponsesStream)``
=================  ==================================================================

Errors: ``decode_error`` gives the OpenAI envelope (and status) for a
provider error body; routing renders it in the client's protocol. A 200
response that is really a refusal (a safety block) is raised from
``decode_response`` as :class:`CodecRefusal`, and emitted by a stream
decoder as an OpenAI error chunk (``data: {"error": {...}}``), which the
chained translators already turn into the client's error event.

Usage: ``decode_response`` leaves the provider's usage translated in the
chat ``usage`` (``prompt_tokens``...), and :meth:`ChatCodec.usage` reads
the provider's own usage object into a :class:`llmproxy.Usage`
(provenance ``provider``); a stream decoder keeps the latest on its
``usage`` attribute, which routing publishes as it changes.

Framing: ``framing = "sse"`` (the default): the decoder's ``feed(event,
data)`` gets one SSE event at a time (its name or None, its joined
``data:`` bytes). ``framing = "bytes"``: the provider's stream is not SSE
(AWS event stream): ``feed(None, chunk)`` gets the raw body bytes as they
arrive, in pieces of any size; the decoder does its own framing.

Everything here is pure (no I/O); a codec instance is stateless and shared,
a decoder lives one response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

from llmproxy import Usage
from llmproxy.filters.translate.errors import TranslationError

__all__ = ["CODECS", "ChatCodec", "CodecRefusal", "StreamDecoder", "cached_prompt_usage", "register_codec"]

JsonObject = dict[str, Any]


class CodecRefusal(TranslationError):
    """A provider's success response that is an error for the client (a safety block).

    ``status`` is the HTTP status the client gets; ``envelope`` the OpenAI
    error envelope ``{"error": {"message", "type", "code", "param"}}``.
    """

    def __init__(self, status: int, envelope: JsonObject) -> None:
        message = envelope.get("error", {}).get("message", "refused")
        super().__init__(str(message))
        self.status = status
        self.envelope = envelope


class StreamDecoder(Protocol):
    """One provider stream to Chat Completions chunks (framed ``data: {...}\\n\\n`` bytes).

    ``feed`` returns the chat bytes for what it was given (possibly ``b""``);
    ``finish`` what is still due when the provider's body ends (the closing
    chunk, the usage chunk when ``include_usage``, ``data: [DONE]``, or an
    error chunk when the stream was cut). ``usage`` is the provider's usage
    so far (None until reported). Malformed input raises
    :class:`~llmproxy.filters.translate.errors.TranslationError`.
    """

    usage: Usage | None

    def feed(self, event: bytes | None, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class ChatCodec:
    """One provider protocol, as seen from Chat Completions. Subclass, then :func:`register_codec`."""

    name: ClassVar[str] = ""
    framing: ClassVar[Literal["sse", "bytes"]] = "sse"

    def encode_request(self, chat: JsonObject, *, model: str) -> JsonObject:
        """The provider's request body for a Chat Completions request (``chat["stream"]`` says stream).

        ``model`` is the provider's model name. Raises ``TranslationError``
        naming the chat ``param`` for what the provider cannot take.
        """
        raise NotImplementedError

    def decode_response(self, body: JsonObject, *, model: str) -> JsonObject:
        """A ``chat.completion`` object for the provider's JSON response (usage as chat ``usage``).

        Raises :class:`CodecRefusal` for a refusal, ``TranslationError`` for a malformed body.
        """
        raise NotImplementedError

    def stream_decoder(self, *, model: str, include_usage: bool) -> StreamDecoder:
        """A fresh decoder for one streamed response; ``include_usage``: end with a usage chunk."""
        raise NotImplementedError

    def decode_error(self, body: bytes, status: int) -> tuple[int, JsonObject]:
        """The client status and OpenAI error envelope for a provider error response."""
        raise NotImplementedError

    def usage(self, body: JsonObject) -> Usage | None:
        """The provider-reported usage of a parsed JSON response (None when it has none)."""
        raise NotImplementedError


CODECS: dict[str, ChatCodec] = {}


def register_codec(name: str) -> Callable[[type[ChatCodec]], type[ChatCodec]]:
    """Class decorator: register one shared instance of the codec as ``name``."""

    def add(cls: type[ChatCodec]) -> type[ChatCodec]:
        cls.name = name
        CODECS[name] = cls()
        return cls

    return add


def token_count(value: Any) -> int:
    """A usage field as a token count: a positive int, else 0 (absent, null, negative, not an int)."""
    return value if type(value) is int and value > 0 else 0


def cached_prompt_usage(
    usage: dict[str, Any], *, uncached: str, cache_read: str, cache_write: str, output: str
) -> Usage:
    """A :class:`llmproxy.Usage` from a usage object whose input field (``uncached``) excludes the
    cache parts, as Anthropic's and Bedrock's do: the record's input is the whole prompt
    (``uncached + cache_read + cache_write``, the OpenTelemetry GenAI rule), with the cache parts
    kept separately. An object without an int ``output`` is marked ``partial``."""
    read = token_count(usage.get(cache_read))
    write = token_count(usage.get(cache_write))
    out = usage.get(output)
    record = Usage(
        input_tokens=token_count(usage.get(uncached)) + read + write,
        output_tokens=token_count(out),
        cache_read_tokens=read,
        cache_write_tokens=write,
        provider_usage=usage,
    )
    if type(out) is not int:
        record.extra["partial"] = True
    return record
