"""JSON helpers shared by the translators: orjson with a stdlib fallback for lone surrogates.

orjson rejects strings holding a lone UTF-16 surrogate (``"\\ud83d"``), which
a provider can emit when it splits an escaped astral character across two
stream deltas. These helpers keep the fast path on orjson and fall back to the
stdlib only when orjson refuses, so the common case pays nothing extra.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from llmproxy.filters.translate.errors import TranslationError

__all__ = ["dumps_str", "loads_object"]


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse ``data`` as a JSON object; raise :class:`TranslationError` otherwise.

    ``what`` names the payload in the error message ("SSE event data").
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(data)
        except ValueError:
            raise TranslationError(f"{what} is not valid JSON") from None
    if type(value) is not dict:
        raise TranslationError(f"{what} is not a JSON object")
    return value


def dumps_str(text: str) -> bytes:
    """``text`` as a JSON string literal (quotes included)."""
    try:
        return orjson.dumps(text)
    except TypeError:  # lone surrogate: escape it the stdlib way
        return json.dumps(text).encode()
