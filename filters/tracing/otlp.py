"""OTLP protobuf, written directly from :class:`~.spans.SpanData` (no ``ReadableSpan``, no message objects).

The SDK's encoder (``encode_spans``) builds one protobuf object per span,
attribute and value from ``ReadableSpan`` objects: about 60 us per
exchange of two spans here, more than the proxy spends on the exchange
itself. This module writes the same bytes (``opentelemetry.proto``'s
``ExportTraceServiceRequest``; a test decodes both and compares them) by
hand, and keeps the encoded ``KeyValue`` of every (name, value) pair whose
value repeats (operation, provider, model, host, outcome, ...) so that most
attributes cost one dict lookup. Values that never repeat (response and
request ids, addresses, recorded content) are not kept; the cache is
bounded.

Wire format reminders: a field is ``(number << 3) | wire type``; wire types
0 (varint), 1 (64-bit), 2 (length-delimited), 5 (32-bit). Every field
number used here is below 16 (one tag byte) except ``Span.flags`` (16).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import TraceState

from llmproxy.filters.tracing import semconv as sc
from llmproxy.filters.tracing.spans import ExchangeTrace, SpanData

__all__ = ["OtlpEncoder"]

_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_FIXED32 = struct.Struct("<I").pack

#: Attributes whose values do not repeat: never cached.
_UNIQUE = frozenset(
    {
        sc.RESPONSE_ID,
        sc.REQUEST_ID,
        sc.INPUT_MESSAGES,
        sc.OUTPUT_MESSAGES,
        sc.SYSTEM_INSTRUCTIONS,
    }
)
_CACHE_LIMIT = 8192

# Span.flags: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK for a remote parent
_FLAGS_LOCAL = b"\x85\x01" + _FIXED32(0x100)
_FLAGS_REMOTE = b"\x85\x01" + _FIXED32(0x300)
_STATUS_UNSET = b"\x7a\x00"
_KIND = {True: b"\x30\x02", False: b"\x30\x03"}  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT


_BYTE = [bytes((i,)) for i in range(256)]


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 two's complement
    if value < 0x80:
        return _BYTE[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` is the whole one-byte tag)."""
    size = len(payload)
    return _BYTE[tag] + (_BYTE[size] if size < 0x80 else _varint(size)) + payload


def _text(tag: int, value: str) -> bytes:
    return _field(tag, value.encode("utf-8", "surrogatepass"))


def _any(value: Any) -> bytes:
    """An ``AnyValue`` message."""
    if isinstance(value, str):
        return _text(0x0A, value)
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, (tuple, list)):
        return _field(0x2A, b"".join(_field(0x0A, _any(item)) for item in value))
    return _text(0x0A, str(value))


def _key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message."""
    return _text(0x0A, key) + _field(0x12, _any(value))


class OtlpEncoder:
    """Encodes exchanges' spans as one ``ExportTraceServiceRequest`` (see the module docstring)."""

    def __init__(self, resource: Mapping[str, Any], scope_name: str, scope_version: str) -> None:
        self._cache: dict[tuple[str, Any], bytes] = {}
        self._int_prefixes: dict[tuple[int, str, int], bytes] = {}
        self._names: dict[str, bytes] = {}
        resource_bytes = _field(0x0A, b"".join(_field(0x0A, _key_value(k, v)) for k, v in resource.items()))
        self._scope = _field(0x0A, _text(0x0A, scope_name) + _text(0x12, scope_version))
        self._resource = resource_bytes

    def _attributes(self, tag: int, attributes: dict[str, Any]) -> list[bytes]:
        cache, prefixes = self._cache, self._int_prefixes
        out: list[bytes] = []
        for key, value in attributes.items():
            if type(value) is int and 0 <= value < 1 << 63:  # counts: a kept prefix, then the varint
                number = _varint(value)
                prefix = prefixes.get((tag, key, len(number)))
                if prefix is None:
                    prefix = self._int_prefix(tag, key, len(number))
                out.append(prefix + number)
                continue
            if type(value) is float:
                prefix = prefixes.get((tag, key, 0))
                if prefix is None:
                    prefix = self._float_prefix(tag, key)
                out.append(prefix + _DOUBLE(value))
                continue
            if key in _UNIQUE:
                out.append(_field(tag, _key_value(key, value)))
                continue
            entry = (key, value)
            encoded = cache.get(entry)
            if encoded is None:
                encoded = _field(tag, _key_value(key, value))
                if len(cache) < _CACHE_LIMIT:
                    cache[entry] = encoded
            out.append(encoded)
        return out

    def _float_prefix(self, tag: int, key: str) -> bytes:
        """The bytes of a ``double_value`` ``KeyValue`` field before its 8 bytes (kept under size 0)."""
        key_bytes = _text(0x0A, key)
        prefix = _BYTE[tag] + _varint(len(key_bytes) + 11) + key_bytes + b"\x12\x09\x21"
        self._int_prefixes[(tag, key, 0)] = prefix
        return prefix

    def _int_prefix(self, tag: int, key: str, size: int) -> bytes:
        """The bytes of an integer ``KeyValue`` field before its ``size``-byte varint."""
        key_bytes = _text(0x0A, key)
        inner = len(key_bytes) + 3 + size  # key, then AnyValue's tag and length, int_value's tag
        prefix = _BYTE[tag] + _varint(inner) + key_bytes + b"\x12" + _BYTE[size + 1] + b"\x18"
        self._int_prefixes[(tag, key, size)] = prefix
        return prefix

    def span(self, trace: ExchangeTrace, data: SpanData, trace_id: bytes, trace_state: bytes) -> bytes:
        """One ``Span`` message."""
        parts = [b"\x0a\x10", trace_id, b"\x12\x08", data.span_id.to_bytes(8, "big")]
        if trace_state:
            parts.append(trace_state)
        if data.parent_id:
            parts += (b"\x22\x08", data.parent_id.to_bytes(8, "big"))
        parts += (
            _text(0x2A, data.name),
            _KIND[data.server],
            b"\x39",
            _FIXED64(data.start),
            b"\x41",
            _FIXED64(data.end),
        )
        group = data.static
        encoded = group.encoded
        if encoded is None:
            encoded = group.encoded = b"".join(self._attributes(0x4A, dict(group.pairs)))
        parts.append(encoded)
        parts += self._attributes(0x4A, data.attributes)
        for name, at, attrs in data.events:
            parts.append(
                _field(0x5A, b"\x09" + _FIXED64(at) + _text(0x12, name) + b"".join(self._attributes(0x1A, attrs)))
            )
        parts.append(_field(0x7A, _text(0x12, data.error) + b"\x18\x02") if data.error else _STATUS_UNSET)
        parts.append(_FLAGS_REMOTE if data.parent_remote else _FLAGS_LOCAL)
        return b"".join(parts)

    def spans(self, trace: ExchangeTrace, spans: list[SpanData]) -> bytes:
        """The spans of one exchange, each as a ``ScopeSpans.spans`` field."""
        trace_id = trace.trace_id.to_bytes(16, "big")
        parent = trace.parent
        state = b""
        if parent is not None and parent.tracestate:  # normalised as the SDK writes it
            state = _text(0x1A, TraceState.from_header([parent.tracestate.decode("latin-1")]).to_header())
        return b"".join(_field(0x12, self.span(trace, data, trace_id, state)) for data in spans)

    def request(self, spans: list[bytes]) -> bytes:
        """An ``ExportTraceServiceRequest`` of encoded spans (from :meth:`spans`)."""
        scope_spans = _field(0x12, self._scope + b"".join(spans))
        return _field(0x0A, self._resource + scope_spans)
