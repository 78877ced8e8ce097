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
from llmproxy.filters.tracing.spans import (
    AttemptRecord,
    ExchangeTrace,
    SpanData,
    SpanSettings,
    StaticGroup,
    client_group,
    content_attributes,
    server_group,
)

__all__ = ["ExchangeWriter", "OtlpEncoder"]

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
        self._heads: dict[tuple[str, bytes], bytes] = {}
        self._keys: dict[str, bytes] = {}
        self._tails: dict[tuple[str | None, tuple[str, ...], str | None], bytes] = {}
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


_TAG_ATTR = 0x4A  # Span.attributes
_TAG_EVENT_ATTR = 0x1A  # Event.attributes


class ExchangeWriter(OtlpEncoder):
    """:meth:`exchange` writes an exchange's spans straight from its record (no :class:`SpanData`).

    The same spans as :func:`~.spans.plan_spans` followed by :meth:`OtlpEncoder.spans`, in
    the same attribute order (a test compares the two), without building an attribute
    dict or a span object per span: the static groups come from the same cache, the
    per-span attributes are written as they are read.
    """

    def _num(self, tag: int, key: str, value: int | float) -> bytes:
        prefixes = self._int_prefixes
        if isinstance(value, float):
            prefix = prefixes.get((tag, key, 0))
            if prefix is None:
                prefix = self._float_prefix(tag, key)
            return prefix + _DOUBLE(value)
        number = _varint(value)
        prefix = prefixes.get((tag, key, len(number)))
        if prefix is None:
            prefix = self._int_prefix(tag, key, len(number))
        return prefix + number

    def _str(self, key: str, value: Any) -> bytes:
        entry = (key, value)
        encoded = self._cache.get(entry)
        if encoded is None:
            encoded = _field(_TAG_ATTR, _key_value(key, value))
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[entry] = encoded
        return encoded

    def _static(self, group: StaticGroup) -> bytes:
        encoded = group.encoded
        if encoded is None:
            encoded = group.encoded = b"".join(self._attributes(_TAG_ATTR, dict(group.pairs)))
        return encoded

    def _first_token(self, trace: ExchangeTrace, start: float, latest: bool, parts: list[bytes]) -> bytes:
        """The first-token event field (b"" for none); with ``latest`` the span attribute goes on ``parts``."""
        if not trace.first_byte or not trace.is_sse:
            return b""
        seconds = max(trace.first_byte - start, 0.0)
        if latest:
            parts.append(self._num(_TAG_ATTR, sc.RESPONSE_TIME_TO_FIRST_CHUNK, seconds))
        event = (
            b"\x09"
            + _FIXED64(trace.ns(trace.first_byte))
            + self._first_token_name
            + self._num(_TAG_EVENT_ATTR, sc.RESPONSE_TIME_TO_FIRST_CHUNK, seconds)
        )
        return _field(0x5A, event)

    _first_token_name = _text(0x12, sc.FIRST_TOKEN_EVENT)

    def _name(self, name: str, kind: bytes) -> bytes:
        """The span's name, kind and the start time's tag (kept per name and kind)."""
        key = (name, kind)
        encoded = self._heads.get(key)
        if encoded is None:
            encoded = _text(0x2A, name) + kind + b"\x39"
            if len(self._heads) < _CACHE_LIMIT:
                self._heads[key] = encoded
        return encoded

    def _unique(self, key: str, value: str) -> bytes:
        """A string attribute whose value does not repeat (ids): the key's bytes kept, the value written."""
        raw = value.encode("utf-8", "surrogatepass")
        size = len(raw)
        key_bytes = self._keys.get(key)
        if key_bytes is None:
            key_bytes = self._keys[key] = _text(0x0A, key)
        inner = len(key_bytes) + 4 + size  # the key, AnyValue's tag and length, string_value's tag and length
        if inner >= 0x80:
            return _field(_TAG_ATTR, _key_value(key, value))
        return b"J" + _BYTE[inner] + key_bytes + b"\x12" + _BYTE[size + 2] + b"\x0a" + _BYTE[size] + raw

    def _tail(self, model: str | None, reasons: tuple[str, ...], error: str | None) -> bytes:
        """A CLIENT span's last fields without a first-token event: response model, finish reasons, status, flags."""
        key = (model, reasons, error)
        encoded = self._tails.get(key)
        if encoded is None:
            encoded = (
                (self._str(sc.RESPONSE_MODEL, model) if model else b"")
                + (self._str(sc.RESPONSE_FINISH_REASONS, reasons) if reasons else b"")
                + (_field(0x7A, _text(0x12, error) + b"\x18\x02") if error else _STATUS_UNSET)
                + _FLAGS_LOCAL
            )
            if len(self._tails) < _CACHE_LIMIT:
                self._tails[key] = encoded
        return encoded

    def _count(self, key: str, value: int) -> bytes:
        """A span's integer attribute (a token count)."""
        number = _BYTE[value] if 0 <= value < 0x80 else _varint(value)
        prefix = self._int_prefixes.get((_TAG_ATTR, key, len(number)))
        if prefix is None:
            prefix = self._int_prefix(_TAG_ATTR, key, len(number))
        return prefix + number

    def exchange(self, trace: ExchangeTrace, settings: SpanSettings) -> bytes:
        """The spans of one exchange, each as a ``ScopeSpans.spans`` field (see the class docstring)."""
        latest, operation, groups = settings.latest, trace.operation, settings.groups
        params = trace.param_pairs(settings.params)
        parent = trace.parent
        head = b"\x0a\x10" + trace.trace_id.to_bytes(16, "big")
        if parent is not None and parent.tracestate:  # normalised as the SDK writes it
            head += _text(0x1A, TraceState.from_header([parent.tracestate.decode("latin-1")]).to_header())
        server_id = trace.server_span_id.to_bytes(8, "big")
        num, text, count = self._num, self._str, self._count
        offset = trace.offset_ns
        first_token = bool(trace.first_byte) and trace.is_sse
        out: list[bytes] = []
        relayed: AttemptRecord | None = None
        for attempt in trace.attempts:
            model = attempt.model or trace.requested_model
            name = f"{operation} {model}" if operation and model else operation or f"{trace.method} {attempt.upstream}"
            parts = [
                head,
                b"\x12\x08",
                attempt.span_id.to_bytes(8, "big"),
                b"\x22\x08",
                server_id,
                self._name(name, b"\x30\x03"),
                _FIXED64(int(attempt.started * 1e9) + offset),
                b"\x41",
                _FIXED64(int((attempt.ended or trace.end) * 1e9) + offset),
                self._static(client_group(groups, operation, model, params, attempt, latest)),
            ]
            counts = attempt.tokens
            if counts is not None:
                parts += (count(sc.USAGE_INPUT_TOKENS, counts[0]), count(sc.USAGE_OUTPUT_TOKENS, counts[1]))
                if counts[2]:
                    parts.append(count(sc.USAGE_CACHE_READ_INPUT_TOKENS, counts[2]))
                if counts[3]:
                    parts.append(count(sc.USAGE_CACHE_CREATION_INPUT_TOKENS, counts[3]))
                if counts[4]:
                    parts.append(count(sc.USAGE_REASONING_OUTPUT_TOKENS, counts[4]))
                if counts[5] is not None:
                    parts.append(num(_TAG_ATTR, sc.COST_USD, counts[5]))
            if attempt.response_id:
                parts.append(self._unique(sc.RESPONSE_ID, attempt.response_id))
            if attempt.head_sent:
                relayed = attempt
            if not (first_token and attempt.head_sent):
                parts.append(self._tail(attempt.response_model, attempt.finish_reasons, attempt.error_type))
                out.append(_field(0x12, b"".join(parts)))
                continue
            if attempt.response_model:
                parts.append(text(sc.RESPONSE_MODEL, attempt.response_model))
            if attempt.finish_reasons:
                parts.append(text(sc.RESPONSE_FINISH_REASONS, attempt.finish_reasons))
            parts.append(self._first_token(trace, attempt.started, latest, parts))
            error = attempt.error_type
            parts.append(_field(0x7A, _text(0x12, error) + b"\x18\x02") if error else _STATUS_UNSET)
            parts.append(_FLAGS_LOCAL)
            out.append(_field(0x12, b"".join(parts)))

        last = relayed or (trace.attempts[-1] if trace.attempts else None)
        path = trace.path.partition("?")[0]
        error = trace.error_type
        if error is None and trace.status is not None and trace.status >= 500:
            error = str(trace.status)
        model = trace.requested_model
        name = f"{operation} {model}" if operation and model else operation or f"{trace.method} {path}"
        group = server_group(groups, trace, path, params, last.provider if last is not None else "", error, latest)
        parts = [head, b"\x12\x08", server_id]
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts += (
            self._name(name, b"\x30\x02"),
            _FIXED64(int(trace.start * 1e9) + offset),
            b"\x41",
            _FIXED64(int(trace.end * 1e9) + offset),
            self._static(group),
            self._unique(sc.REQUEST_ID, trace.request_id),
        )
        if trace.client_addr:
            parts.append(text(sc.CLIENT_ADDRESS, trace.client_addr))
        if operation:
            event = self._first_token(trace, trace.start, latest, parts) if first_token else b""
            if settings.redactor is not None:
                content: dict[str, Any] = {}
                content_attributes(content, trace, settings)
                parts += self._attributes(_TAG_ATTR, content)
            parts.append(event)
        parts.append(_field(0x7A, _text(0x12, error) + b"\x18\x02") if error else _STATUS_UNSET)
        parts.append(_FLAGS_REMOTE if parent is not None else _FLAGS_LOCAL)
        out.insert(0, _field(0x12, b"".join(parts)))
        return b"".join(out)
