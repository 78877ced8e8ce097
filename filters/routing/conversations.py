"""Bridged Responses kept in the shared store: ``previous_response_id``, ``GET``/``DELETE /v1/responses/{id}``.

A provider reached by bridging (Chat Completions, Anthropic Messages) keeps
no conversation, so the routing filter keeps it: each bridged response the
client did not send with ``store: false`` is saved under
``llmproxy:responses:{id}`` with the ``response`` object and the items of the
whole conversation up to it (earlier turns, this request's input, this
response's output), for :data:`ttl <ConversationSettings.ttl>` seconds. A
conversation longer than ``max_bytes`` (encoded) is not saved: a follow-up
naming it gets the same 400 as an unknown id. Each record carries its
owner (the caller's principal name, "" without an auth filter): another
principal gets "not found", never the record.

Config (the routing section's ``responses`` mapping)::

    responses:
      store: true        # false: nothing kept; previous_response_id and GET are a 400
                       # (default: true, but false with several workers and a memory store)
      ttl: 3600          # seconds a stored response is kept
      max_bytes: 1048576 # largest conversation kept (encoded JSON)

With several workers, use a Redis store (``store: redis://...``): a memory
store is per process, and a follow-up may reach another worker. With
``server.workers`` above 1 and a memory store, storage is off unless asked
for, and ``store: true`` is refused at startup.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from llmproxy import ConfigError, Section, SharedStore

__all__ = ["ConversationSettings", "ConversationStore", "Stored", "output_as_input"]

_PREFIX = "llmproxy:responses:"


@dataclass(frozen=True)
class ConversationSettings:
    """The ``responses`` config mapping, validated."""

    #: None when the config does not say (on, unless the store is per process with several workers).
    store: bool | None = None
    ttl: float = 3600.0
    max_bytes: int = 1 << 20

    @classmethod
    def parse(cls, raw: Any) -> ConversationSettings:
        """Read ``responses:``; raises ``ValueError("responses.field: reason")``."""
        sec = Section(raw if raw is not None else {}, "responses", "")
        try:
            out = cls(
                store=sec.get("store", bool, None),
                ttl=sec.get("ttl", float, 3600.0, lambda v: None if v > 0 else "must be greater than 0"),
                max_bytes=sec.get("max_bytes", int, 1 << 20, lambda v: None if v >= 1024 else "must be at least 1024"),
            )
            sec.finish()
        except ConfigError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
        return out

    def enabled(self, *, per_process: bool) -> bool:
        """Whether responses are kept; ``per_process``: a memory store shared by no other worker.

        Raises ``ValueError("responses.store: ...")`` for ``store: true`` on a per-process store.
        """
        if not per_process:
            return self.store is not False
        if self.store:
            raise ValueError(
                "responses.store: with server.workers above 1 a memory store is per worker, so a follow-up "
                "could miss its conversation: use a shared store (store: redis://...) or set it false"
            )
        return False


@dataclass
class Stored:
    """One stored response: the object as sent, and the conversation items through it."""

    response: dict[str, Any]
    items: list[dict[str, Any]]


def output_as_input(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as input items of the next turn (reasoning items only when they
    carry replayable thinking, in ``encrypted_content``)."""
    items: list[dict[str, Any]] = []
    for item in output:
        kind = item.get("type")
        if kind == "reasoning" and item.get("encrypted_content"):
            items.append({"type": "reasoning", "summary": [], "encrypted_content": item["encrypted_content"]})
        elif kind == "message":
            items.append({"type": "message", "role": "assistant", "content": item.get("content") or []})
        elif kind == "function_call":
            items.append(
                {
                    "type": "function_call",
                    "call_id": item.get("call_id"),
                    "name": item.get("name"),
                    "arguments": item.get("arguments") or "",
                }
            )
    return items


class ConversationStore:
    """Bridged responses in a :class:`~llmproxy.SharedStore` (see the module docstring).

    The methods raise :class:`~llmproxy.StoreUnavailable` when the store is down.
    """

    def __init__(self, store: SharedStore, settings: ConversationSettings) -> None:
        self.store = store
        self.settings = settings

    async def save(self, response: dict[str, Any], items: list[dict[str, Any]], owner: str) -> bool:
        """Keep ``response`` and the conversation ``items`` through it; False when too large."""
        value = orjson.dumps({"owner": owner, "response": response, "items": items})
        if len(value) > self.settings.max_bytes:
            return False
        await self.store.set(_PREFIX + str(response["id"]), value, ttl=self.settings.ttl)
        return True

    async def load(self, response_id: str, owner: str) -> Stored | None:
        """The stored response ``response_id`` of ``owner``, or None (unknown, expired, another owner's)."""
        raw, _ = await self.store.get(_PREFIX + response_id)
        if raw is None:
            return None
        record = orjson.loads(raw)
        if not isinstance(record, Mapping) or record.get("owner") != owner:
            return None
        return Stored(record["response"], record["items"])

    async def delete(self, response_id: str, owner: str) -> bool:
        """Forget ``response_id``; False when ``owner`` has no such response."""
        if await self.load(response_id, owner) is None:
            return False
        return await self.store.delete(_PREFIX + response_id)
