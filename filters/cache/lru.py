"""The worker-local entry store: LRU bounded by entries and bytes, with a TTL per entry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["Lru"]


class Lru:
    """``key -> bytes`` with expiry; inserting past ``max_entries`` or ``max_bytes`` evicts the least recently used."""

    __slots__ = ("_clock", "_items", "bytes", "max_bytes", "max_entries")

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> bytes | None:
        """The live value of ``key`` (marking it recently used), or None (absent or expired)."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` for ``ttl`` seconds; False (nothing stored) when it alone exceeds ``max_bytes``."""
        if len(value) > self.max_bytes:
            return False
        if key in self._items:
            self._drop(key)
        self._items[key] = (self._clock() + ttl, value)
        self.bytes += len(value)
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        return True

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self.bytes -= len(value)
