"""Pure protocol translation between OpenAI Chat Completions and Anthropic Messages.

Nothing here does I/O or knows about the proxy: plain functions over JSON
objects and two small stateful stream translators over SSE event payloads.

================================  ==========================================
client speaks OpenAI,             :func:`chat_request_to_messages`,
provider is Anthropic             :func:`messages_response_to_chat`,
                                  :class:`MessagesStreamToChatStream`,
                                  :func:`anthropic_error_to_openai`
client speaks Anthropic,          :func:`messages_request_to_chat`,
provider is OpenAI-compatible     :func:`chat_response_to_messages`,
                                  :class:`ChatStreamToMessagesStream`,
                                  :func:`openai_error_to_anthropic`
client speaks OpenAI Responses,   :func:`responses_request_to_chat`,
provider is Chat Completions      :func:`chat_response_to_responses`,
(or Anthropic, chained with the   :class:`ChatStreamToResponsesStream`,
first row)                        :class:`ChainedStream`
================================  ==========================================

Any other provider protocol is a :class:`ChatCodec` (:mod:`.codec`): it maps
to and from Chat Completions, and the routing filter composes the client's
API with it.

A stream translator lives exactly one response: ``feed(event, data)`` takes
one upstream SSE event (name or None, and the joined ``data:`` bytes) and
returns the framed client bytes for it; ``finish()`` returns what must still
be sent when the upstream body ends. Malformed input raises
:class:`TranslationError`, which carries the offending ``param``.
"""

from llmproxy.filters.translate.chat_to_messages import (
    MessagesStreamToChatStream,
    chat_request_to_messages,
    messages_response_to_chat,
)
from llmproxy.filters.translate.codec import CODECS, ChatCodec, CodecRefusal, StreamDecoder, register_codec
from llmproxy.filters.translate.errors import (
    TranslationError,
    anthropic_envelope_from_openai,
    anthropic_error_to_openai,
    openai_envelope_from_anthropic,
    openai_error_to_anthropic,
)
from llmproxy.filters.translate.messages_to_chat import (
    ChatStreamToMessagesStream,
    chat_response_to_messages,
    messages_request_to_chat,
)
from llmproxy.filters.translate.responses import (
    chat_response_to_responses,
    input_items,
    new_response_id,
    responses_request_to_chat,
    responses_usage,
)
from llmproxy.filters.translate.responses_stream import ChainedStream, ChatStreamToResponsesStream, EventTranslator

__all__ = [
    "CODECS",
    "ChainedStream",
    "ChatCodec",
    "ChatStreamToMessagesStream",
    "ChatStreamToResponsesStream",
    "CodecRefusal",
    "EventTranslator",
    "MessagesStreamToChatStream",
    "StreamDecoder",
    "TranslationError",
    "anthropic_envelope_from_openai",
    "anthropic_error_to_openai",
    "chat_request_to_messages",
    "chat_response_to_messages",
    "chat_response_to_responses",
    "input_items",
    "messages_request_to_chat",
    "messages_response_to_chat",
    "new_response_id",
    "openai_envelope_from_anthropic",
    "openai_error_to_anthropic",
    "register_codec",
    "responses_request_to_chat",
    "responses_usage",
]
