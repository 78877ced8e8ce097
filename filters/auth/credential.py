"""Finding the client's key in a request head.

Three places, as the SDKs send it: ``Authorization: Bearer <key>`` (OpenAI,
and Anthropic's ``auth_token``), ``x-api-key: <key>`` (Anthropic) and
``api-key: <key>`` (Azure OpenAI). :func:`presented_key` scans the fields
once and returns the key's bytes, or the reason there is none:

* ``missing``: none of the three fields;
* ``malformed``: a field given twice, an ``Authorization`` scheme other than
  ``Bearer``, an empty key, or two fields carrying different keys (which
  one would be the caller?). The same key in two fields (an SDK that sends
  both) is one credential.

The scan is one pass over the fields with no allocation beyond the
``Bearer`` slice, and no method call for the head an SDK sends (the parser,
h11, already stripped the values' surrounding whitespace).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MALFORMED", "MISSING", "presented_key"]

MISSING: Final = "missing"
MALFORMED: Final = "malformed"

#: A bit per credential field (to find one given twice); every other field is skipped with one set lookup.
_BITS = {b"authorization": 1, b"x-api-key": 2, b"api-key": 4}
_NAMES = frozenset(_BITS)


def presented_key(fields: list[tuple[bytes, bytes]]) -> bytes | str:
    """The key from ``fields`` (lowercase names, as parsed), or :data:`MISSING` / :data:`MALFORMED`."""
    key: bytes | None = None
    seen = 0
    for name, value in fields:
        if name not in _NAMES:
            continue
        bit = _BITS[name]
        if bit == 1:
            if value[:7] == b"Bearer ":  # what every SDK sends: no method call on the fast path
                value = value[7:]
            else:
                scheme, _, value = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return MALFORMED
            if value[:1] == b" ":
                value = value.lstrip(b" ")
        if not value or 32 in value or seen & bit:  # 32: a space
            return MALFORMED
        if key is None:
            key = value
        elif value != key:
            return MALFORMED
        seen |= bit
    return MISSING if key is None else key
