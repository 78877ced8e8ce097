"""The cache key: a hash of the normalised request, scoped by principal unless shared."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

__all__ = ["IGNORED", "request_key", "table_version"]

#: Request fields that never change the reply's content: left out of the key.
IGNORED = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier", "safety_identifier"})


def request_key(path: str, model: str, body: dict[str, Any], stream: bool, scope: str) -> str:
    """``cache:<sha256>`` of (scope, path, mode, upstream model, body minus :data:`IGNORED` and ``model``).

    ``model`` is the model the provider is asked for (after routing's mapping),
    so two aliases of one model share entries. Keys are sorted before
    hashing: field order never splits entries. The mode (stream or JSON) is
    part of the key: a stream is replayed only from a stream, a JSON reply only
    from a JSON reply, so both are byte- or event-identical to the original.
    """
    normal = {k: v for k, v in body.items() if k not in IGNORED and k != "model"}
    blob = orjson.dumps([scope, path, stream, model, normal], option=orjson.OPT_SORT_KEYS)
    return "cache:" + hashlib.sha256(blob).hexdigest()


def table_version(config: Any) -> str:
    """A digest of a routing config: keys made before routing (the client's model) carry it.

    Entries are then found again only while the model mapping they were
    stored under stands (a shared store outlives a reload that changed it).
    """
    blob = orjson.dumps(config, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(blob).hexdigest()[:16]
