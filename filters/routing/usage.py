"""Provider-reported usage, read from responses in the provider's protocol.

Pure functions and one small accumulator; routing calls them on the
provider's side of a translation, so one reader per provider protocol
serves every protocol pair:

* :func:`from_openai`: a Chat Completions, Completions, Embeddings or
  Responses ``usage`` object (``prompt_tokens``/``completion_tokens`` or
  ``input_tokens``/``output_tokens``; cached prompt tokens and reasoning
  tokens from their ``*_details``);
* :func:`from_anthropic`: a Messages ``usage`` object. OpenTelemetry GenAI
  rule: ``input_tokens`` of the record is the whole prompt,
  ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``,
  with the cache parts kept separately;
* :class:`StreamUsage`: the usage objects of a stream merged in order
  (Anthropic's ``message_start`` and ``message_delta`` both carry usage and
  the later counts are cumulative: they replace, never add).

Events are looked at only when a byte check says they can carry usage
(:data:`USAGE_OBJECT`): the JSON of the other events is never parsed.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from llmproxy import Usage, parse_event, split_events
from llmproxy.filters.translate.bedrock import from_bedrock
from llmproxy.filters.translate.codec import cached_prompt_usage, token_count

__all__ = [
    "USAGE_OBJECT",
    "StreamUsage",
    "from_anthropic",
    "from_openai",
    "from_provider",
    "openai_shaped",
    "usage_events",
]

#: A usage *object* in an event's bytes (``"usage": null``, sent by some
#: OpenAI-compatible servers in every chunk, does not match).
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def from_openai(usage: dict[str, Any]) -> Usage:
    """A :class:`Usage` from an OpenAI-protocol ``usage`` object."""
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    cached = token_count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = token_count(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    record = Usage(
        input_tokens=token_count(prompt),
        output_tokens=token_count(completion),
        cache_read_tokens=cached,
        reasoning_tokens=reasoning,
        provider_usage=usage,
    )
    if type(completion) is not int and "total_tokens" not in usage:
        record.extra["partial"] = True  # (embeddings have no completion but a total: 0 is right)
    return record


def from_anthropic(usage: dict[str, Any]) -> Usage:
    """A :class:`Usage` from an Anthropic ``usage`` object (see the module docstring)."""
    return cached_prompt_usage(
        usage,
        uncached="input_tokens",
        cache_read="cache_read_input_tokens",
        cache_write="cache_creation_input_tokens",
        output="output_tokens",
    )


def from_provider(protocol: str, usage: dict[str, Any]) -> Usage:
    """:func:`from_anthropic`, :func:`from_bedrock` or :func:`from_openai` by the provider's protocol."""
    if protocol == "anthropic":
        return from_anthropic(usage)
    return from_bedrock(usage) if protocol == "bedrock" else from_openai(usage)


def usage_events(data: bytes) -> list[tuple[bytes, dict[str, Any]]]:
    """The whole SSE events in ``data`` that carry a usage object, with their parsed JSON.

    Only events whose bytes match :data:`USAGE_OBJECT` are cut out and parsed:
    the match is found in the whole batch at C speed and its event is the
    span between the blank lines around it (a blank line cannot occur inside
    an event), so a batch of many events costs one search, not one per event.
    """
    if 13 in data:  # a CR (an int test: ``bytes in bytes`` costs an exception in 3.11)
        return _usage_events_split(data)  # CR line ends: the framer's boundary rules
    found: list[tuple[bytes, dict[str, Any]]] = []
    search = USAGE_OBJECT.search
    pos = 0
    while (match := search(data, pos)) is not None:
        before = data.rfind(b"\n\n", 0, match.start())
        after = data.find(b"\n\n", match.end())
        end = len(data) if after < 0 else after + 2
        _take_event(data[0 if before < 0 else before + 2 : end], found)
        pos = end
    return found


def _usage_events_split(data: bytes) -> list[tuple[bytes, dict[str, Any]]]:
    found: list[tuple[bytes, dict[str, Any]]] = []
    for event in split_events(data):
        if USAGE_OBJECT.search(event) is not None:
            _take_event(event, found)
    return found


def _take_event(event: bytes, found: list[tuple[bytes, dict[str, Any]]]) -> None:
    try:
        payload = orjson.loads(parse_event(event).data)
    except orjson.JSONDecodeError:
        return
    if isinstance(payload, dict):
        found.append((event, payload))


def _usage_of(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The usage object of one event's JSON, wherever the protocol puts it."""
    usage = payload.get("usage")
    if isinstance(usage, dict):
        return usage
    for key in ("message", "response"):  # Anthropic message_start; Responses response.completed
        inner = payload.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            return inner["usage"]  # type: ignore[no-any-return]
    return None


class StreamUsage:
    """The usage reported by one stream, merged in order; a provider's protocol per instance."""

    __slots__ = ("_final", "_merged", "protocol")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self._merged: dict[str, Any] | None = None
        #: The stream's closing usage was seen (Anthropic ``message_delta``; an OpenAI usage
        #: chunk is always the last). Before it, output counts are only a running figure.
        self._final = False

    def take(self, payload: dict[str, Any]) -> bool:
        """Merge the usage of one event's JSON; True when it had one."""
        usage = _usage_of(payload)
        if usage is None:
            return False
        if self._merged is None:
            self._merged = dict(usage)
        else:
            # cumulative counts: a later value replaces an earlier one; a null never erases one
            self._merged.update((k, v) for k, v in usage.items() if v is not None)
        if self.protocol != "anthropic" or payload.get("type") == "message_delta":
            self._final = True
        return True

    def result(self) -> Usage | None:
        """The merged record, or None when the stream reported no usage."""
        if self._merged is None:
            return None
        record = from_provider(self.protocol, self._merged)
        if not self._final:
            record.extra["partial"] = True  # cut before the closing usage: output is counted from the text
        return record


def openai_shaped(record: Usage) -> dict[str, Any]:
    """The record as an OpenAI ``usage`` object (``exchange.vars["routing.usage"]``, kept for plugins)."""
    if record.provider_usage is not None and "prompt_tokens" in record.provider_usage:
        return record.provider_usage
    out: dict[str, Any] = {
        "prompt_tokens": record.input_tokens,
        "completion_tokens": record.output_tokens,
        "total_tokens": record.input_tokens + record.output_tokens,
    }
    if record.cache_read_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": record.cache_read_tokens}
    if record.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": record.reasoning_tokens}
    return out
