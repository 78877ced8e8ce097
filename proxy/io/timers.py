"""A lazy timer: one loop timer serving a deadline that moves on every request or chunk.

Connections set a new timeout for each request head, keep-alive wait or
upstream chunk. Scheduling and cancelling a loop timer each time costs more
than the work it guards, so :class:`LazyTimer` keeps one handle and:

* ``arm(deadline, on_expiry)`` records the deadline and the callback, and
  schedules only when that deadline is earlier than the pending handle's;
* ``disarm()`` only forgets the callback (the handle fires later and does
  nothing);
* a handle that fires before the current deadline re-schedules itself for it.

So a busy connection costs no timer operation per request or per chunk.
``close()`` cancels the handle for good (it holds a reference to its owner).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["LazyTimer"]


class LazyTimer:
    """One timeout at a time, on ``loop`` time (see the module docstring)."""

    __slots__ = ("_deadline", "_handle", "_handle_at", "_loop", "_on_expiry")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0  # when the pending handle fires
        self._deadline = 0.0  # when the armed timeout expires
        self._on_expiry: Callable[[], None] | None = None

    def arm(self, deadline: float, on_expiry: Callable[[], None]) -> None:
        """Call ``on_expiry`` at ``deadline`` (loop time) unless re-armed or disarmed first."""
        self._deadline = deadline
        self._on_expiry = on_expiry
        handle = self._handle
        if handle is None or self._handle_at > deadline:
            if handle is not None:
                handle.cancel()
            self._handle_at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)

    def disarm(self) -> None:
        """Forget the armed timeout (cheap: the handle stays scheduled, and fires idle)."""
        self._on_expiry = None

    def close(self) -> None:
        """Disarm and cancel the handle."""
        self._on_expiry = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        on_expiry = self._on_expiry
        if on_expiry is None:
            return
        if self._loop.time() < self._deadline:
            self._handle_at = self._deadline
            self._handle = self._loop.call_at(self._deadline, self._fire)
            return
        self._on_expiry = None
        on_expiry()
