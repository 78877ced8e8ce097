"""The worker-local entry store: LRU bounded by entries and bytes, with a TTL per entry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Lru"]

V = TypeVar("V")


class Lru(Generic[V]):
    """``key -> value`` with expiry; inserting past ``max_entries`` or ``max_bytes`` evicts the least recently used.

    A value's size is ``len(value)`` unless :meth:`put` is told it (an object that holds bytes).
    """

    __slots__ = ("_clock", "_items", "bytes", "max_bytes", "max_entries")

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        """The live value of ``key`` (marking it recently used), or None (absent or expired)."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: str, value: V, ttl: float, size: int | None = None) -> bool:
        """Store ``value`` for ``ttl`` seconds; False (nothing stored) when it alone exceeds ``max_bytes``."""
        if size is None:
            size = len(value)  # type: ignore[arg-type]
        if size > self.max_bytes:
            return False
        if key in self._items:
            self._drop(key)
        self._items[key] = (self._clock() + ttl, value, size)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        return True

    def _drop(self, key: str) -> None:
        self.bytes -= self._items.pop(key)[2]
