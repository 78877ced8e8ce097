"""W3C Trace Context (``traceparent`` / ``tracestate``): parse what the client sent, write what goes upstream.

The proxy is a participant in the trace (W3C Trace Context, level 1):

* a valid ``traceparent`` from the client is the parent of the proxy's
  SERVER span; its ``tracestate`` is passed on unchanged;
* none: the proxy starts a trace (new trace id);
* a malformed one (wrong length, non-lowercase-hex, the all-zero ids,
  version ``ff``, several ``traceparent`` fields): it is dropped with its
  ``tracestate`` (the spec forbids reading one without the other), counted,
  and a new trace starts. Never an error for the client.

The upstream request always carries a ``traceparent`` whose parent id is
the CLIENT span of that attempt (ids are drawn before any span object
exists: spans are built when the exchange ends). Pure functions, no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["TRACEPARENT", "TRACESTATE", "Parent", "format_traceparent", "new_span_id", "new_trace_id", "parse"]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"

_HEX = frozenset(b"0123456789abcdef")
#: The W3C limit for a ``tracestate`` we pass on (512 characters is what a vendor must propagate).
MAX_TRACESTATE = 512

# random.getrandbits is what the OpenTelemetry SDK's RandomIdGenerator uses: fast, not a CSPRNG
# (trace ids are identifiers, not secrets).
_bits = random.getrandbits


def new_trace_id() -> int:
    """A random non-zero 128-bit trace id."""
    value = _bits(128)
    while not value:
        value = _bits(128)
    return value


def new_span_id() -> int:
    """A random non-zero 64-bit span id."""
    value = _bits(64)
    while not value:
        value = _bits(64)
    return value


@dataclass(slots=True, frozen=True)
class Parent:
    """A valid incoming ``traceparent`` (and the ``tracestate`` that came with it)."""

    trace_id: int
    span_id: int
    flags: int
    tracestate: bytes | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def _hex(raw: bytes) -> int | None:
    if not raw or not _HEX.issuperset(raw):
        return None
    return int(raw, 16)


def parse(values: list[bytes], tracestate: list[bytes]) -> Parent | None:
    """The parent from the ``traceparent`` field values (None when it is invalid or absent).

    ``values`` are every ``traceparent`` field of the request (more than one
    is invalid); ``tracestate`` every ``tracestate`` field (joined with commas,
    dropped when longer than :data:`MAX_TRACESTATE`).
    """
    if len(values) != 1:
        return None
    raw = values[0].strip(b" \t")
    # version 00 is exactly 55 characters; a later version may append fields after a '-'
    if len(raw) < 55 or raw[2:3] != b"-" or raw[35:36] != b"-" or raw[52:53] != b"-":
        return None
    version = _hex(raw[0:2])
    if version is None or version == 0xFF or (version == 0 and len(raw) != 55):
        return None
    if len(raw) > 55 and raw[55:56] != b"-":
        return None
    trace_id, span_id, flags = _hex(raw[3:35]), _hex(raw[36:52]), _hex(raw[53:55])
    if not trace_id or not span_id or flags is None:
        return None
    state: bytes | None = b",".join(tracestate) if tracestate else None
    if state is not None and (len(state) > MAX_TRACESTATE or not state.strip(b" \t,")):
        state = None
    return Parent(trace_id, span_id, flags, state)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    """The version-00 ``traceparent`` value for ``trace_id`` / ``span_id``."""
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")
